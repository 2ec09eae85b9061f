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

import re
from typing import Any

from .common import BUNDLED_MODELS, PLACEHOLDER_SPACE, QUERY_PLACEHOLDERS

Rules = list[dict[str, str]]

#: Most canary steps (RolloutSpec.steps maxItems); the step rules index up to this.
MAX_STEPS = 20


def rule(expression: str, message: str, field_path: str = "", reason: str = "") -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry (``reason``: a Kubernetes FieldValue* cause)."""
    out = {"rule": expression, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def schema_rules(*rules: dict[str, str]) -> dict[str, Any]:
    """The ``json_schema_extra`` that puts ``rules`` on a model's or field's schema."""
    return {"x-kubernetes-validations": list(rules)}


def cel_string(text: str) -> str:
    """``text`` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _one_of(expression: str, values: list[str]) -> str:
    return f"{expression} in [{', '.join(cel_string(v) for v in values)}]"


#: No rule uses ``FieldValueDuplicate``: the API server reports it as ``Duplicate value``
#: without the rule's message (tests/cluster/test_api_validation.py).
REQUIRED, FORBIDDEN = "FieldValueRequired", "FieldValueForbidden"


# --------------------------------------------------------------------------- placeholders
_IDENTIFIER_START = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
_IDENTIFIER_REST = _IDENTIFIER_START + "0123456789"


def _char_class(chars: str) -> str:
    """A regex character class of ``chars`` written as ranges."""
    codes = sorted({ord(c) for c in chars})
    parts, start = [], 0
    while start < len(codes):
        end = start
        while end + 1 < len(codes) and codes[end + 1] == codes[end] + 1:
            end += 1
        first, last = chr(codes[start]), chr(codes[end])
        parts.append(first if first == last else f"{first}-{last}")
        start = end + 1
    return "[" + "".join(parts) + "]"


def _not_in(words: list[str], allowed: str, at_root: bool) -> str:
    """A regex for the identifiers (first character from ``allowed``) not in ``words``,
    built from the words' trie: leave it at some character, stop early, or go on past it.
    RE2 has no lookahead, so this is how CEL tells an unknown placeholder from a known one."""
    children: dict[str, list[str]] = {}
    for word in words:
        if word:
            children.setdefault(word[0], []).append(word[1:])
    branches = []
    if not at_root and "" not in words:
        branches.append("")  # the identifier ends here, a proper prefix of a known name
    others = "".join(c for c in allowed if c not in children)
    # RE2's \w is exactly [0-9A-Za-z_], in the API server and in cel-python alike
    if others == _IDENTIFIER_REST:
        branches.append(r"\w+")
    elif others:
        branches.append(_char_class(others) + r"\w*")
    for char in sorted(children):
        branches.append(re.escape(char) + _not_in(children[char], _IDENTIFIER_REST, False))
    return "(" + "|".join(branches) + ")"


#: A ``{{name}}`` placeholder; spaces are spelled out (RE2's and Python's \s differ).
PLACEHOLDER_PATTERN = (
    rf"\{{\{{{PLACEHOLDER_SPACE}*([A-Za-z_][A-Za-z0-9_]*){PLACEHOLDER_SPACE}*\}}\}}"
)
REVISION_PATTERN = rf"\{{\{{{PLACEHOLDER_SPACE}*revision{PLACEHOLDER_SPACE}*\}}\}}"
UNKNOWN_PLACEHOLDER_PATTERN = (
    rf"\{{\{{{PLACEHOLDER_SPACE}*"
    + _not_in(list(QUERY_PLACEHOLDERS), _IDENTIFIER_START, True)
    + rf"{PLACEHOLDER_SPACE}*\}}\}}"
)
_KNOWN = ", ".join("{{" + name + "}}" for name in QUERY_PLACEHOLDERS)


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
        f"{_NO_STRATEGY} || !({_one_of(_STRATEGY, ['leave-one-out', 'by-time'])})"
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
        f"{_one_of('self.baseModel', list(BUNDLED_MODELS))} || self.baseModel.contains('://')"
        " || self.baseModel.startsWith('/') || self.baseModel.startsWith('./')"
        " || self.baseModel.startsWith('../')",
        f"unknown bundled model; expected one of {', '.join(BUNDLED_MODELS)} or a URI of a "
        "model directory",
        ".baseModel",
    )
)


# --------------------------------------------------------------------------- federated
#: Messages shared with ``api/semantics.py`` (the Python side adds the values it saw).
FEDERATED_SILOS_REQUIRED = (
    "required: list the silos (each with its own data) or set partition (silos made from spec.data)"
)
FEDERATED_SILOS_AND_PARTITION = "set silos or partition, not both"
FEDERATED_DUPLICATE_SILO = "silo names must be unique"
FEDERATED_TOO_FEW_SILOS = "exceeds the number of silos: no round could ever complete"
FEDERATED_MU_REQUIRED = "required by FedProx (the weight of its proximal term)"
FEDERATED_MU_FORBIDDEN = "mu is FedProx's; set type: FedProx or remove mu"
FEDERATED_SERVER_LR_FORBIDDEN = (
    "serverLearningRate is a server optimizer's (FedAdam, FedAvgM); set one of those types "
    "or remove serverLearningRate"
)
FEDERATED_SERVER_MOMENTUM_FORBIDDEN = (
    "serverMomentum is FedAvgM's; set type: FedAvgM or remove serverMomentum"
)
#: The strategies that keep optimizer state on the server (with differential privacy the
#: trainer puts them outside the DP wrapper: they step from the private release only).
SERVER_OPTIMIZERS = ("FedAdam", "FedAvgM")
_SERVER_OPTIMIZERS = "[" + ", ".join(f"'{t}'" for t in SERVER_OPTIMIZERS) + "]"
FEDERATED_COLUMN_REQUIRED = "required when by is column"
FEDERATED_COLUMN_FORBIDDEN = "set, but by is hash; set by: column or remove column"
FEDERATED_SECURE_AGGREGATION_SILOS = (
    "must be at least 2 with secureAggregation: SecAgg+ hides one silo's update only in a "
    "sum of several, and rebuilds a dropped silo's masks from minSilos shares"
)
FEDERATED_ONE_PROCESS = (
    "federated training runs one process per silo (a Flower SuperNode each); must be 1"
)
FEDERATED_LORA_EXCHANGE = (
    "exchange lora sends LoRA adapters, but model.fineTuning.method is not lora; set "
    "model.fineTuning.method lora, or exchange full"
)
FEDERATED_COMPRESSION = "not supported yet with training.federated; remove compression"
FEDERATED_SEQUENTIAL = (
    "not supported yet with training.federated: use architecture auto (cross-encoder for "
    "search-ranking, bi-encoder for recommendation)"
)

PARTITION_RULES = schema_rules(
    rule(
        "self.by != 'column' || has(self.column)",
        FEDERATED_COLUMN_REQUIRED,
        ".column",
        REQUIRED,
    ),
    rule(
        "self.by == 'column' || !has(self.column)",
        FEDERATED_COLUMN_FORBIDDEN,
        ".column",
        FORBIDDEN,
    ),
)

STRATEGY_RULES = schema_rules(
    rule("self.type != 'FedProx' || has(self.mu)", FEDERATED_MU_REQUIRED, ".mu", REQUIRED),
    rule("self.type == 'FedProx' || !has(self.mu)", FEDERATED_MU_FORBIDDEN, ".mu", FORBIDDEN),
    rule(
        f"self.type in {_SERVER_OPTIMIZERS} || !has(self.serverLearningRate)",
        FEDERATED_SERVER_LR_FORBIDDEN,
        ".serverLearningRate",
        FORBIDDEN,
    ),
    rule(
        "self.type == 'FedAvgM' || !has(self.serverMomentum)",
        FEDERATED_SERVER_MOMENTUM_FORBIDDEN,
        ".serverMomentum",
        FORBIDDEN,
    ),
)

FEDERATED_RULES = schema_rules(
    rule("has(self.silos) || has(self.partition)", FEDERATED_SILOS_REQUIRED, ".silos", REQUIRED),
    rule(
        "!has(self.silos) || !has(self.partition)",
        FEDERATED_SILOS_AND_PARTITION,
        ".partition",
        FORBIDDEN,
    ),
    rule(
        "!has(self.silos) || self.silos.all(s, self.silos.exists_one(t, t.name == s.name))",
        FEDERATED_DUPLICATE_SILO,
        ".silos",
    ),
    rule(
        "!has(self.silos) || self.participation.minSilos <= size(self.silos)",
        FEDERATED_TOO_FEW_SILOS,
        ".participation.minSilos",
    ),
    rule(
        "!has(self.partition) || self.participation.minSilos <= self.partition.count",
        FEDERATED_TOO_FEW_SILOS,
        ".participation.minSilos",
    ),
    rule(
        "!self.secureAggregation || self.participation.minSilos >= 2",
        FEDERATED_SECURE_AGGREGATION_SILOS,
        ".participation.minSilos",
    ),
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


# --------------------------------------------------------------------------- export, serving
QUALITY_BUDGET_RULES = schema_rules(
    rule(
        "!has(self.maxRelativeDropVsTeacher)"
        " || self.maxRelativeDropVsTeacher >= self.maxRelativeDrop",
        "cannot be tighter than maxRelativeDrop (the teacher is upstream of the unquantized "
        "student)",
        ".maxRelativeDropVsTeacher",
    )
)

RAW_NEEDS_GATEWAY = (
    "RawDeployment/Standard mode needs a Gateway: KServe splits canary traffic only in "
    "Serverless mode, so RecJob splits it with a Gateway API HTTPRoute on this Gateway"
)
SERVING_RULES = schema_rules(
    rule("self.minReplicas <= self.maxReplicas", "must not exceed maxReplicas", ".minReplicas"),
    rule(
        "self.deploymentMode == 'Serverless' || self.minReplicas >= 1",
        "RawDeployment/Standard cannot scale to zero: at least 1",
        ".minReplicas",
    ),
    rule(
        "self.deploymentMode == 'Serverless' || has(self.gateway)",
        RAW_NEEDS_GATEWAY,
        ".gateway",
        "FieldValueRequired",
    ),
)


# --------------------------------------------------------------------------- rollout
_INDEXES = "[" + ", ".join(str(i) for i in range(MAX_STEPS - 1)) + "]"

STEPS_RULES = schema_rules(
    rule(
        f"{_INDEXES}.all(i, i + 1 >= size(self) || self[i] < self[i + 1])",
        "steps must increase strictly",
    ),
    rule(
        "size(self) == 0 || self[size(self) - 1] == 100",
        "the last step must be 100 (promotion)",
    ),
)

METRICS_RULES = schema_rules(
    rule(
        "self.all(m, self.exists_one(n, n.name == m.name))",
        "metric names must be unique",
    )
)

METRIC_CHECK_RULES = schema_rules(
    rule(
        "has(self.min) || has(self.max)",
        "set min and/or max (a check without a threshold cannot fail)",
    ),
    rule("!has(self.min) || !has(self.max) || self.min <= self.max", "must not exceed max", ".min"),
    rule(
        f"self.query.matches({cel_string(REVISION_PATTERN)})",
        "must contain {{revision}} so the canary and the stable revision are measured apart",
        ".query",
    ),
    rule(
        f"!self.query.matches({cel_string(UNKNOWN_PLACEHOLDER_PATTERN)})",
        f"unknown placeholder; expected {_KNOWN}",
        ".query",
    ),
)

ROLLOUT_RULES = schema_rules(
    rule("duration(self.interval) >= duration('1s')", "at least 1s", ".interval"),
    rule(
        "duration(self.noData.deadline) >= duration(self.interval)",
        "must be at least the analysis interval",
        ".noData.deadline",
    ),
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
    rule(
        "!has(self.training.federated) || self.training.federated.exchange != 'lora'"
        " || self.model.fineTuning.method == 'lora'",
        FEDERATED_LORA_EXCHANGE,
        ".training.federated.exchange",
    ),
    rule(
        "!has(self.training.federated) || !has(self.compression)",
        FEDERATED_COMPRESSION,
        ".compression",
    ),
    rule(
        "!has(self.training.federated) || self.model.architecture != 'sequential'",
        FEDERATED_SEQUENTIAL,
        ".model.architecture",
    ),
)
