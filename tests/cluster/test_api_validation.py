"""The RecJob API's validation as the real API server of the test cluster enforces it.

``kubectl apply --dry-run=server`` runs what a create runs (strict field decoding, the
CRD's OpenAPI schema with its bounds and patterns, its CEL ``x-kubernetes-validations``)
without storing anything. The cases come from ``tests/api``: every invalid RecJob of
``test_invalid.py`` that the CRD refuses must be refused here naming its field, the CEL
ones with exactly the fields and messages ``cel_harness.py`` (cel-python) predicts; the
bounds of ``test_bounds.py`` (seeds, durations, integers beyond int64); every sample is
accepted. What only the operator checks (``deepspeed.configOverrides``, storage URIs beyond
the pattern) passes the CRD and ends as ``phase: Failed`` / ``Valid=False`` with every
problem, written by the running operator.
"""

from __future__ import annotations

import copy
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from recjob_operator.api.semantics_federated import FEDERATED_PARTITION_LOCAL_ONLY
from recjob_operator.api.v1alpha1.common import SEED_MAX
from recjob_operator.api.validation import validate_document
from tests.api.cel_harness import cel_failures, schema_errors
from tests.api.test_bounds import DURATIONS, REFERENCE, SEEDS, SPEC_INTEGERS
from tests.api.test_invalid import CASES, SEARCH, mutate
from tests.cluster.conftest import OPERATOR_NS, REPO, Cluster

pytestmark = pytest.mark.cluster

CRD = REPO / "manifests" / "crd" / "bases" / "recjob.dev_recjobs.yaml"
CRD_NAME = "recjobs.recjob.dev"

#: Cases of test_invalid.py that never reach the CRD: kubectl finds the resource by
#: apiVersion and kind, and cannot apply an object without a name.
NOT_THE_CRDS = {"bad-api-version", "bad-kind", "no-name"}

Cause = tuple[str, str]


# --------------------------------------------------------------------------- the cases
def _classify() -> tuple[list, list, list[str]]:
    """test_invalid.py's cases as (schema cases, CEL cases, ids only the operator refuses)."""
    schema, cel, operator_only = [], [], []
    for case_id, base, changes, path, _ in CASES:
        if case_id in NOT_THE_CRDS:
            continue
        document = mutate(base, changes)
        if schema_errors(document):
            schema.append(pytest.param(document, path, id=case_id))
        elif failures := cel_failures(document):
            expected = sorted({(f.path, f.message) for f in failures})
            cel.append(pytest.param(document, expected, id=case_id))
        else:
            operator_only.append(case_id)
    return schema, cel, operator_only


SCHEMA_CASES, CEL_CASES, OPERATOR_ONLY_CASES = _classify()

#: Out-of-range values of test_bounds.py: (document, field, what the API server says).
BOUNDS = [
    *[
        pytest.param(
            mutate(SEARCH, {p: SEED_MAX + 1}),
            p,
            "less than or equal to 4294967295",
            id=f"seed-{p.split('.')[-2]}",
        )
        for p in SEEDS
    ],
    *[
        pytest.param(
            mutate(SEARCH, {"spec.rollout.noData.deadline": "1h", p: value}),
            p,
            message,
            id=f"{p.split('.')[-1]}-{value[:12]}",
        )
        for p in DURATIONS
        for value, message in [
            ("99999999999999999999h", "Too long: may not be more than 20 bytes"),
            ("9999999h", "should match"),
            ("1h" * 11, "Too long: may not be more than 20 bytes"),
        ]
    ],
    *[
        pytest.param(
            mutate(REFERENCE, {p: value}),
            p,
            "should be less than or equal to",
            id=f"{p.removeprefix('spec.')}={'2^63' if value == 2**63 else '1e30'}",
        )
        for p, _ in SPEC_INTEGERS
        for value in (2**63, 10**30)
    ],
    pytest.param(
        mutate(SEARCH, {"spec.training.resources.cpu": 2**63}),
        "spec.training.resources.cpu",
        "less than or equal to",
        id="cpu=2^63",
    ),
    pytest.param(
        mutate(SEARCH, {"spec.rollout.steps": [10, 2**64, 100]}),
        "spec.rollout.steps[1]",
        "less than or equal to 100",
        id="step=2^64",
    ),
    *[
        pytest.param(
            mutate(SEARCH, {p: "file://data/train.csv"}),
            p,
            "should match",
            id=f"relative-file-uri-{p.split('.')[-1]}",
        )
        for p in ("spec.data.train", "spec.artifactsUri", "spec.training.checkpoint.uri")
    ],
]

#: Valid at the edges: the CRD must accept each (the API server's CEL included).
#: A valid, scoped query of nearly the 4096-character limit, every placeholder many times.
_TERM = (
    'sum(rate(x{revision="{{ revision }}",namespace="{{namespace}}",service="{{service}}",'
    's="{{stable}}"}[{{interval}}]))'
)
LONG_QUERY = " + ".join([_TERM] * ((4096 + 3) // (len(_TERM) + 3)))


EDGES = [
    pytest.param(mutate(SEARCH, dict.fromkeys(SEEDS, SEED_MAX)), id="largest-seeds"),
    pytest.param(
        mutate(
            SEARCH,
            {"spec.rollout.interval": "1s", "spec.rollout.noData.deadline": "999999h999999.9999h"},
        ),
        id="longest-duration",
    ),
    pytest.param(mutate(SEARCH, {"spec.data.train": "file:///data/train.csv"}), id="file-uri"),
    pytest.param(
        mutate(
            SEARCH,
            {
                # 20 metrics with queries of nearly 4096 characters full of placeholders:
                # the regex rules' runtime cost must stay within the API server's budget
                # (valid, namespace-scoped PromQL: the operator parses it too)
                "spec.rollout.metrics": [
                    {"name": f"m{i:02d}" + "x" * 60, "query": LONG_QUERY, "max": 1.0}
                    for i in range(20)
                ],
                "spec.rollout.steps": [*range(5, 100, 5), 100],
            },
        ),
        id="largest-rollout",
    ),
]


def _samples() -> list:
    """Every RecJob in examples/ (any depth) and manifests/samples/."""
    files = sorted((REPO / "examples").rglob("*.yaml"))
    files += sorted((REPO / "manifests" / "samples").glob("*.yaml"))
    out = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "RecJob":
                name = f"{path.relative_to(REPO)}:{doc['metadata']['name']}"
                out.append(pytest.param(doc, id=name))
    return out


SAMPLES = _samples()


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> Cluster:
    """The repository's CRD installed (server-side apply, as manifests/default does)."""
    # right after a CRD is created its status has no conditions yet, and kubectl wait then
    # fails at once ("accessor error: <nil>", seen in CI) instead of waiting: retry it
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD), timeout=300)
    deadline = time.monotonic() + 240
    while True:
        result = cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s",
            check=False, timeout=120,
        )  # fmt: skip
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, f"CRD not Established: {result.stderr.strip()}"
        time.sleep(1)
    return cluster


@pytest.fixture(scope="module")
def dry_run_namespace(crd: Cluster) -> Iterator[str]:
    """A namespace for the dry runs (nothing is stored in it), deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    crd.kubectl("create", "namespace", name)
    yield name
    crd.kubectl("delete", "namespace", name, "--wait=false", check=False)


def dry_run(cluster: Cluster, document: dict, namespace: str) -> subprocess.CompletedProcess:
    """``kubectl apply --dry-run=server`` of ``document`` in ``namespace``."""
    document = copy.deepcopy(document)
    document.setdefault("metadata", {})["namespace"] = namespace
    return cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        check=False,
        input=yaml.safe_dump(document, width=1 << 20),
    )


def causes(stderr: str) -> list[Cause]:
    """(field, detail) of each cause in kubectl's report of an Invalid error:
    ``The RecJob "x" is invalid: FIELD: DETAIL``, or one ``* FIELD: DETAIL`` line each."""
    _, found, rest = stderr.partition(" is invalid: ")
    if not found:
        return []
    lines = [line[2:] for line in rest.splitlines() if line.startswith("* ")] or [rest.strip()]
    out = []
    for line in lines:
        field, _, detail = line.partition(": ")
        out.append((field.strip(), detail.strip()))
    return out


def refused(result: subprocess.CompletedProcess) -> str:
    """kubectl's error; fails when the API server accepted the object."""
    assert result.returncode != 0, f"the API server accepted it: {result.stdout.strip()}"
    return result.stderr.strip()


# --------------------------------------------------------------------------- refused
def test_the_cases_are_many() -> None:
    """Most invalid cases are the CRD's; only the free-form configOverrides and a silo's
    files (CEL cannot name the list item) are not."""
    assert len(SCHEMA_CASES) >= 30 and len(CEL_CASES) >= 40
    assert set(OPERATOR_ONLY_CASES) == {
        "override-owned-key", "override-zero-stage", "override-writes-files",
        "override-profiler-file", "override-nvme-path", "federated-atomic-silo-without-catalog",
    }  # fmt: skip


@pytest.mark.parametrize(("document", "expected"), CEL_CASES)
def test_cel_rules_refuse_naming_their_field_and_message(
    crd: Cluster, dry_run_namespace: str, document: dict, expected: list[Cause]
) -> None:
    """Exactly the rules cel-python says break refuse it, each at its ``fieldPath`` with
    its own message."""
    found = causes(refused(dry_run(crd, document, dry_run_namespace)))
    assert found, "not an Invalid error"
    for path, message in expected:
        assert any(field == path and detail.endswith(message) for field, detail in found), (
            f"no cause {path}: ...{message}; the API server said {found}"
        )
    assert sorted({field for field, _ in found}) == sorted({path for path, _ in expected}), found


@pytest.mark.parametrize(("document", "path"), SCHEMA_CASES)
def test_schema_refuses_naming_the_field(
    crd: Cluster, dry_run_namespace: str, document: dict, path: str
) -> None:
    """Types, unknown fields (strict decoding), enums, patterns, bounds, required fields."""
    error = refused(dry_run(crd, document, dry_run_namespace))
    fields = {field for field, _ in causes(error)}
    assert path in fields or f'unknown field "{path}"' in error, error


@pytest.mark.parametrize(("document", "path", "message"), BOUNDS)
def test_out_of_range_values_are_refused(
    crd: Cluster, dry_run_namespace: str, document: dict, path: str, message: str
) -> None:
    """Seeds beyond 32 bits, durations beyond Go's, integers beyond int64, relative
    file:// URIs: refused at the field, with the schema's words."""
    found = causes(refused(dry_run(crd, document, dry_run_namespace)))
    assert any(field == path and message in detail for field, detail in found), found


def test_every_problem_is_reported_at_once(crd: Cluster, dry_run_namespace: str) -> None:
    """The API server reports all schema problems of an object, not just the first."""
    document = mutate(
        SEARCH,
        {
            "spec.training.nodes": 0,
            "spec.rollout.interval": "soon",
            "spec.export.target": "tflite",
            "spec.training.seed": -1,
        },
    )
    fields = {f for f, _ in causes(refused(dry_run(crd, document, dry_run_namespace)))}
    assert fields >= {
        "spec.training.nodes",
        "spec.rollout.interval",
        "spec.export.target",
        "spec.training.seed",
    }, fields
    document = mutate(SEARCH, {"spec.rollout.steps": [50, 10], "spec.serving.minReplicas": 9})
    fields = {f for f, _ in causes(refused(dry_run(crd, document, dry_run_namespace)))}
    assert fields == {"spec.rollout.steps", "spec.serving.minReplicas"}, fields


# --------------------------------------------------------------------------- accepted
@pytest.mark.parametrize("document", SAMPLES)
def test_every_sample_is_accepted(crd: Cluster, dry_run_namespace: str, document: dict) -> None:
    result = dry_run(crd, document, dry_run_namespace)
    assert result.returncode == 0, result.stderr
    assert "created (server dry run)" in result.stdout


@pytest.mark.parametrize("document", EDGES)
def test_valid_values_at_the_edges_are_accepted(
    crd: Cluster, dry_run_namespace: str, document: dict
) -> None:
    assert validate_document(document)[1] == []  # valid for the operator too
    result = dry_run(crd, document, dry_run_namespace)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- the operator
#: Passes the CRD, refused by the operator: configOverrides keys the spec owns (CEL cannot
#: read free-form fields), a pvc:// path above its claim, a bad claim name, an s3:// URI
#: without a bucket, artifacts on an object store for 2 nodes (uris.py / storage.py).
OPERATOR_ONLY = mutate(
    SEARCH,
    {
        "metadata.name": "operator-only",
        "spec.training.deepspeed.configOverrides": {
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 3},
        },
        "spec.data.train": "pvc://data/../../etc/passwd",
        "spec.data.test": "pvc://Not_A_Claim/test.csv",
        "spec.model.baseModel": "s3:///models/minilm",
        "spec.training.nodes": 2,
        "spec.artifactsUri": "s3://recjob-artifacts/runs",
    },
)


def test_what_only_the_operator_checks_ends_failed_with_every_problem(
    operator: Cluster, namespace: str
) -> None:
    """The CRD accepts it; the operator marks it Failed / Valid=False listing each problem
    (and, being invalid, creates nothing)."""
    cluster = operator
    _, problems = validate_document(OPERATOR_ONLY)
    paths = {p.path for p in problems}
    assert paths >= {
        "spec.training.deepspeed.configOverrides.bf16",
        "spec.training.deepspeed.configOverrides.zero_optimization.stage",
        "spec.data.train",
        "spec.data.test",
        "spec.model.baseModel",
        "spec.training.nodes",
    }, problems
    assert schema_errors(OPERATOR_ONLY) == [] and cel_failures(OPERATOR_ONLY) == []
    assert dry_run(cluster, OPERATOR_ONLY, namespace).returncode == 0

    status = operator_marks_failed(cluster, OPERATOR_ONLY, namespace)
    for problem in problems:
        assert str(problem) in status["message"], (str(problem), status["message"])


def test_a_partitioned_federation_is_refused_by_the_operator_not_trained_on_spec_data(
    operator: Cluster, namespace: str
) -> None:
    """Valid (the CRD and the operator's own rules accept it), but a partition of spec.data
    cannot keep silos apart on Kubernetes (every SuperNode would mount the one claim):
    Failed / Valid=False saying so, nothing created (a PyTorchJob would silently train on
    spec.data). Federations of silos run: test_federated.py."""
    document = yaml.safe_load(
        (REPO / "examples" / "federated" / "recjob-federated-partition.yaml").read_text()
    )
    assert validate_document(document)[1] == []
    status = operator_marks_failed(operator, document, namespace)
    assert status["message"] == (
        f"spec.training.federated.partition: {FEDERATED_PARTITION_LOCAL_ONLY}"
    )


def operator_marks_failed(cluster: Cluster, document: dict, namespace: str) -> dict:
    """Apply ``document``; once the operator marks it Failed, its status (Valid=False,
    InvalidSpec, the message in the condition too) after checking it created no child."""
    cluster.apply(document, namespace=namespace)
    name = document["metadata"]["name"]

    def failed() -> dict | None:
        status = (cluster.get("recjob", name, namespace) or {}).get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = cluster.wait(
        "the operator to mark the RecJob Failed",
        failed,
        timeout=60,
        on_timeout=lambda: (
            cluster.describe("recjob", name, namespace)
            + cluster.pod_logs(OPERATOR_NS, "app.kubernetes.io/name=recjob-operator")
        ),
    )
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert (valid["status"], valid["reason"]) == ("False", "InvalidSpec"), valid
    assert valid["message"] == status["message"]
    children = cluster.kubectl(
        "get",
        "configmaps,jobs,pytorchjobs,deployments,services,secrets",
        "-n",
        namespace,
        "-o",
        "name",
        "-l",
        "app.kubernetes.io/managed-by=recjob-operator",
    ).stdout
    assert children.strip() == "", children
    return status


def test_the_cluster_serves_the_repositorys_crd(crd: Cluster) -> None:
    """The schema these tests ran against is manifests/crd/bases (regenerated from the
    API types by ``recjob crd``), not an older one left in the cluster."""
    served = crd.get("crd", CRD_NAME)
    assert served is not None
    shipped = yaml.safe_load(Path(CRD).read_text(encoding="utf-8"))
    assert [v["schema"] for v in served["spec"]["versions"]] == [
        v["schema"] for v in shipped["spec"]["versions"]
    ]
