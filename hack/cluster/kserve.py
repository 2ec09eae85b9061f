"""KServe on the test cluster: the controller built from its Go module, its manifests as
shipped by that module, in RawDeployment (0.17+: Standard) mode.

What is taken from the module unchanged: the CRDs, RBAC, Services, webhook
configurations, the ``inferenceservice-config`` ConfigMap and the ClusterServingRuntimes
(``config/overlays/standalone/kserve`` and ``config/runtimes``, rendered by kubectl's
kustomize). What is changed, and why:

- cert-manager's ``Certificate``/``Issuer`` are left out (cert-manager is not on this
  cluster): the webhook's serving certificate is signed by the cluster CA
  (``pki.serving_cert``) and its CA bundle is written into the webhook configurations, as
  cert-manager's CA injector would;
- the ``kube-rbac-proxy`` sidecar (it only guards the controller's own metrics) is left
  out: its image is not built here;
- ``inferenceservice-config``: ``deploy.defaultDeploymentMode`` RawDeployment (Knative
  cannot run here) and ``ingress.disableIngressCreation`` (no Ingress controller: traffic
  reaches predictors through the Gateway API HTTPRoutes the RecJob operator writes, or
  their Services directly);
- the controller image is the pinned release's tag, which the node agent maps to the
  binary built here.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

NAMESPACE = "kserve"
WEBHOOK_SERVICE = "kserve-webhook-server-service"
WEBHOOK_SECRET = "kserve-webhook-server-cert"
CONTROLLER = "kserve-controller-manager"
IMAGE = "kserve/kserve-controller"


def module_dir(go: str, version: str) -> Path:
    """The KServe module's folder in Go's module cache (downloaded if missing)."""
    out = subprocess.run(
        [go, "mod", "download", "-json", f"github.com/kserve/kserve@{version}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return Path(json.loads(out.stdout)["Dir"])


def build(go: str, version: str, target: Path, env: dict) -> None:
    """Build the controller (``cmd/manager``) inside its module: its go.mod has replace
    directives, so ``go install module@version`` cannot build it."""
    subprocess.run(
        [go, "build", "-trimpath", "-o", str(target), "./cmd/manager"],
        cwd=module_dir(go, version), check=True,
        env={**env, "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"},
    )  # fmt: skip


def _render(kubectl: Callable, folder: Path) -> list[dict]:
    out = kubectl("kustomize", str(folder)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _configure(config_map: dict) -> None:
    data = config_map["data"]
    deploy = json.loads(data["deploy"])
    deploy["defaultDeploymentMode"] = "RawDeployment"
    data["deploy"] = json.dumps(deploy)
    ingress = json.loads(data["ingress"])
    ingress["disableIngressCreation"] = True
    data["ingress"] = json.dumps(ingress)


def manifests(kubectl: Callable, module: Path, version: str, ca_bundle: bytes) -> list[dict]:
    """The module's standalone install, adapted as the module docstring says."""
    out = []
    for doc in _render(kubectl, module / "config" / "overlays" / "standalone" / "kserve"):
        kind = doc["kind"]
        if kind in ("Certificate", "Issuer"):
            continue
        if kind == "Deployment" and doc["metadata"]["name"] == CONTROLLER:
            pod = doc["spec"]["template"]["spec"]
            pod["containers"] = [c for c in pod["containers"] if c["name"] == "manager"]
            pod["containers"][0]["image"] = f"{IMAGE}:{version}"
            pod["containers"][0]["imagePullPolicy"] = "IfNotPresent"
        if kind == "ConfigMap" and doc["metadata"]["name"] == "inferenceservice-config":
            _configure(doc)
        if kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            for webhook in doc["webhooks"]:
                webhook["clientConfig"]["caBundle"] = base64.b64encode(ca_bundle).decode()
        out.append(doc)
    return out


def runtimes(kubectl: Callable, module: Path) -> list[dict]:
    """The module's ClusterServingRuntimes (config/runtimes), as shipped."""
    return [d for d in _render(kubectl, module / "config" / "runtimes") if d["kind"]]


def webhook_secret(cert: Path, key: Path) -> dict:
    """The Secret the controller's webhook server reads its certificate from."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": NAMESPACE},
        "data": {
            "tls.crt": base64.b64encode(cert.read_bytes()).decode(),
            "tls.key": base64.b64encode(key.read_bytes()).decode(),
        },
    }


def apply(kubectl: Callable, docs: list[dict]) -> None:
    """Server-side apply a list of objects."""
    text = yaml.safe_dump_all(docs, sort_keys=False)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=text)
