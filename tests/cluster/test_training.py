"""Training on the real cluster: a RecJob applied with kubectl becomes a real PyTorchJob that
the Kubeflow Training Operator turns into pods, which the node agents run: 2 nodes x 2
processes of DeepSpeed over gloo, rendezvous through cluster DNS, then the conversion Job.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster.conftest import Cluster
from tests.cluster.recjobs import AMAZON, open_claim, put_dataset, recjob, storage

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(not AMAZON.exists(), reason="../shared/data not present"),
]


def _diagnose(cluster: Cluster, namespace: str, name: str) -> str:
    return "\n".join([
        cluster.describe("recjob", name, namespace),
        cluster.kubectl("get", "pytorchjobs,jobs,pods", "-n", namespace, "-o", "wide",
                        check=False).stdout,
        cluster.pod_logs(namespace, f"recjob.dev/recjob={name}"),
    ])  # fmt: skip


def test_recjob_trains_on_two_nodes_of_two_processes_then_converts(operator: Cluster, namespace):
    cluster = operator
    cluster.apply(*storage(namespace))
    put_dataset(cluster.claim_path(namespace, "data"))
    open_claim(cluster.claim_path(namespace, "artifacts"))
    name = "two-by-two"
    cluster.apply(recjob(name, namespace, nodes=2, processes=2))

    job_name = cluster.wait(
        "the PyTorchJob", lambda: (r := cluster.get("recjob", name, namespace))
        and (r.get("status") or {}).get("training", {}).get("jobName"), timeout=120,
        on_timeout=lambda: _diagnose(cluster, namespace, name),
    )  # fmt: skip
    job = cluster.get("pytorchjob", job_name, namespace)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "2"

    # the Training Operator's pods, with the topology it injects
    pods = cluster.wait(
        "master and worker pods running",
        lambda: (p := cluster.get("pods", namespace=namespace))
        and len([x for x in p["items"] if x["status"].get("phase") == "Running"]) >= 2
        and p["items"],
        timeout=180, on_timeout=lambda: _diagnose(cluster, namespace, name),
    )  # fmt: skip
    env = {
        pod["metadata"]["labels"]["training.kubeflow.org/replica-type"]: {
            e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]
        }
        for pod in pods
        if "training.kubeflow.org/replica-type" in pod["metadata"]["labels"]
    }
    assert env["master"]["WORLD_SIZE"] == "4" and env["master"]["PET_NNODES"] == "2"
    assert env["worker"]["PET_NODE_RANK"] == "1" and env["master"]["PET_NPROC_PER_NODE"] == "2"
    assert env["worker"]["MASTER_ADDR"] == f"{job_name}-master-0"
    assert {p["spec"]["nodeName"] for p in pods} <= {"node-1", "node-2"}

    final = cluster.wait(
        "training and conversion to finish",
        lambda: (r := cluster.get("recjob", name, namespace))
        and (r.get("status") or {}).get("conversion", {}).get("state") in ("Succeeded", "Failed")
        and r,
        timeout=900, interval=3, on_timeout=lambda: _diagnose(cluster, namespace, name),
    )  # fmt: skip
    status = final["status"]
    assert status["training"]["state"] == "Succeeded", _diagnose(cluster, namespace, name)
    assert status["training"]["worldSize"] == 4
    assert status["training"]["metrics"], "the master's termination message carries the metrics"
    assert status["conversion"]["state"] == "Succeeded", _diagnose(cluster, namespace, name)
    assert status["conversion"]["qualityGate"]["passed"] is True

    # the DeepSpeed world the trainer formed: 4 ranks (2 pods x 2 processes)
    artifacts = cluster.claim_path(namespace, "artifacts")
    ds = json.loads(next(artifacts.rglob("train/deepspeed.json")).read_text())
    per_rank = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert ds["train_batch_size"] // per_rank == 4
    assert list(artifacts.rglob("train/model/*")), "the consolidated model was written"
