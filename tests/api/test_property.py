"""Property-based tests: validation never crashes, and the CRD agrees with the Python types."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recjob_operator.api.documents import parse_documents
from recjob_operator.api.validation import Problem, validate_document
from recjob_operator.crd import openapi_schema
from recjob_operator.schema import apply_defaults, openapi_to_jsonschema, prune_nulls
from tests.conftest import REPO, load_yaml

SEARCH = load_yaml(REPO / "examples" / "recjob-search.yaml")
REFERENCE = load_yaml(REPO / "examples" / "recjob-reference.yaml")
SCHEMA = openapi_schema()
VALIDATOR = jsonschema.Draft202012Validator(openapi_to_jsonschema(SCHEMA))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.sampled_from(["search-ranking", "recommendation", "1m", "8Gi", "bf16", "100", "{{x}}"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=10), inner, max_size=4),
    ),
    max_leaves=20,
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated_recjobs(draw: st.DrawFn) -> dict:
    """A valid sample with one to three values replaced, removed or added."""
    doc = copy.deepcopy(draw(st.sampled_from([SEARCH, REFERENCE])))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        spec_paths = [p for p in _paths(doc["spec"]) if p]
        path = draw(st.sampled_from(spec_paths))
        parent: Any = doc["spec"]
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.dictionaries(st.text(max_size=10), json_values)))
def test_arbitrary_documents_never_crash_validation(document: Any) -> None:
    job, problems = validate_document(document)
    assert job is not None or problems, "rejected without a reason"
    assert all(isinstance(p, Problem) and p.message for p in problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_recjobs())
def test_mutated_recjobs_never_crash_and_every_problem_names_a_field(document: dict) -> None:
    _, problems = validate_document(document)
    for problem in problems:
        assert problem.path.startswith(("spec", "metadata", "apiVersion", "kind")), problem


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_recjobs())
def test_crd_schema_and_python_types_agree(document: dict) -> None:
    """What the API server would store (null-pruned, defaulted, schema-valid), the operator can
    read, and what the operator accepts, the API server stores: one source of truth."""
    stored = apply_defaults(prune_nulls(document, SCHEMA), SCHEMA)
    server_accepts = not list(VALIDATOR.iter_errors(stored))
    job, problems = validate_document(stored)
    schema_problems = [p for p in problems if job is None]
    operator_accepts = not schema_problems
    assert server_accepts == operator_accepts, (
        f"server {'accepts' if server_accepts else 'rejects'}, operator "
        f"{'accepts' if operator_accepts else 'rejects'}: "
        f"{[str(p) for p in schema_problems]} / "
        f"{[e.message for e in VALIDATOR.iter_errors(stored)][:3]}"
    )


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_never_crashes_the_loader(text: str) -> None:
    for document in parse_documents(text):
        if document.problems:
            assert all(p.message for p in document.problems)
        else:
            validate_document(document.content)
