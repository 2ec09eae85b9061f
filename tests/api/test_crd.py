"""The committed CRD is the generated one, is structural, and is valid Kubernetes."""

from __future__ import annotations

import shutil
import subprocess

import jsonschema
import pytest
import yaml

from recjob_operator.api.v1alpha1 import RecJob
from recjob_operator.crd import PRINTER_COLUMNS, openapi_schema, recjob_crd, render_crd_yaml
from recjob_operator.schema import (
    apply_defaults,
    iter_schema_nodes,
    openapi_to_jsonschema,
    prune_nulls,
    structural_violations,
)
from tests.conftest import MINIMAL, REPO

CRD_PATH = REPO / "manifests" / "crd" / "bases" / "recjob.dev_recjobs.yaml"


def test_committed_crd_is_generated() -> None:
    assert CRD_PATH.read_text(encoding="utf-8") == render_crd_yaml(), (
        "manifests/crd is stale: run `make manifests`"
    )


def test_crd_schema_is_structural() -> None:
    assert structural_violations(openapi_schema()) == []


def test_structural_check_catches_violations() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/x"},
            "b": {"type": "object", "additionalProperties": False, "properties": {}},
            "c": {"type": "number", "exclusiveMinimum": 0},
        },
    }
    found = "\n".join(structural_violations(bad))
    assert ".a: no type" in found and "$ref" in found
    assert "additionalProperties: false" in found
    assert "exclusiveMinimum must be a boolean" in found


def test_crd_is_valid_kubernetes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    crd = yaml.safe_load(CRD_PATH.read_text())
    kubernetes_validate.validate(crd, "1.32", strict=True)
    crd["spec"]["versions"][0]["servedd"] = True  # the check is not vacuous
    with pytest.raises(kubernetes_validate.ValidationError, match="servedd"):
        kubernetes_validate.validate(crd, "1.32", strict=True)


def test_crd_names_and_subresources() -> None:
    crd = recjob_crd()
    assert crd["metadata"]["name"] == "recjobs.recjob.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("RecJob", "recjobs", ["rj"])
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}


def _schema_at(schema: dict, json_path: str) -> dict | None:
    node = schema
    for part in json_path.strip(".").split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


@pytest.mark.parametrize("column", PRINTER_COLUMNS, ids=lambda c: c["name"])
def test_printer_columns_point_at_real_fields(column: dict) -> None:
    if column["jsonPath"] == ".metadata.creationTimestamp":
        return
    node = _schema_at(openapi_schema(), column["jsonPath"])
    assert node is not None, f"{column['jsonPath']} is not in the schema"
    expected = {"string": "string", "integer": "integer", "number": "number"}[column["type"]]
    assert node.get("type") == expected


def test_every_default_is_valid_against_its_own_schema() -> None:
    """The API server rejects a CRD whose defaults do not validate."""
    checked = 0
    for path, node in iter_schema_nodes(openapi_schema()):
        if "default" in node:
            validator = jsonschema.Draft202012Validator(openapi_to_jsonschema(node))
            default = apply_defaults(node["default"], node)
            errors = [e.message for e in validator.iter_errors(default)]
            assert not errors, f"default of {path}: {errors}"
            checked += 1
    assert checked > 50


def test_server_side_defaulting_matches_the_model_defaults() -> None:
    """A minimal RecJob defaulted by the API server (from the CRD) equals the one pydantic
    defaults: the CRD and the Python types agree on every default."""
    schema = openapi_schema()
    server_side = apply_defaults(prune_nulls(MINIMAL, schema), schema)
    in_python = RecJob.model_validate(MINIMAL).to_wire()
    assert server_side["spec"] == in_python["spec"]


def test_kustomize_renders_the_crd() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    for base in ("default", "crd", "samples"):
        out = subprocess.run(
            [kubectl, "kustomize", str(REPO / "manifests" / base)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        kinds = [d["kind"] for d in yaml.safe_load_all(out) if d]
        if base == "samples":
            assert kinds == ["RecJob", "RecJob"]
        else:
            assert "CustomResourceDefinition" in kinds
