"""Fixtures for tests on the real test cluster (hack/cluster): kube-apiserver, controllers,
the Kubeflow Training Operator and node agents whose pods really run.

`make test` starts the cluster first (`make cluster`); the session fixture makes sure it
is up (idempotent) and fails, never skips, when it cannot be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_PY = REPO / "hack" / "cluster" / "cluster.py"
STATE = Path(os.environ.get("RECJOB_CLUSTER_DIR", REPO / ".cluster")).resolve()
BIN = Path(os.environ.get("RECJOB_CLUSTER_BIN", Path.home() / ".cache" / "recjob" / "cluster-bin"))
OPERATOR_NS = "recjob-system"
#: ``Cluster.wait``'s time limits are multiplied by this: they guard against hangs, and
#: ``make test`` runs the cluster tests beside a second pytest worker's training and
#: servers, which on a 2-core machine can make each step up to about twice as slow.
WAIT_FACTOR = float(os.environ.get("RECJOB_TEST_WAIT_FACTOR", "2"))

pytestmark = pytest.mark.cluster


@dataclass
class Cluster:
    """kubectl against the test cluster, as admin unless another kubeconfig is given."""

    kubeconfig: Path

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                kubeconfig: Path | None = None, timeout: float = 120,
                ) -> subprocess.CompletedProcess:  # fmt: skip
        """Run kubectl; raise with its stderr when ``check`` and it fails."""
        result = subprocess.run(
            [str(BIN / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True, text=True, input=input, timeout=timeout,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def apply(self, *documents: dict, namespace: str | None = None, check: bool = True):
        """kubectl apply -f - of the documents."""
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=yaml.safe_dump_all(documents), check=check)

    def get(self, kind: str, name: str | None = None, namespace: str | None = None) -> dict | None:
        """The object (or list) as JSON; None if it does not exist."""
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        result = self.kubectl(*args, *(["-n", namespace] if namespace else []), check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return json.loads(result.stdout)

    def wait(self, what: str, probe: Callable[[], object], timeout: float = 300,
             interval: float = 2.0, on_timeout: Callable[[], str] | None = None):  # fmt: skip
        """Poll ``probe`` until it returns something truthy (at most ``timeout`` x
        :data:`WAIT_FACTOR` seconds); return it."""
        timeout *= WAIT_FACTOR
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            time.sleep(interval)
        detail = on_timeout() if on_timeout else ""
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail}")

    def claim_path(self, namespace: str, claim: str) -> Path:
        """Host folder of a bound PersistentVolumeClaim (hostPath volumes)."""
        pvc = self.wait(
            f"pvc {namespace}/{claim} bound",
            lambda: (
                (p := self.get("pvc", claim, namespace))
                and p["status"].get("phase") == "Bound"
                and p
            ),
            timeout=60,
        )
        pv = self.get("pv", pvc["spec"]["volumeName"])
        return Path(pv["spec"]["hostPath"]["path"])

    def describe(self, kind: str, name: str, namespace: str) -> str:
        """kubectl describe, for failure messages."""
        return self.kubectl("describe", kind, name, "-n", namespace, check=False).stdout

    def pod_logs(self, namespace: str, selector: str) -> str:
        """The logs of every pod matching ``selector`` (through the node agents' kubelet API)."""
        pods = self.get("pods", namespace=namespace) or {"items": []}
        out = []
        for pod in pods["items"]:
            labels = pod["metadata"].get("labels", {})
            if all(labels.get(k) == v for k, v in (kv.split("=") for kv in selector.split(","))):
                for c in pod["spec"]["containers"]:
                    name = pod["metadata"]["name"]
                    logs = self.kubectl("logs", "-n", namespace, name, "-c", c["name"], "--tail=60",
                                        check=False)  # fmt: skip
                    out.append(f"--- {name}/{c['name']}\n{logs.stdout}{logs.stderr}")
        return "\n".join(out)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The running test cluster (started if needed; binaries from the Go build cache)."""
    if os.geteuid() != 0:
        pytest.fail("the test cluster needs root (network namespaces, bind mounts, iptables)")
    if shutil.which("go") is None:
        pytest.fail("Go is needed to build the test cluster (see hack/cluster/README.md)")
    # make test has built the binaries just before (RECJOB_CLUSTER_BUILT): not twice
    skip = ["--skip-build"] if os.environ.get("RECJOB_CLUSTER_BUILT") else []
    result = subprocess.run([sys.executable, str(CLUSTER_PY), "up", *skip], capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"cluster.py up failed:\n{result.stderr[-4000:]}")
    return Cluster(STATE / "kubeconfig")


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def deploy_operator(cluster: Cluster, replicas: int | None = None) -> None:
    """kubectl apply -k manifests/default and wait until the operator Deployment is Available."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-k", str(REPO / "manifests" / "default")
    )
    # a new operator "image" (its environment is rebuilt when the sources change, see
    # hack/cluster/images.py) rolls the Deployment, as pushing a new tag would
    digest = (STATE / "images" / "recjob-operator" / ".recjob-image").read_text()
    patch = {
        "spec": {"template": {"metadata": {"annotations": {"recjob.dev/image-digest": digest}}}}
    }
    cluster.kubectl("-n", OPERATOR_NS, "patch", "deployment/recjob-operator", "--type=merge",
                    "-p", json.dumps(patch))  # fmt: skip
    if replicas is not None:
        cluster.kubectl(
            "-n", OPERATOR_NS, "scale", "deployment/recjob-operator", f"--replicas={replicas}"
        )
    rollout = cluster.kubectl(
        "-n", OPERATOR_NS, "rollout", "status", "deployment/recjob-operator", "--timeout=240s",
        check=False, timeout=300,
    )  # fmt: skip
    if rollout.returncode != 0:
        raise AssertionError(
            "the recjob operator Deployment did not roll out:\n"
            + cluster.pod_logs(OPERATOR_NS, "app.kubernetes.io/name=recjob-operator")
            + cluster.kubectl("-n", OPERATOR_NS, "describe", "pods", check=False).stdout
        )


@pytest.fixture(scope="session")
def operator(cluster: Cluster) -> Cluster:
    """The RecJob operator installed from manifests/default, running as a pod."""
    deploy_operator(cluster)
    return cluster
