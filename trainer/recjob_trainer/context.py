"""What the stages of a training run share: the run's fixed facts (:class:`RunContext`)
and one DeepSpeed training stage (:class:`Stage`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .batches import Batcher, Shard
from .config import TrainerConfig
from .data.prepared import PreparedData
from .models import ModelInfo, RankingModel
from .progress import Progress


@dataclass
class RunContext:
    """What the end of a run needs to know about it."""

    config: TrainerConfig
    rank: int
    world: int
    run_dir: Path
    prepared: PreparedData
    info: ModelInfo
    tokenizer: Any
    batcher: Batcher
    progress: Progress
    shard: Shard
    steps_per_epoch: int
    started: float


@dataclass
class Stage:
    """One DeepSpeed training stage of a run: fine-tuning (``train``), or with compression
    distillation (``distill``) and recovery after pruning (``recover``)."""

    name: str
    model: RankingModel
    total_steps: int
    checkpoints: Path
    step_loss: Callable[[Any, dict, torch.Tensor, list[int]], torch.Tensor]
    """(engine, batch without labels, labels, shard row indices) -> loss."""
    after_step: Callable[[Any], None] | None = None
    """Called after every optimizer step (e.g. to keep pruned weights at zero)."""

    def tag(self) -> dict[str, str]:
        """What progress events of this stage carry (nothing for plain fine-tuning)."""
        return {} if self.name == "train" else {"stage": self.name}
