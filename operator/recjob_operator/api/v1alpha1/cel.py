"""CEL validation rules (``x-kubernetes-validations``) of the RecJob spec.

The cross-field rules of ``recjob_operator.api.validation`` that CEL can express, so the API
server refuses a bad RecJob at ``kubectl apply`` instead of the operator marking it
``Valid=False`` later. The spec types attach these lists with ``json_schema_extra``; the
CRD generator copies them into the schema, and ``api/semantics.py`` keeps the same rules in
Python (for local mode, ``recjob validate`` and objects stored before the CRD had them).

Rules run after the API server's defaulting, so fields with a default are always present;
optional fields without one are tested with ``has()``. Every string and list a rule reads
has a maxLength / maxItems bound in the schema so the API server can estimate the cost.
"""

from __future__ import annotations

from .cel_federated import FEDERATED_ONE_PROCESS, FEDERATED_SPEC_RULES
from .cel_syntax import (
    FORBIDDEN,
    REQUIRED,
    Rules,
    cel_string,
    one_of,
    rule,
    schema_rules,
)
from .common import BUNDLED_MODELS


# --------------------------------------------------------------------------- metrics vs task
def _metric_rules(metric: str, guard: str, field_path: str) -> Rules:
    """The task a quality metric needs (semantics._metric_fits_task)."""
    prefix = f"{guard} || " if guard else ""
    return [
        rule(
            f"{prefix}{metric} != 'rmse' || self.data.task == 'search-ranking'",
            "rmse needs graded relevance labels (task search-ranking)",
            field_path,
        ),
        rule(
            f"{prefix}!{metric}.startsWith('hr@') || self.data.task == 'recommendation'",
            "hit rate (hr@k) is a next-item metric (task recommendation)",
            field_path,
        ),
    ]


# --------------------------------------------------------------------------- data
SPLIT_RULES = schema_rules(
    rule(
        "self.validationFraction + self.testFraction < 0.9",
        "validationFraction + testFraction must be below 0.9 (something must be left to train on)",
        ".testFraction",
    )
)

_STRATEGY = "self.preprocessing.split.strategy"
_NO_STRATEGY = f"!has({_STRATEGY})"
_CARVED = "self.format == 'atomic'"

DATA_RULES = schema_rules(
    rule(
        "self.format != 'atomic' || self.task == 'recommendation'",
        "the atomic (RecBole) format holds interaction sequences; it needs task: recommendation",
        ".format",
    ),
    rule(
        "self.format != 'atomic' || has(self.catalog)",
        "the atomic format needs the item texts: set catalog to the .text file",
        ".catalog",
        REQUIRED,
    ),
    rule(
        "self.format != 'atomic' || has(self.validation) || has(self.test)",
        "the atomic format needs the held-out .inter files: set test (and validation, else "
        "validation is carved from the training file)",
        ".test",
        REQUIRED,
    ),
    rule(
        f"self.format != 'atomic' || {_NO_STRATEGY} || {_STRATEGY} != 'by-time'",
        "the atomic format's .inter files hold item sequences without times; use "
        "predefined, or leave-one-out to carve validation from the training file",
        ".preprocessing.split.strategy",
    ),
    *[
        rule(
            f"{_CARVED} || self.task != 'search-ranking' || has(self.columns.{column})",
            "required for task search-ranking (name the column that holds it)",
            f".columns.{column}",
            REQUIRED,
        )
        for column in ("query", "itemText", "label")
    ],
    *[
        rule(
            f"{_CARVED} || self.task != 'recommendation' || has(self.columns.{column})",
            "required for task recommendation (name the column that holds it)",
            f".columns.{column}",
            REQUIRED,
        )
        for column in ("userId", "itemId", "itemText")
    ],
    rule(
        f"{_CARVED} || !has(self.columns.history)",
        "only the atomic format reads pre-built histories (its .inter files); other formats "
        "build them from the interactions",
        ".columns.history",
        FORBIDDEN,
    ),
    rule(
        f"{_CARVED} || !has(self.itemIndex)",
        "only the atomic format maps catalog item codes through an item index",
        ".itemIndex",
        FORBIDDEN,
    ),
    rule(
        "!has(self.candidates) || self.task == 'recommendation'",
        "candidate lists are ranked for next-item recommendation (task recommendation); "
        "search-ranking test files already list each query's items",
        ".candidates",
        FORBIDDEN,
    ),
    rule(
        "!has(self.columns.candidates) || has(self.candidates)",
        "set, but spec.data.candidates names no file",
        ".columns.candidates",
        FORBIDDEN,
    ),
    rule(
        "!has(self.preprocessing.positiveEvents) || has(self.columns.eventType)",
        "needs spec.data.columns.eventType",
        ".preprocessing.positiveEvents",
    ),
    rule(
        f"{_NO_STRATEGY} || {_STRATEGY} != 'by-query' || self.task == 'search-ranking'",
        "by-query splits query-item pairs; for task recommendation use leave-one-out, "
        "by-time or predefined",
        ".preprocessing.split.strategy",
    ),
    rule(
        f"{_NO_STRATEGY} || !({one_of(_STRATEGY, ['leave-one-out', 'by-time'])})"
        " || self.task == 'recommendation'",
        "leave-one-out and by-time split user histories; for task search-ranking use "
        "by-query or predefined",
        ".preprocessing.split.strategy",
    ),
    rule(
        f"{_NO_STRATEGY} || {_STRATEGY} != 'by-time' || has(self.columns.timestamp)",
        "by-time needs spec.data.columns.timestamp",
        ".preprocessing.split.strategy",
    ),
    rule(
        f"{_NO_STRATEGY} || {_STRATEGY} != 'predefined' || has(self.validation)",
        "required by split strategy predefined",
        ".validation",
        REQUIRED,
    ),
    rule(
        f"!has(self.validation) || {_NO_STRATEGY} || {_STRATEGY} == 'predefined'",
        "validation data is given, so the split is predefined; remove the strategy or "
        "the validation URI",
        ".preprocessing.split.strategy",
    ),
    rule(
        "!has(self.validation) || has(self.test)",
        "validation data is given but no test data, so nothing would be left to evaluate "
        "the model on: set test, or remove validation to carve both from train",
        ".test",
        REQUIRED,
    ),
)


# --------------------------------------------------------------------------- model
FINE_TUNING_RULES = schema_rules(
    rule(
        "self.method != 'lora' || has(self.lora)", "required when method is lora", ".lora", REQUIRED
    ),
    rule(
        "self.method == 'lora' || !has(self.lora)",
        "lora settings are given but method is not lora; set method: lora or remove lora",
        ".method",
    ),
)

SEQUENTIAL_RULES = schema_rules(
    rule(
        "self.hiddenSize % self.heads == 0",
        "heads must divide hiddenSize",
        ".heads",
    ),
)

MODEL_RULES = schema_rules(
    rule(
        f"{one_of('self.baseModel', list(BUNDLED_MODELS))} || self.baseModel.contains('://')"
        " || self.baseModel.startsWith('/') || self.baseModel.startsWith('./')"
        " || self.baseModel.startsWith('../')",
        f"unknown bundled model; expected one of {', '.join(BUNDLED_MODELS)} or a URI of a "
        "model directory",
        ".baseModel",
    )
)


# --------------------------------------------------------------------------- training
_NVME = "(self.offloadOptimizer == 'nvme' || self.offloadParameters == 'nvme')"

DEEPSPEED_RULES = schema_rules(
    rule(
        "self.offloadOptimizer == 'none' || self.zeroStage >= 1",
        "optimizer offload needs zeroStage 1, 2 or 3",
        ".offloadOptimizer",
    ),
    rule(
        "self.offloadParameters == 'none' || self.zeroStage == 3",
        "parameter offload needs zeroStage 3",
        ".offloadParameters",
    ),
    rule(
        f"!{_NVME} || has(self.nvmePath)", "required when offloading to nvme", ".nvmePath", REQUIRED
    ),
    rule(
        f"!has(self.nvmePath) || {_NVME}",
        "set, but nothing is offloaded to nvme",
        ".nvmePath",
        FORBIDDEN,
    ),
)

SCHEDULE_RULES = schema_rules(
    rule(
        "!has(self.warmupSteps) || !has(self.warmupRatio)",
        "set warmupSteps or warmupRatio, not both",
        ".warmupRatio",
    )
)

TRAINING_RULES = schema_rules(
    rule(
        "self.precision != 'fp16' || self.resources.gpu >= 1",
        "fp16 mixed precision needs GPUs (resources.gpu >= 1); use bf16 or fp32 on CPU",
        ".precision",
    ),
    rule(
        "self.resources.gpu == 0 || self.processesPerNode <= self.resources.gpu",
        "more processes than GPUs per pod; DeepSpeed runs one process per GPU",
        ".processesPerNode",
    ),
    rule(
        "!has(self.maxSteps) || !has(self.schedule.warmupSteps)"
        " || self.schedule.warmupSteps < self.maxSteps",
        "must be below maxSteps",
        ".schedule.warmupSteps",
    ),
    rule(
        "!has(self.maxSteps) || self.checkpoint.intervalSteps <= self.maxSteps",
        "exceeds maxSteps: no checkpoint would be written, so a restarted pod would start over",
        ".checkpoint.intervalSteps",
    ),
    rule("!has(self.federated) || self.nodes == 1", FEDERATED_ONE_PROCESS, ".nodes"),
    rule(
        "!has(self.federated) || self.processesPerNode == 1",
        FEDERATED_ONE_PROCESS,
        ".processesPerNode",
    ),
)


# --------------------------------------------------------------------------- compression
COMPRESSION_RULES = schema_rules(
    rule(
        "has(self.distillation) || has(self.pruning)",
        "set distillation and/or pruning, or remove compression",
    )
)

DISTILLATION_RULES = schema_rules(
    rule(
        "self.taskWeight + self.distillationWeight + self.intermediateWeight > 0.0",
        "taskWeight, distillationWeight and intermediateWeight are all 0",
        ".distillationWeight",
    ),
    rule(
        "self.intermediateWeight <= 0.0 || !has(self.student.hiddenSize)",
        "hidden-state matching needs the teacher's hidden size (leave student.hiddenSize unset)",
        ".intermediateWeight",
    ),
)


def _teacher_rules() -> Rules:
    """The student must be smaller than the teacher and shaped to fit it: a bundled
    encoder (auto architecture) or the sequential recommender's transformer."""
    out: Rules = []
    student = "self.compression.distillation.student"
    hidden = f"has({student}.hiddenSize)"
    for name, (layers, width, heads) in BUNDLED_MODELS.items():
        guard = (
            f"!has(self.compression) || !has(self.compression.distillation)"
            f" || self.model.architecture == 'sequential'"
            f" || self.model.baseModel != {cel_string(name)}"
        )
        path = ".compression.distillation.student"
        out += [
            rule(
                f"{guard} || {student}.numLayers < {layers}"
                f" || ({hidden} && {student}.hiddenSize < {width})",
                f"the student must be smaller than the teacher {name} ({layers} layers, "
                f"hidden {width})",
                f"{path}.numLayers",
            ),
            rule(
                f"{guard} || {student}.numLayers <= {layers}",
                f"at most the teacher's {layers} layers ({name})",
                f"{path}.numLayers",
            ),
            rule(
                f"{guard} || !{hidden} || {student}.hiddenSize % {heads} == 0",
                f"must be a multiple of the teacher's {heads} attention heads ({name})",
                f"{path}.hiddenSize",
            ),
            rule(
                f"{guard} || !{hidden} || {student}.hiddenSize <= {width}",
                f"at most the teacher's hidden size {width} ({name})",
                f"{path}.hiddenSize",
            ),
        ]
    guard = (
        "!has(self.compression) || !has(self.compression.distillation)"
        " || self.model.architecture != 'sequential'"
    )
    teacher, path = "self.model.sequential", ".compression.distillation.student"
    out += [
        rule(
            f"{guard} || {student}.numLayers < {teacher}.layers"
            f" || ({hidden} && {student}.hiddenSize < {teacher}.hiddenSize)",
            SEQUENTIAL_STUDENT_SMALLER,
            f"{path}.numLayers",
        ),
        rule(
            f"{guard} || {student}.numLayers <= {teacher}.layers",
            SEQUENTIAL_STUDENT_LAYERS,
            f"{path}.numLayers",
        ),
        rule(
            f"{guard} || !{hidden} || {student}.hiddenSize % {teacher}.heads == 0",
            SEQUENTIAL_STUDENT_HEADS,
            f"{path}.hiddenSize",
        ),
        rule(
            f"{guard} || !{hidden} || {student}.hiddenSize <= {teacher}.hiddenSize",
            SEQUENTIAL_STUDENT_WIDTH,
            f"{path}.hiddenSize",
        ),
    ]
    return out


#: Messages shared with api/semantics.py (the sequential recommender's student and pruning).
SEQUENTIAL_STUDENT_SMALLER = (
    "the student must be smaller than the teacher (model.sequential: fewer layers, or a "
    "smaller hiddenSize)"
)
SEQUENTIAL_STUDENT_LAYERS = "at most the teacher's model.sequential.layers"
SEQUENTIAL_STUDENT_HEADS = "must be a multiple of the teacher's model.sequential.heads"
SEQUENTIAL_STUDENT_WIDTH = "at most the teacher's model.sequential.hiddenSize"
SEQUENTIAL_PRUNING = (
    "attention-heads does not apply to the sequential architecture (nn.MultiheadAttention "
    "ties the heads' width to the model width); use ffn-channels, layers or magnitude"
)


# --------------------------------------------------------------------------- whole spec
SPEC_RULES = schema_rules(
    rule(
        "self.model.architecture != 'sequential' || self.data.task == 'recommendation'",
        "the sequential architecture is a recommender; data.task must be recommendation",
        ".model.architecture",
    ),
    rule(
        "self.model.architecture != 'sequential' || self.model.sequential.negatives != "
        "'catalog' || self.model.fineTuning.method == 'frozen'",
        "a softmax over the whole catalog needs every item's text embedding at each step: "
        "set model.fineTuning.method frozen, or model.sequential.negatives sampled",
        ".model.sequential.negatives",
    ),
    rule(
        "self.model.architecture != 'sequential' || !has(self.compression)"
        " || !has(self.compression.pruning)"
        " || self.compression.pruning.method != 'attention-heads'",
        SEQUENTIAL_PRUNING,
        ".compression.pruning.method",
    ),
    rule(
        "self.model.head.objective != 'listwise' || self.data.task != 'search-ranking'",
        "listwise ranks a user's candidates (recommendation); search-ranking uses regression "
        "(graded labels) or binary (clicks)",
        ".model.head.objective",
    ),
    rule(
        "self.model.head.objective != 'regression' || self.data.task != 'recommendation'",
        "regression needs graded labels; recommendation uses binary or listwise",
        ".model.head.objective",
    ),
    *_metric_rules(
        "self.training.earlyStopping.metric",
        "!has(self.training.earlyStopping)",
        ".training.earlyStopping.metric",
    ),
    *_metric_rules("self.export.qualityBudget.metric", "", ".export.qualityBudget.metric"),
    rule(
        "!self.export.target.startsWith('tensorrt') || self.export.resources.gpu >= 1",
        "TensorRT targets build the engine on a GPU: at least 1",
        ".export.resources.gpu",
    ),
    rule(
        "!self.export.target.startsWith('tensorrt') || self.serving.resources.gpu >= 1",
        "TensorRT plans run on GPUs: at least 1",
        ".serving.resources.gpu",
    ),
    rule(
        "!has(self.export.qualityBudget.maxRelativeDropVsTeacher) || has(self.compression)",
        "only meaningful with spec.compression (there is no separate teacher)",
        ".export.qualityBudget.maxRelativeDropVsTeacher",
    ),
    *_teacher_rules(),
    *FEDERATED_SPEC_RULES,
)
