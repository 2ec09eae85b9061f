"""Builders of the Kubernetes objects a RecJob owns (pure: RecJob in, dict out).

- ``<name>-g<gen>-train`` ConfigMap (trainer.yaml, deepspeed.json) and PyTorchJob
  (kubeflow.org/v1): 1 Master + nodes-1 Workers, ``nprocPerNode``, a container named
  ``pytorch`` running ``recjob-train --config``, restartPolicy OnFailure with
  ``runPolicy.backoffLimit = maxRestarts``, the artifacts PVC mounted where the trainer's
  ``pvc://`` URIs resolve;
- ``<name>-g<gen>-convert`` ConfigMap and batch/v1 Job running ``recjob-serve convert``;
  the quality gate's summary comes back in the container's termination message;
- the InferenceService (serving.kserve.io/v1beta1) of ``spec.serving`` on the Triton
  runtime, serving one model version's repository snapshot; ``canaryTrafficPercent`` for
  a canary.

Every object carries an ownerReference to the RecJob (garbage-collected with it) and the
``recjob.dev/*`` labels. Tests validate them against the upstream CRD schemas.
"""

from __future__ import annotations

import json

import yaml

from ..api.v1alpha1.common import GROUP
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.spec import ResourceSpec
from .reconcile import conversion_name, training_name

#: Where the trainer's pvc:// URIs are mounted in pods (RECJOB_PVC_ROOT).
PVC_ROOT = "/mnt/pvc"
CONFIG_MOUNT = "/etc/recjob"
#: The conversion container writes the quality-gate summary here (read back by the operator).
TERMINATION_LOG = "/dev/termination-log"
DEFAULT_SERVING_IMAGE = "ghcr.io/recjob/recjob-serving:0.1.0"


def labels(recjob: RecJob, component: str) -> dict[str, str]:
    """Labels on every child (selectable by RecJob, generation and component)."""
    return {
        "app.kubernetes.io/name": "recjob",
        "app.kubernetes.io/managed-by": "recjob-operator",
        "app.kubernetes.io/component": component,
        f"{GROUP}/recjob": recjob.metadata.name,
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
    """Where this generation's ``train`` or ``convert`` output goes."""
    return artifacts_uri(recjob, recjob.metadata.name, f"g{recjob.generation}", part)


def repository_uri(recjob: RecJob) -> str:
    """The service's Triton model repository (all versions)."""
    return recjob.spec.serving.storage_uri or artifacts_uri(
        recjob, recjob.service_name, "repository"
    )


def snapshot_uri(recjob: RecJob, model_version: int) -> str:
    """A repository holding only ``model_version`` (what one InferenceService revision
    serves, so a restarted stable pod never picks up the canary's version)."""
    return f"{repository_uri(recjob).rstrip('/')}-snapshots/v{model_version}"


def _pvc_volumes(recjob: RecJob) -> tuple[list[dict], list[dict]]:
    """Volumes and mounts for every pvc:// claim the RecJob's URIs name."""
    uris = [recjob.spec.artifacts_uri, repository_uri(recjob)]
    data = recjob.spec.data
    uris += [u for u in (data.train, data.validation, data.test, data.catalog) if u]
    claims = sorted(
        {u.removeprefix("pvc://").split("/", 1)[0] for u in uris if u.startswith("pvc://")}
    )
    volumes = [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}}
        for i, claim in enumerate(claims)
    ]
    mounts = [
        {"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}"} for i, claim in enumerate(claims)
    ]
    return volumes, mounts


def _resources(spec: ResourceSpec) -> dict:
    requests = {"cpu": str(spec.cpu), "memory": str(spec.memory)}
    limits = {"memory": str(spec.memory)}
    if spec.gpu:
        requests[spec.gpu_resource_name] = str(spec.gpu)
        limits[spec.gpu_resource_name] = str(spec.gpu)
    return {"requests": requests, "limits": limits}


_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


# --------------------------------------------------------------------------- training
def training_config_map(recjob: RecJob) -> dict:
    """trainer.yaml (what recjob-train reads) and deepspeed.json (for inspection; the
    trainer derives the same config from trainer.yaml and the world size)."""
    from recjob_trainer.config import config_from_recjob
    from recjob_trainer.train import deepspeed_config

    config = config_from_recjob(recjob, generation_uri(recjob, "train"), None)
    training = recjob.spec.training
    world = training.nodes * training.processes_per_node
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(recjob, f"{training_name(recjob)}-config", "training"),
        "data": {
            "trainer.yaml": yaml.safe_dump(
                config.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False
            ),
            "deepspeed.json": json.dumps(deepspeed_config(config, world), indent=2),
        },
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
        "command": ["recjob-train", "--config", f"{CONFIG_MOUNT}/trainer.yaml"],
        "env": [
            {"name": "RECJOB_PVC_ROOT", "value": PVC_ROOT},
            {"name": "OMP_NUM_THREADS", "value": "1"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            # the master leaves metrics.json's headline here for the operator to read
            {"name": "RECJOB_TERMINATION_LOG", "value": TERMINATION_LOG},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "resources": _resources(training.resources),
        "volumeMounts": [
            {"name": "recjob-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *mounts,
        ],
        "securityContext": _SECURITY,
    }
    template = {
        "metadata": {"labels": labels(recjob, "training")},
        "spec": {
            "containers": [container],
            "volumes": [
                config_volume,
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                *volumes,
            ],
            "securityContext": {"runAsNonRoot": True, "fsGroup": 1000},
        },
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
        "data": {"convert.yaml": yaml.safe_dump(config, sort_keys=False)},
    }


def conversion_job(recjob: RecJob, image: str = DEFAULT_SERVING_IMAGE) -> dict:
    """The conversion Job of the current generation (GPU nodes for TensorRT targets)."""
    volumes, mounts = _pvc_volumes(recjob)
    gpu = recjob.spec.export.target.startswith("tensorrt")
    resources = ResourceSpec(cpu="2", memory="8Gi", gpu=1 if gpu else 0)
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
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "convert",
                            "image": image,
                            "command": [
                                "recjob-serve",
                                "convert",
                                "--config",
                                f"{CONFIG_MOUNT}/convert.yaml",
                                "--termination-log",
                                TERMINATION_LOG,
                            ],
                            "env": [{"name": "RECJOB_PVC_ROOT", "value": PVC_ROOT}],
                            "resources": _resources(resources),
                            "terminationMessagePath": TERMINATION_LOG,
                            "terminationMessagePolicy": "File",
                            "volumeMounts": [
                                {
                                    "name": "recjob-config",
                                    "mountPath": CONFIG_MOUNT,
                                    "readOnly": True,
                                },
                                *mounts,
                            ],
                            "securityContext": _SECURITY,
                        }
                    ],
                    "volumes": [
                        {
                            "name": "recjob-config",
                            "configMap": {"name": f"{conversion_name(recjob)}-config"},
                        },
                        *volumes,
                    ],
                    "securityContext": {"runAsNonRoot": True, "fsGroup": 1000},
                },
            },
        },
    }


# --------------------------------------------------------------------------- serving
def inference_service(recjob: RecJob, model_version: int, canary_percent: int | None) -> dict:
    """The InferenceService serving ``model_version`` (its own repository snapshot) on the
    Triton runtime; ``canary_percent`` sends that share to it and the rest to the
    previous ready revision (None: all traffic, i.e. first rollout or promotion)."""
    serving = recjob.spec.serving
    predictor: dict = {
        "minReplicas": serving.min_replicas,
        "maxReplicas": serving.max_replicas,
        "model": {
            "modelFormat": {"name": "triton"},
            "runtime": serving.runtime_name,
            "protocolVersion": "v2",
            "storageUri": snapshot_uri(recjob, model_version),
            "resources": _resources(serving.resources),
        },
    }
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    metadata = _metadata(recjob, recjob.service_name, "serving")
    metadata["annotations"] = {
        "serving.kserve.io/deploymentMode": serving.deployment_mode,
        f"{GROUP}/model-version": str(model_version),
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": predictor},
    }
