"""The RecJob spec's ``export``, ``serving`` and ``rollout`` sections: conversion with its
quality budget, the InferenceService, and the metric-gated canary. Field docstrings become
the CRD's descriptions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import cel_delivery, cel_syntax
from .common import DnsLabel, Duration, StorageUri
from .spec_base import MAX_TEXT_LENGTH, METRIC_PATTERN, ResourceSpec, SpecModel, with_rules

ExportTarget = Literal["onnxruntime-int8", "onnxruntime-fp32", "tensorrt-int8", "tensorrt-fp16"]


class QualityBudget(SpecModel):
    """How much ranking quality conversion may cost before the model is refused."""

    model_config = with_rules(cel_delivery.QUALITY_BUDGET_RULES)

    metric: str = Field(default="auto", pattern=METRIC_PATTERN, max_length=16)
    """auto: ndcg@10 (the task's main metric)."""
    max_relative_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    """Maximum relative drop of the metric vs the unquantized model (0.01 = 1%)."""
    max_relative_drop_vs_teacher: float | None = Field(default=None, ge=0.0, le=1.0)
    """With compression: maximum relative drop vs the uncompressed teacher."""
    min_rank_correlation: float = Field(default=0.0, ge=-1.0, le=1.0)
    """Minimum Spearman correlation between source and converted scores."""


class ExportSpec(SpecModel):
    """Conversion to a quantized model in a Triton model repository."""

    target: ExportTarget = "onnxruntime-int8"
    calibration_samples: int = Field(default=512, ge=1, le=1_000_000)
    """Samples from the training set used to calibrate static int8 (tensorrt-int8)."""
    opset: int = Field(default=17, ge=13, le=23)
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    quality_budget: QualityBudget = Field(default_factory=QualityBudget)
    image: str = Field(
        default="ghcr.io/recjob/recjob-serving:0.1.0", min_length=1, max_length=MAX_TEXT_LENGTH
    )
    resources: ResourceSpec = Field(default_factory=ResourceSpec)


# --------------------------------------------------------------------------- serving
DeploymentMode = Literal["Serverless", "RawDeployment", "Standard"]
#: KServe's modes without Knative: RawDeployment (up to 0.16), Standard (0.17 and later).
RAW_MODES = ("RawDeployment", "Standard")
#: The ServingRuntime each export target is served by by default (manifests/serving).
DEFAULT_RUNTIMES = {"onnxruntime": "recjob-oip", "tensorrt": "recjob-triton"}
HOSTNAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class GatewayRef(SpecModel):
    """The Gateway API Gateway whose HTTPRoute splits a canary's traffic in
    RawDeployment/Standard mode (KServe itself splits traffic only in Serverless mode)."""

    name: DnsLabel
    namespace: DnsLabel | None = None
    """Default: the RecJob's namespace."""
    hostname: str | None = Field(default=None, pattern=HOSTNAME_PATTERN, max_length=253)
    """Host the HTTPRoute answers; default ``<service>-<namespace>.example.com`` (KServe's
    default domain template)."""


class ServingSpec(SpecModel):
    """The KServe InferenceService that serves the model."""

    model_config = with_rules(cel_delivery.SERVING_RULES)

    name: DnsLabel | None = Field(default=None, max_length=45)
    """Service name; default: the RecJob's name. RecJobs naming the same service roll out
    one after another (oldest first): the first goes to 100%, later ones are canaried."""
    runtime: Literal["triton"] = "triton"
    """Model repository layout (a Triton model repository)."""
    runtime_name: str | None = Field(default=None, min_length=1, max_length=253)
    """The (Cluster)ServingRuntime KServe uses; default: recjob-oip (the project's own
    Open Inference Protocol server) for ONNX Runtime targets, recjob-triton for TensorRT."""
    storage_uri: StorageUri | None = None
    """Model repository root; default: <artifactsUri>/<service>/repository."""
    deployment_mode: DeploymentMode = "Serverless"
    """Serverless: one InferenceService, canaryTrafficPercent steps (Knative). RawDeployment
    (KServe <= 0.16) or Standard (>= 0.17): one InferenceService per model version and a
    Gateway API HTTPRoute (``gateway``) weighting their predictors."""
    gateway: GatewayRef | None = None
    """Required in RawDeployment/Standard mode."""
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=3, ge=1, le=1000)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)

    @property
    def raw(self) -> bool:
        """KServe without Knative (RawDeployment / Standard)."""
        return self.deployment_mode in RAW_MODES


# --------------------------------------------------------------------------- rollout
class MetricCheck(SpecModel):
    """One canary check: a PromQL query and the range its value must stay in.

    Every series selector must carry namespace="{{namespace}}": a RecJob reads its own
    namespace's metrics only (checked on the parsed query). The query is a template;
    ``{{revision}}`` becomes the canary revision under analysis,
    ``{{stable}}`` the stable revision (to compare the canary with it, e.g. a ratio of
    click-through rates), ``{{namespace}}``, ``{{service}}`` and ``{{interval}}`` are
    filled in too. Missing data never counts as a pass."""

    model_config = with_rules(cel_delivery.METRIC_CHECK_RULES)

    name: DnsLabel
    query: str = Field(min_length=1, max_length=4096)
    min: float | None = None
    """The value must be at least this."""
    max: float | None = None
    """The value must be at most this."""


def _default_metrics() -> list[MetricCheck]:
    return [
        MetricCheck(
            name="error-rate",
            query=(
                "sum(rate(recjob_inference_errors_total"
                '{revision="{{revision}}",namespace="{{namespace}}"}[{{interval}}]))'
                " / sum(rate(recjob_inference_requests_total"
                '{revision="{{revision}}",namespace="{{namespace}}"}[{{interval}}]))'
            ),
            max=0.01,
        ),
        MetricCheck(
            name="latency-p99",
            query=(
                "histogram_quantile(0.99, sum by (le) (rate("
                "recjob_inference_latency_seconds_bucket"
                '{revision="{{revision}}",namespace="{{namespace}}"}[{{interval}}])))'
            ),
            max=0.5,
        ),
    ]


class NoDataPolicy(SpecModel):
    """What an analysis without data does. It never promotes."""

    action: Literal["hold", "fail"] = "hold"
    """hold: keep the current weight and wait; fail: count as a failed check."""
    deadline: Duration = "10m"
    """With hold: roll back when no data has arrived for this long."""


class RolloutSpec(SpecModel):
    """Progressive delivery of a new model version as a canary."""

    model_config = with_rules(cel_delivery.ROLLOUT_RULES)

    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [10, 25, 50, 100],
        min_length=1,
        max_length=cel_syntax.MAX_STEPS,
        json_schema_extra=cel_delivery.STEPS_RULES,
    )
    """Canary traffic percents, strictly increasing, ending at 100."""
    interval: Duration = "1m"
    """Time between analyses (and the PromQL range)."""
    analyses_per_step: int = Field(default=1, ge=1, le=100)
    """Passing analyses needed before advancing to the next step."""
    failure_limit: int = Field(default=2, ge=1, le=100)
    """Failed checks that trigger a rollback."""
    metrics: list[MetricCheck] = Field(
        default_factory=_default_metrics,
        max_length=20,
        json_schema_extra=cel_delivery.METRICS_RULES,
    )
    no_data: NoDataPolicy = Field(default_factory=NoDataPolicy)
    manual_approval: bool = False
    """Pause before the last step until the RecJob carries the annotation
    recjob.dev/approve-generation=<its generation>."""
    prometheus: DnsLabel | None = None
    """Which of the Prometheus servers the operator is configured with to query (its
    RECJOB_PROMETHEUS_SOURCES names); default: the operator's default Prometheus. A RecJob
    never names a URL."""
