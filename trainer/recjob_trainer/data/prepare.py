"""Data preparation: read, clean, split and write the prepared data of a run.

Search-ranking data becomes (query, item_id, item_text, label) pairs split by query;
recommendation data becomes (user_id, history, item_id) next-item examples plus a catalog
(item_id, item_text). The prepared splits, the quarantine and a report with the counts of
every step are written under ``<run>/data/``; their digest is the data snapshot.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recjob_operator.api.v1alpha1.spec_data import DataSpec
from recjob_operator.api.v1alpha1.spec_training import ModelSpec

from ..storage import atomic_directory, write_json_atomic
from .cleaning import (
    CleaningLog,
    cast_numbers,
    cast_timestamps,
    dedup_pairs,
    handle_missing,
    k_core,
    near_duplicate_groups,
    normalize_text,
)
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
    split_by_group,
)

SPLITS = ("train", "validation", "test")


@dataclass
class PreparedData:
    """The prepared splits of one run."""

    task: str
    splits: dict[str, pl.DataFrame]
    catalog: pl.DataFrame | None
    log: CleaningLog = field(default_factory=CleaningLog)
    digest: str = ""
    #: Facts about the training split every rank needs without reading it (label range).
    train_summary: dict = field(default_factory=dict)
    #: Training interactions per item (recommendation), for popularity negatives.
    popularity: dict[str, float] | None = None

    def report(self) -> dict:
        """Counts per step and per split, the quarantine size and the digest."""
        return {
            "task": self.task,
            "digest": self.digest,
            "rows": {name: frame.height for name, frame in self.splits.items()},
            "catalog_items": self.catalog.height if self.catalog is not None else None,
            "quarantined": self.log.quarantine_frame().height,
            "steps": self.log.to_dicts(),
            "train": summarize_train(self.splits["train"]),
        }


def summarize_train(train: pl.DataFrame) -> dict:
    """Row count and label range of the training split."""
    summary: dict = {"rows": train.height, "labelled": "label" in train.columns}
    if "label" in train.columns and train.height:
        summary.update(
            label_min=float(train["label"].min()),
            label_max=float(train["label"].max()),
            label_distinct=int(train["label"].n_unique()),
        )
    return summary


def prepare(data: DataSpec, model: ModelSpec, base_dir: str | Path | None) -> PreparedData:
    """Read, clean and split the RecJob's data (in memory)."""
    if data.task == "search-ranking":
        prepared = _prepare_search(data, base_dir)
    elif data.format == "atomic":
        prepared = _prepare_atomic(data, model, base_dir)
    else:
        prepared = _prepare_interactions(data, model, base_dir)
    for name, frame in prepared.splits.items():
        if name == "train" and frame.height == 0:
            raise DataError(
                data.train,
                "no training rows are left after cleaning and splitting "
                "(see the quarantine and the step counts)",
            )
    prepared.digest = _digest(prepared)
    return prepared


def _digest(prepared: PreparedData) -> str:
    h = hashlib.sha256()
    frames = [prepared.splits[s] for s in SPLITS]
    if prepared.catalog is not None:
        frames.append(prepared.catalog)
    for frame in frames:
        h.update(hashlib.sha256(frame.write_ndjson().encode()).digest())
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- search
def _read_pairs(
    uri: str, data: DataSpec, base_dir, log: CleaningLog, max_rows: int | None
) -> pl.DataFrame:
    cols = data.columns
    raw = read_table(uri, data.format, base_dir, max_rows)
    text = column(raw, uri, "itemText", cols.item_text)
    frame = raw.select(
        column(raw, uri, "query", cols.query).alias("query"),
        (
            column(raw, uri, "itemId", cols.item_id)
            if cols.item_id
            else text.hash().cast(pl.String)
        ).alias("item_id"),
        text.alias("item_text"),
        pl.col(column_name(raw, uri, "label", cols.label)).alias("label"),
    )
    log.record(f"read {uri}", frame.height, frame.height)
    frame = handle_missing(
        frame, ["query", "item_text", "label"], data.preprocessing.missing_values, log, uri
    )
    if frame.schema["label"] == pl.String:
        frame = cast_numbers(frame, "label", log, uri)
    else:
        frame = frame.with_columns(pl.col("label").cast(pl.Float64))
    opts = data.preprocessing.text_normalization
    return frame.with_columns(normalize_text("query", opts), normalize_text("item_text", opts))


def _prepare_search(data: DataSpec, base_dir) -> PreparedData:
    log = CleaningLog()
    pre = data.preprocessing
    frame = _read_pairs(data.train, data, base_dir, log, pre.max_rows)
    frame = _dedup_search(frame, data, log)
    if data.validation is not None or data.test is not None:
        if data.validation is not None:
            splits = {
                "train": frame,
                "validation": _dedup_search(
                    _read_pairs(data.validation, data, base_dir, log, None), data, log
                ),
            }
        else:  # a test file alone: validation is carved from train, by query
            split = pre.split
            carved = split_by_group(frame, "query", split.validation_fraction, 0.0, split.seed)
            splits = {"train": carved["train"], "validation": carved["validation"]}
            log.record(
                "split by query (validation carved from train)",
                frame.height,
                carved["train"].height + carved["validation"].height,
                f"train={carved['train'].height}, validation={carved['validation'].height}; "
                f"test: {data.test}",
            )
        splits["test"] = (
            _dedup_search(_read_pairs(data.test, data, base_dir, log, None), data, log)
            if data.test
            else splits["validation"].clear()
        )
        _check_disjoint_queries(splits, data)
    else:
        split = pre.split
        splits = split_by_group(
            frame, "query", split.validation_fraction, split.test_fraction, split.seed
        )
        log.record(
            "split by query",
            frame.height,
            sum(s.height for s in splits.values()),
            ", ".join(f"{k}={v.height}" for k, v in splits.items()),
        )
    return PreparedData("search-ranking", splits, None, log)


def _dedup_search(frame: pl.DataFrame, data: DataSpec, log: CleaningLog) -> pl.DataFrame:
    pre = data.preprocessing
    if pre.deduplicate.exact:
        frame = dedup_pairs(frame, ["query", "item_id"], "label", log)
    if pre.deduplicate.near:
        keep = []
        for group in frame.partition_by("query", maintain_order=True):
            roots = near_duplicate_groups(
                group["item_text"].to_list(), pre.deduplicate.near_threshold
            )
            keep.append(group.filter(pl.Series([r == i for i, r in enumerate(roots)])))
        out = pl.concat(keep) if keep else frame
        log.record(
            "near duplicates (per query)",
            frame.height,
            out.height,
            f"Jaccard >= {pre.deduplicate.near_threshold}",
        )
        frame = out
    return frame


def _check_disjoint_queries(splits: dict[str, pl.DataFrame], data: DataSpec) -> None:
    queries = {name: set(frame["query"].to_list()) for name, frame in splits.items()}
    for name, earlier in (("validation", "train"), ("test", "train"), ("test", "validation")):
        shared = queries[earlier] & queries[name]
        if shared:
            uri = data.validation if name == "validation" else data.test
            where = "training" if earlier == "train" else "validation"
            raise DataError(
                str(uri),
                f"{len(shared)} quer(ies) also appear in the {where} "
                f"data (e.g. {sorted(shared)[0]!r}): held-out data would leak",
                column=data.columns.query,
            )


# --------------------------------------------------------------------------- recommendation
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


def _prepare_atomic(data: DataSpec, model: ModelSpec, base_dir) -> PreparedData:
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


def _prepare_interactions(data: DataSpec, model: ModelSpec, base_dir) -> PreparedData:
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


# --------------------------------------------------------------------------- on disk
def write_prepared(prepared: PreparedData, directory: Path) -> None:
    """Write the prepared data atomically (a reader never sees half of it)."""
    with atomic_directory(directory) as tmp:
        for name, frame in prepared.splits.items():
            frame.write_parquet(tmp / f"{name}.parquet")
        if prepared.catalog is not None:
            prepared.catalog.write_parquet(tmp / "catalog.parquet")
        prepared.log.quarantine_frame().write_parquet(tmp / "quarantine.parquet")
        if "item_id" in prepared.splits["train"].columns and prepared.task == "recommendation":
            prepared.splits["train"]["item_id"].value_counts().write_parquet(
                tmp / "popularity.parquet"
            )
        write_json_atomic(tmp / "report.json", prepared.report())


def ensure_prepared(
    data: DataSpec, model: ModelSpec, base_dir: str | Path | None, directory: Path
) -> None:
    """Prepare ``data`` into ``directory`` unless a complete preparation is already there
    (``report.json`` is written last): a restarted run reuses it."""
    if not (directory / "report.json").exists():
        write_prepared(prepare(data, model, base_dir), directory)


def read_prepared(directory: Path, splits: tuple[str, ...] = SPLITS) -> PreparedData:
    """Read what :func:`write_prepared` wrote (only the named splits: a training rank reads
    its own shard, not the whole training split)."""
    report = json.loads((directory / "report.json").read_text())
    frames = {name: pl.read_parquet(directory / f"{name}.parquet") for name in splits}
    catalog_path = directory / "catalog.parquet"
    catalog = pl.read_parquet(catalog_path) if catalog_path.exists() else None
    popularity_path = directory / "popularity.parquet"
    popularity = (
        {str(k): float(v) for k, v in pl.read_parquet(popularity_path).rows()}
        if popularity_path.exists()
        else None
    )
    return PreparedData(
        report["task"],
        frames,
        catalog,
        digest=report["digest"],
        train_summary=report["train"],
        popularity=popularity,
    )
