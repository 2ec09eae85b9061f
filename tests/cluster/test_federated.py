"""Federated training on the real cluster (issue 16): a RecJob with two silos, each silo's
data on a claim of its own, becomes a SuperLink Deployment and Service, one SuperNode
Deployment per silo and the Job that submits the run, all made by the operator and run by
the node agents as real Flower processes over TLS (the certificate from the operator's
Secret, checked against the Service's DNS name). The SuperLink's pod is killed after the
first round: the run is submitted again to its successor and resumes from the round's
checkpoint. The model then goes through conversion and the quality gate like any other;
the federation is deleted once the run has ended.

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


def federated_recjob(name: str, namespace: str) -> dict:
    """The cluster tests' small RecJob, trained by two silos: LoRA, two rounds of two steps."""
    document = recjob(name, namespace)
    spec = document["spec"]
    spec["model"]["fineTuning"] = {"method": "lora", "lora": {"rank": 4, "alpha": 8.0}}
    data = "pvc://{}/amazon/Scientific"
    spec["training"] = {
        "microBatchSize": 8,
        "learningRate": 1e-3,
        "resources": {"cpu": "1", "memory": "4Gi"},
        "federated": {
            "silos": [{"name": silo, "data": silo_data(data.format(silo))} for silo in SILOS],
            "rounds": 2,
            "localSteps": 2,
            "participation": {"minSilos": 2, "roundDeadlineSeconds": 300},
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


def _diagnose(cluster: Cluster, namespace: str, name: str) -> str:
    return "\n".join([
        cluster.describe("recjob", name, namespace),
        cluster.kubectl("get", "deployments,services,jobs,pods", "-n", namespace, "-o", "wide",
                        check=False).stdout,
        cluster.pod_logs(namespace, f"recjob.dev/recjob={name}"),
    ])  # fmt: skip


def _claims(pod: dict) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v}  # fmt: skip


def test_a_federated_recjob_trains_on_silos_that_keep_their_data(operator: Cluster, namespace):
    cluster = operator
    cluster.apply(*storage(namespace, ("data", "artifacts", *SILOS)))
    put_dataset(cluster.claim_path(namespace, "data"))  # the owner's held-out reference
    open_claim(cluster.claim_path(namespace, "artifacts"))
    for index, silo in enumerate(SILOS):
        put_silo_data(cluster.claim_path(namespace, silo), index)
    name = "fed"
    cluster.apply(federated_recjob(name, namespace))
    diagnose = lambda: _diagnose(cluster, namespace, name)  # noqa: E731

    # the federation's pods, as scheduled and run
    def federation_pods() -> dict[str, dict] | None:
        pods = (cluster.get("pods", namespace=namespace) or {}).get("items", [])
        running = {
            p["metadata"]["labels"].get("recjob.dev/silo")
            or p["metadata"]["labels"].get("recjob.dev/federation-role", "submit"): p
            for p in pods
            if p["status"].get("phase") == "Running"
        }
        return running if {"superlink", *SILOS} <= set(running) else None

    pods = cluster.wait("the SuperLink and both SuperNodes running", federation_pods,
                        timeout=240, on_timeout=diagnose)  # fmt: skip
    assert _claims(pods["north"]) == {"north"} and _claims(pods["south"]) == {"south"}
    assert _claims(pods["superlink"]) == {"artifacts"}
    training = f"{name}-g1-train"
    submit = cluster.get("job", training, namespace)
    assert _claims(submit["spec"]["template"]) == {"data", "artifacts"}
    service = cluster.get("service", f"{training}-link", namespace)
    assert service["spec"]["ports"][0]["port"] == 9093
    # the fences, as the API server accepted them (the node agent does not enforce them: a
    # CNI would), each selecting the pods that run
    for policy, fenced in (("link", ["superlink"]), ("silos", list(SILOS))):
        spec = cluster.get("networkpolicy", f"{training}-{policy}", namespace)["spec"]
        selector = spec["podSelector"]["matchLabels"]
        assert all(selector.items() <= pods[p]["metadata"]["labels"].items() for p in fenced)

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
    assert metrics["federated"]["resumed_from_round"] == 1, metrics["federated"]
    assert metrics["federated"]["superlink"]["tls"] is True
    assert metrics["federated"]["superlink"]["network_traffic"], metrics["federated"]
    opened = json.loads(next(run.rglob("g1/train/federated/server-opened-files.json"))
                        .read_text())  # fmt: skip
    assert opened, "the audit hook recorded the ServerApp's files"
    assert not [p for p in opened if any(f"/mnt/pvc/{silo}" in p for silo in SILOS)], opened

    # the federation's pods are gone (the Job stays, with its result; the inert Service and
    # Secret go with the RecJob)
    def federation_left() -> list[str]:
        out = cluster.kubectl("get", "deployments,pods", "-n", namespace, "-l",
                              f"{FEDERATION}={training}", "-o", "name").stdout  # fmt: skip
        return out.split()

    cluster.wait("the federation deleted", lambda: not federation_left() or None, timeout=60,
                 on_timeout=lambda: "\n".join(federation_left()))  # fmt: skip
    assert cluster.get("job", training, namespace)["status"].get("succeeded") == 1
