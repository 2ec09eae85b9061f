"""spec.storage reaches the training and conversion pods (and the InferenceService)."""

from __future__ import annotations

import copy

from recjob_operator.api.v1alpha1.storage import GCP_KEY_PATH, WORK_DIR
from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller.children import conversion_job, pytorch_job
from recjob_operator.controller.serving_objects import serverless_inference_service
from tests.conftest import CLUSTER_SAMPLES, MINIMAL, load_yaml


def _job(document: dict):
    recjob = parse_recjob(copy.deepcopy(document))
    recjob.metadata.uid = "5f0c1e6e-2a4e-4a4b-9b1e-0d6f3f1b2c3d"
    recjob.metadata.namespace = "shop"
    return recjob


def _pods(recjob) -> list[dict]:
    replicas = pytorch_job(recjob)["spec"]["pytorchReplicaSpecs"].values()
    return [r["template"]["spec"] for r in replicas] + [
        conversion_job(recjob)["spec"]["template"]["spec"]
    ]


def test_s3_sample_pods_get_the_secret_and_a_work_dir() -> None:
    (sample,) = [p for p in CLUSTER_SAMPLES if p.name == "recjob-recommendation.yaml"]
    recjob = _job(load_yaml(sample))
    assert recjob.spec.artifacts_uri.startswith("s3://")
    for pod in _pods(recjob):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "recjob-s3"}}]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RECJOB_WORK_DIR"] == WORK_DIR
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[WORK_DIR]]
        assert "serviceAccountName" not in pod


def test_service_account_and_gcs_key_file() -> None:
    document = copy.deepcopy(MINIMAL)
    document["spec"]["data"]["train"] = "gs://shop-logs/queries.csv"
    document["spec"]["storage"] = {
        "credentialsSecret": {"name": "gcs-key", "gcsKeyFile": "key.json"},
        "serviceAccountName": "recjob-workload",
    }
    recjob = _job(document)
    for pod in _pods(recjob):
        assert pod["serviceAccountName"] == "recjob-workload"
        assert pod["automountServiceAccountToken"] is False  # identity, not API access
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["GOOGLE_APPLICATION_CREDENTIALS"] == GCP_KEY_PATH
        assert "RECJOB_WORK_DIR" not in env  # artifacts stay on the pvc
        key = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName"))
        assert key["secret"]["items"] == [{"key": "key.json", "path": "key.json"}]
    predictor = serverless_inference_service(recjob, 1, None)["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "recjob-workload"


def test_without_storage_the_pods_are_unchanged() -> None:
    for pod in _pods(_job(MINIMAL)):
        (container,) = pod["containers"]
        assert "envFrom" not in container and "serviceAccountName" not in pod
        assert not any(v["name"].startswith("recjob-work") for v in pod["volumes"])
