"""Recommendation data preparation: interactions (or a RecBole atomic dataset) become
(user_id, history, item_id) next-item examples split without leakage, plus a cleaned
catalog (item_id, item_text) and, where given, candidate lists."""

from __future__ import annotations

import polars as pl

from recjob_operator.api.v1alpha1.spec_data import DataSpec
from recjob_operator.api.v1alpha1.spec_training import ModelSpec

from .cleaning import (
    CleaningLog,
    cast_numbers,
    cast_timestamps,
    handle_missing,
    k_core,
    near_duplicate_groups,
    normalize_text,
)
from .prepared import PreparedData
from .readers import (
    DataError,
    column,
    column_name,
    read_atomic_catalog,
    read_atomic_inter,
    read_candidates,
    read_table,
)
from .splits import (
    by_time,
    given_splits,
    labelled_examples,
    leave_one_out,
    sequences,
)


def _clean_catalog(
    catalog: pl.DataFrame, data: DataSpec, source: str, log: CleaningLog
) -> tuple[pl.DataFrame, dict[str, str]]:
    """Normalised catalog without missing texts; near-duplicate items mapped to one id."""
    pre = data.preprocessing
    catalog = handle_missing(catalog, ["item_id", "item_text"], pre.missing_values, log, source)
    catalog = catalog.with_columns(normalize_text("item_text", pre.text_normalization))
    before = catalog.height
    catalog = catalog.unique("item_id", keep="first", maintain_order=True)
    log.record("catalog duplicate ids", before, catalog.height)
    mapping: dict[str, str] = {}
    if pre.deduplicate.near:
        ids = catalog["item_id"].to_list()
        roots = near_duplicate_groups(
            catalog["item_text"].to_list(), pre.deduplicate.near_threshold
        )
        mapping = {ids[i]: ids[r] for i, r in enumerate(roots) if r != i}
        catalog = catalog.filter(~pl.col("item_id").is_in(list(mapping)))
        log.record(
            "catalog near duplicates",
            len(ids),
            catalog.height,
            f"{len(mapping)} item(s) merged into a near-identical one",
        )
    return catalog, mapping


def _map_items(frame: pl.DataFrame, mapping: dict[str, str]) -> pl.DataFrame:
    if not mapping:
        return frame
    return frame.with_columns(
        pl.col("item_id").replace(mapping),
        pl.col("history").list.eval(pl.element().replace(mapping)),
    )


def _drop_unknown_items(
    frame: pl.DataFrame, known: set[str], source: str, log: CleaningLog, step: str
) -> pl.DataFrame:
    known_list = list(known)
    bad = frame.filter(~pl.col("item_id").is_in(known_list))
    log.quarantine(bad, source, "target item is not in the catalog (or has no text)")
    out = frame.filter(pl.col("item_id").is_in(known_list)).with_columns(
        pl.col("history").list.eval(pl.element().filter(pl.element().is_in(known_list)))
    )
    log.record(step, frame.height, out.height, f"{bad.height} example(s) quarantined")
    return out


def prepare_atomic(data: DataSpec, model: ModelSpec, base_dir) -> PreparedData:
    """A RecBole atomic dataset (``.inter`` interactions + ``.item`` catalog): its
    sequences become next-item examples, split as preprocessing.split says."""
    log = CleaningLog()
    pre = data.preprocessing
    if data.catalog is None:  # validation refuses it; a hand-made trainer config may not
        raise ValueError(
            "data.catalog: the atomic format needs the item texts (the .text file); a "
            "federated silo reads only its own files, so each silo needs its own catalog"
        )
    raw_catalog = read_atomic_catalog(
        data.catalog, base_dir, data.columns, data.item_index, log=log
    )
    catalog, mapping = _clean_catalog(raw_catalog, data, data.catalog, log)
    known = set(catalog["item_id"].to_list())
    splits: dict[str, pl.DataFrame] = {}
    for name, uri in (("train", data.train), ("validation", data.validation), ("test", data.test)):
        if uri is None:
            splits[name] = pl.DataFrame(
                schema={"user_id": pl.String, "history": pl.List(pl.String), "item_id": pl.String}
            )
            continue
        frame = read_atomic_inter(uri, base_dir, data.columns)
        if name == "train" and pre.max_rows:
            frame = frame.head(pre.max_rows)
        log.record(f"read {uri}", frame.height, frame.height)
        frame = _map_items(frame, mapping)
        frame = _drop_unknown_items(frame, known, uri, log, f"{name}: items in catalog")
        splits[name] = frame
    if data.validation is None and data.test is not None:
        splits["train"], splits["validation"] = _carve_last_examples(splits["train"], log)
    if pre.min_user_interactions > 0:
        lengths = (
            pl.concat(
                [
                    s.select("user_id", (pl.col("history").list.len() + 1).alias("n"))
                    for s in splits.values()
                ]
            )
            .group_by("user_id")
            .agg(pl.col("n").max())
        )
        keep = lengths.filter(pl.col("n") >= pre.min_user_interactions)["user_id"]
        for name, frame in splits.items():
            out = frame.filter(pl.col("user_id").is_in(keep.to_list()))
            log.record(
                f"{name}: users with >= {pre.min_user_interactions} interactions",
                frame.height,
                out.height,
            )
            splits[name] = out
    if data.validation is None and data.test is None:
        raise DataError(
            data.train,
            "the atomic format needs held-out .inter files: spec.data.test (and "
            "spec.data.validation, else validation is carved from the training file)",
        )
    splits = {
        name: frame.with_columns(pl.col("history").list.tail(model.history_length))
        for name, frame in splits.items()
    }
    _attach_candidates(splits, data, base_dir, log, known, mapping)
    return PreparedData("recommendation", splits, catalog, log)


def _carve_last_examples(
    train: pl.DataFrame, log: CleaningLog
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Atomic training examples -> (train, validation): each user's example with the
    longest history (the last in the file among equals) is validation, for users with at
    least 2 examples (leave-one-out on pre-built sequences)."""
    ranked = (
        train.with_row_index("_row")
        .with_columns(pl.col("history").list.len().alias("_len"))
        .sort(["user_id", "_len", "_row"])
        .with_columns(
            (pl.col("user_id").is_last_distinct() & (pl.len().over("user_id") >= 2)).alias(
                "_validation"
            )
        )
        .sort("_row")
    )
    keep = train.columns
    out = (
        ranked.filter(~pl.col("_validation")).select(keep),
        ranked.filter(pl.col("_validation")).select(keep),
    )
    log.record(
        "validation carved from train (each user's last example)",
        train.height,
        train.height,
        f"train={out[0].height}, validation={out[1].height}",
    )
    return out


def _read_interactions(
    uri: str, data: DataSpec, base_dir, log: CleaningLog, max_rows: int | None, prefix: str = ""
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(raw table, cleaned interactions: user_id, item_id[, timestamp][, event_type][, label])
    of one interaction log; ``prefix`` names the split in the step counts."""
    pre, cols = data.preprocessing, data.columns
    raw = read_table(uri, data.format, base_dir, max_rows)
    select = [
        column(raw, uri, "userId", cols.user_id).alias("user_id"),
        column(raw, uri, "itemId", cols.item_id).alias("item_id"),
    ]
    for role, spec, name in (
        ("timestamp", cols.timestamp, "timestamp"),
        ("eventType", cols.event_type, "event_type"),
        ("label", cols.label, "label"),
    ):
        if spec:
            select.append(pl.col(column_name(raw, uri, role, spec)).alias(name))
    frame = raw.select(select)
    log.record(f"read {uri}", frame.height, frame.height)
    frame = handle_missing(frame, frame.columns, pre.missing_values, log, uri)
    if "timestamp" in frame.columns:
        frame = cast_timestamps(frame, "timestamp", log, uri)
    if "label" in frame.columns:
        frame = cast_numbers(frame, "label", log, uri)
    if cols.event_type and pre.positive_events:
        before = frame.height
        frame = frame.filter(pl.col("event_type").is_in(pre.positive_events))
        log.record(
            f"{prefix}positive events",
            before,
            frame.height,
            f"kept {', '.join(pre.positive_events)}",
        )
    if pre.deduplicate.exact and "label" not in frame.columns:
        before = frame.height
        frame = frame.unique(maintain_order=True)
        log.record(f"{prefix}exact duplicates", before, frame.height)
    return raw, frame


def prepare_interactions(data: DataSpec, model: ModelSpec, base_dir) -> PreparedData:
    """Generic interaction logs (user, item[, time][, event][, click label]) + a catalog.

    Without held-out files the splits are carved by preprocessing.split; with them (given
    validation and/or test logs, same columns) every held-out interaction is an example
    whose history is the user's earlier interactions (training ones first), and without a
    validation file validation is carved from the training log by the split strategy."""
    log = CleaningLog()
    pre, cols = data.preprocessing, data.columns
    raw, frame = _read_interactions(data.train, data, base_dir, log, pre.max_rows)
    held = {
        name: (uri, _read_interactions(uri, data, base_dir, log, None, f"{name}: ")[1])
        for name, uri in (("validation", data.validation), ("test", data.test))
        if uri is not None
    }
    source = data.catalog or data.train
    raw_catalog = read_table(data.catalog, data.format, base_dir) if data.catalog else raw
    catalog = raw_catalog.select(
        column(raw_catalog, source, "itemId", cols.item_id).alias("item_id"),
        column(raw_catalog, source, "itemText", cols.item_text).alias("item_text"),
    )
    catalog, mapping = _clean_catalog(catalog, data, source, log)
    known = catalog["item_id"].to_list()

    def in_catalog(frame: pl.DataFrame, uri: str) -> pl.DataFrame:
        if mapping:
            frame = frame.with_columns(pl.col("item_id").replace(mapping))
        log.quarantine(
            frame.filter(~pl.col("item_id").is_in(known)),
            uri,
            "item is not in the catalog (or has no text)",
        )
        return frame.filter(pl.col("item_id").is_in(known))

    frame = in_catalog(frame, data.train)
    if held:
        frame = pl.concat(
            [
                frame.with_columns(pl.lit("train").alias("_side")),
                *(
                    in_catalog(f, uri).with_columns(pl.lit(name).alias("_side"))
                    for name, (uri, f) in held.items()
                ),
            ],
            how="vertical_relaxed",
        )
    frame = k_core(
        frame, "user_id", "item_id", pre.min_user_interactions, pre.min_item_interactions, log
    )
    split = pre.split
    order = "timestamp" if cols.timestamp else None
    strategy = split.strategy if split.strategy in ("leave-one-out", "by-time") else None
    if held:
        carve = None if data.validation is not None else strategy or "leave-one-out"
        if "label" in frame.columns:
            splits = labelled_examples(
                frame,
                order,
                model.history_length,
                carve,
                split.validation_fraction,
                split.test_fraction,
                carve_validation=carve is not None,
            )
        else:
            splits = given_splits(
                sequences(frame, order), model.history_length, carve, split.validation_fraction
            )
        step = "split predefined" + (
            f" (validation carved from train: {carve})" if carve is not None else ""
        )
    else:
        if "label" in frame.columns:
            splits = labelled_examples(
                frame,
                order,
                model.history_length,
                split.strategy,
                split.validation_fraction,
                split.test_fraction,
            )
        elif split.strategy == "by-time":
            splits = by_time(
                sequences(frame, order),
                model.history_length,
                split.validation_fraction,
                split.test_fraction,
            )
        else:
            splits = leave_one_out(sequences(frame, order), model.history_length)
        step = f"split {split.strategy or 'leave-one-out'}"
    log.record(
        step,
        frame.height,
        sum(s.height for s in splits.values()),
        ", ".join(f"{k}={v.height}" for k, v in splits.items()),
    )
    _attach_candidates(splits, data, base_dir, log, set(known), mapping)
    return PreparedData("recommendation", splits, catalog, log)


def _attach_candidates(
    splits: dict[str, pl.DataFrame],
    data: DataSpec,
    base_dir,
    log: CleaningLog,
    known: set[str],
    mapping: dict[str, str],
) -> None:
    """Give the test split a ``candidates`` column (list[str], null for rows without a
    list) from spec.data.candidates: rows matched by user, or by user and true item when
    the file has the item column. Ids go through the catalog's near-duplicate merges; an
    id the prepared catalog lacks, or two lists for one key, is a DataError."""
    uri = data.candidates
    if uri is None:
        return
    lists = read_candidates(uri, data.format, base_dir, data.columns)
    keys = ["user_id", "item_id"] if "item_id" in lists.columns else ["user_id"]
    matched_on = "user and true item" if "item_id" in keys else "user"
    if mapping:
        lists = lists.with_columns(
            pl.col("candidates").list.eval(pl.element().replace(mapping)),
            *([pl.col("item_id").replace(mapping)] if "item_id" in keys else []),
        )
    lists = lists.with_columns(pl.col("candidates").list.unique(maintain_order=True))
    shared = lists.filter(pl.struct(keys).is_duplicated())
    if shared.height:
        key = " and ".join(f"{k.removesuffix('_id')} {shared[k][0]!r}" for k in keys)
        hint = (
            ""
            if "item_id" in keys
            else " (with the item column, spec.data.columns.itemId, a list is per test row)"
        )
        raise DataError(
            uri,
            f"{shared.height} rows share their key: {key} has more than one candidate list{hint}",
        )
    ids = lists["candidates"].explode().drop_nulls().unique(maintain_order=True)
    unknown = ids.filter(~ids.is_in(list(known)))
    if unknown.len():
        raise DataError(
            uri,
            f"{unknown.len()} candidate item id(s) are not in the prepared catalog (e.g. "
            f"{unknown[0]!r}): ids must be the test file's; an item the catalog "
            f"{data.catalog or data.train} lacks, or that cleaning removed (see the "
            "quarantine), cannot be ranked",
        )
    test = splits["test"]
    joined = test.join(lists, on=keys, how="left", maintain_order="left")
    listed = joined.filter(pl.col("candidates").is_not_null())
    if listed.height == 0:
        example = f"; e.g. test user {test['user_id'][0]!r}" if test.height else ""
        raise DataError(
            uri,
            f"no test row has a candidate list (matched on {matched_on}: "
            f"e.g. user {lists['user_id'][0]!r} in this file{example})",
        )
    hits = int(listed.select(pl.col("candidates").list.contains(pl.col("item_id")).sum()).item())
    unused = lists.join(test.select(keys).unique(), on=keys, how="anti").height
    sizes = listed["candidates"].list.len()
    log.record(
        f"test: candidate lists from {uri}",
        test.height,
        test.height,
        f"{listed.height} test row(s) with a list (matched on {matched_on}), "
        f"{test.height - listed.height} without; {listed.height - hits} list(s) without "
        f"the true item (misses); {unused} list(s) for no test row; {sizes.min()}-"
        f"{sizes.max()} items a list",
    )
    splits["test"] = joined
