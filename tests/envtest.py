"""A real API server for tests that play the controllers themselves (kubebuilder's envtest).

etcd and kube-apiserver, the same binaries the test cluster runs (``make cluster`` builds
them into ``~/.cache/recjob/cluster-bin``), on free loopback ports in a temporary folder:
RBAC authorization, ServiceAccount tokens, the default admission plugins (ResourceQuota
included), an audit log written synchronously. No controller runs: nothing schedules or
runs pods, no garbage collector, no quota or Job controller. A test writes the status those
controllers would write (a PyTorchJob's conditions, a finished pod's termination message,
an InferenceService's revisions) and the real API server validates it.

    with EnvTest(tmp_path, crds=[RECJOB_CRD, PYTORCHJOB_CRD]) as env:
        env.namespace("shop")
        api = env.client()                      # kubernetes ApiClient, administrator
        kubeconfig = env.service_account_kubeconfig("recjob-system", "recjob-operator")
        events = env.audit(user=env.service_account_user("recjob-system", "recjob-operator"))
"""

from __future__ import annotations

import importlib.util
import os
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from recjob_operator.local.processes import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("RECJOB_CLUSTER_BIN", Path.home() / ".cache" / "recjob" / "cluster-bin"))
RECJOB_CRD = REPO / "manifests" / "crd" / "bases" / "recjob.dev_recjobs.yaml"
UPSTREAM = REPO.parent / "shared" / "upstream-crds"
#: Kubeflow Training Operator v1.9's PyTorchJob CRD and KServe's InferenceService CRD,
#: unmodified (../shared/upstream-crds/SOURCES.md).
PYTORCHJOB_CRD = UPSTREAM / "kubeflow.org_pytorchjobs.yaml"
INFERENCESERVICE_CRD = UPSTREAM / "serving.kserve.io_inferenceservices.yaml"

AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted, Panic]
rules:
  - level: None
    nonResourceURLs: ["/healthz*", "/readyz*", "/livez*", "/version", "/metrics"]
  - level: None
    users: ["system:apiserver"]
  - level: Metadata
"""


def _pki_module():
    """hack/cluster/pki.py (certificates and kubeconfigs of the test cluster)."""
    spec = importlib.util.spec_from_file_location("recjob_cluster_pki", REPO / "hack" / "cluster"
                                                  / "pki.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EnvTest:
    """etcd + kube-apiserver in ``root`` (see the module docstring)."""

    def __init__(self, root: Path, crds: list[Path] = ()):
        self.root, self.crds = Path(root), list(crds)
        self.pki = self.root / "pki"
        self.kubeconfig = self.root / "kubeconfig"
        self.audit_log = self.root / "audit.log"
        self.processes: list[subprocess.Popen] = []
        self.port = 0

    # -------------------------------------------------------------------- lifecycle
    def start(self) -> EnvTest:
        """Start etcd and kube-apiserver, wait for /readyz, install the CRDs."""
        for binary in ("etcd", "kube-apiserver", "kubectl"):
            if not (BIN / binary).exists():
                raise RuntimeError(
                    f"{BIN / binary} is missing: build the test cluster's binaries first "
                    "(make cluster, or .venv/bin/python hack/cluster/cluster.py build)"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        pki = _pki_module()
        pki.ensure(self.pki, "127.0.0.1", "10.0.0.1", [])
        etcd_port, peer_port, self.port = free_port(), free_port(), free_port()
        logs = (self.root / "etcd.log").open("ab")
        self.processes.append(subprocess.Popen([
            str(BIN / "etcd"), "--name=envtest", f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=envtest=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level=warn",
        ], stdout=logs, stderr=subprocess.STDOUT))  # fmt: skip
        (self.root / "audit-policy.yaml").write_text(AUDIT_POLICY)
        p = self.pki
        logs = (self.root / "kube-apiserver.log").open("ab")
        self.processes.append(subprocess.Popen([
            str(BIN / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}",
            "--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
            f"--client-ca-file={p / 'ca.crt'}", f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--authorization-mode=RBAC",
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            "--profiling=false", "--v=0",
            f"--audit-policy-file={self.root / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}", "--audit-log-mode=blocking",
            "--audit-log-maxsize=0",
        ], stdout=logs, stderr=subprocess.STDOUT))  # fmt: skip
        pki.kubeconfig(self.kubeconfig, self.url, p / "ca.crt", p / "admin.crt", p / "admin.key")
        try:
            self._wait_ready()
            if self.crds:
                self.install_crds(*self.crds)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd (the folder stays, for logs)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        self.processes.clear()

    def __enter__(self) -> EnvTest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The API server's address."""
        return f"https://127.0.0.1:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        context = self._ssl_context()
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    log = (self.root / "kube-apiserver.log").read_text(errors="replace")
                    raise RuntimeError(f"{process.args[0]} exited: {log[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=context,
                                            timeout=2) as response:  # fmt: skip
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready in {timeout} s ({self.root})")
            time.sleep(0.3)

    # -------------------------------------------------------------------- clients
    def kubectl(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run kubectl as the administrator (``check``: raise with its stderr on failure)."""
        result = subprocess.run([str(BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
                                capture_output=True, text=True, **kwargs)  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def client(self):
        """A kubernetes ``ApiClient`` for the administrator (system:masters)."""
        from kubernetes import config

        return config.new_client_from_config(str(self.kubeconfig))

    def http(self):
        """An ``httpx.Client`` for the administrator, ``base_url`` the API server."""
        import httpx

        return httpx.Client(base_url=self.url, verify=self._ssl_context(), timeout=10)

    def install_crds(self, *paths: Path) -> None:
        """Apply CustomResourceDefinitions and wait until they are Established and their
        kinds are served (Established can come first). A MutatingAdmissionPolicy that
        matches a kind can still refuse its creates with 503 for a moment after this (it
        learns the schema from OpenAPI on a timer): see test_kopf_integration.wait_admissible."""
        jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
        for path in paths:
            self.kubectl("apply", "--server-side", "-f", str(path))
            applied = self.kubectl("get", "-f", str(path), "-o", "name").stdout.split()
            for name in applied:  # polled: `kubectl wait` fails while status has no conditions
                deadline = time.monotonic() + 60
                established = ("get", name, "-o", f"jsonpath={jsonpath}")
                self._poll(established, lambda result: result.stdout == "True", deadline,
                           f"{name} not Established within 60 s")  # fmt: skip
                served = ("get", name.split("/", 1)[1], "-A", "-o", "name")
                self._poll(served, lambda result: result.returncode == 0, deadline,
                           f"{name} not served within 60 s")  # fmt: skip

    def _poll(self, args: tuple[str, ...], done, deadline: float, message: str) -> None:
        """``kubectl args`` every 0.2 s until ``done(result)``; TimeoutError(``message``)
        past ``deadline``."""
        while not done(self.kubectl(*args, check=False)):
            if time.monotonic() > deadline:
                raise TimeoutError(message)
            time.sleep(0.2)

    def namespace(self, name: str) -> None:
        """Create namespace ``name`` with its ``default`` ServiceAccount (which the
        ServiceAccount admission plugin wants before any pod; the controller manager
        would create it)."""
        self.kubectl("create", "namespace", name)
        self.kubectl("-n", name, "create", "serviceaccount", "default")

    @staticmethod
    def service_account_user(namespace: str, name: str) -> str:
        """The user name a ServiceAccount's token authenticates as."""
        return f"system:serviceaccount:{namespace}:{name}"

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path | None = None,
                                   hours: int = 24) -> Path:  # fmt: skip
        """A kubeconfig holding a token of ServiceAccount ``namespace/name`` (TokenRequest
        API), so requests are authorized by RBAC as that account."""
        if self.kubectl("-n", namespace, "get", "serviceaccount", name, check=False).returncode:
            self.kubectl("-n", namespace, "create", "serviceaccount", name)
        token = self.kubectl("-n", namespace, "create", "token", name,
                             f"--duration={hours}h").stdout.strip()  # fmt: skip
        path = path or self.root / f"{namespace}-{name}.kubeconfig"
        _pki_module().kubeconfig(path, self.url, self.pki / "ca.crt", None, None, token=token,
                                 user=name)  # fmt: skip
        return path

    def audit(self, **filters):
        """The audited requests so far (tests/cluster/audit.py's ``read_events``)."""
        from tests.cluster.audit import read_events

        return read_events(self.audit_log, **filters)
