"""A run's data on every rank: rank 0 prepares it once (or reuses it), every rank reads
the held-out splits and its own shard of the training rows."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .batches import Shard, shard_rows
from .config import TrainerConfig
from .data.prepare import ensure_prepared
from .data.prepared import SPLITS, PreparedData, read_prepared
from .distributed import barrier, broadcast
from .storage import atomic_directory


def prepared_data(config: TrainerConfig, run_dir: Path, rank: int) -> PreparedData:
    """Rank 0 prepares (or reuses) the data; every rank then reads it."""
    data_dir = run_dir / "data"
    error = None
    if rank == 0:
        try:
            ensure_prepared(config.data, config.model, config.base_dir, data_dir)
        except Exception as exc:  # reported on every rank, raised below
            error = f"{type(exc).__name__}: {exc}"
    error = broadcast(error)
    if error:
        raise RuntimeError(f"data preparation failed: {error}")
    # only rank 0 reads the whole training split (to write the shards, and for baselines)
    return read_prepared(data_dir, SPLITS if rank == 0 else ("validation", "test"))


def rank_shard(prepared: PreparedData, run_dir: Path, rank: int, world: int) -> Shard:
    """This rank's training rows, from a shard file written once per world size."""
    shard_dir = run_dir / "data" / f"shards-{world}"
    if rank == 0 and not shard_dir.exists():
        with atomic_directory(shard_dir) as tmp:
            train = prepared.splits["train"]
            for r in range(world):
                shard_rows(train, r, world).write_parquet(tmp / f"train-{r}.parquet")
    barrier()
    return Shard(pl.read_parquet(shard_dir / f"train-{rank}.parquet"), rank, world)
