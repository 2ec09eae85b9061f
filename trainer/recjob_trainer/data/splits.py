"""Splits that cannot leak, and reproducible negative sampling."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl


def _bucket(key: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_by_group(
    frame: pl.DataFrame, group: str, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, pl.DataFrame]:
    """Assign whole groups (e.g. every pair of a query) to train / validation / test by a
    seeded hash of the group key, so a group never straddles two sides and the assignment
    of a group does not depend on which other groups are present."""
    keys = frame.select(pl.col(group).unique(maintain_order=True)).to_series().to_list()
    side = {}
    for key in keys:
        u = _bucket(str(key), seed)
        side[key] = (
            "test"
            if u < test_fraction
            else ("validation" if u < test_fraction + validation_fraction else "train")
        )
    labelled = frame.with_columns(
        pl.col(group).replace_strict(side, return_dtype=pl.String).alias("_side")
    )
    return {
        name: labelled.filter(pl.col("_side") == name).drop("_side")
        for name in ("train", "validation", "test")
    }


#: The splits, in the order a user's items are laid out when they come from given files.
SIDES = ("train", "validation", "test")


def _side_rank(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with ``_rank``: the position of its ``_side`` in :data:`SIDES`."""
    ranks = {side: n for n, side in enumerate(SIDES)}
    return frame.with_columns(
        pl.col("_side").replace_strict(ranks, return_dtype=pl.Int8).alias("_rank")
    )


def sequences(interactions: pl.DataFrame, order_by: str | None) -> pl.DataFrame:
    """Per user, the items in time order (file order when there is no timestamp):
    (user_id, items: list[str], times: list[int] when ordered by time).

    With a ``_side`` column (interactions read from the validation / test files) a user's
    training items come first, then the validation ones, then the test ones, each in time
    order, and ``sides`` (list[str]) says which split each item came from."""
    frame = interactions.with_row_index("_row")
    keys = ["user_id"]
    if "_side" in frame.columns:
        frame, keys = _side_rank(frame), ["user_id", "_rank"]
    frame = frame.sort([*keys, order_by, "_row"] if order_by else [*keys, "_row"])
    aggs = [pl.col("item_id").alias("items")]
    if order_by:
        aggs.append(pl.col(order_by).alias("times"))
    if "_side" in frame.columns:
        aggs.append(pl.col("_side").alias("sides"))
    return frame.group_by("user_id", maintain_order=True).agg(aggs)


def _examples(
    user: str, items: list[str], start: int, stop: int, history_length: int
) -> list[tuple[str, list[str], str]]:
    return [(user, items[max(0, i - history_length) : i], items[i]) for i in range(start, stop)]


EXAMPLE_SCHEMA = {"user_id": pl.String, "history": pl.List(pl.String), "item_id": pl.String}


def _frame(rows: list[tuple[str, list[str], str]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=EXAMPLE_SCHEMA, orient="row")


def leave_one_out(seqs: pl.DataFrame, history_length: int) -> dict[str, pl.DataFrame]:
    """Last item of each user -> test, the one before -> validation, the rest -> train
    (every prefix a training example). Users with fewer than 3 items only train."""
    train, valid, test = [], [], []
    for user, items in seqs.select("user_id", "items").iter_rows():
        n = len(items)
        if n < 3:
            train += _examples(user, items, 1, n, history_length)
            continue
        train += _examples(user, items, 1, n - 2, history_length)
        valid += _examples(user, items, n - 2, n - 1, history_length)
        test += _examples(user, items, n - 1, n, history_length)
    return {"train": _frame(train), "validation": _frame(valid), "test": _frame(test)}


def by_time(
    seqs: pl.DataFrame, history_length: int, validation_fraction: float, test_fraction: float
) -> dict[str, pl.DataFrame]:
    """Global time cut-offs: targets in the last ``test_fraction`` of time -> test, the
    slice before -> validation, earlier -> train. Histories only hold earlier items, so no
    example sees the future of its split."""
    times = np.concatenate([np.asarray(t) for t in seqs["times"].to_list()])
    t_valid, t_test = np.quantile(
        times, [1 - validation_fraction - test_fraction, 1 - test_fraction]
    )
    out: dict[str, list] = {"train": [], "validation": [], "test": []}
    for user, items, ts in seqs.select("user_id", "items", "times").iter_rows():
        for i in range(1, len(items)):
            side = "test" if ts[i] > t_test else "validation" if ts[i] > t_valid else "train"
            out[side] += _examples(user, items, i, i + 1, history_length)
    return {name: _frame(rows) for name, rows in out.items()}


def given_splits(
    seqs: pl.DataFrame, history_length: int, carve: str | None, validation_fraction: float
) -> dict[str, pl.DataFrame]:
    """Examples from given held-out files (``seqs`` from :func:`sequences` with ``sides``):
    each validation / test item is an example whose history is everything the user did
    before it: their training items, then earlier held-out ones (a training example's
    history never holds a held-out item). Held-out items of a user without training items
    have an empty history (cold users); training examples need one earlier item.

    With ``carve`` (no validation file) validation is carved from the training items:
    "leave-one-out", each user's last one (users with at least 2); "by-time", those after
    the ``1 - validation_fraction`` quantile of the training items' times."""
    cut = None
    if carve == "by-time":
        train_times = [
            t
            for ts, sides in zip(seqs["times"].to_list(), seqs["sides"].to_list(), strict=True)
            for t, side in zip(ts, sides, strict=True)
            if side == "train"
        ]
        cut = float(np.quantile(train_times, 1 - validation_fraction)) if train_times else None
    out: dict[str, list] = {side: [] for side in SIDES}
    columns = ["user_id", "items", "sides", *(["times"] if "times" in seqs.columns else [])]
    for row in seqs.select(columns).iter_rows(named=True):
        user, items, sides = row["user_id"], row["items"], list(row["sides"])
        n_train = sides.count("train")
        if carve == "by-time" and cut is not None:
            sides = [
                "validation" if side == "train" and t > cut else side
                for side, t in zip(sides, row["times"], strict=True)
            ]
        elif carve is not None and n_train >= 2:  # leave-one-out
            sides[n_train - 1] = "validation"
        for i, side in enumerate(sides):
            if side != "train" or i > 0:
                out[side] += _examples(user, items, i, i + 1, history_length)
    return {name: _frame(rows) for name, rows in out.items()}


def sample_negatives(
    targets: list[str],
    histories: list[list[str]],
    catalog: list[str],
    popularity: dict[str, float] | None,
    per_positive: int,
    seed: int,
) -> list[list[str]]:
    """``per_positive`` negatives per example, never the target nor an item in the user's
    history; uniform over the catalog or proportional to popularity**0.75 (word2vec's
    smoothing). The same seed gives the same negatives."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(catalog)
    if popularity is not None:
        weights = np.array([popularity.get(i, 0.0) for i in catalog], dtype=np.float64) ** 0.75
        weights = weights + 1e-12
        probs = weights / weights.sum()
    else:
        probs = None
    out = []
    catalog_set = set(catalog)
    for target, history in zip(targets, histories, strict=True):
        banned = set(history) | {target}
        if len(catalog_set - banned) < per_positive:
            raise ValueError(
                f"cannot sample {per_positive} negatives: the catalog has only "
                f"{len(catalog_set - banned)} item(s) outside a user's history"
            )
        chosen: dict[str, None] = {}  # insertion-ordered set
        while len(chosen) < per_positive:
            for d in rng.choice(ids, size=per_positive * 2, p=probs).tolist():
                if d not in banned:
                    chosen[d] = None
        out.append(list(chosen)[:per_positive])
    return out


LABELLED_SCHEMA = {**EXAMPLE_SCHEMA, "label": pl.Float64}


def labelled_examples(
    impressions: pl.DataFrame,
    order_by: str | None,
    history_length: int,
    strategy: str | None,
    validation_fraction: float,
    test_fraction: float,
    carve_validation: bool = False,
) -> dict[str, pl.DataFrame]:
    """Labelled impressions (user, item, click) -> examples whose history is the user's
    earlier *clicked* items. Split by time (global cut-offs) or leave-one-out per user
    (last impression -> test, the one before -> validation).

    With a ``_side`` column (impressions read from the validation / test files) every row
    keeps its side and a user's training impressions come first, so no training history
    holds a held-out click; with ``carve_validation`` validation is carved from the
    training rows by ``strategy`` (by-time: after the ``1 - validation_fraction`` quantile
    of their times; else each user's last one, users with at least 2)."""
    frame = impressions.with_row_index("_row")
    keys = ["user_id"]
    given = "_side" in frame.columns
    if given:
        frame, keys = _side_rank(frame), ["user_id", "_rank"]
    frame = frame.sort([*keys, order_by, "_row"] if order_by else [*keys, "_row"])
    rows, sides = [], []
    times = frame[order_by].to_list() if order_by else [0.0] * frame.height
    given_sides = frame["_side"].to_list() if given else []
    if given and carve_validation and strategy == "by-time":
        train_times = [t for t, side in zip(times, given_sides, strict=True) if side == "train"]
        t_valid = (
            np.quantile(np.asarray(train_times, dtype=np.float64), 1 - validation_fraction)
            if train_times
            else np.inf
        )
    elif strategy == "by-time" and not given:
        t_valid, t_test = np.quantile(
            np.asarray(times, dtype=np.float64),
            [1 - validation_fraction - test_fraction, 1 - test_fraction],
        )
    users = frame["user_id"].to_list()
    items, labels = frame["item_id"].to_list(), frame["label"].to_list()
    start = 0
    while start < len(users):
        end = start
        while end < len(users) and users[end] == users[start]:
            end += 1
        clicked: list[str] = []
        n_train = given_sides[start:end].count("train") if given else 0
        for i in range(start, end):
            rows.append((users[i], clicked[-history_length:], items[i], float(labels[i])))
            if given:
                side = given_sides[i]
                if side == "train" and carve_validation:
                    carved = (
                        times[i] > t_valid
                        if strategy == "by-time"
                        else i == start + n_train - 1 and n_train >= 2
                    )
                    side = "validation" if carved else side
                sides.append(side)
            elif strategy == "by-time":
                sides.append(
                    "test" if times[i] > t_test else "validation" if times[i] > t_valid else "train"
                )
            else:
                last = end - 1 - i
                sides.append(
                    "test"
                    if last == 0 and end - start >= 3
                    else "validation"
                    if last == 1 and end - start >= 3
                    else "train"
                )
            if labels[i] > 0:
                clicked.append(items[i])
        start = end
    out = pl.DataFrame(rows, schema=LABELLED_SCHEMA, orient="row").with_columns(
        pl.Series("_side", sides)
    )
    return {
        name: out.filter(pl.col("_side") == name).drop("_side")
        for name in ("train", "validation", "test")
    }
