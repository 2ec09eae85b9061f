"""The CRD's CEL rules: present, well-formed, cheap enough, and equivalent to api/semantics.py.

Each cross-field rule of ``api/semantics.py`` that CEL can express is an
``x-kubernetes-validations`` rule of the CRD (``api/v1alpha1/cel.py``), so the API server
refuses the RecJob at apply time. Here cel-python evaluates every rule on every invalid
case of ``test_invalid.py`` (each must be refused, at the same field), on every sample
(none may be refused), and on random combinations of the settings the rules are about
(CEL and Python must agree on every one).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recjob_operator.api import semantics, semantics_federated
from recjob_operator.api.v1alpha1 import RecJob
from recjob_operator.api.v1alpha1.cel_syntax import (
    MAX_STEPS,
    PLACEHOLDER_PATTERN,
    REVISION_PATTERN,
    UNKNOWN_PLACEHOLDER_PATTERN,
)
from recjob_operator.api.v1alpha1.common import QUERY_PLACEHOLDERS
from recjob_operator.schema import iter_schema_nodes
from tests.api.cel_harness import (
    all_rules,
    cel_failures,
    compiled,
    openapi_schema,
    schema_errors,
)
from tests.api.test_invalid import CASES, DELETE, mutate
from tests.conftest import CLUSTER_SAMPLES, EXAMPLES, REPO, load_yaml

re2 = pytest.importorskip("re2")

#: Invalid cases only the operator refuses: CEL cannot read the free-form configOverrides,
#: nor name the list item (the silo) whose files spec.data's format needs.
OPERATOR_ONLY = {"override-owned-key", "override-zero-stage", "override-writes-files",
                 "override-profiler-file", "override-nvme-path",
                 "federated-atomic-silo-without-catalog"}  # fmt: skip
#: Rule functions of api/semantics.py that the CEL rules mirror (not the storage checks).
MIRRORED = (
    semantics._data_rules,
    semantics._model_rules,
    semantics._training_rules,
    semantics_federated.federated_rules,
    semantics._compression_rules,
    semantics._export_rules,
    semantics._serving_rules,
    semantics._rollout_rules,
)
REASONS = {"FieldValueRequired", "FieldValueForbidden", "FieldValueInvalid", "FieldValueDuplicate"}
SAMPLES = [
    *EXAMPLES,
    *sorted((REPO / "examples" / "demo").glob("*.yaml")),
    *CLUSTER_SAMPLES,
]


def _normal(path: str) -> str:
    """A field path without list indexes (CEL rules on a list name the list)."""
    path = re.sub(r"\[\d+\]", "", path)
    return "spec.rollout.metrics" if path == "spec.rollout.metrics.name" else path


def mirrored_problems(document: dict) -> list[semantics.Problem]:
    """What api/semantics.py's mirrored rules say about a schema-valid document."""
    job = RecJob.model_validate(document)
    return [
        p
        for check in MIRRORED
        for p in check(job.spec)
        if not p.path.startswith("spec.training.deepspeed.configOverrides")
    ]


# --------------------------------------------------------------------------- the rules
def test_the_crd_carries_the_rules() -> None:
    rules = all_rules()
    assert len(rules) >= 50
    where = {path for path, _ in rules}
    assert {".spec", ".spec.data", ".spec.training", ".spec.rollout", ".spec.rollout.steps",
            ".spec.rollout.metrics", ".spec.rollout.metrics[]"} <= where  # fmt: skip
    schema = openapi_schema()
    nodes = dict(iter_schema_nodes(schema))
    for path, rule in rules:
        assert set(rule) <= {"rule", "message", "fieldPath", "reason"}, rule
        assert rule["rule"] and rule["message"], rule
        assert rule.get("reason", "FieldValueInvalid") in REASONS, rule
        compiled(rule["rule"])  # parses and compiles
        if "fieldPath" in rule:  # the API server refuses a fieldPath outside the schema
            assert f"{path}{rule['fieldPath']}" in nodes, (path, rule["fieldPath"])


def _max_size(node: dict) -> int | None:
    """What the API server assumes a string's size to be (maxLength x 4 bytes)."""
    if "maxLength" in node:
        return node["maxLength"] * 4
    if node.get("enum"):
        return max(len(v) for v in node["enum"])
    return None


def test_every_spec_string_and_list_is_bounded() -> None:
    """CEL cost estimates need bounds; so does the API server's memory."""
    unbounded = []
    for path, node in iter_schema_nodes(openapi_schema()["properties"]["spec"]):
        if node.get("x-kubernetes-preserve-unknown-fields") or "<anyOf" in path:
            continue  # configOverrides: free-form, no rule reads it; quantities: bounded above
        if node.get("type") == "string" and _max_size(node) is None:
            unbounded.append(path)
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
    assert unbounded == []


def test_regex_rules_stay_within_the_per_rule_cost_limit() -> None:
    """The API server's static estimate for ``s.matches(re)``: (size(s)+1) x 0.1 x len(re)
    x 0.25 per evaluation, times the most evaluations (maxItems of the enclosing lists);
    each rule must stay below 10,000,000. The query rules are the only regexes."""
    schema = openapi_schema()["properties"]["spec"]
    metrics = schema["properties"]["rollout"]["properties"]["metrics"]
    query = metrics["items"]["properties"]["query"]
    size = _max_size(query)
    assert size is not None
    for pattern in (REVISION_PATTERN, UNKNOWN_PLACEHOLDER_PATTERN):
        cost = (size + 1) * 0.1 * len(pattern) * 0.25 * metrics["maxItems"]
        assert cost < 10_000_000, (pattern[:40], cost)


# --------------------------------------------------------------------------- cases
def test_samples_pass_every_rule() -> None:
    for path in SAMPLES:
        document = load_yaml(path)
        assert cel_failures(document) == [], path


#: The invalid spec cases the OpenAPI schema lets through (apiVersion, kind and the name
#: are the API server's own business).
SEMANTIC_CASES = [
    case
    for case in CASES
    if case[3].startswith("spec") and not schema_errors(mutate(case[1], case[2]))
]


def test_the_semantic_cases_are_many() -> None:
    assert len(SEMANTIC_CASES) >= 40


@pytest.mark.parametrize(
    ("case_id", "base", "changes", "path", "fragment"),
    SEMANTIC_CASES,
    ids=[c[0] for c in SEMANTIC_CASES],
)
def test_cel_refuses_each_semantic_case_at_its_field(case_id, base, changes, path, fragment):
    """Every case the OpenAPI schema lets through, api/semantics.py refuses; CEL must too."""
    failures = cel_failures(mutate(base, changes))
    if case_id in OPERATOR_ONLY:
        assert failures == [], f"{case_id}: now a CEL rule; remove it from OPERATOR_ONLY"
        return
    assert failures, (
        f"{case_id}: the API server would accept it; add a rule to api/v1alpha1/cel*.py "
        "(or, if CEL cannot express it, list the case in OPERATOR_ONLY)"
    )
    assert _normal(path) in {_normal(f.path) for f in failures}, (case_id, failures)
    assert all(f.error is None for f in failures), failures


# --------------------------------------------------------------------------- equivalence
def _metrics(*changes: dict) -> list[dict]:
    base = [
        {"name": "error-rate", "query": 'errors{revision="{{revision}}"}', "max": 0.01},
        {"name": "ctr", "query": 'ctr{revision="{{ revision }}"} / ctr{r="{{stable}}"}',
         "min": 0.95},
    ]  # fmt: skip
    out = copy.deepcopy(base)
    for i, change in enumerate(changes):
        out[i] = {k: v for k, v in {**out[i], **change}.items() if v is not DELETE}
    return out


#: The settings the rules are about, and values on both sides of each rule.
SETTINGS: dict[str, list[Any]] = {
    "spec.data.task": ["search-ranking", "recommendation"],
    "spec.data.format": ["csv", "atomic", "parquet"],
    "spec.data.catalog": [DELETE, "items.text"],
    "spec.data.validation": [DELETE, "valid.csv"],
    "spec.data.test": [DELETE, "test.csv"],
    "spec.data.itemIndex": [DELETE, "items.item2index"],
    "spec.data.candidates": [DELETE, "candidates.tsv"],
    **{
        f"spec.data.columns.{column}": [DELETE, "c"]
        for column in (
            *("query", "itemText", "label", "userId", "itemId", "timestamp", "eventType"),
            *("history", "candidates"),
        )
    },
    "spec.data.preprocessing.positiveEvents": [DELETE, ["click"]],
    "spec.data.preprocessing.split.strategy": [
        DELETE,
        "by-query",
        "leave-one-out",
        "by-time",
        "predefined",
    ],
    "spec.data.preprocessing.split.validationFraction": [0.1, 0.45, 0.4],
    "spec.data.preprocessing.split.testFraction": [0.1, 0.45, 0.49],
    "spec.model.baseModel": ["all-MiniLM-L6-v2", "bert-large", "pvc://m/bert", "./m", "../m"],
    "spec.model.fineTuning": [
        {},
        {"method": "lora"},
        {"method": "full", "lora": {}},
        {"method": "lora", "lora": {}},
    ],
    "spec.model.head.objective": ["auto", "regression", "binary", "listwise"],
    "spec.training.deepspeed": [
        {"zeroStage": 0, "offloadOptimizer": "cpu"},
        {"zeroStage": 2, "offloadParameters": "cpu"},
        {"zeroStage": 3, "offloadParameters": "nvme"},
        {"zeroStage": 3, "offloadOptimizer": "nvme", "nvmePath": "/nvme"},
        {"nvmePath": "/nvme"},
        {"zeroStage": 1, "offloadOptimizer": "cpu"},
    ],
    "spec.training.precision": ["fp32", "bf16", "fp16"],
    "spec.training.resources.gpu": [0, 1, 2],
    "spec.training.processesPerNode": [1, 2, 4],
    "spec.training.schedule": [
        {},
        {"warmupSteps": 10},
        {"warmupRatio": 0.1},
        {"warmupSteps": 10, "warmupRatio": 0.2},
        {"warmupSteps": 500},
    ],
    "spec.training.maxSteps": [DELETE, 100, 300, 5],
    "spec.training.checkpoint.intervalSteps": [1, 50, 200, 1000],
    "spec.training.earlyStopping": [
        DELETE,
        {},
        {"metric": "rmse"},
        {"metric": "hr@10"},
        {"metric": "ndcg@10"},
    ],
    "spec.compression": [
        DELETE,
        {},
        {"pruning": {}},
        {"distillation": {}},
        {"distillation": {"student": {"numLayers": 6}}},
        {"distillation": {"student": {"numLayers": 7, "hiddenSize": 120}}},
        {"distillation": {"student": {"numLayers": 6, "hiddenSize": 96}}},
        {"distillation": {"student": {"numLayers": 2, "hiddenSize": 100}}},
        {"distillation": {"student": {"hiddenSize": 768}}},
        {"distillation": {"taskWeight": 0, "distillationWeight": 0}},
        {"distillation": {"intermediateWeight": 0.5, "student": {"hiddenSize": 192}}},
        {"distillation": {"intermediateWeight": 0.5}},
        {"pruning": {"method": "ffn-channels"}},
        {"pruning": {"method": "layers"}, "distillation": {"student": {"numLayers": 1}}},
        {"distillation": {"student": {"numLayers": 2, "hiddenSize": 64}}},
        {"distillation": {"student": {"numLayers": 1, "hiddenSize": 48}}},
        {"distillation": {"student": {"numLayers": 3, "hiddenSize": 384}}},
    ],
    "spec.model.sequential": [{}, {"layers": 4, "hiddenSize": 96, "heads": 4}],
    "spec.model.architecture": ["auto", "sequential"],
    "spec.training.federated": [
        DELETE,
        {},
        {"partition": {"count": 2}},
        {"partition": {"count": 4, "by": "column", "column": "region"}, "exchange": "full"},
        {"partition": {"by": "column"}, "participation": {"minSilos": 3}},
        {"partition": {"column": "x"}, "strategy": {"type": "FedProx"}},
        {"partition": {"count": 3}, "strategy": {"type": "FedAdam", "mu": 0.1}},
        {"partition": {"count": 3}, "strategy": {"type": "FedProx", "mu": 0.1}},
        {"partition": {"count": 2}, "strategy": {"serverLearningRate": 0.5}},
        {"partition": {"count": 2}, "strategy": {"type": "FedAdam", "serverLearningRate": 0.5}},
        {"partition": {"count": 2}, "secureAggregation": True, "exchange": "full"},
        {"partition": {"count": 3}, "secureAggregation": True, "participation": {"minSilos": 1}},
        {
            "partition": {"count": 2},
            "secureAggregation": True,
            "differentialPrivacy": {"clippingNorm": 1.0, "noiseMultiplier": 0.5},
        },
        {
            "silos": [
                {"name": "a", "data": {"train": "a.csv"}},
                {"name": "b", "data": {"train": "b.csv"}},
            ]
        },
        {
            "silos": [
                {"name": "a", "data": {"train": "a.csv"}},
                {"name": "a", "data": {"train": "b.csv"}},
            ],
            "exchange": "full",
        },
        {
            "silos": [
                {"name": "a", "data": {"train": "a.csv"}},
                {"name": "b", "data": {"train": "b.csv"}},
            ],
            "partition": {},
            "participation": {"minSilos": 5},
        },
    ],
    "spec.export.target": ["onnxruntime-int8", "tensorrt-int8", "tensorrt-fp16"],
    "spec.export.resources.gpu": [0, 1],
    "spec.serving.resources.gpu": [0, 1],
    "spec.export.qualityBudget": [
        {},
        {"metric": "rmse"},
        {"metric": "hr@5"},
        {"maxRelativeDropVsTeacher": 0.03},
        {"maxRelativeDrop": 0.05, "maxRelativeDropVsTeacher": 0.01},
    ],
    "spec.serving.minReplicas": [0, 1, 5],
    "spec.serving.maxReplicas": [1, 3],
    "spec.serving.deploymentMode": ["Serverless", "RawDeployment", "Standard"],
    "spec.serving.gateway": [DELETE, {"name": "shop"}],
    "spec.rollout.steps": [
        [10, 100],
        [50, 25, 100],
        [50, 50, 100],
        [10, 50],
        [100],
        [5, 100, 100],
        list(range(81, 101)),
        [*range(80, 99), 97],
    ],
    "spec.rollout.interval": ["500ms", "1s", "30s", "1m", "1h30m", "999999h"],
    "spec.rollout.noData.deadline": ["10s", "1m", "0.5s", "2h"],
    "spec.rollout.metrics": [
        _metrics(),
        _metrics({"max": DELETE}),
        _metrics({"min": 0.5, "max": 0.1}),
        _metrics({"min": 0.1, "max": 0.1}),
        _metrics({}, {"name": "error-rate"}),
        _metrics({"query": "up"}),
        _metrics({"query": 'x{r="{{revision}}",p="{{pod}}"}'}),
        _metrics({"query": "x{{revisions}}"}),
        _metrics({"query": "x{{ revision\t}} {{stabl}} {{ namespace }}"}),
        _metrics({"query": "{{revision}} {{ interval }} {{service}} {{_x}}"}),
        _metrics({"query": "{{{revision}}}"}),
    ],
}


@st.composite
def edited_samples(draw: st.DrawFn) -> dict:
    """A sample with one to five of the SETTINGS changed."""
    base = draw(st.sampled_from([load_yaml(p) for p in EXAMPLES]))
    paths = draw(st.lists(st.sampled_from(sorted(SETTINGS)), min_size=1, max_size=5, unique=True))
    changes = {}
    for path in paths:
        changes[path] = draw(st.sampled_from(SETTINGS[path]))
    try:
        return mutate(base, changes)
    except (KeyError, IndexError):  # deleting what is not there
        return mutate(base, {k: v for k, v in changes.items() if v is not DELETE})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edited_samples())
def test_cel_and_validation_agree(document: dict) -> None:
    """On any combination of these settings, the API server (schema + CEL) refuses exactly
    what api/semantics.py's mirrored rules refuse, at the same fields."""
    if schema_errors(document):
        return  # the OpenAPI schema refuses it already (and so does pydantic)
    python = {_normal(p.path) for p in mirrored_problems(document)}
    cel = {_normal(f.path) for f in cel_failures(document)}
    assert python == cel, f"semantics: {sorted(python)}; CEL: {sorted(cel)}"


# --------------------------------------------------------------------------- placeholders
def _python_placeholders(query: str) -> list[str]:
    return re.findall(PLACEHOLDER_PATTERN, query)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["{{", "}}", "{", "}", " ", "\t", "\v", "\u00a0", "_", "x", "9"]),
            st.sampled_from([*QUERY_PLACEHOLDERS, "rev", "revisions", "stabl", "pod", "Service"]),
        ),
        max_size=12,
    ).map("".join)
)
def test_placeholder_regexes_agree_with_python(query: str) -> None:
    """RE2 (the API server) and Python find the same known and unknown placeholders."""
    names = _python_placeholders(query)
    unknown = bool(set(names) - set(QUERY_PLACEHOLDERS))
    assert bool(re2.search(UNKNOWN_PLACEHOLDER_PATTERN, query)) == unknown, query
    assert bool(re2.search(REVISION_PATTERN, query)) == ("revision" in names), query
    assert len(SETTINGS["spec.rollout.steps"][-2]) == MAX_STEPS  # the longest list is tried
