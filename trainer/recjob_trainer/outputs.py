"""Where a training run writes: its output URI, or a local working copy of it.

A mounted output (file://, pvc://, a path) is written in place, as always. An object-store
output (s3://, gs://) is written to a local working copy (``$RECJOB_WORK_DIR``: an
emptyDir in the pod, which outlives container restarts, so a restarted trainer resumes
from its local checkpoints) and rank 0 publishes the artifacts when the run is done:
folders with a manifest written last, files as single objects, the model card last (see
:mod:`recjob_trainer.remote`). Checkpoints and per-world-size shards stay local.

Every rank must see the same run directory (rank 0 prepares the data, DeepSpeed writes
checkpoint partitions there): :func:`check_shared` stops a run whose ranks do not, e.g.
several nodes each with their own working copy.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch.distributed as dist

from .remote import WorkingCopy

#: What a finished run publishes, in this order: folders first, the model card last.
RUN_OUTPUTS = (
    "data",
    "teacher",
    "distilled",
    "model",
    "pruning.json",
    "metrics.json",
    "progress.jsonl",
    "curves.png",
    "deepspeed.json",
    "model-card.json",
)
#: Not published: shards are derived per world size from data/ again.
NOT_PUBLISHED = ("shards-*",)


def run_directory(output_uri: str, base_dir: str | None) -> WorkingCopy:
    """The run directory of ``output_uri`` (its own folder when mounted)."""
    return WorkingCopy(output_uri, base_dir)


def check_shared(run_dir: Path, rank: int, world: int) -> None:
    """Raise on every rank unless all ranks see the same ``run_dir`` (call after rank 0
    created it; a collective: every rank must call it)."""
    if world <= 1 or not dist.is_initialized():
        return
    box = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    marker = run_dir / f".shared-{box[0]}"
    if rank == 0:
        marker.write_text(str(run_dir))
    dist.barrier()
    seen: list[bool | None] = [None] * world
    dist.all_gather_object(seen, marker.exists())
    dist.barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise RuntimeError(
            f"rank(s) {blind} do not see rank 0's run directory {run_dir}: every rank must "
            "share it (one node, or a ReadWriteMany pvc:// for the artifacts); an s3:// or "
            "gs:// output is a per-pod working copy, so it needs all ranks on one node"
        )


def publish_run(run: WorkingCopy) -> list[str]:
    """Rank 0, at the end: publish the artifacts of an object-store output (nothing to
    do for a mounted one). Returns the URLs written."""
    return run.publish(RUN_OUTPUTS, exclude=NOT_PUBLISHED)
