"""The trainer config: what the operator (and local mode) hand to ``recjob-train``.

``trainer.yaml`` in the ``<name>-g<gen>-train-config`` ConfigMap (or local mode's work
directory) is a :class:`TrainerConfig` in camelCase YAML: the RecJob's ``data``,
``model``, ``training`` and ``compression`` sections verbatim, plus ``name``,
``outputUri`` (the run directory), ``baseDir`` (where relative data paths resolve),
``evaluation`` and ``logIntervalSteps``. It reuses the RecJob API types, so a field means
the same thing everywhere, and depends on pydantic only: the operator writes it without
the trainer's packages, and the trainer (``recjob_trainer.config.load_config``) reads it
and derives everything else itself, the DeepSpeed config included (it depends on the
world size the trainer finds at start).

Example (every unset field takes its RecJob default)::

    name: search-ranker-g3
    outputUri: pvc://recjob-artifacts/search-ranker/g3/train
    data: {task: search-ranking, train: pvc://recjob-data/queries.csv, columns: {...}}
    training: {nodes: 2, processesPerNode: 2, deepspeed: {zeroStage: 2}}
"""

from __future__ import annotations

from pydantic import Field

from .common import ApiModel, StorageUri
from .recjob import RecJob
from .spec_data import DataSpec
from .spec_training import CompressionSpec, ModelSpec, TrainingSpec


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


def trainer_config(job: RecJob, output_uri: str, base_dir: str | None = None) -> TrainerConfig:
    """The trainer config of a RecJob's current generation, writing to ``output_uri``."""
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
