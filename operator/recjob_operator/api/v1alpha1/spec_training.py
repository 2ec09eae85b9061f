"""The RecJob spec's ``model``, ``training`` and ``compression`` sections: the encoder and
what is fine-tuned, the distributed training run, and optional distillation / pruning.
Field docstrings become the CRD's descriptions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from . import cel
from .common import SEED_MAX, StorageUri
from .spec_base import (
    MAX_STEP_COUNT,
    MAX_TEXT_LENGTH,
    METRIC_PATTERN,
    ResourceSpec,
    SpecModel,
    with_rules,
)
from .spec_federated import FederatedSpec

Precision = Literal["fp32", "bf16", "fp16"]


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
    """Full fine-tuning, LoRA, or a frozen encoder."""

    model_config = with_rules(cel.FINE_TUNING_RULES)

    method: Literal["full", "lora", "frozen"] = "full"
    """full: every encoder weight trains; lora: low-rank adapters only; frozen: the encoder
    does not train (the sequential architecture then encodes the catalog's texts once,
    before training, and trains what sits on top)."""
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


class SequentialSpec(SpecModel):
    """The sequential recommender (architecture sequential): a causal transformer over the
    user's ordered history of item vectors, each made of the item text's embedding plus a
    learned item-ID embedding."""

    model_config = with_rules(cel.SEQUENTIAL_RULES)

    hidden_size: int = Field(default=128, ge=8, le=4096)
    """Width of item vectors and of the transformer."""
    layers: int = Field(default=2, ge=1, le=24)
    heads: int = Field(default=2, ge=1, le=64)
    """Attention heads; must divide hiddenSize."""
    dropout: float = Field(default=0.3, ge=0.0, lt=1.0)
    item_ids: bool = True
    """Add a learned embedding per item seen in training (items never seen in training are
    represented by their text alone)."""
    temperature: float = Field(default=0.07, ge=0.0, le=10.0)
    """Scores are cosine similarities divided by this (unit-length user and item vectors);
    0: plain dot products, as SASRec."""
    negatives: Literal["catalog", "sampled"] = "catalog"
    """The softmax's other items: the whole catalog (needs fineTuning.method frozen, where
    every item's text embedding is computed once), or the batch's own items plus
    data.preprocessing.negativeSampling's sampled ones (any fine-tuning method)."""


class ModelSpec(SpecModel):
    """The pretrained encoder and what is fine-tuned."""

    model_config = with_rules(cel.MODEL_RULES)

    base_model: str = Field(default="all-MiniLM-L6-v2", min_length=1, max_length=2048)
    """A bundled model name (all-MiniLM-L6-v2) or a storage URI of a Hugging Face-format
    model directory. Nothing is ever fetched from a model hub."""
    max_sequence_length: int = Field(default=128, ge=8, le=512)
    history_length: int = Field(default=10, ge=1, le=200)
    """Recommendation: how many of the user's most recent items describe the user."""
    history_encoding: Literal["text", "item-embeddings"] = "text"
    """Recommendation with the bi-encoder: history as concatenated item texts, or pooled
    item embeddings."""
    architecture: Literal["auto", "sequential"] = "auto"
    """auto: a cross-encoder for search-ranking, a bi-encoder (history vs item) for
    recommendation; sequential (recommendation): an order-aware text-and-ID model, see
    sequential."""
    sequential: SequentialSpec = Field(default_factory=SequentialSpec)
    """Settings of the sequential architecture."""
    head: HeadSpec = Field(default_factory=HeadSpec)
    fine_tuning: FineTuning = Field(default_factory=FineTuning)


class DeepSpeedSpec(SpecModel):
    """DeepSpeed ZeRO settings."""

    model_config = with_rules(cel.DEEPSPEED_RULES)

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

    model_config = with_rules(cel.SCHEDULE_RULES)

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

    model_config = with_rules(cel.TRAINING_RULES)

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
    federated: FederatedSpec | None = None
    """Federated fine-tuning across data silos (Flower) instead of one PyTorchJob over
    spec.data: each silo trains on its own data only and the server aggregates updates."""


# --------------------------------------------------------------------------- compression
class StudentSpec(SpecModel):
    """A smaller student built from the teacher (architecture sequential: from its
    transformer, model.sequential)."""

    num_layers: int = Field(default=3, ge=1, le=48)
    """Transformer layers kept (taken from the teacher per layerSelection)."""
    hidden_size: int | None = Field(default=None, ge=32, le=4096)
    """Narrower hidden size (unset keeps the teacher's). Architecture sequential: the width
    of the transformer and of every item vector (the served item table), its weights
    trained afresh from the teacher."""
    layer_selection: Literal["uniform", "first", "last"] = "uniform"


class DistillationSpec(SpecModel):
    """Knowledge distillation from the fine-tuned teacher."""

    model_config = with_rules(cel.DISTILLATION_RULES)

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
    """Structured methods shrink the graph; magnitude zeroes weights (rarely faster).
    Architecture sequential: ffn-channels, layers or magnitude (not attention-heads)."""
    amount: float = Field(default=0.3, gt=0.0, lt=1.0)
    """Fraction removed."""
    recovery_steps: int = Field(default=100, ge=0, le=MAX_STEP_COUNT)
    """Fine-tuning steps after pruning."""


class CompressionSpec(SpecModel):
    """Optional distillation and/or pruning of the fine-tuned model."""

    model_config = with_rules(cel.COMPRESSION_RULES)

    distillation: DistillationSpec | None = None
    pruning: PruningSpec | None = None
