"""Readers for the log formats RecJob understands, returning polars frames.

Every error names the file (as the user wrote it) and, where it applies, the column.
Values are read as text first so that bad values can be quarantined rather than guessed.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from recjob_operator.api.v1alpha1.uris import with_suffix

from ..storage import StorageError, StorageNotFound, open_uri, resolve


class DataError(ValueError):
    """Bad input data: which file, which column, what was expected."""

    def __init__(self, source: str, message: str, column: str | None = None):
        self.source, self.column = source, column
        where = f"{source}: column {column!r}: " if column else f"{source}: "
        super().__init__(where + message)


def read_table(
    uri: str, fmt: str, base_dir: str | Path | None = None, max_rows: int | None = None
) -> pl.DataFrame:
    """Read a csv / tsv / parquet / jsonl table; csv columns all come back as text."""
    try:
        with open_uri(uri, "rb", base_dir) as handle:
            raw = handle.read()
    except StorageError as error:
        raise DataError(uri, f"cannot read ({error})") from error
    if not raw.strip():
        raise DataError(uri, "the file is empty")
    try:
        if fmt == "csv":
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


def require_columns(frame: pl.DataFrame, source: str, mapping: dict[str, str | None]) -> None:
    """Raise DataError naming the first mapped column missing from ``frame``."""
    for role, column in mapping.items():
        if column is None:
            raise DataError(source, f"no column is mapped for {role} (spec.data.columns)")
        if column not in frame.columns:
            raise DataError(
                source,
                f"missing (needed as {role}); the file has {', '.join(frame.columns[:20])}",
                column=column,
            )


def read_atomic_inter(uri: str, base_dir: str | Path | None = None) -> pl.DataFrame:
    """A RecBole/UniSRec ``.inter`` file -> (user_id, history: list[str], item_id)."""
    frame = read_table(uri, "csv", base_dir)
    wanted = {
        "user_id:token": "user_id",
        "item_id_list:token_seq": "history",
        "item_id:token": "item_id",
    }
    for column in wanted:
        if column not in frame.columns:
            raise DataError(
                uri,
                "missing; an atomic .inter file has user_id:token, "
                "item_id_list:token_seq and item_id:token",
                column=column,
            )
    frame = frame.rename(wanted).select(wanted.values())
    return frame.with_columns(
        pl.col("history")
        .fill_null("")
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
    )


def read_atomic_catalog(uri: str, base_dir: str | Path | None = None) -> pl.DataFrame:
    """A UniSRec ``.text`` file -> (item_id, item_text); item codes are mapped to the
    ``.inter`` indices through the ``.item2index`` file beside it when there is one."""
    frame = read_table(uri, "csv", base_dir)
    for column in ("item_id:token", "text:token_seq"):
        if column not in frame.columns:
            raise DataError(
                uri,
                "missing; an atomic .text file has item_id:token and text:token_seq",
                column=column,
            )
    frame = frame.rename({"item_id:token": "item_id", "text:token_seq": "item_text"})
    # a sibling of the catalog, whatever the scheme (pvc://, file://, s3://, a path)
    index_uri = with_suffix(uri, ".item2index")
    try:
        with open_uri(index_uri, "rb", base_dir) as handle:
            raw = handle.read()
    except StorageNotFound:  # no index: the catalog's item ids are the .inter ids
        return frame.select("item_id", "item_text")
    except StorageError as error:  # there, but unreadable: never silently unmapped
        raise DataError(index_uri, f"cannot read ({error})") from error
    try:
        mapping = pl.read_csv(
            raw,
            separator="\t",
            has_header=False,
            new_columns=["code", "index"],
            infer_schema=False,
        )
    except Exception as error:  # polars raises many kinds of parse errors
        raise DataError(index_uri, f"cannot parse as code<TAB>index lines: {error}") from error
    joined = frame.join(mapping, left_on="item_id", right_on="code", how="inner")
    return joined.select(pl.col("index").alias("item_id"), "item_text")


def column(frame: pl.DataFrame, source: str, role: str, spec: str | None) -> pl.Expr:
    """The text expression for a mapped column; ``spec`` may name several columns separated
    by commas, whose values are joined with spaces. DataError if one is missing."""
    if spec is None:
        raise DataError(source, f"no column is mapped for {role} (spec.data.columns)")
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        require_columns(frame, source, {role: name})
    parts = [pl.col(name).cast(pl.String) for name in names]
    return parts[0] if len(parts) == 1 else pl.concat_str(parts, separator=" ")


def column_name(frame: pl.DataFrame, source: str, role: str, spec: str | None) -> str:
    """A single mapped column's name, checked to exist in ``frame``."""
    require_columns(frame, source, {role: spec})
    return str(spec)
