"""The RecJob spec: what a user asks for. Field docstrings become the CRD's descriptions.

The spec is never written by the operator; progress lives in status only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from . import cel
from .common import (
    MAX_INTEGER,
    SEED_MAX,
    URL_PATTERN,
    ApiModel,
    DnsLabel,
    Duration,
    Quantity,
    StorageUri,
)
from .storage import StorageSpec

Task = Literal["search-ranking", "recommendation"]
DataFormat = Literal["csv", "parquet", "jsonl", "atomic"]
SplitStrategy = Literal["by-query", "leave-one-out", "by-time", "predefined"]
Precision = Literal["fp32", "bf16", "fp16"]
ExportTarget = Literal["onnxruntime-int8", "onnxruntime-fp32", "tensorrt-int8", "tensorrt-fp16"]

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


def _rules(extra: dict) -> Any:
    """A spec type's model_config with its CEL rules (see :mod:`.cel`)."""
    return SpecModel.model_config | {"json_schema_extra": extra}


# --------------------------------------------------------------------------- data
class ColumnMapping(SpecModel):
    """Which column of the user's logs holds what. Unset columns are not used."""

    query: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Search query text (search-ranking)."""
    item_id: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Item (product) identifier."""
    item_text: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Item text: title, and optionally category/brand (search-ranking, catalog). Several
    columns may be named, separated by commas; their values are joined with spaces."""
    label: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Graded relevance (search-ranking) or click label (recommendation impression logs:
    then every row is a labelled impression and no negatives are sampled)."""
    user_id: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """User identifier (recommendation); several comma-separated columns form one key."""
    timestamp: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Event time (recommendation; needed by the by-time split)."""
    event_type: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Event type such as view / click / purchase (recommendation); see
    preprocessing.positiveEvents."""


class Deduplication(SpecModel):
    """Duplicate removal; removed rows are counted in the data report."""

    exact: bool = True
    """Drop rows identical after text normalisation."""
    near: bool = False
    """Also drop near-duplicate item texts (shingle Jaccard similarity)."""
    near_threshold: float = Field(default=0.9, gt=0.0, le=1.0)
    """Jaccard similarity at or above which two texts count as near duplicates."""


class MissingValues(SpecModel):
    """What to do with rows that lack a required value."""

    policy: Literal["drop", "fill", "quarantine"] = "quarantine"
    """drop: remove and count; fill: replace with fillText / fillNumber; quarantine: write
    the rows aside with the reason (never silently lost)."""
    fill_text: str = Field(default="", max_length=MAX_TEXT_LENGTH)
    """Replacement for missing text when policy is fill."""
    fill_number: float = 0.0
    """Replacement for missing numbers when policy is fill."""


class TextNormalization(SpecModel):
    """Text clean-up applied to queries and item texts."""

    lowercase: bool = True
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC"
    strip_html: bool = True
    collapse_whitespace: bool = True


class Split(SpecModel):
    """How held-out data is carved out without leakage."""

    model_config = _rules(cel.SPLIT_RULES)

    strategy: SplitStrategy | None = None
    """by-query (search: all pairs of a query on one side), leave-one-out or by-time
    (recommendation), predefined (use the validation/test URIs). Default: by-query for
    search-ranking, leave-one-out for recommendation, predefined when validation is given."""
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    seed: int = Field(default=42, ge=0, le=SEED_MAX)


class NegativeSampling(SpecModel):
    """Negatives for implicit feedback (recommendation)."""

    strategy: Literal["none", "uniform", "popularity"] = "popularity"
    per_positive: int = Field(default=4, ge=1, le=1000)
    seed: int = Field(default=42, ge=0, le=SEED_MAX)


class Preprocessing(SpecModel):
    """Cleaning, filtering, splitting and sampling, with a count reported for each step."""

    deduplicate: Deduplication = Field(default_factory=Deduplication)
    missing_values: MissingValues = Field(default_factory=MissingValues)
    text_normalization: TextNormalization = Field(default_factory=TextNormalization)
    min_user_interactions: int = Field(default=0, ge=0, le=1000)
    """k-core filter: drop users with fewer interactions (0 disables)."""
    min_item_interactions: int = Field(default=0, ge=0, le=1000)
    """k-core filter: drop items with fewer interactions (0 disables)."""
    split: Split = Field(default_factory=Split)
    negative_sampling: NegativeSampling = Field(default_factory=NegativeSampling)
    positive_events: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1, max_length=100
    )
    """With columns.eventType: the event types that count as interactions (others are
    dropped and counted); unset keeps every event."""
    max_rows: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    """Read at most this many rows of training data (smoke runs)."""


class DataSpec(SpecModel):
    """The user's logs: where they are, their shape, and how to prepare them."""

    model_config = _rules(cel.DATA_RULES)

    task: Task
    """search-ranking: query-item relevance; recommendation: next-item / click prediction."""
    format: DataFormat = "csv"
    """File format; atomic is the RecBole/UniSRec format (.inter + .text files)."""
    train: StorageUri
    """Training logs."""
    validation: StorageUri | None = None
    """Optional held-out logs; required by the predefined split."""
    test: StorageUri | None = None
    """Optional test logs (predefined split)."""
    catalog: StorageUri | None = None
    """Item catalog with item texts (recommendation)."""
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)


# --------------------------------------------------------------------------- model
class LoraSpec(SpecModel):
    """Low-rank adaptation settings (peft)."""

    rank: int = Field(default=8, ge=1, le=256)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=lambda: ["query", "value"], min_length=1, max_length=64
    )
    """Names of the linear modules to adapt."""


class FineTuning(SpecModel):
    """Full fine-tuning or LoRA."""

    model_config = _rules(cel.FINE_TUNING_RULES)

    method: Literal["full", "lora"] = "full"
    lora: LoraSpec | None = None
    """Required when method is lora."""


class HeadSpec(SpecModel):
    """The scoring head on top of the encoder."""

    type: Literal["linear", "mlp"] = "linear"
    hidden_size: int = Field(default=256, ge=1, le=8192)
    """Hidden width of the mlp head."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    objective: Literal["auto", "regression", "binary", "listwise"] = "auto"
    """auto: regression for graded relevance, binary for clicks / implicit feedback."""


class ModelSpec(SpecModel):
    """The pretrained encoder and what is fine-tuned."""

    model_config = _rules(cel.MODEL_RULES)

    base_model: str = Field(default="all-MiniLM-L6-v2", min_length=1, max_length=2048)
    """A bundled model name (all-MiniLM-L6-v2) or a storage URI of a Hugging Face-format
    model directory. Nothing is ever fetched from a model hub."""
    max_sequence_length: int = Field(default=128, ge=8, le=512)
    history_length: int = Field(default=10, ge=1, le=200)
    """Recommendation: how many of the user's most recent items describe the user."""
    history_encoding: Literal["text", "item-embeddings"] = "text"
    """Recommendation: history as concatenated item texts, or pooled item embeddings."""
    head: HeadSpec = Field(default_factory=HeadSpec)
    fine_tuning: FineTuning = Field(default_factory=FineTuning)


# --------------------------------------------------------------------------- training
class ResourceSpec(SpecModel):
    """Compute per pod."""

    cpu: Quantity = "2"
    memory: Quantity = "8Gi"
    gpu: int = Field(default=0, ge=0, le=16)
    """GPUs per pod (requested as gpuResourceName)."""
    gpu_resource_name: str = Field(default="nvidia.com/gpu", min_length=1, max_length=253)


class DeepSpeedSpec(SpecModel):
    """DeepSpeed ZeRO settings."""

    model_config = _rules(cel.DEEPSPEED_RULES)

    zero_stage: int = Field(default=2, ge=0, le=3)
    """0 = plain data parallel, 1 = optimizer states, 2 = + gradients, 3 = + parameters."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-Offload of optimizer states (stages 1-3)."""
    offload_parameters: Literal["none", "cpu", "nvme"] = "none"
    """ZeRO-Infinity parameter offload (stage 3 only)."""
    nvme_path: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_LENGTH)
    """Local NVMe mount for nvme offload."""
    config_overrides: dict[str, Any] | None = None
    """Merged last into the generated DeepSpeed config (expert use)."""


class Schedule(SpecModel):
    """Learning-rate schedule."""

    model_config = _rules(cel.SCHEDULE_RULES)

    type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int | None = Field(default=None, ge=0, le=MAX_STEP_COUNT)
    warmup_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Fraction of total steps used for warm-up (default 0.1 when warmupSteps is unset)."""


class EarlyStopping(SpecModel):
    """Stop when the validation metric stops improving."""

    metric: str = Field(default="auto", pattern=METRIC_PATTERN, max_length=16)
    """Validation metric to watch; auto: the task's main metric (ndcg@10)."""
    patience: int = Field(default=3, ge=1, le=1000)
    """Evaluations without improvement before stopping."""
    min_delta: float = Field(default=0.0, ge=0.0)


class CheckpointSpec(SpecModel):
    """Checkpoints for resuming after a pod dies."""

    interval_steps: int = Field(default=200, ge=1, le=MAX_STEP_COUNT)
    keep: int = Field(default=2, ge=1, le=100)
    """How many complete checkpoints to keep."""
    uri: StorageUri | None = None
    """Where checkpoints go; default: <artifactsUri>/<name>/g<generation>/checkpoints."""


class TrainingSpec(SpecModel):
    """Distributed fine-tuning as a Kubeflow PyTorchJob (local processes in local mode)."""

    model_config = _rules(cel.TRAINING_RULES)

    image: str = Field(
        default="ghcr.io/recjob/recjob-trainer:0.1.0", min_length=1, max_length=MAX_TEXT_LENGTH
    )
    nodes: int = Field(default=1, ge=1, le=256)
    """PyTorchJob replicas (1 Master + nodes-1 Workers)."""
    processes_per_node: int = Field(default=1, ge=1, le=64)
    """nprocPerNode: training processes in each pod."""
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    precision: Precision = "bf16"
    micro_batch_size: int = Field(default=16, ge=1, le=4096)
    """Samples per process per step."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    learning_rate: float = Field(default=3e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    schedule: Schedule = Field(default_factory=Schedule)
    gradient_clipping: float | None = Field(default=1.0, gt=0.0)
    epochs: int = Field(default=1, ge=1, le=1000)
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEP_COUNT)
    """Stop after this many optimizer steps (wins over epochs when both are set)."""
    eval_interval_steps: int = Field(default=100, ge=1, le=MAX_STEP_COUNT)
    early_stopping: EarlyStopping | None = None
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    max_restarts: int = Field(default=3, ge=0, le=100)
    """Pod restarts the PyTorchJob allows (backoffLimit); training resumes from checkpoints."""
    seed: int = Field(default=42, ge=0, le=SEED_MAX)


# --------------------------------------------------------------------------- compression
class StudentSpec(SpecModel):
    """A smaller student built from the teacher."""

    num_layers: int = Field(default=3, ge=1, le=48)
    """Transformer layers kept (taken from the teacher per layerSelection)."""
    hidden_size: int | None = Field(default=None, ge=32, le=4096)
    """Narrower hidden size (unset keeps the teacher's)."""
    layer_selection: Literal["uniform", "first", "last"] = "uniform"


class DistillationSpec(SpecModel):
    """Knowledge distillation from the fine-tuned teacher."""

    model_config = _rules(cel.DISTILLATION_RULES)

    student: StudentSpec = Field(default_factory=StudentSpec)
    temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    task_weight: float = Field(default=0.5, ge=0.0)
    """Weight of the task loss on the labels."""
    distillation_weight: float = Field(default=0.5, ge=0.0)
    """Weight of the loss against the teacher's scores."""
    intermediate_weight: float = Field(default=0.0, ge=0.0)
    """Weight of hidden-state matching between mapped layers (0 disables)."""
    loss: Literal["mse", "kl", "listwise-kl"] = "mse"
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEP_COUNT)
    """Distillation steps (default: the training budget)."""


class PruningSpec(SpecModel):
    """Pruning after (or instead of) distillation."""

    method: Literal["attention-heads", "ffn-channels", "layers", "magnitude"] = "attention-heads"
    """Structured methods shrink the graph; magnitude zeroes weights (rarely faster)."""
    amount: float = Field(default=0.3, gt=0.0, lt=1.0)
    """Fraction removed."""
    recovery_steps: int = Field(default=100, ge=0, le=MAX_STEP_COUNT)
    """Fine-tuning steps after pruning."""


class CompressionSpec(SpecModel):
    """Optional distillation and/or pruning of the fine-tuned model."""

    model_config = _rules(cel.COMPRESSION_RULES)

    distillation: DistillationSpec | None = None
    pruning: PruningSpec | None = None


# --------------------------------------------------------------------------- export
class QualityBudget(SpecModel):
    """How much ranking quality conversion may cost before the model is refused."""

    model_config = _rules(cel.QUALITY_BUDGET_RULES)

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
class ServingSpec(SpecModel):
    """The KServe InferenceService (Triton runtime) that serves the model."""

    model_config = _rules(cel.SERVING_RULES)

    name: DnsLabel | None = Field(default=None, max_length=45)
    """InferenceService name; default: the RecJob's name. RecJobs naming the same service
    roll out one after another: the first goes to 100%, later ones are canaried."""
    runtime: Literal["triton"] = "triton"
    runtime_name: str = Field(default="kserve-tritonserver", min_length=1, max_length=253)
    """The (Cluster)ServingRuntime KServe uses."""
    storage_uri: StorageUri | None = None
    """Model repository root; default: <artifactsUri>/<service>/repository."""
    deployment_mode: Literal["Serverless", "RawDeployment"] = "Serverless"
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=3, ge=1, le=1000)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)


# --------------------------------------------------------------------------- rollout
class MetricCheck(SpecModel):
    """One canary check: a PromQL query and the range its value must stay in.

    The query is a template; ``{{revision}}`` becomes the canary revision under analysis,
    ``{{stable}}`` the stable revision (to compare the canary with it, e.g. a ratio of
    click-through rates), ``{{namespace}}``, ``{{service}}`` and ``{{interval}}`` are
    filled in too. Missing data never counts as a pass."""

    model_config = _rules(cel.METRIC_CHECK_RULES)

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
                'sum(rate(recjob_inference_errors_total{revision="{{revision}}"}[{{interval}}]))'
                ' / sum(rate(recjob_inference_requests_total{revision="{{revision}}"}'
                "[{{interval}}]))"
            ),
            max=0.01,
        ),
        MetricCheck(
            name="latency-p99",
            query=(
                "histogram_quantile(0.99, sum by (le) (rate("
                'recjob_inference_latency_seconds_bucket{revision="{{revision}}"}'
                "[{{interval}}])))"
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

    model_config = _rules(cel.ROLLOUT_RULES)

    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [10, 25, 50, 100],
        min_length=1,
        max_length=cel.MAX_STEPS,
        json_schema_extra=cel.STEPS_RULES,
    )
    """Canary traffic percents, strictly increasing, ending at 100."""
    interval: Duration = "1m"
    """Time between analyses (and the PromQL range)."""
    analyses_per_step: int = Field(default=1, ge=1, le=100)
    """Passing analyses needed before advancing to the next step."""
    failure_limit: int = Field(default=2, ge=1, le=100)
    """Failed checks that trigger a rollback."""
    metrics: list[MetricCheck] = Field(
        default_factory=_default_metrics, max_length=20, json_schema_extra=cel.METRICS_RULES
    )
    no_data: NoDataPolicy = Field(default_factory=NoDataPolicy)
    manual_approval: bool = False
    """Pause before the last step until the RecJob carries the annotation
    recjob.dev/approve-generation=<its generation>."""
    prometheus_url: str | None = Field(default=None, pattern=URL_PATTERN, max_length=2048)
    """Prometheus to query; default: the operator's setting."""


# --------------------------------------------------------------------------- spec
class RecJobSpec(SpecModel):
    """A model's whole way from logs to a promoted, quantized, served model."""

    model_config = _rules(cel.SPEC_RULES)

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
