"""The RecJob status: what the operator observed and decided. Only the operator writes it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import MAX_INTEGER, ApiModel, Timestamp

Phase = Literal[
    "Pending", "Training", "Converting", "RollingOut", "Succeeded", "Failed", "RolledBack"
]
#: Phases after which nothing more happens for this generation.
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "RolledBack"})

#: Condition types the operator sets (one entry each in status.conditions).
CONDITION_TYPES = (
    "Valid",
    "Trained",
    "Converted",
    "QualityGatePassed",
    "Deployed",
    "Promoted",
    "Ready",
)

#: Most analysis entries kept in status.rollout.history (the object must stay small).
MAX_HISTORY = 50


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: str = Field(min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(default="", max_length=1024)
    """CamelCase reason for the last transition."""
    message: str = Field(default="", max_length=32768)
    last_transition_time: Timestamp | None = None
    observed_generation: int | None = Field(default=None, ge=0, le=MAX_INTEGER)


class TrainingProgress(ApiModel):
    """Where training is."""

    step: int = Field(default=0, ge=0, le=MAX_INTEGER)
    total_steps: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    epoch: float | None = Field(default=None, ge=0.0)
    loss: float | None = None
    samples_per_second: float | None = Field(default=None, ge=0.0)
    stage: Literal["train", "distill", "recover", "federated"] | None = None
    """With compression: which training stage the step counts (each starts at 0);
    federated: the steps are federated rounds."""


class FederationStatus(ApiModel):
    """A federated run's own account (its metrics.json): who took part, what crossed the
    wire, the privacy budget spent."""

    silos: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    """Silos whose updates were aggregated."""
    rounds_completed: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    bytes_exchanged: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    """Model-update bytes sent and received by the server over all rounds."""
    epsilon: float | None = Field(default=None, ge=0.0)
    """Differential privacy: the epsilon spent (at delta), by the accountant."""
    delta: float | None = Field(default=None, ge=0.0, le=1.0)


class TrainingStatus(ApiModel):
    """The PyTorchJob (or local processes, or federation) of the current generation."""

    job_name: str | None = None
    state: Literal["Created", "Running", "Restarting", "Succeeded", "Failed"] | None = None
    world_size: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    restarts: int = Field(default=0, ge=0, le=MAX_INTEGER)
    resumed_from_step: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    progress: TrainingProgress | None = None
    metrics: dict[str, float] | None = None
    """Held-out quality of the trained model and its baselines (metrics.json)."""
    federation: FederationStatus | None = None
    """Federated training: the run's account."""
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
    message: str | None = None


class QualityGateStatus(ApiModel):
    """The converted model measured against its source."""

    metric: str
    source_value: float | None = None
    converted_value: float | None = None
    teacher_value: float | None = None
    relative_drop: float | None = None
    relative_drop_vs_teacher: float | None = None
    budget: float
    rank_correlation: float | None = None
    top_k_overlap: float | None = None
    passed: bool
    report_uri: str | None = None


class ConversionStatus(ApiModel):
    """The conversion Job of the current generation."""

    job_name: str | None = None
    state: Literal["Created", "Running", "Succeeded", "Failed"] | None = None
    target: str | None = None
    model_version: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    """Version directory published in the model repository."""
    quality_gate: QualityGateStatus | None = None
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
    message: str | None = None


class AnalysisRecord(ApiModel):
    """One metric measurement of one canary analysis."""

    time: Timestamp
    step: int = Field(ge=0, le=MAX_INTEGER)
    weight: int = Field(ge=0, le=100)
    metric: str
    revision: str | None = None
    value: float | None = None
    min: float | None = None
    max: float | None = None
    verdict: Literal["pass", "fail", "no-data", "error"]
    message: str | None = None


class RolloutStatus(ApiModel):
    """Canary progress; the only place rollout progress is kept."""

    state: (
        Literal["Progressing", "Holding", "AwaitingApproval", "Promoted", "RolledBack"] | None
    ) = None
    step: int = Field(default=0, ge=0, le=MAX_INTEGER)
    """Index into spec.rollout.steps of the current step (0-based)."""
    canary_weight: int = Field(default=0, ge=0, le=100)
    stable_revision: str | None = None
    canary_revision: str | None = None
    stable_model_version: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    canary_model_version: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    passed_analyses: int = Field(default=0, ge=0, le=MAX_INTEGER)
    """Passing analyses at the current step."""
    failed_checks: int = Field(default=0, ge=0, le=MAX_INTEGER)
    query_errors: int = Field(default=0, ge=0, le=MAX_INTEGER)
    """Prometheus errors, counted apart from failed checks."""
    no_data_since: Timestamp | None = None
    started_at: Timestamp | None = None
    step_started_at: Timestamp | None = None
    """When the current weight was set (analyses start one interval later)."""
    last_analysis_time: Timestamp | None = None
    next_analysis_time: Timestamp | None = None
    history: list[AnalysisRecord] = Field(default_factory=list, max_length=MAX_HISTORY)
    message: str | None = None


class QualitySummary(ApiModel):
    """The headline quality number shown by kubectl get."""

    metric: str
    value: float


class Lineage(ApiModel):
    """Where the served model came from."""

    data_snapshot: str | None = None
    """Digest of the prepared training data."""
    base_model: str | None = None
    checkpoint_digest: str | None = None
    model_repository: str | None = None
    model_version: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    inference_service_revision: str | None = None
    previous_model_version: int | None = Field(default=None, ge=1, le=MAX_INTEGER)


class RecJobStatus(ApiModel):
    """Everything the operator knows about a RecJob."""

    phase: Phase = "Pending"
    observed_generation: int | None = Field(default=None, ge=0, le=MAX_INTEGER)
    model_generation: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    """The model this RecJob trains: advances only when a field that defines the trained
    model changes (data, model, training, compression, artifactsUri), not on every spec
    edit; names the training child ``<name>-g<modelGeneration>-train``."""
    model_digest: str | None = Field(default=None, max_length=128)
    """Digest of the model-defining fields of modelGeneration."""
    conversion_revision: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    """The conversion of modelGeneration: starts at 1 and advances when only what the
    conversion depends on changes (export, serving.name, serving.storageUri); names the
    conversion child (``<name>-g<modelGeneration>-convert``, ``-convert-<revision>`` after
    the first)."""
    conversion_digest: str | None = Field(default=None, max_length=128)
    """Digest of the conversion-defining fields of conversionRevision."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    message: str | None = None
    """Human-readable summary of the current phase (the reason when failed)."""
    quality: QualitySummary | None = None
    training: TrainingStatus | None = None
    conversion: ConversionStatus | None = None
    rollout: RolloutStatus | None = None
    lineage: Lineage | None = None
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
