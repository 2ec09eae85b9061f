"""The test cluster's Gateway API: the standard-channel CRDs and recjob-gateway.

On a real cluster a Gateway API implementation (Envoy Gateway, Istio) follows the
HTTPRoutes that the operator writes for a canary; here ``cmd/recjob-gateway`` does, for
real traffic on :data:`GATEWAY_URL`. This module installs what it needs:

- the CRDs (and the ValidatingAdmissionPolicy against mixing channels) as shipped by the
  Go module ``sigs.k8s.io/gateway-api`` at ``GATEWAY_API`` of ``VERSIONS``;
- the GatewayClass :data:`GATEWAY_CLASS` (controllerName :data:`CONTROLLER_NAME`) and the
  Gateway :data:`GATEWAY_NAMESPACE`/:data:`GATEWAY_NAME`: one HTTP listener on port 80
  that accepts HTTPRoutes from all namespaces;

and gives the command line of the process (:func:`argv`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS = dict(
    line.split("=", 1) for line in (HERE / "VERSIONS").read_text().split() if "=" in line
)
GO = shutil.which("go") or "/usr/local/go/bin/go"

GATEWAY_NAMESPACE = "recjob-gateway"
GATEWAY_NAME = "recjob"
GATEWAY_CLASS = "recjob-test"
CONTROLLER_NAME = "recjob.dev/test-gateway"
LISTEN = "10.244.0.1:8081"
GATEWAY_URL = f"http://{LISTEN}"

# The CRDs the GatewayClass, the Gateway and the operator's HTTPRoutes need, and the
# ReferenceGrants by which a namespace lets a federated RecJob of another run a silo in it.
CRDS = ("gatewayclasses", "gateways", "httproutes", "referencegrants")

Kubectl = Callable[..., subprocess.CompletedProcess]

MANIFEST = f"""\
apiVersion: v1
kind: Namespace
metadata:
  name: {GATEWAY_NAMESPACE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: {GATEWAY_CLASS}
spec:
  controllerName: {CONTROLLER_NAME}
  description: RecJob test cluster data plane (hack/cluster recjob-gateway)
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: {GATEWAY_NAME}
  namespace: {GATEWAY_NAMESPACE}
spec:
  gatewayClassName: {GATEWAY_CLASS}
  listeners:
    - name: http
      protocol: HTTP
      port: 80
      allowedRoutes:
        namespaces:
          from: All
"""


def module() -> Path:
    """The folder of the ``sigs.k8s.io/gateway-api`` module (downloaded when missing)."""
    out = subprocess.run(
        [GO, "mod", "download", "-json", f"sigs.k8s.io/gateway-api@{VERSIONS['GATEWAY_API']}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return Path(json.loads(out.stdout)["Dir"])


def _established(kubectl: Kubectl, crd: str) -> bool:
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
    name = f"customresourcedefinitions/{crd}.gateway.networking.k8s.io"
    return kubectl("get", name, "-o", f"jsonpath={jsonpath}", check=False).stdout == "True"


def install(kubectl: Kubectl, log: Callable[[str], None], timeout: float = 60.0) -> None:
    """Apply the standard-channel CRDs, wait until they are Established, then apply the
    namespace, the GatewayClass and the Gateway. Idempotent (server-side apply).

    ``kubectl(*args, check=True, **kwargs)`` runs the cluster's kubectl as administrator
    (extra keyword arguments go to :func:`subprocess.run`); ``log`` reports progress.
    """
    crds = module() / "config" / "crd"  # its kustomization: standard/*.yaml
    log(f"Gateway API {VERSIONS['GATEWAY_API']}: standard CRDs from {crds}")
    kubectl("apply", "--server-side", "--force-conflicts", "-k", str(crds))
    deadline = time.monotonic() + timeout
    for crd in CRDS:  # polled: `kubectl wait` fails while a new CRD has no conditions yet
        while not _established(kubectl, crd):
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {crd}.gateway.networking.k8s.io not Established")
            time.sleep(0.2)
    while True:  # kubectl's discovery may lag the new CRDs for a moment
        applied = kubectl("apply", "--server-side", "-f", "-", input=MANIFEST, check=False)
        if applied.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"applying the GatewayClass and Gateway failed: {applied.stderr}")
        time.sleep(0.5)
    log(f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME} (class {GATEWAY_CLASS}) applied")


def argv(bin_dir: Path, state: Path) -> list[str]:
    """The command line of recjob-gateway: the administrator's kubeconfig in ``state``,
    serving the Gateway on :data:`LISTEN`."""
    return [
        str(bin_dir / "recjob-gateway"),
        f"--kubeconfig={state / 'kubeconfig'}",
        f"--listen={LISTEN}",
        f"--gateway={GATEWAY_NAMESPACE}/{GATEWAY_NAME}",
        f"--controller-name={CONTROLLER_NAME}",
    ]


def programmed(kubectl: Kubectl) -> bool:
    """Whether recjob-gateway has taken the Gateway on (its Programmed condition is
    True): a probe for waiting after starting the process."""
    jsonpath = '{.status.conditions[?(@.type=="Programmed")].status}'
    return (
        kubectl(
            "-n", GATEWAY_NAMESPACE, "get", "gateway", GATEWAY_NAME, "-o", f"jsonpath={jsonpath}",
            check=False,
        ).stdout
        == "True"
    )  # fmt: skip
