"""Child objects: PyTorchJob and InferenceService against the upstream CRD schemas,
ConfigMaps and the conversion Job against kubernetes-validate."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from recjob_operator.controller.children import (
    conversion_config_map,
    conversion_job,
    inference_service,
    pytorch_job,
    pytorch_job_state,
    snapshot_uri,
    training_config_map,
)
from recjob_operator.schema import apply_defaults, openapi_to_jsonschema, prune_nulls
from recjob_operator.validation import parse_recjob
from tests.conftest import EXAMPLES, MINIMAL, SHARED, load_yaml

CRDS = SHARED / "upstream-crds"
pytestmark = pytest.mark.skipif(not CRDS.exists(), reason="../shared/upstream-crds not present")


@cache
def crd_schema(file: str, version: str) -> dict:
    crd = yaml.safe_load((CRDS / file).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def assert_valid_against(obj: dict, file: str, version: str) -> None:
    """As the API server would: prune nulls, default, then validate."""
    schema = crd_schema(file, version)
    admitted = apply_defaults(prune_nulls(copy.deepcopy(obj), schema), schema)
    errors = sorted(
        jsonschema.Draft202012Validator(openapi_to_jsonschema(schema)).iter_errors(admitted),
        key=str,
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def job(document: dict | None = None, generation: int = 3):
    recjob = parse_recjob(copy.deepcopy(document or MINIMAL))
    recjob.metadata.uid = "5f0c1e6e-2a4e-4a4b-9b1e-0d6f3f1b2c3d"
    recjob.metadata.namespace = "shop"
    recjob.metadata.generation = generation
    return recjob


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_builds_valid_children(example: Path) -> None:
    recjob = job(load_yaml(example))
    training = pytorch_job(recjob)
    assert_valid_against(training, "kubeflow.org_pytorchjobs.yaml", "v1")
    for canary in (None, 10):
        isvc = inference_service(recjob, 4, canary)
        assert_valid_against(isvc, "serving.kserve.io_inferenceservices.yaml", "v1beta1")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in (training_config_map(recjob), conversion_config_map(recjob), conversion_job(recjob)):
        kubernetes_validate.validate(obj, "1.32", strict=True)


def test_pytorch_job_shape() -> None:
    document = copy.deepcopy(MINIMAL)
    document["spec"]["training"] = {
        "nodes": 3,
        "processesPerNode": 2,
        "maxRestarts": 5,
        "resources": {"cpu": "4", "memory": "16Gi", "gpu": 2},
    }
    recjob = job(document)
    obj = pytorch_job(recjob)
    assert obj["metadata"]["name"] == "minimal-g3-train"
    owner = obj["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "RecJob" and owner["controller"] and owner["uid"] == recjob.metadata.uid
    spec = obj["spec"]
    assert spec["nprocPerNode"] == "2" and spec["runPolicy"]["backoffLimit"] == 5
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RECJOB_TERMINATION_LOG"] == container["terminationMessagePath"]
    assert container["command"] == ["recjob-train", "--config", "/etc/recjob/trainer.yaml"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/mnt/pvc/recjob-artifacts" in mounts  # artifactsUri pvc://recjob-artifacts
    single = pytorch_job(job())
    assert "Worker" not in single["spec"]["pytorchReplicaSpecs"]


def test_training_config_map_carries_the_trainer_and_deepspeed_configs() -> None:
    recjob = job()
    data = training_config_map(recjob)["data"]
    trainer = yaml.safe_load(data["trainer.yaml"])
    assert trainer["outputUri"] == "pvc://recjob-artifacts/minimal/g3/train"
    assert trainer["name"] == "minimal-g3"
    deepspeed = json.loads(data["deepspeed.json"])
    assert deepspeed["zero_optimization"]["stage"] == recjob.spec.training.deepspeed.zero_stage


def test_conversion_job_reports_through_its_termination_message() -> None:
    recjob = job()
    obj = conversion_job(recjob)
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert "--termination-log" in container["command"]
    rule = obj["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2, 3]
    config = yaml.safe_load(conversion_config_map(recjob)["data"]["convert.yaml"])
    assert config["modelDir"] == "pvc://recjob-artifacts/minimal/g3/train/model"
    assert config["modelName"] == "minimal"
    assert "teacherDir" not in config  # no compression: no separate teacher
    document = copy.deepcopy(MINIMAL)
    document["spec"]["compression"] = {"distillation": {"student": {"numLayers": 2}}}
    compressed = yaml.safe_load(conversion_config_map(job(document))["data"]["convert.yaml"])
    assert compressed["teacherDir"] == "pvc://recjob-artifacts/minimal/g3/train/teacher"


def test_inference_service_canary_and_snapshot() -> None:
    recjob = job()
    stable = inference_service(recjob, 1, None)
    canary = inference_service(recjob, 2, 25)
    assert "canaryTrafficPercent" not in stable["spec"]["predictor"]
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 25
    model = canary["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == snapshot_uri(recjob, 2) != snapshot_uri(recjob, 1)
    assert canary["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"


def test_a_recjob_without_uid_cannot_own_children() -> None:
    recjob = parse_recjob(copy.deepcopy(MINIMAL))
    with pytest.raises(ValueError, match="uid"):
        pytorch_job(recjob)


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([], "Created"),
        ([{"type": "Created", "status": "True"}], "Created"),
        ([{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}], "Running"),
        ([{"type": "Running", "status": "False"}, {"type": "Restarting", "status": "True"}],
         "Restarting"),
        ([{"type": "Running", "status": "False"},
          {"type": "Failed", "status": "True", "message": "OOMKilled"}], "Failed"),
        ([{"type": "Succeeded", "status": "True"}], "Succeeded"),
    ],
)  # fmt: skip
def test_pytorch_job_conditions_map_to_states(conditions: list, expected: str) -> None:
    state, _, _ = pytorch_job_state({"status": {"conditions": conditions}})
    assert state == expected


def test_the_schema_check_catches_what_an_api_server_would_reject() -> None:
    recjob = job()
    broken = pytorch_job(recjob)
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    with pytest.raises(AssertionError, match="replicas"):
        assert_valid_against(broken, "kubeflow.org_pytorchjobs.yaml", "v1")
    typo = inference_service(recjob, 1, 10)
    typo["spec"]["predictor"]["canaryTraficPercent"] = typo["spec"]["predictor"].pop(
        "canaryTrafficPercent"
    )
    with pytest.raises(AssertionError, match="canaryTraficPercent"):
        assert_valid_against(typo, "serving.kserve.io_inferenceservices.yaml", "v1beta1")
