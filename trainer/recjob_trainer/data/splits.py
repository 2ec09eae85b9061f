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


def sequences(interactions: pl.DataFrame, order_by: str | None) -> pl.DataFrame:
    """Per user, the items in time order (file order when there is no timestamp):
    (user_id, items: list[str], times: list[int] when ordered by time)."""
    frame = interactions.with_row_index("_row")
    sort_cols = ["user_id", order_by, "_row"] if order_by else ["user_id", "_row"]
    frame = frame.sort(sort_cols)
    aggs = [pl.col("item_id").alias("items")]
    if order_by:
        aggs.append(pl.col(order_by).alias("times"))
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
) -> dict[str, pl.DataFrame]:
    """Labelled impressions (user, item, click) -> examples whose history is the user's
    earlier *clicked* items. Split by time (global cut-offs) or leave-one-out per user
    (last impression -> test, the one before -> validation)."""
    frame = impressions.with_row_index("_row")
    frame = frame.sort(["user_id", order_by, "_row"] if order_by else ["user_id", "_row"])
    rows, sides = [], []
    times = frame[order_by].to_list() if order_by else [0.0] * frame.height
    if strategy == "by-time":
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
        for i in range(start, end):
            rows.append((users[i], clicked[-history_length:], items[i], float(labels[i])))
            if strategy == "by-time":
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
