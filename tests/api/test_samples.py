"""Samples pass the CRD schema (as the API server checks it) and semantic validation."""

from __future__ import annotations

import jsonschema
import pytest

from recjob_operator.api.validation import validate_document
from recjob_operator.crd import openapi_schema
from recjob_operator.schema import (
    apply_defaults,
    iter_schema_nodes,
    openapi_to_jsonschema,
    prune_nulls,
)
from tests.conftest import CLUSTER_SAMPLES, EXAMPLES, REPO, load_yaml

#: Federated RecJobs showing every field of spec.training.federated (silos, partition); not
#: recjob-*.yaml of examples/: the operator's backends do not run federated training yet.
FEDERATED_SAMPLES = sorted((REPO / "examples" / "federated").glob("recjob-*.yaml"))
SAMPLES = [*EXAMPLES, *CLUSTER_SAMPLES, *FEDERATED_SAMPLES]


def crd_errors(document: dict) -> list[str]:
    """What an API server with this CRD would reject in ``document`` (null-pruned, defaulted)."""
    schema = openapi_schema()
    obj = apply_defaults(prune_nulls(document, schema), schema)
    validator = jsonschema.Draft202012Validator(openapi_to_jsonschema(schema))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]


def test_there_are_samples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"recjob-search.yaml", "recjob-recommendation.yaml", "recjob-reference.yaml"} <= names
    assert len(CLUSTER_SAMPLES) >= 2


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_sample_passes_crd_schema(path) -> None:
    assert crd_errors(load_yaml(path)) == []


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_sample_passes_semantic_validation(path) -> None:
    job, problems = validate_document(load_yaml(path))
    assert problems == [] and job is not None


def _leaf_paths(schema: dict, prefix: str = "") -> set[str]:
    props = schema.get("properties")
    if not props:
        return {prefix}
    out: set[str] = set()
    for name, sub in props.items():
        node = sub["items"] if sub.get("type") == "array" and "items" in sub else sub
        out |= _leaf_paths(node, f"{prefix}.{name}")
    return out


def _present_paths(obj, prefix: str = "") -> set[str]:
    if isinstance(obj, dict):
        out = {prefix}
        for key, value in obj.items():
            out |= _present_paths(value, f"{prefix}.{key}")
        return out
    if isinstance(obj, list):
        out = {prefix}
        for value in obj:
            out |= _present_paths(value, prefix)
        return out
    return {prefix}


def test_reference_sample_shows_every_spec_field() -> None:
    """examples/recjob-reference.yaml documents the whole spec; a new field must be added."""
    spec_schema = openapi_schema()["properties"]["spec"]
    reference = load_yaml(REPO / "examples" / "recjob-reference.yaml")["spec"]
    # spec.training.federated excludes nodes > 1 and compression, which the reference shows:
    # its fields are shown by the federated sample
    shown = _present_paths(reference) | {
        p
        for sample in FEDERATED_SAMPLES
        for p in _present_paths(load_yaml(sample)["spec"])
        if p.startswith(".training.federated")
    }
    missing = {p for p in _leaf_paths(spec_schema) if p not in shown}
    # configOverrides is free-form: any key shows it.
    assert missing == set(), f"fields missing from the reference sample: {sorted(missing)}"


def test_crd_schema_rejects_what_the_api_server_would() -> None:
    """The schema check used above is not vacuous."""
    doc = load_yaml(REPO / "examples" / "recjob-search.yaml")
    doc["spec"]["training"]["nodes"] = "two"
    doc["spec"]["rollout"]["steps"] = [0, 101]
    doc["spec"]["surprise"] = True
    errors = "\n".join(crd_errors(doc))
    assert "spec.training.nodes" in errors
    assert "spec.rollout.steps.0" in errors and "spec.rollout.steps.1" in errors
    assert "surprise" in errors


def test_every_spec_section_is_documented() -> None:
    """kubectl explain has something to say about every section of the spec."""
    spec = openapi_schema()["properties"]["spec"]
    bare = [
        path
        for path, node in iter_schema_nodes(spec)
        if node.get("type") == "object" and "description" not in node
    ]
    assert bare == []
