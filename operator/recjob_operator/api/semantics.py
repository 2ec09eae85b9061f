"""RecJob semantic rules: cross-field rules the schema cannot express, each problem naming
the field path and what was expected.

The rules are also CEL rules of the CRD (``v1alpha1/cel.py``), so the API server refuses
most bad RecJobs itself; only the rules about the free-form ``deepspeed.configOverrides``
(which CEL cannot read) are checked here alone. Both must change together:
``tests/api/test_cel.py`` proves each CEL rule refuses what these refuse.
"""

from __future__ import annotations

import re

from .problems import Problem, Problems
from .semantics_federated import federated_rules, silo_file_rules
from .v1alpha1 import RecJob, cel, parse_duration
from .v1alpha1.cel_delivery import RAW_NEEDS_GATEWAY
from .v1alpha1.cel_syntax import PLACEHOLDER_PATTERN
from .v1alpha1.common import BUNDLED_MODELS, QUERY_PLACEHOLDERS
from .v1alpha1.deepspeed_overrides import override_problems
from .v1alpha1.promql import QueryScopeError, check_template
from .v1alpha1.spec import RecJobSpec
from .v1alpha1.storage import storage_problems

_PLACEHOLDER_RE = re.compile(PLACEHOLDER_PATTERN)

#: DeepSpeed config keys that the spec owns; configOverrides may not set them.
_OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "spec.training.microBatchSize",
    "gradient_accumulation_steps": "spec.training.gradientAccumulationSteps",
    "train_batch_size": "spec.training.microBatchSize x gradientAccumulationSteps x world size",
    "bf16": "spec.training.precision",
    "fp16": "spec.training.precision",
    "gradient_clipping": "spec.training.gradientClipping",
}


class SemanticsByGeneration:
    """:func:`semantic_problems` of one RecJob, found once per ``metadata.generation``: the
    spec of a generation never changes (status writes and label or annotation edits leave
    it), so a reconcile loop re-reading the object need not re-check it (a pass was 5% of
    the operator's CPU in these checks, bench/operator_scale.py)."""

    def __init__(self) -> None:
        self._generation: int | None = None
        self._problems: list[Problem] = []

    def __call__(self, job: RecJob) -> list[Problem]:
        """The semantic problems of ``job``'s spec."""
        generation = job.metadata.generation
        if generation is None or generation != self._generation:
            self._problems, self._generation = semantic_problems(job), generation
        return list(self._problems)


def semantic_problems(job: RecJob) -> list[Problem]:
    """Cross-field rules the schema cannot express."""
    spec = job.spec
    problems: list[Problem] = []
    for check in (
        _data_rules,
        _model_rules,
        _training_rules,
        federated_rules,
        silo_file_rules,
        _compression_rules,
        _export_rules,
        _serving_rules,
        _rollout_rules,
        _query_scope_rules,
    ):
        problems.extend(check(spec))
    # storage URIs (claims, file://, object stores): api/v1alpha1/storage.py
    problems.extend(Problem(path, message) for path, message in storage_problems(spec))
    return problems


def _metric_fits_task(metric: str, task: str) -> str | None:
    """Why ``metric`` cannot be used for ``task`` (None if it can)."""
    if metric == "rmse" and task != "search-ranking":
        return "rmse needs graded relevance labels (task search-ranking)"
    if metric.startswith("hr@") and task != "recommendation":
        return "hit rate (hr@k) is a next-item metric (task recommendation)"
    return None


def _data_rules(spec: RecJobSpec) -> list[Problem]:
    data, p = spec.data, "spec.data"
    cols = data.columns
    out = Problems()
    if data.format == "atomic":
        if data.task != "recommendation":
            out.add(
                f"{p}.format",
                "the atomic (RecBole) format holds interaction "
                "sequences; it needs task: recommendation",
            )
        if data.catalog is None:
            out.add(
                f"{p}.catalog",
                "the atomic format needs the item texts: set catalog to the .text file",
            )
        if data.validation is None and data.test is None:
            out.add(
                f"{p}.test",
                "the atomic format needs the held-out .inter files: set test (and "
                "validation, else validation is carved from the training file)",
            )
        if data.preprocessing.split.strategy == "by-time":
            out.add(
                f"{p}.preprocessing.split.strategy",
                "the atomic format's .inter files hold item sequences without times; use "
                "predefined, or leave-one-out to carve validation from the training file",
            )
    elif data.task == "search-ranking":
        for name in ("query", "item_text", "label"):
            if getattr(cols, name) is None:
                alias = type(cols).model_fields[name].alias
                out.add(
                    f"{p}.columns.{alias}",
                    "required for task search-ranking (name the column that holds it)",
                )
    else:
        for name in ("user_id", "item_id", "item_text"):
            if getattr(cols, name) is None:
                alias = type(cols).model_fields[name].alias
                where = " (in the catalog)" if name == "item_text" and data.catalog else ""
                out.add(
                    f"{p}.columns.{alias}",
                    f"required for task recommendation (name the column that holds it{where})",
                )

    if data.format != "atomic":
        if cols.history is not None:
            out.add(
                f"{p}.columns.history",
                "only the atomic format reads pre-built histories (its .inter files); "
                "other formats build them from the interactions",
            )
        if data.item_index is not None:
            out.add(
                f"{p}.itemIndex",
                "only the atomic format maps catalog item codes through an item index",
            )
    if data.candidates is not None and data.task != "recommendation":
        out.add(
            f"{p}.candidates",
            "candidate lists are ranked for next-item recommendation (task recommendation); "
            "search-ranking test files already list each query's items",
        )
    if cols.candidates is not None and data.candidates is None:
        out.add(f"{p}.columns.candidates", "set, but spec.data.candidates names no file")
    if data.preprocessing.positive_events and cols.event_type is None:
        out.add(f"{p}.preprocessing.positiveEvents", "needs spec.data.columns.eventType")
    split = data.preprocessing.split
    sp = f"{p}.preprocessing.split"
    strategy = split.strategy
    if strategy == "by-query" and data.task != "search-ranking":
        out.add(
            f"{sp}.strategy",
            "by-query splits query-item pairs; for task "
            "recommendation use leave-one-out, by-time or predefined",
        )
    if strategy in ("leave-one-out", "by-time") and data.task != "recommendation":
        out.add(
            f"{sp}.strategy",
            f"{strategy} splits user histories; for task search-ranking use by-query or predefined",
        )
    if strategy == "by-time" and cols.timestamp is None:
        out.add(f"{sp}.strategy", "by-time needs spec.data.columns.timestamp")
    if strategy == "predefined" and data.validation is None:
        out.add(f"{p}.validation", "required by split strategy predefined")
    if data.validation is not None and strategy not in (None, "predefined"):
        out.add(
            f"{sp}.strategy",
            f"validation data is given, so the split is "
            f"predefined; remove strategy {strategy!r} or the validation URI",
        )
    if data.validation is not None and data.test is None:
        out.add(
            f"{p}.test",
            "validation data is given but no test data, so nothing would be left to "
            "evaluate the model on: set test, or remove validation to carve both from train",
        )
    if split.validation_fraction + split.test_fraction >= 0.9:
        out.add(
            f"{sp}.testFraction",
            "validationFraction + testFraction must be "
            "below 0.9 (something must be left to train on)",
        )
    return out


def _model_rules(spec: RecJobSpec) -> list[Problem]:
    model, p = spec.model, "spec.model"
    out = Problems()
    base = model.base_model
    looks_like_uri = "://" in base or base.startswith(("/", "./", "../"))
    if not looks_like_uri and base not in BUNDLED_MODELS:
        out.add(
            f"{p}.baseModel",
            f"unknown bundled model {base!r}; expected one of "
            f"{', '.join(BUNDLED_MODELS)} or a URI of a model directory",
        )
    tuning = model.fine_tuning
    if tuning.method == "lora" and tuning.lora is None:
        out.add(f"{p}.fineTuning.lora", "required when method is lora")
    if tuning.method != "lora" and tuning.lora is not None:
        out.add(
            f"{p}.fineTuning.method",
            "lora settings are given but method is not lora; set method: lora or remove lora",
        )
    sequential = model.sequential
    if sequential.hidden_size % sequential.heads:
        out.add(f"{p}.sequential.heads", "heads must divide hiddenSize")
    if model.architecture == "sequential":
        if spec.data.task != "recommendation":
            out.add(
                f"{p}.architecture",
                "the sequential architecture is a recommender; data.task must be recommendation",
            )
        if sequential.negatives == "catalog" and tuning.method != "frozen":
            out.add(
                f"{p}.sequential.negatives",
                "a softmax over the whole catalog needs every item's text embedding at each "
                "step: set model.fineTuning.method frozen, or model.sequential.negatives "
                "sampled",
            )
    if model.head.objective == "listwise" and spec.data.task == "search-ranking":
        out.add(
            f"{p}.head.objective",
            "listwise ranks a user's candidates (recommendation); search-ranking uses "
            "regression (graded labels) or binary (clicks)",
        )
    if model.head.objective == "regression" and spec.data.task == "recommendation":
        out.add(
            f"{p}.head.objective",
            "regression needs graded labels; recommendation uses binary or listwise",
        )
    return out


def _training_rules(spec: RecJobSpec) -> list[Problem]:
    t, p = spec.training, "spec.training"
    out = Problems()
    ds = t.deepspeed
    if ds.offload_optimizer != "none" and ds.zero_stage < 1:
        out.add(
            f"{p}.deepspeed.offloadOptimizer",
            f"optimizer offload needs zeroStage 1, 2 or 3 (got zeroStage {ds.zero_stage})",
        )
    if ds.offload_parameters != "none" and ds.zero_stage != 3:
        out.add(
            f"{p}.deepspeed.offloadParameters",
            f"parameter offload needs zeroStage 3 (got zeroStage {ds.zero_stage})",
        )
    uses_nvme = "nvme" in (ds.offload_optimizer, ds.offload_parameters)
    if uses_nvme and ds.nvme_path is None:
        out.add(f"{p}.deepspeed.nvmePath", "required when offloading to nvme")
    if ds.nvme_path is not None and not uses_nvme:
        out.add(f"{p}.deepspeed.nvmePath", "set, but nothing is offloaded to nvme")
    for key, owner in _OWNED_DEEPSPEED_KEYS.items():
        if ds.config_overrides and key in ds.config_overrides:
            out.add(
                f"{p}.deepspeed.configOverrides.{key}",
                f"owned by the spec; set {owner} instead",
            )
    for where, message in override_problems(ds.config_overrides or {}):
        if where in _OWNED_DEEPSPEED_KEYS:  # reported below, naming the spec field to use
            continue
        out.add(f"{p}.deepspeed.configOverrides.{where}".rstrip("."), message)
    zero = (ds.config_overrides or {}).get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        out.add(
            f"{p}.deepspeed.configOverrides.zero_optimization.stage",
            "owned by the spec; set spec.training.deepspeed.zeroStage instead",
        )
    gpus = t.resources.gpu
    if t.precision == "fp16" and gpus == 0:
        out.add(
            f"{p}.precision",
            "fp16 mixed precision needs GPUs (resources.gpu >= 1); use bf16 or fp32 on CPU",
        )
    if gpus > 0 and t.processes_per_node > gpus:
        out.add(
            f"{p}.processesPerNode",
            f"{t.processes_per_node} processes but "
            f"{gpus} GPU(s) per pod; DeepSpeed runs one process per GPU",
        )
    if t.nodes * t.processes_per_node < 1:
        out.add(f"{p}.nodes", "nodes x processesPerNode must be at least 1")
    sched = t.schedule
    if sched.warmup_steps is not None and sched.warmup_ratio is not None:
        out.add(f"{p}.schedule.warmupRatio", "set warmupSteps or warmupRatio, not both")
    if t.max_steps is not None:
        if sched.warmup_steps is not None and sched.warmup_steps >= t.max_steps:
            out.add(
                f"{p}.schedule.warmupSteps",
                f"must be below maxSteps ({t.max_steps}), got {sched.warmup_steps}",
            )
        if t.checkpoint.interval_steps > t.max_steps:
            out.add(
                f"{p}.checkpoint.intervalSteps",
                f"{t.checkpoint.interval_steps} "
                f"exceeds maxSteps ({t.max_steps}): no checkpoint would be "
                "written, so a restarted pod would start over",
            )
    if t.early_stopping is not None:
        reason = _metric_fits_task(t.early_stopping.metric, spec.data.task)
        if reason:
            out.add(f"{p}.earlyStopping.metric", reason)
    return out


def _compression_rules(spec: RecJobSpec) -> list[Problem]:
    c, p = spec.compression, "spec.compression"
    if c is None:
        return []
    if c.distillation is None and c.pruning is None:
        return [Problem(p, "set distillation and/or pruning, or remove compression")]
    out = Problems()
    sequential = spec.model.architecture == "sequential"
    teacher = None if sequential else BUNDLED_MODELS.get(spec.model.base_model)
    d = c.distillation
    if sequential and c.pruning is not None and c.pruning.method == "attention-heads":
        out.add(f"{p}.pruning.method", cel.SEQUENTIAL_PRUNING)
    if d is not None:
        if d.task_weight + d.distillation_weight + d.intermediate_weight <= 0:
            out.add(
                f"{p}.distillation.distillationWeight",
                "taskWeight, distillationWeight and intermediateWeight are all 0",
            )
        if sequential:  # its transformer is the teacher (model.sequential)
            seq = spec.model.sequential
            layers, hidden, heads = seq.layers, seq.hidden_size, seq.heads
            s = d.student
            if s.num_layers >= layers and (s.hidden_size is None or s.hidden_size >= hidden):
                out.add(f"{p}.distillation.student.numLayers", cel.SEQUENTIAL_STUDENT_SMALLER)
            if s.num_layers > layers:
                out.add(
                    f"{p}.distillation.student.numLayers",
                    f"{cel.SEQUENTIAL_STUDENT_LAYERS} ({layers}), got {s.num_layers}",
                )
            if s.hidden_size is not None and s.hidden_size % heads:
                out.add(
                    f"{p}.distillation.student.hiddenSize",
                    f"{cel.SEQUENTIAL_STUDENT_HEADS} ({heads}), got {s.hidden_size}",
                )
            if s.hidden_size is not None and s.hidden_size > hidden:
                out.add(
                    f"{p}.distillation.student.hiddenSize",
                    f"{cel.SEQUENTIAL_STUDENT_WIDTH} ({hidden}), got {s.hidden_size}",
                )
        if teacher is not None:
            layers, hidden, heads = teacher
            s = d.student
            if s.num_layers >= layers and (s.hidden_size is None or s.hidden_size >= hidden):
                out.add(
                    f"{p}.distillation.student.numLayers",
                    f"the student must be "
                    f"smaller than the teacher ({layers} layers, hidden {hidden})",
                )
            if s.num_layers > layers:
                out.add(
                    f"{p}.distillation.student.numLayers",
                    f"at most the teacher's {layers} layers, got {s.num_layers}",
                )
            if s.hidden_size is not None and s.hidden_size % heads:
                out.add(
                    f"{p}.distillation.student.hiddenSize",
                    f"must be a multiple of the teacher's {heads} attention heads",
                )
            if s.hidden_size is not None and s.hidden_size > hidden:
                out.add(
                    f"{p}.distillation.student.hiddenSize",
                    f"at most the teacher's {hidden}, got {s.hidden_size}",
                )
        if d.intermediate_weight > 0 and d.student.hidden_size is not None:
            out.add(
                f"{p}.distillation.intermediateWeight",
                "hidden-state matching "
                "needs the teacher's hidden size (leave student.hiddenSize unset)",
            )
    return out


def _export_rules(spec: RecJobSpec) -> list[Problem]:
    e, p = spec.export, "spec.export"
    out = Problems()
    if e.target.startswith("tensorrt"):
        if e.resources.gpu < 1:
            out.add(
                f"{p}.resources.gpu",
                f"{e.target} builds a TensorRT engine on a GPU: at least 1",
            )
        if spec.serving.resources.gpu < 1:
            out.add("spec.serving.resources.gpu", f"{e.target} plans run on GPUs: at least 1")
    budget = e.quality_budget
    reason = _metric_fits_task(budget.metric, spec.data.task)
    if reason:
        out.add(f"{p}.qualityBudget.metric", reason)
    if budget.max_relative_drop_vs_teacher is not None:
        if spec.compression is None:
            out.add(
                f"{p}.qualityBudget.maxRelativeDropVsTeacher",
                "only meaningful with spec.compression (there is no separate teacher)",
            )
        elif budget.max_relative_drop_vs_teacher < budget.max_relative_drop:
            out.add(
                f"{p}.qualityBudget.maxRelativeDropVsTeacher",
                "cannot be "
                "tighter than maxRelativeDrop (the teacher is upstream of the "
                "unquantized student)",
            )
    return out


def _serving_rules(spec: RecJobSpec) -> list[Problem]:
    s, p = spec.serving, "spec.serving"
    out = Problems()
    if s.min_replicas > s.max_replicas:
        out.add(
            f"{p}.minReplicas",
            f"must not exceed maxReplicas ({s.max_replicas}), got {s.min_replicas}",
        )
    if s.raw and s.min_replicas < 1:
        out.add(f"{p}.minReplicas", "RawDeployment/Standard cannot scale to zero: at least 1")
    if s.raw and s.gateway is None:
        out.add(f"{p}.gateway", RAW_NEEDS_GATEWAY)
    return out


def _rollout_rules(spec: RecJobSpec) -> list[Problem]:
    r, p = spec.rollout, "spec.rollout"
    out = Problems()
    for i in range(1, len(r.steps)):
        if r.steps[i] <= r.steps[i - 1]:
            out.add(
                f"{p}.steps[{i}]",
                f"steps must increase strictly: {r.steps[i]} follows {r.steps[i - 1]}",
            )
    if r.steps and r.steps[-1] != 100:
        out.add(
            f"{p}.steps[{len(r.steps) - 1}]",
            f"the last step must be 100 (promotion), got {r.steps[-1]}",
        )
    interval = parse_duration(r.interval).total_seconds()
    if interval < 1:
        out.add(f"{p}.interval", f"at least 1s, got {r.interval}")
    if parse_duration(r.no_data.deadline).total_seconds() < interval:
        out.add(
            f"{p}.noData.deadline",
            f"must be at least the analysis interval ({r.interval}), got {r.no_data.deadline}",
        )
    seen: set[str] = set()
    for i, m in enumerate(r.metrics):
        mp = f"{p}.metrics[{i}]"
        if m.name in seen:
            out.add(f"{mp}.name", f"duplicate metric name {m.name!r}")
        seen.add(m.name)
        if m.min is None and m.max is None:
            out.add(mp, "set min and/or max (a check without a threshold cannot fail)")
        if m.min is not None and m.max is not None and m.min > m.max:
            out.add(f"{mp}.min", f"must not exceed max ({m.max}), got {m.min}")
        names = _PLACEHOLDER_RE.findall(m.query)
        unknown = sorted(set(names) - set(QUERY_PLACEHOLDERS))
        if unknown:
            out.add(
                f"{mp}.query",
                f"unknown placeholder(s) {', '.join(unknown)}; "
                f"expected {', '.join('{{' + n + '}}' for n in QUERY_PLACEHOLDERS)}",
            )
        if "revision" not in names:
            out.add(
                f"{mp}.query",
                "must contain {{revision}} so the canary and the "
                "stable revision are measured apart",
            )
    return out


def _query_scope_rules(spec: RecJobSpec) -> list[Problem]:
    """Each check's query, parsed: within the RecJob's namespace, {{revision}} used in the
    query itself (no CEL counterpart: the API server cannot parse PromQL)."""
    out = Problems()
    for i, m in enumerate(spec.rollout.metrics):
        names = set(_PLACEHOLDER_RE.findall(m.query))
        if "revision" not in names or names - set(QUERY_PLACEHOLDERS):
            continue  # _rollout_rules reports these
        try:
            check_template(m.query)
        except QueryScopeError as error:
            out.add(f"spec.rollout.metrics[{i}].query", str(error))
    return out
