"""Data preparation: read, clean, split and write the prepared data of a run.

Search-ranking data becomes (query, item_id, item_text, label) pairs split by query;
recommendation data becomes (user_id, history, item_id) next-item examples plus a catalog
(item_id, item_text). The prepared splits, the quarantine and a report with the counts of
every step are written under ``<run>/data/``; their digest is the data snapshot.
The search half is here; ``prepare_recommendation.py`` has the recommendation half and
``prepared.py`` the result and its files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from recjob_operator.api.v1alpha1.spec_data import DataSpec
from recjob_operator.api.v1alpha1.spec_training import ModelSpec

from .cleaning import (
    CleaningLog,
    cast_numbers,
    dedup_pairs,
    handle_missing,
    near_duplicate_groups,
    normalize_text,
)
from .prepare_recommendation import prepare_atomic, prepare_interactions
from .prepared import SPLITS, PreparedData, write_prepared
from .readers import (
    DataError,
    column,
    column_name,
    read_table,
)
from .splits import (
    split_by_group,
)


def prepare(data: DataSpec, model: ModelSpec, base_dir: str | Path | None) -> PreparedData:
    """Read, clean and split the RecJob's data (in memory)."""
    if data.task == "search-ranking":
        prepared = _prepare_search(data, base_dir)
    elif data.format == "atomic":
        prepared = prepare_atomic(data, model, base_dir)
    else:
        prepared = prepare_interactions(data, model, base_dir)
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


def ensure_prepared(
    data: DataSpec, model: ModelSpec, base_dir: str | Path | None, directory: Path
) -> None:
    """Prepare ``data`` into ``directory`` unless a complete preparation is already there
    (``report.json`` is written last): a restarted run reuses it."""
    if not (directory / "report.json").exists():
        write_prepared(prepare(data, model, base_dir), directory)


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
