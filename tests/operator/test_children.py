"""Child objects: PyTorchJob and InferenceService against the upstream CRD schemas,
ConfigMaps and the conversion Job against kubernetes-validate."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from recjob_operator.api.v1alpha1.spec_delivery import ExportSpec
from recjob_operator.api.v1alpha1.trainer import TrainerConfig
from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller.children import (
    conversion_config_map,
    conversion_job,
    pytorch_job,
    pytorch_job_state,
    training_config_map,
)
from recjob_operator.controller.serving_objects import serverless_inference_service
from recjob_operator.schema import apply_defaults, openapi_to_jsonschema, prune_nulls
from tests.conftest import CLUSTER_SAMPLES, EXAMPLES, MINIMAL, SHARED, load_yaml

CRDS = SHARED / "upstream-crds"
SAMPLES = EXAMPLES + CLUSTER_SAMPLES
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


@pytest.mark.parametrize("example", SAMPLES, ids=[f"{e.parent.name}/{e.name}" for e in SAMPLES])
def test_every_example_builds_valid_children(example: Path) -> None:
    recjob = job(load_yaml(example))
    training = pytorch_job(recjob)
    assert_valid_against(training, "kubeflow.org_pytorchjobs.yaml", "v1")
    for canary in (None, 10):
        isvc = serverless_inference_service(recjob, 4, canary)
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
    # each pod runs torchrun (nprocPerNode processes) from the Training Operator's PET_*
    assert container["command"] == [
        "recjob-train",
        "--launch",
        "--config",
        "/etc/recjob/trainer.yaml",
    ]
    # MASTER_PORT / PET_MASTER_PORT come from this port (Training Operator v1.9)
    assert container["ports"] == [
        {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}
    ]
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
        "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
    }
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/mnt/pvc/recjob-artifacts" in mounts  # artifactsUri pvc://recjob-artifacts
    single = pytorch_job(job())
    assert "Worker" not in single["spec"]["pytorchReplicaSpecs"]


def test_every_data_claim_is_mounted() -> None:
    """Every pvc:// file of spec.data is mounted, the atomic item index included."""
    document = copy.deepcopy(MINIMAL)
    document["spec"]["data"] = {
        "task": "recommendation",
        "format": "atomic",
        "train": "pvc://inter/d.train.inter",
        "test": "pvc://inter/d.test.inter",
        "catalog": "pvc://texts/d.text",
        "itemIndex": "pvc://mappings/d.item2index",
    }
    container = pytorch_job(job(document))["spec"]["pytorchReplicaSpecs"]["Master"]["template"][
        "spec"
    ]["containers"][0]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/mnt/pvc/inter", "/mnt/pvc/texts", "/mnt/pvc/mappings"} <= mounts


def test_training_config_map_carries_the_trainer_config() -> None:
    document = copy.deepcopy(MINIMAL)
    document["spec"]["compression"] = {"pruning": {"amount": 0.5}}
    recjob = job(document)
    data = training_config_map(recjob)["data"]
    assert set(data) == {"trainer.yaml"}  # the trainer derives its DeepSpeed config itself
    trainer = TrainerConfig.model_validate(yaml.safe_load(data["trainer.yaml"]))
    assert trainer.output_uri == "pvc://recjob-artifacts/minimal/5f0c1e6e/g3/train"
    assert trainer.name == "minimal-g3" and trainer.base_dir is None
    assert trainer.data == recjob.spec.data and trainer.training == recjob.spec.training
    assert trainer.compression == recjob.spec.compression


def _pods(recjob) -> list[dict]:
    """Every pod spec the operator builds (PyTorchJob replicas, conversion Job)."""
    replicas = pytorch_job(recjob)["spec"]["pytorchReplicaSpecs"].values()
    return [r["template"]["spec"] for r in replicas] + [
        conversion_job(recjob)["spec"]["template"]["spec"]
    ]


@pytest.mark.parametrize("example", SAMPLES, ids=[f"{e.parent.name}/{e.name}" for e in SAMPLES])
def test_child_pods_are_locked_down(example: Path) -> None:
    recjob = job(load_yaml(example))
    for pod in _pods(recjob):
        assert pod["automountServiceAccountToken"] is False
        # containers other controllers add (the Training Operator's init-pytorch, whose
        # image runs as root) must be verifiably non-root too: runAsUser at pod level
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), (container["name"], kind)
            # everything a read-only container writes lies on an emptyDir
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            env = {e["name"]: e["value"] for e in container["env"]}
            for path in ("/tmp", env["HOME"]):
                assert "emptyDir" in volumes[mounts[path]], path
            for name in ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "HF_HOME", "MPLCONFIGDIR"):
                assert env[name].startswith(env["HOME"] + "/"), name
    isvc = serverless_inference_service(recjob, 1, None)["spec"]["predictor"]
    assert isvc["automountServiceAccountToken"] is False
    limits = isvc["model"]["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits)


def test_children_never_share_mutable_parts() -> None:
    recjob = job()
    first = pytorch_job(recjob)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    first["containers"][0]["env"].clear()
    first["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    again = conversion_job(recjob)["spec"]["template"]["spec"]["containers"][0]
    assert again["env"] and again["securityContext"]["readOnlyRootFilesystem"] is True


def test_conversion_job_uses_the_export_image_and_resources() -> None:
    document = copy.deepcopy(MINIMAL)
    document["spec"]["export"] = {
        "image": "registry.example/recjob-serving:9.9",
        "resources": {"cpu": "3", "memory": "12Gi"},
    }
    (container,) = conversion_job(job(document))["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/recjob-serving:9.9"
    assert container["resources"] == {
        "requests": {"cpu": "3", "memory": "12Gi"},
        "limits": {"cpu": "3", "memory": "12Gi"},
    }
    defaults = conversion_job(job())["spec"]["template"]["spec"]["containers"][0]
    assert defaults["image"] == ExportSpec().image
    assert defaults["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    (search,) = [p for p in CLUSTER_SAMPLES if p.name == "recjob-search.yaml"]
    gpus = load_yaml(search)  # TensorRT on 1 GPU
    assert gpus["spec"]["export"]["target"] == "tensorrt-int8"
    (container,) = conversion_job(job(gpus))["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}


def test_conversion_job_reports_through_its_termination_message() -> None:
    recjob = job()
    obj = conversion_job(recjob)
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert "--termination-log" in container["command"]
    rule = obj["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2, 3]
    config = yaml.safe_load(conversion_config_map(recjob)["data"]["convert.yaml"])
    assert config["modelDir"] == "pvc://recjob-artifacts/minimal/5f0c1e6e/g3/train/model"
    assert config["modelName"] == "minimal"
    assert "teacherDir" not in config  # no compression: no separate teacher
    document = copy.deepcopy(MINIMAL)
    document["spec"]["compression"] = {"distillation": {"student": {"numLayers": 2}}}
    compressed = yaml.safe_load(conversion_config_map(job(document))["data"]["convert.yaml"])
    assert compressed["teacherDir"] == "pvc://recjob-artifacts/minimal/5f0c1e6e/g3/train/teacher"


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
    typo = serverless_inference_service(recjob, 1, 10)
    typo["spec"]["predictor"]["canaryTraficPercent"] = typo["spec"]["predictor"].pop(
        "canaryTrafficPercent"
    )
    with pytest.raises(AssertionError, match="canaryTraficPercent"):
        assert_valid_against(typo, "serving.kserve.io_inferenceservices.yaml", "v1beta1")


def test_a_recjob_created_again_under_its_name_gets_fresh_folders() -> None:
    """Deleted and created again (new input files, say): another uid, so none of the old
    object's prepared data or checkpoints is resumed."""
    from recjob_operator.controller.children import generation_uri

    first, again = job(), job()
    again.metadata.uid = "0d6f3f1b-9b1e-4a4b-2a4e-5f0c1e6e2c3d"
    assert generation_uri(first, "train") == "pvc://recjob-artifacts/minimal/5f0c1e6e/g3/train"
    assert generation_uri(again, "train") == "pvc://recjob-artifacts/minimal/0d6f3f1b/g3/train"
