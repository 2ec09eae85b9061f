"""Federated training on the real cluster (issue 16): a RecJob with two silos, each silo's
data on a claim of its own (south's in a namespace of its own, which must grant it first
with a Gateway API ReferenceGrant), becomes a SuperLink Deployment and Service, one SuperNode
Deployment per silo and the Job that submits the run, all made by the operator and run by
the node agents as real Flower processes over TLS (the certificate from the operator's
Secret, checked against the Service's DNS name), the rounds securely aggregated with
Flower's SecAgg+ (each silo's update leaves its pod only masked). The SuperLink's pod is
killed after the first round: the run is submitted again to its successor and resumes
from the round's checkpoint. The model then goes through conversion and the quality gate
like any other; the federation is deleted once the run has ended.

Privacy on the cluster: the pods as the API server holds them mount what they should (a
SuperNode only its silo's claim; the SuperLink, whose ServerApp aggregates, and the
submitter no silo's), and the ServerApp's record of every file it opened names none of a
silo's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster
from tests.cluster.recjobs import AMAZON, open_claim, put_dataset, recjob, storage

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not AMAZON.exists(), reason="../shared/data not present"),
]

SILOS = ("north", "south")
FEDERATION = "recjob.dev/federation"


def put_silo_data(root: Path, index: int, users: int = 60) -> None:
    """Silo ``index`` of two: the users of the first ``users`` whose id has its parity
    (disjoint silos), and the catalog files, readable by the pods' user."""
    target = root / "amazon"
    target.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        lines = (AMAZON / f"Scientific.{split}.inter").read_text().splitlines()
        kept = [lines[0]] + [
            line for line in lines[1:]
            if (user := int(line.split("\t", 1)[0])) < users and user % 2 == index
        ]  # fmt: skip
        (target / f"Scientific.{split}.inter").write_text("\n".join(kept) + "\n")
    for name in ("Scientific.item2index", "Scientific.text"):
        (target / name).write_bytes((AMAZON / name).read_bytes())
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)


def federated_recjob(
    name: str, namespace: str, elsewhere: dict[str, str] | None = None, secure: bool = False
) -> dict:
    """The cluster tests' small RecJob, trained by two silos: LoRA, two rounds of two steps
    (``elsewhere``: the namespace of a silo not in the RecJob's, by silo; ``secure``:
    secure aggregation)."""
    document = recjob(name, namespace)
    spec = document["spec"]
    spec["model"]["fineTuning"] = {"method": "lora", "lora": {"rank": 4, "alpha": 8.0}}
    data = "pvc://{}/amazon/Scientific"
    spec["training"] = {
        "microBatchSize": 8,
        "learningRate": 1e-3,
        "resources": {"cpu": "1", "memory": "4Gi"},
        "federated": {
            "silos": [
                {"name": silo, "data": silo_data(data.format(silo))}
                | ({"namespace": elsewhere[silo]} if silo in (elsewhere or {}) else {})
                for silo in SILOS
            ],
            "rounds": 2,
            "localSteps": 2,
            "participation": {"minSilos": 2, "roundDeadlineSeconds": 300},
            "secureAggregation": secure,
        },
    }
    return document


def silo_data(prefix: str) -> dict[str, str]:
    """A silo's data URIs: its own claim's train and test splits and catalog."""
    return {
        "train": f"{prefix}.train.inter",
        "test": f"{prefix}.test.inter",
        "catalog": f"{prefix}.text",
    }


def _diagnose(cluster: Cluster, namespace: str, name: str, *others: str) -> str:
    return "\n".join([
        cluster.describe("recjob", name, namespace),
        *(cluster.kubectl("get", "deployments,services,jobs,pods", "-n", ns, "-o", "wide",
                          check=False).stdout for ns in (namespace, *others)),
        *(cluster.pod_logs(ns, f"recjob.dev/recjob={name}") for ns in (namespace, *others)),
    ])  # fmt: skip


@pytest.fixture
def south_namespace(cluster: Cluster, namespace: str):
    """The namespace silo south lives in (deleted afterwards, without waiting)."""
    name = f"{namespace}-south"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def reference_grant(silo_namespace: str, owner_namespace: str, claim: str) -> dict:
    """silo_namespace lets the RecJobs of owner_namespace use its claim."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": f"recjobs-of-{owner_namespace}", "namespace": silo_namespace},
        "spec": {
            "from": [{"group": "recjob.dev", "kind": "RecJob", "namespace": owner_namespace}],
            "to": [{"group": "", "kind": "PersistentVolumeClaim", "name": claim}],
        },
    }


def _claims(pod: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v}  # fmt: skip


def test_a_federated_recjob_trains_on_silos_that_keep_their_data(
    operator: Cluster, namespace: str, south_namespace: str
):
    cluster, south = operator, south_namespace
    cluster.apply(*storage(namespace, ("data", "artifacts", "north")), *storage(south, ("south",)))
    put_dataset(cluster.claim_path(namespace, "data"))  # the owner's held-out reference
    open_claim(cluster.claim_path(namespace, "artifacts"))
    put_silo_data(cluster.claim_path(namespace, "north"), 0)
    put_silo_data(cluster.claim_path(south, "south"), 1)
    name = "fed"
    training = f"{name}-g1-train"
    cluster.apply(federated_recjob(name, namespace, {"south": south}, secure=True))
    diagnose = lambda: _diagnose(cluster, namespace, name, south)  # noqa: E731

    # south's namespace has not granted its claim yet: nothing is created, and the
    # RecJob says which grant is missing
    def refused() -> str | None:
        conditions = ((cluster.get("recjob", name, namespace) or {}).get("status") or {}).get(
            "conditions", []
        )
        found = [c for c in conditions if c["type"] == "ChildrenCreated" and c["status"] == "False"]
        return found[0]["message"] if found else None

    message = cluster.wait("the missing grant reported", refused, timeout=120, on_timeout=diagnose)
    assert f"namespace {south} does not grant RecJobs of namespace {namespace}" in message
    assert "PersistentVolumeClaim south" in message and "silos[1].namespace" in message
    assert cluster.get("job", training, namespace) is None
    kinds, selector = "deployments,configmaps,networkpolicies", f"{FEDERATION}={training}"
    for ns in (namespace, south):
        assert not cluster.kubectl("get", kinds, "-n", ns, "-l", selector, "-o", "name").stdout
    cluster.apply(reference_grant(south, namespace, "south"))

    # the federation's pods, as scheduled and run
    def federation_pods() -> dict[str, dict] | None:
        pods = [
            pod
            for ns in (namespace, south)
            for pod in (cluster.get("pods", namespace=ns) or {}).get("items", [])
        ]
        running = {
            p["metadata"]["labels"].get("recjob.dev/silo")
            or p["metadata"]["labels"].get("recjob.dev/federation-role", "submit"): p
            for p in pods
            if p["status"].get("phase") == "Running"
        }
        return running if {"superlink", *SILOS} <= set(running) else None

    pods = cluster.wait("the SuperLink and both SuperNodes running", federation_pods,
                        timeout=300, on_timeout=diagnose)  # fmt: skip
    assert _claims(pods["north"]) == {"north"} and _claims(pods["south"]) == {"south"}
    assert pods["south"]["metadata"]["namespace"] == south  # its namespace's claim
    assert _claims(pods["superlink"]) == {"artifacts"}
    submit = cluster.get("job", training, namespace)
    assert _claims(submit["spec"]["template"]) == {"data", "artifacts"}
    service = cluster.get("service", f"{training}-link", namespace)
    assert service["spec"]["ports"][0]["port"] == 9093
    # the fences, as the API server accepted them, each selecting the pods that run (the
    # cluster enforces them: the run below trains through them; what they refuse is
    # tests/cluster/test_network_policy.py's)
    for policy, ns, fenced in (("link", namespace, "superlink"), ("silos", namespace, "north"),
                               (f"silos-from-{namespace}", south, "south")):  # fmt: skip
        spec = cluster.get("networkpolicy", f"{training}-{policy}", ns)["spec"]
        selector = spec["podSelector"]["matchLabels"]
        assert selector.items() <= pods[fenced]["metadata"]["labels"].items()

    # the SuperLink's pod dies once round 1 is checkpointed: its Deployment starts another
    # (which knows no run), the Job's pod fails on that, and the next one submits the run
    # again, which resumes after round 1
    artifacts = cluster.claim_path(namespace, "artifacts")
    cluster.wait(
        "round 1's checkpoint",
        lambda: list(artifacts.rglob("g1/train/federated/checkpoints/round-000001/state.json")),
        timeout=600, interval=0.5, on_timeout=diagnose,
    )  # fmt: skip
    cluster.kubectl("delete", "pod", "-n", namespace, pods["superlink"]["metadata"]["name"],
                    "--wait=false")  # fmt: skip

    final = cluster.wait(
        "federated training and conversion to finish",
        lambda: (r := cluster.get("recjob", name, namespace))
        and ((s := r.get("status") or {}).get("phase") == "Failed"
             or s.get("conversion", {}).get("state") in ("Succeeded", "Failed"))
        and r,
        timeout=900, interval=3, on_timeout=diagnose,
    )  # fmt: skip
    status = final["status"]
    assert status["training"]["state"] == "Succeeded", diagnose()
    federation = status["training"]["federation"]
    assert federation["silos"] == 2 and federation["roundsCompleted"] == 2, federation
    assert federation["bytesExchanged"] > 0
    assert status["training"]["restarts"] >= 1, "the Job's pod failed with the SuperLink"
    assert status["training"]["metrics"], "the submitter's termination message carries them"
    assert status["conversion"]["state"] == "Succeeded", diagnose()
    assert status["conversion"]["qualityGate"]["passed"] is True

    # the run went through the SuperLink over TLS, and the server side opened no silo file
    run = artifacts
    metrics = json.loads(next(run.rglob("g1/train/metrics.json")).read_text())
    assert metrics["federated"]["engine"] == "flower-deployment"
    assert metrics["federated"]["secure_aggregation"]["protocol"] == "secagg+"  # between pods
    assert metrics["federated"]["resumed_from_round"] == 1, metrics["federated"]
    assert metrics["federated"]["superlink"]["tls"] is True
    assert metrics["federated"]["superlink"]["network_traffic"], metrics["federated"]
    opened = json.loads(next(run.rglob("g1/train/federated/server-opened-files.json"))
                        .read_text())  # fmt: skip
    assert opened, "the audit hook recorded the ServerApp's files"
    assert not [p for p in opened if any(f"/mnt/pvc/{silo}" in p for silo in SILOS)], opened

    # the federation's pods are gone (the Job stays, with its result; the inert Service and
    # Secret go with the RecJob), and in south's namespace, where nothing is the RecJob's
    # to garbage-collect, its ConfigMap and NetworkPolicy too
    def federation_left() -> list[str]:
        selector = ("-l", f"{FEDERATION}={training}", "-o", "name")
        out = cluster.kubectl("get", "deployments,pods", "-n", namespace, *selector).stdout
        there = cluster.kubectl("get", "deployments,pods,configmaps,networkpolicies", "-n", south,
                                *selector).stdout  # fmt: skip
        return out.split() + there.split()

    cluster.wait("the federation deleted", lambda: not federation_left() or None, timeout=60,
                 on_timeout=lambda: "\n".join(federation_left()))  # fmt: skip
    assert cluster.get("job", training, namespace)["status"].get("succeeded") == 1


def test_a_federated_recjob_deleted_mid_run_leaves_nothing_in_the_silos_namespace(
    operator: Cluster, namespace: str, south_namespace: str
):
    """Nothing in south's namespace is owned by the RecJob (ownerReferences cannot cross
    namespaces): its finalizer deletes the SuperNode, its ConfigMap and its fence there,
    while the garbage collector takes what the RecJob owns in its own namespace."""
    cluster, south = operator, south_namespace
    cluster.apply(*storage(namespace, ("data", "artifacts", "north")), *storage(south, ("south",)))
    put_dataset(cluster.claim_path(namespace, "data"))
    open_claim(cluster.claim_path(namespace, "artifacts"))
    put_silo_data(cluster.claim_path(namespace, "north"), 0)
    put_silo_data(cluster.claim_path(south, "south"), 1)
    cluster.apply(reference_grant(south, namespace, "south"))
    name = "gone"
    training = f"{name}-g1-train"
    cluster.apply(federated_recjob(name, namespace, {"south": south}))
    diagnose = lambda: _diagnose(cluster, namespace, name, south)  # noqa: E731
    selector = ("-l", f"{FEDERATION}={training}", "-o", "name")

    def left(ns: str, kinds: str = "deployments,pods,configmaps,networkpolicies") -> list[str]:
        return cluster.kubectl("get", kinds, "-n", ns, *selector).stdout.split()

    def south_running() -> bool:
        pods = (cluster.get("pods", namespace=south) or {}).get("items", [])
        return any(p["status"].get("phase") == "Running" for p in pods)

    cluster.wait("south's SuperNode running in its namespace", south_running, timeout=300,
                 on_timeout=diagnose)  # fmt: skip
    assert len(left(south, "configmaps,networkpolicies")) == 2
    cluster.kubectl("delete", "recjob", name, "-n", namespace, "--wait=false")
    cluster.wait(
        "the RecJob and everything of its federation gone, in both namespaces",
        lambda: cluster.get("recjob", name, namespace) is None
        and not left(south) and not left(namespace),
        timeout=120, on_timeout=lambda: f"{left(south)} {left(namespace)}\n{diagnose()}",
    )  # fmt: skip
