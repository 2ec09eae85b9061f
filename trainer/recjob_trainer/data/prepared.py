"""The prepared data of a run in memory (``PreparedData``) and on disk: the splits, the
catalog, the quarantine and the report with the counts of every step, written under
``<run>/data/`` atomically so a reader never sees half of it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ..storage import atomic_directory, write_json_atomic
from .cleaning import CleaningLog

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
