"""Readers for the log formats RecJob understands, returning polars frames.

Every error names the file (as the user wrote it) and, where it applies, the column.
Values are read as text first so that bad values can be quarantined rather than guessed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from recjob_operator.api.v1alpha1.spec_data import ATOMIC_COLUMNS, ColumnMapping
from recjob_operator.api.v1alpha1.uris import with_suffix

from ..storage import StorageError, StorageNotFound, open_uri, resolve

if TYPE_CHECKING:
    from .cleaning import CleaningLog


class DataError(ValueError):
    """Bad input data: which file, which column, what was expected."""

    def __init__(self, source: str, message: str, column: str | None = None):
        self.source, self.column = source, column
        where = f"{source}: column {column!r}: " if column else f"{source}: "
        super().__init__(where + message)


def read_table(
    uri: str,
    fmt: str,
    base_dir: str | Path | None = None,
    max_rows: int | None = None,
    tabs: bool | None = None,
) -> pl.DataFrame:
    """Read a csv / tsv / parquet / jsonl table; csv columns all come back as text. A csv
    is tab-separated when ``tabs`` says so (None: when named .tsv, .inter or .text)."""
    try:
        with open_uri(uri, "rb", base_dir) as handle:
            raw = handle.read()
    except StorageError as error:
        raise DataError(uri, f"cannot read ({error})") from error
    if not raw.strip():
        raise DataError(uri, "the file is empty")
    try:
        if fmt == "csv":
            if tabs is None:
                tabs = resolve(uri, base_dir).endswith((".tsv", ".inter", ".text"))
            frame = pl.read_csv(
                io.BytesIO(raw),
                infer_schema=False,
                separator="\t" if tabs else ",",
                quote_char=None if tabs else '"',
                n_rows=max_rows,
                encoding="utf8-lossy",
            )
        elif fmt == "parquet":
            frame = pl.read_parquet(io.BytesIO(raw), n_rows=max_rows)
        elif fmt == "jsonl":
            frame = pl.read_ndjson(io.BytesIO(raw), n_rows=max_rows)
        else:
            raise DataError(uri, f"unsupported format {fmt!r} (expected csv, parquet or jsonl)")
    except DataError:
        raise
    except Exception as error:  # polars raises many kinds of parse errors
        raise DataError(uri, f"cannot parse as {fmt}: {error}") from error
    if frame.height == 0:
        raise DataError(uri, "the file has a header but no rows")
    return frame


def _found(frame: pl.DataFrame) -> str:
    names = frame.columns
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    return ", ".join(names[:20]) + more


def require_columns(
    frame: pl.DataFrame, source: str, mapping: dict[str, str | None], note: str = ""
) -> None:
    """Raise DataError naming the first mapped column missing from ``frame``, the field that
    names it (``note``: where the name came from, e.g. a format's default) and the columns
    the file has."""
    for role, column in mapping.items():
        if column is None:
            raise DataError(source, f"no column is mapped for {role} (spec.data.columns.{role})")
        if column not in frame.columns:
            raise DataError(
                source,
                f"missing (needed as {role}: spec.data.columns.{role}{note}); "
                f"the file has {_found(frame)}",
                column=column,
            )


def atomic_columns(columns: ColumnMapping) -> dict[str, tuple[str, str]]:
    """Role -> (column name, note for errors) of the atomic format: the RecJob's
    spec.data.columns, else RecBole's names."""
    given = columns.model_dump(by_alias=True)
    return {
        role: (given[role], "") if given.get(role) else (default, ", the atomic format's default")
        for role, default in ATOMIC_COLUMNS.items()
    }


def read_atomic_inter(
    uri: str, base_dir: str | Path | None = None, columns: ColumnMapping | None = None
) -> pl.DataFrame:
    """A RecBole/UniSRec ``.inter`` file (tab-separated, with a header) -> (user_id,
    history: list[str], item_id); the columns are the RecJob's userId, history and itemId
    (default user_id:token, item_id_list:token_seq, item_id:token)."""
    frame = read_table(uri, "csv", base_dir, tabs=True)
    names = atomic_columns(columns or ColumnMapping())
    history_name, history_note = names["history"]
    require_columns(frame, uri, {"history": history_name}, history_note)
    frame = frame.select(
        column(frame, uri, "userId", *names["userId"]).alias("user_id"),
        pl.col(history_name).alias("history"),
        column(frame, uri, "itemId", *names["itemId"]).alias("item_id"),
    )
    return frame.with_columns(
        pl.col("history")
        .fill_null("")
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
    )


def read_atomic_catalog(
    uri: str,
    base_dir: str | Path | None = None,
    columns: ColumnMapping | None = None,
    item_index: str | None = None,
    log: CleaningLog | None = None,
) -> pl.DataFrame:
    """An atomic catalog (UniSRec ``.text``, RecBole ``.item``: tab-separated, with a
    header) -> (item_id, item_text) from the RecJob's itemId and itemText columns (default
    item_id:token, text:token_seq). Item codes are mapped to the ``.inter`` ids through
    ``item_index`` (spec.data.itemIndex), else through the ``.item2index`` file beside the
    catalog when there is one; what was used goes to ``log``."""
    frame = read_table(uri, "csv", base_dir, tabs=True)
    names = atomic_columns(columns or ColumnMapping())
    frame = frame.select(
        column(frame, uri, "itemId", *names["itemId"]).alias("item_id"),
        column(frame, uri, "itemText", *names["itemText"]).alias("item_text"),
    )
    # a sibling of the catalog, whatever the scheme (pvc://, file://, s3://, a path)
    index_uri = item_index or with_suffix(uri, ".item2index")
    field = "spec.data.itemIndex" if item_index else f"the default beside {uri}"
    try:
        with open_uri(index_uri, "rb", base_dir) as handle:
            raw = handle.read()
    except StorageNotFound as error:
        if item_index:  # named in the RecJob: never silently unmapped
            raise DataError(index_uri, f"cannot read the item index ({field}): {error}") from error
        if log is not None:
            log.record(
                "catalog: item index",
                frame.height,
                frame.height,
                f"no {index_uri} beside the catalog: its item ids are used as the .inter "
                "ids (spec.data.itemIndex names a mapping)",
            )
        return frame
    except StorageError as error:  # there, but unreadable: never silently unmapped
        raise DataError(index_uri, f"cannot read the item index ({field}): {error}") from error
    try:
        mapping = pl.read_csv(raw, separator="\t", has_header=False, infer_schema=False)
    except Exception as error:  # polars raises many kinds of parse errors
        raise DataError(
            index_uri, f"cannot parse as code<TAB>id lines (item index, {field}): {error}"
        ) from error
    if mapping.width != 2:
        raise DataError(
            index_uri,
            f"expected code<TAB>id lines (item index, {field}), found {mapping.width} "
            f"tab-separated field(s) a line",
        )
    mapping = mapping.rename(dict(zip(mapping.columns, ["code", "index"], strict=True)))
    joined = frame.join(mapping, left_on="item_id", right_on="code", how="inner")
    if joined.height == 0:
        raise DataError(
            index_uri,
            f"none of the {frame.height} item id(s) of the catalog {uri} (e.g. "
            f"{frame['item_id'][0]!r}) is a code of this item index ({field}; codes such as "
            f"{mapping['code'][0]!r}): is it the catalog's mapping?",
        )
    if log is not None:
        unmapped = frame.filter(~pl.col("item_id").is_in(mapping["code"].to_list()))
        example = f", e.g. {unmapped['item_id'][0]!r}" if unmapped.height else ""
        log.record(
            f"catalog: item codes mapped by {index_uri}",
            frame.height,
            joined.height,
            f"{field}; {unmapped.height} catalog item(s) without an id dropped{example}",
        )
    return joined.select(pl.col("index").alias("item_id"), "item_text")


def read_candidates(
    uri: str, fmt: str, base_dir: str | Path | None = None, columns: ColumnMapping | None = None
) -> pl.DataFrame:
    """The spec.data.candidates file -> (user_id[, item_id], candidates: list[str]).

    A table in the RecJob's format (atomic: tab-separated with a header) with the user id
    (columns.userId), the list (columns.candidates: ids separated by spaces, or a list
    column) and, when the file has it, the true item (columns.itemId). Column names
    default as for the logs' format (atomic: user_id:token, item_id_list:token_seq,
    item_id:token; else the list column is ``candidates``)."""
    columns = columns or ColumnMapping()
    if fmt == "atomic":
        frame = read_table(uri, "csv", base_dir, tabs=True)
        names = atomic_columns(columns)
    else:
        frame = read_table(uri, fmt, base_dir)
        default = (columns.candidates, "") if columns.candidates else ("candidates", ", default")
        names = {
            "userId": (columns.user_id, ""),
            "itemId": (columns.item_id, ""),
            "candidates": default,
        }
    list_name, note = names["candidates"]
    require_columns(frame, uri, {"candidates": list_name}, note)
    select = [column(frame, uri, "userId", *names["userId"]).alias("user_id")]
    item = names["itemId"][0]
    if item and all(name.strip() in frame.columns for name in item.split(",") if name.strip()):
        select.append(column(frame, uri, "itemId", *names["itemId"]).alias("item_id"))
    if isinstance(frame.schema[list_name], pl.List):
        lists = pl.col(list_name).cast(pl.List(pl.String))
    else:
        lists = (
            pl.col(list_name)
            .cast(pl.String)
            .fill_null("")
            .str.split(" ")
            .list.eval(pl.element().str.strip_chars().filter(pl.element().str.strip_chars() != ""))
        )
    return frame.select(*select, lists.alias("candidates"))


def column(
    frame: pl.DataFrame, source: str, role: str, spec: str | None, note: str = ""
) -> pl.Expr:
    """The text expression for a mapped column; ``spec`` may name several columns separated
    by commas, whose values are joined with spaces. DataError if one is missing."""
    if spec is None:
        raise DataError(source, f"no column is mapped for {role} (spec.data.columns.{role})")
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        require_columns(frame, source, {role: name}, note)
    parts = [pl.col(name).cast(pl.String) for name in names]
    return parts[0] if len(parts) == 1 else pl.concat_str(parts, separator=" ")


def column_name(frame: pl.DataFrame, source: str, role: str, spec: str | None) -> str:
    """A single mapped column's name, checked to exist in ``frame``."""
    require_columns(frame, source, {role: spec})
    return str(spec)
