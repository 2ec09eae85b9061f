"""Cleaning rules. Each one records how many rows it removed or changed; rows that are
wrong (not merely duplicate) are quarantined with the reason, never silently dropped."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from recjob_operator.api.v1alpha1.spec_data import MissingValues, TextNormalization


@dataclass
class StepReport:
    """What one cleaning step did."""

    step: str
    rows_in: int
    rows_out: int
    detail: str = ""

    @property
    def removed(self) -> int:
        """Rows the step removed."""
        return self.rows_in - self.rows_out


@dataclass
class CleaningLog:
    """The counts of every step and the quarantined rows."""

    steps: list[StepReport] = field(default_factory=list)
    quarantined: list[pl.DataFrame] = field(default_factory=list)

    def record(self, step: str, rows_in: int, rows_out: int, detail: str = "") -> None:
        """Add a step's counts."""
        self.steps.append(StepReport(step, rows_in, rows_out, detail))

    def quarantine(self, rows: pl.DataFrame, source: str, reason: str) -> None:
        """Keep ``rows`` aside with the file and the reason."""
        if rows.height:
            self.quarantined.append(
                pl.DataFrame(
                    {
                        "source": [source] * rows.height,
                        "reason": [reason] * rows.height,
                        "row": [json.dumps(r, default=str) for r in rows.to_dicts()],
                    }
                )
            )

    def quarantine_frame(self) -> pl.DataFrame:
        """All quarantined rows (source, reason, row as JSON)."""
        if not self.quarantined:
            return pl.DataFrame(schema={"source": pl.String, "reason": pl.String, "row": pl.String})
        return pl.concat(self.quarantined)

    def to_dicts(self) -> list[dict]:
        """The step counts as plain dicts (for reports and the model card)."""
        return [
            {
                "step": s.step,
                "rows_in": s.rows_in,
                "rows_out": s.rows_out,
                "removed": s.removed,
                "detail": s.detail,
            }
            for s in self.steps
        ]


def normalize_text(column: str, options: TextNormalization) -> pl.Expr:
    """The normalised form of a text column."""
    expr = pl.col(column).cast(pl.String)
    if options.unicode_form != "none":
        expr = expr.str.normalize(options.unicode_form)
    if options.strip_html:
        expr = expr.str.replace_all(r"<[^>]*>", " ").str.replace_all(r"&(amp|quot|lt|gt|#39);", " ")
    if options.lowercase:
        expr = expr.str.to_lowercase()
    if options.collapse_whitespace:
        expr = expr.str.replace_all(r"\s+", " ").str.strip_chars()
    return expr.alias(column)


def cast_numbers(frame: pl.DataFrame, column: str, log: CleaningLog, source: str) -> pl.DataFrame:
    """Cast a text column to float; values that are present but not numbers are quarantined."""
    if frame.schema[column].is_numeric():
        return frame.with_columns(pl.col(column).cast(pl.Float64))
    casted = pl.col(column).str.strip_chars().cast(pl.Float64, strict=False)
    bad = frame.filter(
        pl.col(column).is_not_null() & (pl.col(column).str.strip_chars() != "") & casted.is_null()
    )
    log.quarantine(bad, source, f"column {column!r} is not a number")
    out = frame.filter(
        ~(
            pl.col(column).is_not_null()
            & (pl.col(column).str.strip_chars() != "")
            & casted.is_null()
        )
    )
    out = out.with_columns(casted.alias(column))
    log.record(
        f"numeric {column}",
        frame.height,
        out.height,
        f"{bad.height} row(s) quarantined: not a number",
    )
    return out


def handle_missing(
    frame: pl.DataFrame, columns: list[str], policy: MissingValues, log: CleaningLog, source: str
) -> pl.DataFrame:
    """Apply the missing-value policy to ``columns`` (null, or empty text)."""

    def missing(c: str) -> pl.Expr:
        e = pl.col(c).is_null()
        if frame.schema[c] == pl.String:
            e = e | (pl.col(c).str.strip_chars() == "")
        return e

    any_missing = pl.any_horizontal([missing(c) for c in columns])
    rows = frame.filter(any_missing)
    if policy.policy == "fill":
        fills = [
            pl.when(missing(c))
            .then(
                pl.lit(policy.fill_text)
                if frame.schema[c] == pl.String
                else pl.lit(policy.fill_number)
            )
            .otherwise(pl.col(c))
            .alias(c)
            for c in columns
        ]
        out = frame.with_columns(fills)
        log.record("missing values", frame.height, out.height, f"{rows.height} row(s) filled")
        return out
    out = frame.filter(~any_missing)
    if policy.policy == "quarantine":
        for c in columns:
            log.quarantine(rows.filter(missing(c)), source, f"missing value in column {c!r}")
            rows = rows.filter(~missing(c))
    log.record(
        "missing values",
        frame.height,
        out.height,
        f"{frame.height - out.height} row(s) {policy.policy}ped"
        if policy.policy == "drop"
        else f"{frame.height - out.height} row(s) quarantined",
    )
    return out


def dedup_pairs(frame: pl.DataFrame, keys: list[str], label: str, log: CleaningLog) -> pl.DataFrame:
    """Exact duplicates of ``keys``: one row kept, conflicting labels averaged."""
    conflicts = (
        frame.group_by(keys).agg(pl.col(label).n_unique().alias("n")).filter(pl.col("n") > 1).height
    )
    others = [c for c in frame.columns if c not in keys and c != label]
    out = (
        frame.group_by(keys, maintain_order=True)
        .agg(pl.col(label).mean(), *[pl.col(c).first() for c in others])
        .select(frame.columns)
    )
    log.record(
        "exact duplicates",
        frame.height,
        out.height,
        f"{conflicts} duplicate group(s) had conflicting labels (averaged)",
    )
    return out


def _shingles(text: str, size: int = 3) -> set[int]:
    tokens = text.split()
    if len(tokens) < size:
        return {zlib.crc32(text.encode())}
    return {
        zlib.crc32(" ".join(tokens[i : i + size]).encode()) for i in range(len(tokens) - size + 1)
    }


def jaccard(a: set[int], b: set[int]) -> float:
    """Jaccard similarity of two shingle sets."""
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate_groups(
    texts: list[str], threshold: float, seed: int = 0, bands: int = 16, rows: int = 4
) -> list[int]:
    """For each text, the index of the first text it near-duplicates (itself if none).

    MinHash (bands x rows permutations) finds candidate pairs; each candidate is confirmed
    with the exact Jaccard similarity of word 3-shingles, so no pair below ``threshold``
    is ever merged.
    """
    n = len(texts)
    shingles = [_shingles(t) for t in texts]
    rng = np.random.default_rng(seed)
    prime = (1 << 31) - 1  # products of two values below 2**31 stay inside int64
    a = rng.integers(1, prime, bands * rows, dtype=np.int64)[:, None]
    b = rng.integers(0, prime, bands * rows, dtype=np.int64)[:, None]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    buckets: dict[tuple, list[int]] = {}
    for i, sh in enumerate(shingles):
        values = np.fromiter(sh, dtype=np.int64, count=len(sh))[None, :] % prime
        signature = ((a * values + b) % prime).min(axis=1).tolist()
        for band in range(bands):
            key = (band, *signature[band * rows : (band + 1) * rows])
            buckets.setdefault(key, []).append(i)
    for members in buckets.values():
        for j in members[1:]:
            i = members[0]
            if find(i) != find(j) and jaccard(shingles[i], shingles[j]) >= threshold:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def k_core(
    frame: pl.DataFrame, user: str, item: str, min_user: int, min_item: int, log: CleaningLog
) -> pl.DataFrame:
    """Repeatedly drop users and items with too few interactions until none is left."""
    rows_in, rounds = frame.height, 0
    while min_user > 0 or min_item > 0:
        rounds += 1
        before = frame.height
        if min_item > 0:
            frame = frame.filter(pl.len().over(item) >= min_item)
        if min_user > 0:
            frame = frame.filter(pl.len().over(user) >= min_user)
        if frame.height == before:
            break
    log.record(
        "k-core",
        rows_in,
        frame.height,
        f"users >= {min_user}, items >= {min_item}, {rounds} round(s)",
    )
    return frame


def cast_timestamps(
    frame: pl.DataFrame, column: str, log: CleaningLog, source: str
) -> pl.DataFrame:
    """Event times as float seconds: numbers (epoch) or ISO-8601 date-times; values that are
    neither are quarantined."""
    if frame.schema[column].is_numeric():
        return frame.with_columns(pl.col(column).cast(pl.Float64))
    text = pl.col(column).str.strip_chars()
    as_number = text.cast(pl.Float64, strict=False)
    as_time = (
        text.str.to_datetime(strict=False, time_zone="UTC").dt.epoch("us").cast(pl.Float64) / 1e6
    )
    parsed = pl.coalesce(as_number, as_time)
    bad = frame.filter(pl.col(column).is_not_null() & parsed.is_null())
    log.quarantine(bad, source, f"column {column!r} is neither a number nor a date-time")
    out = frame.with_columns(parsed.alias(column)).filter(pl.col(column).is_not_null())
    log.record(f"timestamps {column}", frame.height, out.height, f"{bad.height} row(s) quarantined")
    return out
