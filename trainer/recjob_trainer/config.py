"""The trainer's configuration file: the RecJob sections it needs plus where to write.

The operator (PyTorchJob ConfigMap) and local mode write this file; `recjob-train
--config FILE` reads it. It reuses the RecJob API types, so a field means the same thing
everywhere.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from recjob_operator.api.v1alpha1 import RecJob
from recjob_operator.api.v1alpha1.common import ApiModel, StorageUri
from recjob_operator.api.v1alpha1.spec import (
    CompressionSpec,
    DataSpec,
    ModelSpec,
    TrainingSpec,
)


class EvaluationSettings(ApiModel):
    """How held-out data is evaluated (sizes bound the cost on small machines)."""

    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    sampled_negatives: int = Field(default=100, ge=1)
    """Recommendation: negatives in the sampled ranking protocol."""
    max_groups: int | None = Field(default=None, ge=1)
    """Evaluate at most this many queries / users per split (None: all)."""
    batch_size: int = Field(default=64, ge=1)
    baselines: bool = True
    """Also evaluate BM25 / popularity and the zero-shot pretrained model."""


class TrainerConfig(ApiModel):
    """Everything one training run needs."""

    name: str = Field(min_length=1)
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    compression: CompressionSpec | None = None
    output_uri: StorageUri
    """Run directory: data/, checkpoints/, model/, metrics.json, model-card.json."""
    base_dir: str | None = None
    """Relative data paths resolve against this folder."""
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    log_interval_steps: int = Field(default=10, ge=1)


def load_config(path: str | Path) -> TrainerConfig:
    """Read a trainer config (YAML or JSON)."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return TrainerConfig.model_validate(document)


def config_from_recjob(job: RecJob, output_uri: str, base_dir: str | None) -> TrainerConfig:
    """The trainer config of a RecJob (what the operator and local mode write)."""
    spec = job.spec
    return TrainerConfig(
        name=f"{job.metadata.name}-g{job.generation}",
        data=spec.data,
        model=spec.model,
        training=spec.training,
        compression=spec.compression,
        output_uri=output_uri,
        base_dir=base_dir,
    )
