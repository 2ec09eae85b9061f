"""The RecJob spec: what a user asks for. Field docstrings become the CRD's descriptions.

The spec is never written by the operator; progress lives in status only. Its sections are
defined by topic: :mod:`.spec_data` (data), :mod:`.spec_training` (model, training,
compression), :mod:`.spec_delivery` (export, serving, rollout), on :mod:`.spec_base`.
"""

from __future__ import annotations

from pydantic import Field

from . import cel
from .common import StorageUri
from .spec_base import SpecModel, with_rules
from .spec_data import DataSpec
from .spec_delivery import ExportSpec, RolloutSpec, ServingSpec
from .spec_training import CompressionSpec, ModelSpec, TrainingSpec
from .storage import StorageSpec


class RecJobSpec(SpecModel):
    """A model's whole way from logs to a promoted, quantized, served model."""

    model_config = with_rules(cel.SPEC_RULES)

    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    compression: CompressionSpec | None = None
    export: ExportSpec = Field(default_factory=ExportSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    artifacts_uri: StorageUri = "pvc://recjob-artifacts"
    """Root for everything produced (checkpoints, models, repositories, reports)."""
    storage: StorageSpec | None = None
    """Credentials for s3:// and gs:// URIs (a Secret, or the pods' ServiceAccount)."""
