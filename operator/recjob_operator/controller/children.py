"""Builders of the Kubernetes objects a RecJob owns (pure: RecJob in, dict out).

- ``<name>-g<gen>-train`` ConfigMap (trainer.yaml, a
  :class:`~recjob_operator.api.v1alpha1.trainer.TrainerConfig`) and PyTorchJob
  (kubeflow.org/v1): 1 Master + nodes-1 Workers, ``nprocPerNode``, a container named
  ``pytorch`` with the ``pytorchjob-port`` port running ``recjob-train --launch --config``
  (torchrun with ``nprocPerNode`` trainer processes, from the Training Operator's
  ``PET_*`` variables), restartPolicy OnFailure with ``runPolicy.backoffLimit =
  maxRestarts``, the artifacts PVC mounted where the trainer's ``pvc://`` URIs resolve;
- ``<name>-g<gen>-convert`` ConfigMap and batch/v1 Job running ``recjob-serve convert``
  (``spec.export.image`` and ``resources``); the quality gate's summary comes back in the
  container's termination message;
- the serving objects: ``serving_objects``.

Every object here carries an ownerReference to the RecJob (garbage-collected with it) and the
``recjob.dev/*`` labels. Pods get no service-account token (they never call the API
server), cpu and memory requests and limits, and the trainer and conversion containers a
read-only root filesystem with emptyDirs for /tmp and a HOME holding every cache.
Tests validate them against the upstream CRD schemas.

The operator imports neither the trainer nor the serving package (its image has no
torch): what it hands them is API types and plain YAML.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import yaml

from ..api.v1alpha1.common import GROUP
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.spec_base import ResourceSpec
from ..api.v1alpha1.storage import data_uris, pod_storage, with_pod_storage
from ..api.v1alpha1.trainer import trainer_config
from ..api.v1alpha1.uris import pvc_claim
from .identity import generation_parts
from .reconcile import conversion_name, training_name

#: Where the trainer's pvc:// URIs are mounted in pods (RECJOB_PVC_ROOT).
PVC_ROOT = "/mnt/pvc"
CONFIG_MOUNT = "/etc/recjob"
#: The conversion container writes the quality-gate summary here (read back by the operator).
TERMINATION_LOG = "/dev/termination-log"
#: The Training Operator reads MASTER_PORT / PET_MASTER_PORT from the ``pytorch``
#: container's port of this name (23456 is also its default).
PYTORCHJOB_PORT_NAME = "pytorchjob-port"
PYTORCHJOB_PORT = 23456
#: HOME of trainer and conversion containers: an emptyDir, like /tmp (read-only root).
HOME = "/home/recjob"

#: libyaml's emitter where PyYAML has it (its wheels do): the pure-Python one was 7% of
#: the operator's CPU while 1,000 RecJobs were created (py-spy).
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _yaml(document: dict) -> str:
    """``document`` as a ConfigMap's YAML file, keys in their order."""
    return yaml.dump(document, Dumper=_DUMPER, sort_keys=False)


#: The label naming the RecJob a child (and its pods) belongs to.
RECJOB_LABEL = f"{GROUP}/recjob"


def labels(recjob: RecJob, component: str) -> dict[str, str]:
    """Labels on every child (selectable by RecJob, generation and component)."""
    return {
        "app.kubernetes.io/name": "recjob",
        "app.kubernetes.io/managed-by": "recjob-operator",
        "app.kubernetes.io/component": component,
        RECJOB_LABEL: recjob.metadata.name,
        f"{GROUP}/generation": str(recjob.generation),
    }


def owner_reference(recjob: RecJob) -> dict:
    """The RecJob as controller owner (children are deleted with it)."""
    if not recjob.metadata.uid:
        raise ValueError("the RecJob has no metadata.uid (was it read from the API server?)")
    return {
        "apiVersion": recjob.api_version,
        "kind": recjob.kind,
        "name": recjob.metadata.name,
        "uid": recjob.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(recjob: RecJob, name: str, component: str) -> dict:
    return {
        "name": name,
        "namespace": recjob.metadata.namespace or "default",
        "labels": labels(recjob, component),
        "ownerReferences": [owner_reference(recjob)],
    }


def artifacts_uri(recjob: RecJob, *parts: str) -> str:
    """A URI under spec.artifactsUri."""
    return "/".join([recjob.spec.artifacts_uri.rstrip("/"), *parts])


def generation_uri(recjob: RecJob, part: str) -> str:
    """Where the ``train`` output of the spec's model generation, or the ``convert`` output
    of its conversion revision, goes (``<name>/<uid[:8]>/g<model generation>/train``,
    ``.../convert``, ``.../convert-<revision>``; see ``identity``). The RecJob's uid keeps
    a RecJob deleted and created again under the same name (new data, say) from resuming
    the old one's prepared data and checkpoints."""
    owner = [recjob.metadata.uid[:8]] if recjob.metadata.uid else []
    return artifacts_uri(recjob, recjob.metadata.name, *owner, *generation_parts(recjob, part))


def repository_uri(recjob: RecJob) -> str:
    """The service's Triton model repository (all versions)."""
    return recjob.spec.serving.storage_uri or artifacts_uri(
        recjob, recjob.service_name, "repository"
    )


def snapshot_uri(recjob: RecJob, model_version: int) -> str:
    """A repository holding only ``model_version`` (what one InferenceService revision
    serves, so a restarted stable pod never picks up the canary's version)."""
    return f"{repository_uri(recjob).rstrip('/')}-snapshots/v{model_version}"


def pvc_claims(uris: Iterable[str]) -> list[str]:
    """The claims the ``pvc://`` URIs among ``uris`` name, sorted, each once."""
    return sorted({claim for uri in uris if (claim := pvc_claim(uri))})


def claim_volumes(claims: list[str], prefix: str = "pvc") -> tuple[list[dict], list[dict]]:
    """Volumes (``<prefix>-<i>``) and their mounts where the trainer's pvc:// URIs resolve."""
    volumes = [
        {"name": f"{prefix}-{i}", "persistentVolumeClaim": {"claimName": claim}}
        for i, claim in enumerate(claims)
    ]
    mounts = [
        {"name": f"{prefix}-{i}", "mountPath": f"{PVC_ROOT}/{claim}"}
        for i, claim in enumerate(claims)
    ]
    return volumes, mounts


def _pvc_volumes(recjob: RecJob) -> tuple[list[dict], list[dict]]:
    """Volumes and mounts for every pvc:// claim the RecJob's URIs name."""
    uris = [recjob.spec.artifacts_uri, repository_uri(recjob)]
    uris += [uri for _, uri in data_uris(recjob.spec)]
    return claim_volumes(pvc_claims(uris))


def _resources(spec: ResourceSpec) -> dict:
    """Requests and limits (equal: cpu, memory and any GPUs)."""
    requests = {"cpu": str(spec.cpu), "memory": str(spec.memory)}
    limits = dict(requests)
    if spec.gpu:
        requests[spec.gpu_resource_name] = str(spec.gpu)
        limits[spec.gpu_resource_name] = str(spec.gpu)
    return {"requests": requests, "limits": limits}


_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}

#: Writable places of a read-only container: /tmp (torchrun's logs, tempfiles, the
#: inductor cache) and HOME, with every cache torch, DeepSpeed (JIT-built ops), Triton,
#: Hugging Face and matplotlib would write pointed inside it.
_SCRATCH_VOLUMES = [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
_SCRATCH_MOUNTS = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME}]
_SCRATCH_ENV = [
    {"name": "HOME", "value": HOME},
    {"name": "TMPDIR", "value": "/tmp"},
    {"name": "XDG_CACHE_HOME", "value": f"{HOME}/.cache"},
    {"name": "TORCH_EXTENSIONS_DIR", "value": f"{HOME}/.cache/torch_extensions"},
    {"name": "TRITON_CACHE_DIR", "value": f"{HOME}/.cache/triton"},
    {"name": "HF_HOME", "value": f"{HOME}/.cache/huggingface"},
    {"name": "MPLCONFIGDIR", "value": f"{HOME}/.config/matplotlib"},
    {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
]


def _pod_spec(containers: list[dict], volumes: list[dict], **extra: object) -> dict:
    """A child pod: no API access, non-root, scratch volumes for read-only containers
    (a deep copy: callers may change it without touching the shared constants)."""
    return copy.deepcopy(
        {
            **extra,
            "automountServiceAccountToken": False,
            "containers": containers,
            "volumes": [*volumes, *_SCRATCH_VOLUMES],
            # runAsUser at pod level: containers others add to the pod (the Training
            # Operator's init-pytorch, from an image whose user is root) run as 1000 too;
            # with runAsNonRoot alone a kubelet refuses to start them.
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "runAsGroup": 1000,
                "fsGroup": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }
    )


# --------------------------------------------------------------------------- training
def training_config_map(recjob: RecJob) -> dict:
    """trainer.yaml: the RecJob's trainer config (an API type). The trainer derives the
    DeepSpeed config from it and the world size at start (``<run>/deepspeed.json``)."""
    config = trainer_config(recjob, generation_uri(recjob, "train"))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(recjob, f"{training_name(recjob)}-config", "training"),
        "data": {"trainer.yaml": _yaml(config.to_wire())},
    }


def pytorch_job(recjob: RecJob) -> dict:
    """The PyTorchJob of the current generation."""
    training = recjob.spec.training
    volumes, mounts = _pvc_volumes(recjob)
    config_volume = {
        "name": "recjob-config",
        "configMap": {"name": f"{training_name(recjob)}-config"},
    }
    container = {
        "name": "pytorch",  # the Training Operator finds the container by this name
        "image": training.image,
        # torchrun with nprocPerNode trainer processes, from the PET_* variables the
        # Training Operator injects (recjob_trainer.launch)
        "command": ["recjob-train", "--launch", "--config", f"{CONFIG_MOUNT}/trainer.yaml"],
        "ports": [
            {"name": PYTORCHJOB_PORT_NAME, "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}
        ],
        "env": [
            {"name": "RECJOB_PVC_ROOT", "value": PVC_ROOT},
            {"name": "OMP_NUM_THREADS", "value": "1"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            # the master leaves metrics.json's headline here for the operator to read
            {"name": "RECJOB_TERMINATION_LOG", "value": TERMINATION_LOG},
            *_SCRATCH_ENV,
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "resources": _resources(training.resources),
        "volumeMounts": [
            {"name": "recjob-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *_SCRATCH_MOUNTS,
            *mounts,
        ],
        "securityContext": _SECURITY,
    }
    template = {
        "metadata": {"labels": labels(recjob, "training")},
        "spec": with_pod_storage(  # spec.storage: credentials, work dir (api/.../storage.py)
            _pod_spec(
                [container],
                [config_volume, {"name": "dshm", "emptyDir": {"medium": "Memory"}}, *volumes],
            ),
            pod_storage(recjob.spec),
        ),
    }

    def replicas(count: int) -> dict:
        return {"replicas": count, "restartPolicy": "OnFailure", "template": template}

    specs = {"Master": replicas(1)}
    if training.nodes > 1:
        specs["Worker"] = replicas(training.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(recjob, training_name(recjob), "training"),
        "spec": {
            "nprocPerNode": str(training.processes_per_node),
            "runPolicy": {"backoffLimit": training.max_restarts, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": specs,
        },
    }


def batch_job_state(job: dict) -> tuple[str, str | None, int]:
    """(state, message, restarts) of a batch Job (the conversion, a federated run's
    submitter) from its Complete / Failed conditions and pod counts, in the reconcile
    core's terms (Created / Running / Restarting / Succeeded / Failed)."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    restarts = int(status.get("failed") or 0)
    for kind, state in (("Complete", "Succeeded"), ("Failed", "Failed")):
        condition = conditions.get(kind) or {}
        if condition.get("status") == "True":
            return state, condition.get("message") or condition.get("reason"), restarts
    if status.get("active"):
        return ("Restarting" if restarts else "Running"), None, restarts
    return "Created", None, restarts


def pytorch_job_state(job: dict) -> tuple[str, str | None, int]:
    """(state, message, restarts) of a PyTorchJob from its status conditions, in the
    reconcile core's terms (Created / Running / Restarting / Succeeded / Failed)."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    restarts = sum(
        int(r.get("failed", 0) or 0) for r in (status.get("replicaStatuses") or {}).values()
    )
    for kind in ("Failed", "Succeeded", "Restarting", "Running", "Created"):
        condition = conditions.get(kind)
        if condition and condition.get("status") == "True":
            return kind, condition.get("message"), restarts
    return "Created", None, restarts


# --------------------------------------------------------------------------- conversion
def conversion_config_map(recjob: RecJob) -> dict:
    """convert.yaml for recjob-serve convert."""
    config = {
        "modelDir": f"{generation_uri(recjob, 'train')}/model",
        "dataDir": f"{generation_uri(recjob, 'train')}/data",
        "outputDir": generation_uri(recjob, "convert"),
        "repository": repository_uri(recjob),
        "modelName": recjob.service_name,
        "export": recjob.spec.export.model_dump(mode="json", by_alias=True, exclude_none=True),
        "snapshots": True,  # snapshot_uri(): what each InferenceService revision serves
    }
    if recjob.spec.compression is not None:  # the gate compares against the teacher
        config["teacherDir"] = f"{generation_uri(recjob, 'train')}/teacher"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(recjob, f"{conversion_name(recjob)}-config", "conversion"),
        "data": {"convert.yaml": _yaml(config)},
    }


def conversion_job(recjob: RecJob) -> dict:
    """The conversion Job of the current generation: ``spec.export.image`` with
    ``spec.export.resources`` (validation asks GPUs of TensorRT targets)."""
    export = recjob.spec.export
    volumes, mounts = _pvc_volumes(recjob)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(recjob, conversion_name(recjob), "conversion"),
        "spec": {
            "backoffLimit": 2,
            # exit 2 (gate refused) and 3 (target unavailable) are answers, not crashes
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "convert",
                            "operator": "In",
                            "values": [2, 3],
                        },
                    }
                ]
            },
            "template": {
                "metadata": {"labels": labels(recjob, "conversion")},
                "spec": with_pod_storage(  # spec.storage (api/v1alpha1/storage.py)
                    _pod_spec(
                        [
                            {
                                "name": "convert",
                                "image": export.image,
                                "command": [
                                    "recjob-serve",
                                    "convert",
                                    "--config",
                                    f"{CONFIG_MOUNT}/convert.yaml",
                                    "--termination-log",
                                    TERMINATION_LOG,
                                ],
                                "env": [
                                    {"name": "RECJOB_PVC_ROOT", "value": PVC_ROOT},
                                    *_SCRATCH_ENV,
                                ],
                                "resources": _resources(export.resources),
                                "terminationMessagePath": TERMINATION_LOG,
                                "terminationMessagePolicy": "File",
                                "volumeMounts": [
                                    {
                                        "name": "recjob-config",
                                        "mountPath": CONFIG_MOUNT,
                                        "readOnly": True,
                                    },
                                    *_SCRATCH_MOUNTS,
                                    *mounts,
                                ],
                                "securityContext": _SECURITY,
                            }
                        ],
                        [
                            {
                                "name": "recjob-config",
                                "configMap": {"name": f"{conversion_name(recjob)}-config"},
                            },
                            *volumes,
                        ],
                        restartPolicy="Never",
                    ),
                    pod_storage(recjob.spec),
                ),
            },
        },
    }
