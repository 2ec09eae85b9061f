"""What every section of the RecJob spec shares: the base model (no infinite or NaN
numbers), CEL rules in a type's config, common bounds and the compute of a pod."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .common import ApiModel, Quantity

#: Ranking/quality metric names understood by the trainer's evaluation, the quality gate
#: and early stopping: ``auc``, ``logloss``, ``rmse``, ``mrr``, or ``ndcg|hr|recall|precision@K``.
METRIC_PATTERN = r"^((ndcg|hr|recall|precision)@[1-9][0-9]{0,3}|auc|logloss|rmse|mrr|auto)$"
#: Most optimizer steps any step count may ask for (far beyond any real run).
MAX_STEP_COUNT = 1_000_000_000
#: Column names (several may be comma-separated) and other free text.
MAX_TEXT_LENGTH = 1024


class SpecModel(ApiModel):
    """Base of the spec types: also refuses infinite and NaN numbers (YAML's .inf, .nan)."""

    model_config = ApiModel.model_config | {"allow_inf_nan": False}


def with_rules(extra: dict) -> Any:
    """A spec type's model_config with its CEL rules (see :mod:`.cel`)."""
    return SpecModel.model_config | {"json_schema_extra": extra}


class ResourceSpec(SpecModel):
    """Compute per pod."""

    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    gpu: int = Field(default=0, ge=0, le=16)
    """GPUs per pod (requested as gpuResourceName)."""
    gpu_resource_name: str = Field(default="nvidia.com/gpu", min_length=1, max_length=253)
