"""RecJob validation: schema errors from pydantic and semantic rules beyond the schema.

Every problem names the field path (``spec.rollout.steps[2]``) and what was expected.
Validation never raises on bad input; it returns problems.

The semantic rules are also CEL rules of the CRD (``api/v1alpha1/cel.py``), so the API
server refuses most bad RecJobs itself; only the rules about the free-form
``deepspeed.configOverrides`` (which CEL cannot read) are checked here alone. Both must
change together: ``tests/api/test_cel.py`` proves each CEL rule refuses what these refuse.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .api.v1alpha1 import RecJob, cel, parse_duration
from .api.v1alpha1.cel import PLACEHOLDER_PATTERN, RAW_NEEDS_GATEWAY
from .api.v1alpha1.common import (
    BUNDLED_MODELS,
    DNS_LABEL_PATTERN,
    DURATION_PATTERN,
    QUERY_PLACEHOLDERS,
    URI_PATTERN,
    URL_PATTERN,
)
from .api.v1alpha1.deepspeed_overrides import override_problems
from .api.v1alpha1.promql import QueryScopeError, check_template
from .api.v1alpha1.recjob import NAME_PATTERN
from .api.v1alpha1.spec import RecJobSpec
from .api.v1alpha1.spec_base import METRIC_PATTERN
from .api.v1alpha1.storage import data_uris, storage_problems
from .api.v1alpha1.uris import pvc_claim, uri_problem

__all__ = [
    "BUNDLED_MODELS",
    "QUERY_PLACEHOLDERS",
    "Problem",
    "RecJobInvalid",
    "cluster_problems",
    "parse_recjob",
    "semantic_problems",
    "validate_document",
]

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


#: Human words for the regular expressions of the API types.
_PATTERN_WORDS = {
    DURATION_PATTERN: "a duration such as 30s, 5m or 1h30m (units ms, s, m, h; at most 6 "
    "digits before a unit)",
    DNS_LABEL_PATTERN: "a DNS label: lowercase letters, digits and '-', starting with a letter",
    NAME_PATTERN: "a DNS label: lowercase letters, digits and '-', starting with a letter",
    URI_PATTERN: (
        "a storage URI (file:///absolute/path, pvc://CLAIM/path, s3://BUCKET/key, "
        "gs://BUCKET/key) or a path"
    ),
    METRIC_PATTERN: "a metric: auc, logloss, rmse, mrr, auto, or ndcg|hr|recall|precision@K",
    URL_PATTERN: "an http(s) URL",
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$": "a DNS label: lowercase letters, digits and '-'",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a RecJob: where (a field path) and what was expected."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class _Problems(list[Problem]):
    """A list of problems with a short way to add one."""

    def add(self, path: str, message: str) -> None:
        self.append(Problem(path, message))


class RecJobInvalid(ValueError):
    """Raised by :func:`parse_recjob` with every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def parse_recjob(document: Any) -> RecJob:
    """Validate a RecJob document (a dict) and return the typed object, or raise RecJobInvalid."""
    job, problems = validate_document(document)
    if problems or job is None:
        raise RecJobInvalid(problems)
    return job


def validate_document(
    document: Any, semantics: Callable[[RecJob], list[Problem]] | None = None
) -> tuple[RecJob | None, list[Problem]]:
    """Schema and semantic validation of one document; never raises on bad input.
    ``semantics``: what finds the semantic problems of a RecJob that passed the schema
    (default :func:`semantic_problems`; the operator's daemon remembers them per
    generation)."""
    if not isinstance(document, dict):
        return None, [Problem("", f"expected a RecJob object (a mapping), got {_kind(document)}")]
    try:
        job = RecJob.model_validate(document)
    except ValidationError as error:
        errors = error.errors()
        problems = [_problem_from_error(e) for e in errors]
        return None, problems + _semantic_problems_elsewhere(document, errors)
    return job, (semantics or semantic_problems)(job)


def _semantic_problems_elsewhere(document: dict, errors: list[dict[str, Any]]) -> list[Problem]:
    """Semantic problems in the parts of a document that have no schema error.

    The fields with schema errors are removed (so defaults stand in for them); if the rest
    then parses, its semantic problems are reported too, except those about removed fields.
    """
    repaired = copy.deepcopy(document)
    removed: list[str] = []
    for error in errors:
        loc = list(error.get("loc", ()))
        while loc and isinstance(loc[-1], int):
            loc.pop()  # a bad list element: fall back to the whole list's default
        if error.get("type") == "missing" or not loc or not _delete(repaired, loc):
            return []
        removed.append(_path(loc))
    try:
        job = RecJob.model_validate(repaired)
    except ValidationError:
        return []
    return [
        p
        for p in semantic_problems(job)
        if not any(p.path == r or p.path.startswith((r + ".", r + "[")) for r in removed)
    ]


def _delete(document: Any, loc: list[Any]) -> bool:
    node = document
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(node, dict) and loc[-1] in node:
        del node[loc[-1]]
        return True
    return isinstance(node, dict)  # already gone (an earlier error removed it)


# --------------------------------------------------------------------------- schema errors
def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem_from_error(error: dict[str, Any]) -> Problem:
    loc = list(error.get("loc", ()))
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "missing":
        return Problem(_path(loc), "required field is missing")
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1])
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return Problem(_path(loc), f"unknown field {loc[-1]!r}{hint}")
    if kind == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern", "")
        if pattern == URI_PATTERN and isinstance(value, str) and (why := uri_problem(value)):
            return Problem(_path(loc), f"{why} (got {_short(value)})")
        expected = _PATTERN_WORDS.get(pattern, f"text matching {pattern}")
        return Problem(_path(loc), f"expected {expected} (got {_short(value)})")
    message = error.get("msg", "invalid value")
    if kind == "value_error":
        return Problem(_path(loc), message.removeprefix("Value error, "))
    message = message.replace("Input should be", "expected", 1)
    got = "null" if value is None else f"{_kind(value)} {_short(value)}"
    return Problem(_path(loc), f"{message} (got {got})")


def _allowed_fields(loc: list[Any]) -> list[str]:
    """The field names (camelCase) accepted at ``loc``, walking the API types."""
    model: Any = RecJob
    for part in loc:
        model = _unwrap(model)
        if isinstance(part, int):
            args = typing.get_args(model)
            model = args[0] if args else None
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = next(
            (f for n, f in model.model_fields.items() if (f.alias or n) == part or n == part), None
        )
        if field is None:
            return []
        model = field.annotation
    model = _unwrap(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(f.alias or n for n, f in model.model_fields.items())
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Optional / Annotated from a type annotation."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


# --------------------------------------------------------------------------- semantic rules
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
        _federated_rules,
        _silo_file_rules,
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
    out = _Problems()
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
    out = _Problems()
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
    out = _Problems()
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


def _silo_file_rules(spec: RecJobSpec) -> list[Problem]:
    """The files each silo's data must name itself: a silo reads only its own files (none
    of spec.data's), so what spec.data's format needs must be in every silo's data. Not
    mirrored in CEL: the rule joins spec.data.format with each list item's fields, and a
    CEL rule's fieldPath cannot name a list item, so its error could not name the silo."""
    fed, out = spec.training.federated, _Problems()
    if fed is None or fed.silos is None or spec.data.format != "atomic":
        return out
    for i, silo in enumerate(fed.silos):
        p = f"spec.training.federated.silos[{i}].data"
        if silo.data.catalog is None:
            out.add(
                f"{p}.catalog",
                "the atomic format needs the item texts in every silo (a silo reads only "
                "its own files, not spec.data.catalog): set the silo's catalog",
            )
        if silo.data.validation is None and silo.data.test is None:
            out.add(
                f"{p}.test",
                "the atomic format needs the silo's held-out .inter files: set test (and "
                "validation, else validation is carved from the silo's training file)",
            )
    return out


def _federated_rules(spec: RecJobSpec) -> list[Problem]:
    """spec.training.federated (messages shared with api/v1alpha1/cel.py)."""
    fed, p = spec.training.federated, "spec.training.federated"
    out = _Problems()
    if fed is None:
        return out
    if spec.training.nodes != 1:
        out.add("spec.training.nodes", f"{cel.FEDERATED_ONE_PROCESS} (got {spec.training.nodes})")
    if spec.training.processes_per_node != 1:
        out.add(
            "spec.training.processesPerNode",
            f"{cel.FEDERATED_ONE_PROCESS} (got {spec.training.processes_per_node})",
        )
    if fed.silos is None and fed.partition is None:
        out.add(f"{p}.silos", cel.FEDERATED_SILOS_REQUIRED)
    if fed.silos is not None and fed.partition is not None:
        out.add(f"{p}.partition", cel.FEDERATED_SILOS_AND_PARTITION)
    if fed.silos is not None:
        names = [silo.name for silo in fed.silos]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            out.add(f"{p}.silos", f"{cel.FEDERATED_DUPLICATE_SILO}: {', '.join(duplicates)}")
    count = len(fed.silos) if fed.silos is not None else None
    if fed.partition is not None:
        count = fed.partition.count
        if fed.partition.by == "column" and fed.partition.column is None:
            out.add(f"{p}.partition.column", cel.FEDERATED_COLUMN_REQUIRED)
        if fed.partition.by != "column" and fed.partition.column is not None:
            out.add(f"{p}.partition.column", cel.FEDERATED_COLUMN_FORBIDDEN)
    for silos in (len(fed.silos) if fed.silos is not None else None, count):
        if silos is not None and fed.participation.min_silos > silos:
            out.add(
                f"{p}.participation.minSilos",
                f"{fed.participation.min_silos} {cel.FEDERATED_TOO_FEW_SILOS} ({silos})",
            )
            break
    strategy = fed.strategy
    if strategy.type == "FedProx" and strategy.mu is None:
        out.add(f"{p}.strategy.mu", cel.FEDERATED_MU_REQUIRED)
    if strategy.type != "FedProx" and strategy.mu is not None:
        out.add(f"{p}.strategy.mu", cel.FEDERATED_MU_FORBIDDEN)
    if strategy.type not in cel.SERVER_OPTIMIZERS and strategy.server_learning_rate is not None:
        out.add(f"{p}.strategy.serverLearningRate", cel.FEDERATED_SERVER_LR_FORBIDDEN)
    if strategy.type != "FedAvgM" and strategy.server_momentum is not None:
        out.add(f"{p}.strategy.serverMomentum", cel.FEDERATED_SERVER_MOMENTUM_FORBIDDEN)
    if fed.secure_aggregation and fed.participation.min_silos < 2:
        out.add(f"{p}.participation.minSilos", cel.FEDERATED_SECURE_AGGREGATION_SILOS)
    if fed.exchange == "lora" and spec.model.fine_tuning.method != "lora":
        out.add(f"{p}.exchange", cel.FEDERATED_LORA_EXCHANGE)
    if spec.compression is not None:
        out.add("spec.compression", cel.FEDERATED_COMPRESSION)
    if spec.model.architecture == "sequential":
        out.add("spec.model.architecture", cel.FEDERATED_SEQUENTIAL)
    return out


#: Why the Kubernetes backend refuses a partitioned federation (local mode runs it).
FEDERATED_PARTITION_LOCAL_ONLY = (
    "partition splits spec.data into silos on one machine (local mode: recjob run); on "
    "Kubernetes list silos instead, each with its own data on a PersistentVolumeClaim of "
    "its own, so that each SuperNode mounts only its silo's claim"
)
FEDERATED_SILO_PVC = (
    "on Kubernetes a silo's data must be on a PersistentVolumeClaim (pvc://<claim>/<path>) "
    "that only its SuperNode mounts; object storage would need spec.storage's credentials "
    "in every silo's pod"
)


def cluster_problems(job: RecJob) -> list[Problem]:
    """What a valid RecJob asks for that the Kubernetes backend cannot run: reported as
    Valid=False instead of a silent fallback. A federation there needs silos whose data
    are each on claims of their own (no other silo, nor the owner's pods, mounts them)."""
    fed, p = job.spec.training.federated, "spec.training.federated"
    if fed is None:
        return []
    if fed.partition is not None:
        return [Problem(f"{p}.partition", FEDERATED_PARTITION_LOCAL_ONLY)]
    out = _Problems()
    namespace = job.metadata.namespace or "default"
    owner = {(namespace, pvc_claim(uri)) for _, uri in data_uris(job.spec)}
    owner |= {(namespace, pvc_claim(job.spec.artifacts_uri))}
    users: dict[tuple[str, str], list[str]] = {}  # (namespace, claim): its silos
    for i, silo in enumerate(fed.silos or []):
        for field, uri in silo.data.uris().items():
            if not uri.startswith("pvc://"):
                out.add(f"{p}.silos[{i}].data.{field}", FEDERATED_SILO_PVC)
                continue
            claim = (silo.namespace or namespace, pvc_claim(uri))
            if claim in owner:
                out.add(
                    f"{p}.silos[{i}].data.{field}",
                    f"claim {claim[1]} is also mounted by the model owner's pods (spec.data or "
                    "spec.artifactsUri): a silo's data need a claim of their own",
                )
            users.setdefault(claim, [])
            if silo.name not in users[claim]:
                users[claim].append(silo.name)
    for (claim_namespace, claim), silos in users.items():
        if len(silos) > 1:
            where = "" if claim_namespace == namespace else f" (namespace {claim_namespace})"
            out.add(
                f"{p}.silos",
                f"claim {claim}{where} holds the data of silos {', '.join(silos)}: each "
                "silo's data need a claim of their own (every claim a silo names is mounted "
                "by its SuperNode)",
            )
    return out


def _compression_rules(spec: RecJobSpec) -> list[Problem]:
    c, p = spec.compression, "spec.compression"
    if c is None:
        return []
    if c.distillation is None and c.pruning is None:
        return [Problem(p, "set distillation and/or pruning, or remove compression")]
    out = _Problems()
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
    out = _Problems()
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
    out = _Problems()
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
    out = _Problems()
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
    out = _Problems()
    for i, m in enumerate(spec.rollout.metrics):
        names = set(_PLACEHOLDER_RE.findall(m.query))
        if "revision" not in names or names - set(QUERY_PLACEHOLDERS):
            continue  # _rollout_rules reports these
        try:
            check_template(m.query)
        except QueryScopeError as error:
            out.add(f"spec.rollout.metrics[{i}].query", str(error))
    return out
