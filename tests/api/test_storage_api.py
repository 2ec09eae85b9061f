"""spec.storage and the storage-URI rules: validation messages and what pods get."""

from __future__ import annotations

import copy

import pytest

from recjob_operator.api.v1alpha1.storage import (
    AWS_ENV_KEYS,
    GCP_KEY_PATH,
    WORK_DIR,
    pod_storage,
    with_pod_storage,
)
from recjob_operator.api.v1alpha1.uris import (
    join,
    pvc_local_path,
    split_pvc,
    uri_problem,
    with_suffix,
)
from recjob_operator.api.validation import validate_document
from tests.conftest import MINIMAL


def _job(**spec) -> dict:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"].update(spec)
    return doc


def _problems(doc: dict) -> list[str]:
    return [str(p) for p in validate_document(doc)[1]]


# --------------------------------------------------------------------------- URI rules
@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("pvc://recjob-data/../other/x.csv", "leaves the claim 'recjob-data'"),
        ("pvc://recjob-data/a/../../x.csv", "leaves the claim"),
        ("pvc://", "claim name is missing"),
        ("pvc:///x.csv", "claim name is missing"),
        ("pvc://Data/x.csv", "not a PersistentVolumeClaim name"),
        ("file://data.csv", "must be absolute"),
        ("file://localhost/data.csv", "must be absolute"),
        ("s3:///key.csv", "bucket name is missing"),
        ("gs:///key.csv", "bucket name is missing"),
    ],
)
def test_bad_uris_are_refused_naming_the_field(uri: str, fragment: str) -> None:
    doc = _job()
    doc["spec"]["data"]["train"] = uri
    problems = _problems(doc)
    assert any(p.startswith("spec.data.train: ") and fragment in p for p in problems), problems


@pytest.mark.parametrize(
    "field",
    [
        "artifactsUri",
        "data.catalog",
        "data.validation",
        "data.itemIndex",
        "data.candidates",
        "serving.storageUri",
        "model.baseModel",
    ],
)
def test_every_uri_field_is_checked(field: str) -> None:
    doc = _job()
    section, _, name = field.rpartition(".")
    node = doc["spec"].setdefault(section, {}) if section else doc["spec"]
    node[name] = "pvc://recjob-data/../../etc"
    if field == "data.validation":
        doc["spec"]["data"]["preprocessing"] = {"split": {"strategy": "predefined"}}
    problems = _problems(doc)
    assert any(p.startswith(f"spec.{field}: ") and "leaves the claim" in p for p in problems), (
        problems
    )


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://recjob-data/a/../b.csv",  # stays inside the claim
        "pvc://recjob-data",
        "file:///data/train.csv",
        "s3://bucket/key.csv",
        "gs://bucket/dir/key.csv",
        "data/train.csv",
        "../shared/data/train.csv",
    ],
)
def test_good_uris_pass(uri: str) -> None:
    doc = _job()
    doc["spec"]["data"]["train"] = uri
    assert _problems(doc) == []
    assert uri_problem(uri) is None


def test_uri_helpers() -> None:
    assert split_pvc("pvc://data/a/./b/../c.csv") == ("data", "a/c.csv")
    assert pvc_local_path("pvc://data/x", "/mnt/pvc") == "/mnt/pvc/data/x"
    assert with_suffix("pvc://data/amazon/Sci.text", ".item2index") == (
        "pvc://data/amazon/Sci.item2index"
    )
    assert with_suffix("file:///a/Sci.text", ".item2index") == "file:///a/Sci.item2index"
    assert with_suffix("s3://b/Sci", ".item2index") == "s3://b/Sci.item2index"
    assert with_suffix("Sci.text", ".item2index") == "Sci.item2index"
    assert join("s3://b", "x/", "/y") == "s3://b/x/y"


def test_object_store_artifacts_need_one_node() -> None:
    doc = _job(artifactsUri="s3://recjob-artifacts", training={"nodes": 2})
    problems = _problems(doc)
    assert len(problems) == 1 and problems[0].startswith("spec.training.nodes: ")
    assert "use 1 node" in problems[0]
    one_node = _job(artifactsUri="s3://recjob-artifacts", training={"processesPerNode": 4})
    assert _problems(one_node) == []
    assert _problems(_job(artifactsUri="s3://recjob-artifacts")) == []
    assert _problems(_job(artifactsUri="pvc://shared", training={"nodes": 2})) == []


# --------------------------------------------------------------------------- spec.storage
def test_storage_section_parses_and_is_checked() -> None:
    storage = {
        "credentialsSecret": {"name": "s3-credentials", "gcsKeyFile": "key.json"},
        "serviceAccountName": "recjob-trainer",
    }
    job, problems = validate_document(_job(storage=storage))
    assert problems == [] and job is not None
    assert job.spec.storage.credentials_secret.name == "s3-credentials"
    bad = _job(storage={"credentialsSecret": {"name": "Bad_Name"}, "serviceAccount": "x"})
    problems = _problems(bad)
    assert any(p.startswith("spec.storage.credentialsSecret.name: ") for p in problems)
    assert any("unknown field 'serviceAccount'" in p for p in problems), problems


def _spec(**spec):
    job, problems = validate_document(_job(**spec))
    assert problems == [] and job is not None, problems
    return job.spec


def test_no_storage_section_changes_nothing() -> None:
    storage = pod_storage(_spec())
    assert storage.env == storage.env_from == storage.volumes == ()
    assert storage.service_account_name is None
    pod = {"containers": [{"name": "c", "env": [{"name": "A", "value": "1"}]}]}
    assert with_pod_storage(pod, storage) == pod


def test_secret_keys_become_env_and_the_gcs_key_a_file() -> None:
    spec = _spec(
        storage={
            "credentialsSecret": {"name": "s3-credentials", "gcsKeyFile": "service-account.json"}
        }
    )
    storage = pod_storage(spec)
    assert storage.env_from == ({"secretRef": {"name": "s3-credentials"}},)
    assert {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": GCP_KEY_PATH} in storage.env
    (volume,) = storage.volumes
    assert volume["secret"]["items"] == [{"key": "service-account.json", "path": "key.json"}]
    assert storage.volume_mounts[0]["readOnly"] is True
    assert GCP_KEY_PATH.startswith(storage.volume_mounts[0]["mountPath"] + "/")
    assert "AWS_SECRET_ACCESS_KEY" in AWS_ENV_KEYS


def test_object_store_artifacts_get_a_work_dir_and_the_service_account() -> None:
    spec = _spec(
        artifactsUri="s3://recjob-artifacts",
        storage={"serviceAccountName": "recjob-irsa"},
    )
    storage = pod_storage(spec)
    assert storage.env_from == ()  # the pod's identity, no static keys
    assert storage.service_account_name == "recjob-irsa"
    assert {"name": "RECJOB_WORK_DIR", "value": WORK_DIR} in storage.env
    assert {"name": "recjob-work", "emptyDir": {}} in storage.volumes
    pod = {
        "containers": [
            {"name": "pytorch", "env": [{"name": "RECJOB_WORK_DIR", "value": "/own"}]},
            {"name": "sidecar"},
        ],
        "volumes": [{"name": "config", "configMap": {"name": "x"}}],
    }
    out = with_pod_storage(pod, storage, containers=["pytorch"])
    assert out["serviceAccountName"] == "recjob-irsa"
    assert [v["name"] for v in out["volumes"]] == ["config", "recjob-work"]
    trainer, sidecar = out["containers"]
    assert trainer["env"] == [{"name": "RECJOB_WORK_DIR", "value": "/own"}]  # its own wins
    assert trainer["volumeMounts"] == [{"name": "recjob-work", "mountPath": WORK_DIR}]
    assert sidecar == {"name": "sidecar"}
    assert pod["containers"][0].get("volumeMounts") is None  # the input is not modified
