"""Builders of the serving objects (pure: RecJob in, dict out).

A *service* (``spec.serving.name``) may be rolled out to by many RecJobs, one after
another, so nothing here is owned by the RecJob that happened to create it, except a
canary while it is one:

- **Serverless** (Knative): one InferenceService ``<service>``; a canary is a new
  ``storageUri`` with ``canaryTrafficPercent`` (KServe splits between the last rolled-out
  revision and the latest); promotion removes ``canaryTrafficPercent`` and rollback sets it
  to 0 (KServe's documented rollback), neither touching the revision template.
- **RawDeployment / Standard** (no Knative; KServe cannot split traffic there): one
  InferenceService per model version, ``<service>-v<N>`` (= the serving revision), and a
  Gateway API HTTPRoute ``<service>`` weighting their predictor Services, Flagger-style;
  requests carrying ``x-recjob-revision: <revision>`` are pinned to that revision (the
  storefront's feedback reaches the pods that served the ranking).
- The **service record**, ConfigMap ``<service>-recjob``: which model version is stable,
  the canary in flight and which RecJob holds the service's rollout (one at a time). It is
  the operator's bookkeeping; InferenceService annotations would be copied into KServe's
  revision template, so changing them would start new pods.

Predictor pods carry ``recjob.dev/revision`` (the runtime's metrics label, through the
downward API) and Prometheus scrape annotations; requests equal limits and the containers
run under the restricted Pod Security profile.
"""

from __future__ import annotations

from ..api.v1alpha1.common import GROUP
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.spec_delivery import DEFAULT_RUNTIMES
from ..api.v1alpha1.storage import pod_storage
from .children import _resources, owner_reference, snapshot_uri
from .rollout import revision_name

KSERVE_API = "serving.kserve.io/v1beta1"
GATEWAY_API = "gateway.networking.k8s.io/v1"
REVISION_LABEL = f"{GROUP}/revision"
SERVICE_LABEL = f"{GROUP}/service"
REVISION_HEADER = "x-recjob-revision"
#: The model servers' HTTP port (the runtimes in manifests/serving), scraped for metrics.
HTTP_PORT = 8080
#: KServe's RawDeployment predictor Service: ``<isvc>-predictor``, port 80.
PREDICTOR_PORT = 80
_RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def record_name(service: str) -> str:
    """The service record's ConfigMap."""
    return f"{service}-recjob"


def runtime_name(recjob: RecJob) -> str:
    """``spec.serving.runtimeName``, else the default runtime of the export target."""
    target = recjob.spec.export.target.split("-", 1)[0]
    return recjob.spec.serving.runtime_name or DEFAULT_RUNTIMES[target]


def service_labels(recjob: RecJob) -> dict[str, str]:
    """Labels of the shared serving objects (no RecJob or generation: any may own them)."""
    return {
        "app.kubernetes.io/name": "recjob",
        "app.kubernetes.io/managed-by": "recjob-operator",
        "app.kubernetes.io/component": "serving",
        SERVICE_LABEL: recjob.service_name,
    }


def _predictor(recjob: RecJob, model_version: int) -> dict:
    serving = recjob.spec.serving
    revision = revision_name(recjob.service_name, model_version)
    predictor: dict = {
        "automountServiceAccountToken": False,  # model servers need no API access
        "minReplicas": serving.min_replicas,
        "maxReplicas": serving.max_replicas,
        "labels": {REVISION_LABEL: revision},
        "annotations": {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(HTTP_PORT),
            "prometheus.io/path": "/metrics",
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "model": {
            "modelFormat": {"name": "triton", "version": "2"},
            "runtime": runtime_name(recjob),
            "protocolVersion": "v2",
            "storageUri": snapshot_uri(recjob, model_version),
            "resources": _resources(serving.resources),
            "securityContext": _RESTRICTED,
        },
    }
    account = pod_storage(recjob.spec).service_account_name
    if account:  # spec.storage: KServe's storage initializer reads the snapshot as it
        predictor["serviceAccountName"] = account
    return predictor


def _isvc(recjob: RecJob, name: str, model_version: int) -> dict:
    return {
        "apiVersion": KSERVE_API,
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": recjob.metadata.namespace or "default",
            "labels": service_labels(recjob),
            "annotations": {
                "serving.kserve.io/deploymentMode": recjob.spec.serving.deployment_mode
            },
        },
        "spec": {"predictor": _predictor(recjob, model_version)},
    }


def serverless_inference_service(
    recjob: RecJob, model_version: int, canary_percent: int | None
) -> dict:
    """Serverless: the service's one InferenceService serving ``model_version``;
    ``canary_percent`` sends that share to it (None: all traffic)."""
    isvc = _isvc(recjob, recjob.service_name, model_version)
    if canary_percent is not None:
        isvc["spec"]["predictor"]["canaryTrafficPercent"] = canary_percent
    return isvc


def version_inference_service(recjob: RecJob, model_version: int, canary: bool) -> dict:
    """RawDeployment/Standard: the InferenceService of one model version. A canary is owned
    by its RecJob (deleted with it); a stable one by nobody (it outlives RecJobs)."""
    isvc = _isvc(recjob, revision_name(recjob.service_name, model_version), model_version)
    if canary:
        owner = owner_reference(recjob)
        isvc["metadata"]["ownerReferences"] = [{**owner, "controller": False}]
    return isvc


def route_hostname(recjob: RecJob) -> str:
    """The host the service's HTTPRoute answers."""
    gateway = recjob.spec.serving.gateway
    if gateway is not None and gateway.hostname:
        return gateway.hostname
    return f"{recjob.service_name}-{recjob.metadata.namespace or 'default'}.example.com"


def http_route(recjob: RecJob, weights: dict[int, int]) -> dict:
    """RawDeployment/Standard: the service's HTTPRoute, ``weights`` = {model version:
    percent} over the versions' predictor Services (a weight of 0 keeps a version
    reachable by its pinning header only)."""
    gateway = recjob.spec.serving.gateway
    assert gateway is not None  # validation requires it in these modes
    service = recjob.service_name

    def backend(version: int, weight: int) -> dict:
        name = f"{revision_name(service, version)}-predictor"
        return {"name": name, "port": PREDICTOR_PORT, "weight": weight}

    parent = {"name": gateway.name}
    if gateway.namespace:
        parent["namespace"] = gateway.namespace
    pinned = [
        {
            "matches": [
                {
                    "headers": [
                        {
                            "type": "Exact",
                            "name": REVISION_HEADER,
                            "value": revision_name(service, v),
                        }
                    ]
                }
            ],
            "backendRefs": [backend(v, 1)],
        }
        for v in sorted(weights)
    ]
    split = {"backendRefs": [backend(v, w) for v, w in sorted(weights.items())]}
    return {
        "apiVersion": GATEWAY_API,
        "kind": "HTTPRoute",
        "metadata": {
            "name": service,
            "namespace": recjob.metadata.namespace or "default",
            "labels": service_labels(recjob),
        },
        "spec": {
            "parentRefs": [parent],
            "hostnames": [route_hostname(recjob)],
            "rules": [*pinned, split],
        },
    }


def route_weights(route: dict) -> dict[int, int]:
    """{model version: weight} of a service's HTTPRoute (its weighted rule)."""
    rules = (route.get("spec") or {}).get("rules") or []
    # the rule without header matches (the API server defaults its matches to PathPrefix /)
    split = next(
        (r for r in rules if not any(m.get("headers") for m in r.get("matches") or [])), None
    )
    out: dict[int, int] = {}
    for ref in (split or {}).get("backendRefs") or []:
        name = str(ref.get("name", "")).removesuffix("-predictor")
        _, _, version = name.rpartition("-v")
        if version.isdigit():
            out[int(version)] = int(ref.get("weight", 1))
    return out


def service_record(recjob: RecJob, data: dict[str, str]) -> dict:
    """The service record ConfigMap with ``data`` (see the module docstring)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": record_name(recjob.service_name),
            "namespace": recjob.metadata.namespace or "default",
            "labels": service_labels(recjob),
        },
        "data": data,
    }
