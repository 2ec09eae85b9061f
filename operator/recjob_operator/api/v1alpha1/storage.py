"""``spec.storage``: how the training and conversion pods reach s3:// and gs:// storage.

Credentials come from one of two places, never from the RecJob itself:

- a Secret (``credentialsSecret``): every key of it becomes an environment variable of
  the training and conversion containers, so a Secret holding ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY`` (and optionally ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``
  or ``AWS_REGION``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible
  stores such as MinIO) gives s3:// access; for gs://, ``gcsKeyFile`` names the key that
  holds a Google service-account JSON key, mounted as a file with
  ``GOOGLE_APPLICATION_CREDENTIALS`` pointing at it;
- the pod's identity (no Secret): ``serviceAccountName`` runs the pods as a
  ServiceAccount that EKS IRSA / Pod Identity or GKE Workload Identity binds to a cloud
  role; the SDKs' default credential chains (botocore, google-auth) pick it up.

:func:`pod_storage` turns a spec into the env, volumes and ServiceAccount a pod needs;
``controller/children.py`` applies it to the PyTorchJob and conversion Job pod
templates with :func:`with_pod_storage`. Pure: no I/O, no Kubernetes client.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from .common import ApiModel
from .uris import is_object_store, uri_problem

if TYPE_CHECKING:  # spec.py imports this module
    from .spec import RecJobSpec

DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"

#: Environment variables an S3 credentials Secret usually holds (documentation and
#: tests; the pod gets every key of the Secret).
AWS_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
#: Where the Google service-account key file is mounted (gs:// with ``gcsKeyFile``).
GCP_KEY_DIR = "/var/run/secrets/recjob/gcp"
GCP_KEY_PATH = f"{GCP_KEY_DIR}/key.json"
#: Local working copy of object-store artifacts (an emptyDir: it survives container
#: restarts, so a restarted trainer resumes from its local checkpoints).
WORK_DIR = "/var/recjob/work"
WORK_DIR_ENV = "RECJOB_WORK_DIR"
_GCP_VOLUME, _WORK_VOLUME = "recjob-gcp-key", "recjob-work"


class CredentialsSecret(ApiModel):
    """A Secret in the RecJob's namespace whose keys become environment variables of the
    training and conversion containers (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION, AWS_ENDPOINT_URL(_S3) for s3://).
    The pods do not start while it is missing."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """The Secret's name."""
    gcs_key_file: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN
    )
    """For gs://: the key of the Secret that holds a Google service-account JSON key. It
    is mounted read-only as a file and GOOGLE_APPLICATION_CREDENTIALS points at it. Unset:
    gs:// uses the pod's identity (GKE Workload Identity)."""


class StorageSpec(ApiModel):
    """Credentials for s3:// and gs:// data and artifacts. Without this section the pods
    use the cloud SDKs' default credential chain (the node's or the namespace's default
    ServiceAccount's identity)."""

    credentials_secret: CredentialsSecret | None = None
    """Static credentials from a Secret."""
    service_account_name: str | None = Field(
        default=None, min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN
    )
    """ServiceAccount the training, conversion and serving pods run as: with IRSA / EKS Pod
    Identity or GKE Workload Identity it carries the cloud identity, so no key is stored
    anywhere. Default: the namespace's default ServiceAccount."""


@dataclass(frozen=True)
class PodStorage:
    """What a pod needs to reach a RecJob's storage (see :func:`pod_storage`)."""

    env: tuple[dict, ...] = ()
    """Added to each container's ``env``."""
    env_from: tuple[dict, ...] = ()
    """Added to each container's ``envFrom`` (the credentials Secret)."""
    volumes: tuple[dict, ...] = ()
    """Added to the pod's ``volumes``."""
    volume_mounts: tuple[dict, ...] = ()
    """Added to each container's ``volumeMounts``."""
    service_account_name: str | None = None
    """The pod's ``serviceAccountName`` (None: leave the namespace default)."""


def artifact_uris(spec: RecJobSpec) -> list[tuple[str, str]]:
    """(field path, URI) of every URI the RecJob writes to."""
    out = [("spec.artifactsUri", spec.artifacts_uri)]
    if spec.training.checkpoint.uri:
        out.append(("spec.training.checkpoint.uri", spec.training.checkpoint.uri))
    if spec.serving.storage_uri:
        out.append(("spec.serving.storageUri", spec.serving.storage_uri))
    return out


def data_uris(spec: RecJobSpec) -> list[tuple[str, str]]:
    """(field path, URI) of every file the RecJob's data section names."""
    data = spec.data
    return [
        (f"spec.data.{name}", uri)
        for name, uri in (
            ("train", data.train),
            ("validation", data.validation),
            ("test", data.test),
            ("catalog", data.catalog),
            ("itemIndex", data.item_index),
            ("candidates", data.candidates),
        )
        if uri
    ]


def storage_uris(spec: RecJobSpec) -> list[tuple[str, str]]:
    """(field path, URI) of every storage URI in the spec, data first."""
    out = data_uris(spec)
    base = spec.model.base_model
    if "://" in base:
        out.append(("spec.model.baseModel", base))
    return out + artifact_uris(spec)


def storage_problems(spec: RecJobSpec) -> list[tuple[str, str]]:
    """(field path, message) for every storage URI the API refuses beyond its pattern
    (paths leaving their claim, relative file:// URIs, ...) and for artifacts on an
    object store that a multi-node run cannot share."""
    problems = [(path, why) for path, uri in storage_uris(spec) if (why := uri_problem(uri))]
    nodes = spec.training.nodes
    if nodes > 1:
        for path, uri in artifact_uris(spec):
            if path != "spec.serving.storageUri" and is_object_store(uri):
                problems.append(
                    (
                        "spec.training.nodes",
                        f"{nodes} nodes share one run directory (prepared data, DeepSpeed "
                        f"checkpoint partitions), which an object store cannot be: with "
                        f"{path.removeprefix('spec.')} on {uri.split('://')[0]}:// use 1 "
                        "node (processesPerNode may be larger), or put the artifacts on a "
                        "ReadWriteMany pvc://",
                    )
                )
                break
    return problems


def needs_work_dir(spec: RecJobSpec) -> bool:
    """True when the RecJob writes artifacts to an object store: the pods then work in a
    local copy (``$RECJOB_WORK_DIR``) and publish it."""
    return any(is_object_store(uri) for _, uri in artifact_uris(spec))


def pod_storage(spec: RecJobSpec) -> PodStorage:
    """The env, envFrom, volumes, mounts and ServiceAccount that the training and
    conversion pods of ``spec`` need for its s3:// / gs:// storage (empty when none)."""
    storage = spec.storage
    secret = storage.credentials_secret if storage else None
    env: list[dict] = []
    env_from: list[dict] = []
    volumes: list[dict] = []
    mounts: list[dict] = []
    if secret is not None:
        env_from.append({"secretRef": {"name": secret.name}})
        if secret.gcs_key_file:
            volumes.append(
                {
                    "name": _GCP_VOLUME,
                    "secret": {
                        "secretName": secret.name,
                        "items": [{"key": secret.gcs_key_file, "path": "key.json"}],
                        "defaultMode": 0o440,
                    },
                }
            )
            mounts.append({"name": _GCP_VOLUME, "mountPath": GCP_KEY_DIR, "readOnly": True})
            env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": GCP_KEY_PATH})
    if needs_work_dir(spec):
        volumes.append({"name": _WORK_VOLUME, "emptyDir": {}})
        mounts.append({"name": _WORK_VOLUME, "mountPath": WORK_DIR})
        env.append({"name": WORK_DIR_ENV, "value": WORK_DIR})
    return PodStorage(
        env=tuple(env),
        env_from=tuple(env_from),
        volumes=tuple(volumes),
        volume_mounts=tuple(mounts),
        service_account_name=storage.service_account_name if storage else None,
    )


def with_pod_storage(
    pod_spec: dict, storage: PodStorage, containers: Iterable[str] | None = None
) -> dict:
    """A copy of ``pod_spec`` (a PodSpec dict) with ``storage`` applied to the named
    containers (all when None). A container's own env entries win over the added ones."""
    out = copy.deepcopy(pod_spec)
    names = set(containers) if containers is not None else None
    for container in out.get("containers", []):
        if names is not None and container.get("name") not in names:
            continue
        own = {e.get("name") for e in container.get("env", [])}
        added = [copy.deepcopy(e) for e in storage.env if e["name"] not in own]
        if added:
            container["env"] = [*container.get("env", []), *added]
        if storage.env_from:
            added_from = copy.deepcopy(list(storage.env_from))
            container["envFrom"] = [*container.get("envFrom", []), *added_from]
        if storage.volume_mounts:
            mounts = copy.deepcopy(list(storage.volume_mounts))
            container["volumeMounts"] = [*container.get("volumeMounts", []), *mounts]
    if storage.volumes:
        out["volumes"] = [*out.get("volumes", []), *copy.deepcopy(list(storage.volumes))]
    if storage.service_account_name:
        out["serviceAccountName"] = storage.service_account_name
    return out
