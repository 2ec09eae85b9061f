"""RecJobs, claims and data for the cluster tests (small: seconds of training)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SHARED
from tests.local.test_local_mode import tiny_dataset

AMAZON = SHARED / "data" / "amazon-scientific"
DATA = "pvc://data/amazon"
#: The test cluster's Gateway (namespace, name) (hack/cluster).
GATEWAY = ("recjob-gateway", "recjob")


def storage(namespace: str, claims: tuple[str, ...] = ("data", "artifacts")) -> list[dict]:
    """ReadWriteMany claims on the cluster's default StorageClass."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        for claim in claims
    ]


def open_claim(claim_root: Path) -> None:
    """Let the pods' non-root users write to a hostPath-provisioned claim (the provisioner
    creates it 0750 root; an administrator would chmod or chown it the same way)."""
    claim_root.chmod(0o777)


def put_dataset(claim_root: Path, users: int = 60) -> None:
    """A slice of Amazon Scientific into the data claim (what a loader Job would do),
    readable by the trainer's user."""
    target = claim_root / "amazon"
    tiny_dataset(target, users)
    for path in [claim_root, *claim_root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)


def recjob(name: str, namespace: str, nodes: int = 1, processes: int = 1, **training) -> dict:
    """A recommendation RecJob on the data claim, artifacts on the artifacts claim."""
    return {
        "apiVersion": "recjob.dev/v1alpha1",
        "kind": "RecJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "data": {
                "task": "recommendation",
                "format": "atomic",
                "train": f"{DATA}/Scientific.train.inter",
                "validation": f"{DATA}/Scientific.valid.inter",
                "test": f"{DATA}/Scientific.test.inter",
                "catalog": f"{DATA}/Scientific.text",
                "preprocessing": {"negativeSampling": {"strategy": "uniform", "perPositive": 1}},
            },
            "model": {"maxSequenceLength": 24, "historyLength": 3},
            "training": {
                "nodes": nodes,
                "processesPerNode": processes,
                "microBatchSize": 4,
                "maxSteps": 3,
                # fp32: CPUs without bf16 arithmetic (AVX2; CI's too) emulate bf16, and
                # a 3-step RecJob like this trained in 103 s instead of 40 s (trainer/README.md)
                "precision": "fp32",
                "evalIntervalSteps": 3,
                "checkpoint": {"intervalSteps": 3},
                "resources": {"cpu": "1", "memory": "4Gi"},
                **training,
            },
            "export": {
                "target": "onnxruntime-fp32",
                "qualityBudget": {"maxRelativeDrop": 0.5},
                "resources": {"cpu": "1", "memory": "4Gi"},
            },
            "serving": {"name": "tiny"},
            "artifactsUri": "pvc://artifacts/runs",
        },
    }


SERVICE = "shop"
ERROR_RATE = {
    "name": "error-rate",
    "query": 'sum(rate(recjob_inference_errors_total{revision="{{revision}}",'
    'namespace="{{namespace}}"}[{{interval}}])) / sum(rate(recjob_inference_requests_total'
    '{revision="{{revision}}",namespace="{{namespace}}"}[{{interval}}]))',
    "max": 0.05,
}
LIVE_GAIN = {  # the storefront's feedback, counted by the pods of the revision that served.
    # No data (so: hold) until the canary has 30 impressions in the window. Its first
    # analysis comes seconds after it gets traffic: CI rolled a good canary back on such a
    # first analysis (live NDCG 0), and a run here found 7 impressions behind it, while at
    # steady state the same canary measured 0.242 vs the stable's 0.246 (the same model)
    "name": "live-ndcg",
    "query": '(sum(rate(recjob_feedback_gain_total{revision="{{revision}}",'
    'namespace="{{namespace}}"}[1m])) / sum(rate(recjob_feedback_impressions_total'
    '{revision="{{revision}}",namespace="{{namespace}}"}[1m]))) and on() '
    '(sum(increase(recjob_feedback_impressions_total{revision="{{revision}}",'
    'namespace="{{namespace}}"}[1m])) >= 30)',
    "min": 0.05,
}


def serving_recjob(name: str, namespace: str, **export) -> dict:
    """A small recommendation RecJob rolling out to SERVICE in RawDeployment mode."""
    document = recjob(name, namespace)
    spec = document["spec"]
    spec["export"].update(export)
    spec["serving"] = {
        "name": SERVICE,
        "deploymentMode": "RawDeployment",
        "gateway": {"name": GATEWAY[1], "namespace": GATEWAY[0]},
        "minReplicas": 1,
        "maxReplicas": 1,
        "resources": {"cpu": "1", "memory": "2Gi"},
    }
    spec["rollout"] = {
        "steps": [50, 100],
        "interval": "10s",
        "failureLimit": 1,
        "metrics": [ERROR_RATE, LIVE_GAIN],
        "noData": {"action": "hold", "deadline": "3m"},
    }
    return document
