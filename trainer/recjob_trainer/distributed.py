"""The process group of a training run: set up from torchrun's environment, barriers,
rank 0's values on every rank, and a clean exit."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist

from .extension_locks import clear_stale_locks

#: What torch 2.13 warns (a FutureWarning from its ``@deprecated`` wrappers, attributed to
#: torch/distributed/c10d_logger.py) on every call of the two collectives DeepSpeed 0.19.8
#: uses for ZeRO's parameter all-gathers and gradient reduce-scatters
#: (deepspeed/comm/torch.py ``get_all_gather_function`` / ``get_reduce_scatter_function``).
#: Shown again and again rather than once: something in each step (subprocess's
#: os.get_exec_path, under warnings.catch_warnings) resets Python's once-per-location
#: registry, so a ZeRO-3 log got thousands of them.
DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated\."
)


def quiet_deprecated_collectives() -> None:
    """Silence exactly those two warnings in this process (every other warning stays)."""
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)


def setup_distributed() -> tuple[int, int, int]:
    """Initialise the process group from the environment; (rank, world size, local rank).

    torchrun (what a PyTorchJob pod runs too) sets every variable per process; a process
    started some other way without LOCAL_RANK (DeepSpeed then fails) gets 0, and a lone
    process a world of one. On a machine without CUDA, DeepSpeed runs on its CPU
    accelerator over gloo. Every rank drops DeepSpeed's deprecated-collective warnings
    (:data:`DEPRECATED_COLLECTIVES`), and first clears a build lock a killed DeepSpeed op
    build left behind (:mod:`~recjob_trainer.extension_locks`), which would hang it.
    """
    quiet_deprecated_collectives()
    clear_stale_locks()
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False
    )
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def exit_cleanly(code: int) -> None:
    """Leave without gloo's exit-time abort (seen 2-3 runs in 20 on these machines)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
