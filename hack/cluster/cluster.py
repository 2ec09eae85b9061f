"""The RecJob test cluster: real upstream Kubernetes components on this machine.

    python hack/cluster/cluster.py up       # build (cached), start, wait until usable
    python hack/cluster/cluster.py down     # stop everything, remove pods' namespaces
    python hack/cluster/cluster.py status

What runs (versions in hack/cluster/VERSIONS; binaries built from Go modules):
etcd; kube-apiserver (RBAC + Node authorizers, ServiceAccount tokens, NodeRestriction and
OwnerReferencesPermissionEnforcement admission); kube-controller-manager; kube-scheduler;
kube-proxy (iptables mode, so Service ClusterIPs work); recjob-dns (cluster DNS);
recjob-netpol (NetworkPolicy enforced with iptables, what a CNI's policy engine does);
two recjob-node agents (virtual-kubelet based: each pod runs as local processes in its
own network/mount/UTS/IPC/PID namespaces on the bridge ``recjob0``, 10.244.0.0/16); the
Kubeflow Training Operator from its own module's manifests (standalone overlay).

Needs root (network namespaces, bind mounts, iptables). State lives in
``$RECJOB_CLUSTER_DIR`` (default ``.cluster/`` in the repository); ``KUBECONFIG`` for
an administrator is ``.cluster/kubeconfig``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway
import images
import kserve
import pki
import prometheus

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STATE = Path(os.environ.get("RECJOB_CLUSTER_DIR", REPO / ".cluster")).resolve()
BIN = Path(os.environ.get("RECJOB_CLUSTER_BIN", Path.home() / ".cache" / "recjob" / "cluster-bin"))
VERSIONS = dict(
    line.split("=", 1) for line in (HERE / "VERSIONS").read_text().split() if "=" in line
)
BRIDGE, HOST_IP, POD_NETWORK, SERVICE_CIDR, SERVICE_IP = (
    "recjob0", "10.244.0.1", "10.244.0.0/16", "10.96.0.0/16", "10.96.0.1",
)  # fmt: skip
API_PORT = 6443
SERVER = f"https://{HOST_IP}:{API_PORT}"
NODES = ["node-1", "node-2"]
ETCD_PORT = 23790
GO_PACKAGES = [
    "go.etcd.io/etcd/server/v3",
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "k8s.io/kubernetes/cmd/kube-controller-manager",
    "k8s.io/kubernetes/cmd/kube-scheduler",
    "k8s.io/kubernetes/cmd/kube-proxy",
    "k8s.io/kubernetes/cmd/kubectl",
    "./cmd/recjob-node",
    "./cmd/recjob-dns",
    "./cmd/recjob-netpol",
    "./cmd/recjob-gateway",
]


GO = shutil.which("go") or "/usr/local/go/bin/go"


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- build
DEBIAN = {"iptables": "iptables", "conntrack": "conntrack", "busybox": "busybox",
          "openssl": "openssl", "nsenter": "util-linux", "ip": "iproute2"}  # fmt: skip


def debian_packages() -> None:
    """Install the Debian packages the cluster uses, where missing."""
    missing = sorted({pkg for command, pkg in DEBIAN.items() if shutil.which(command) is None})
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env=env, capture_output=True)  # fmt: skip


def build() -> None:
    """Build the Go binaries (Go's build cache makes a second build take seconds)."""
    BIN.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    started = time.monotonic()
    version = VERSIONS["KUBERNETES"]
    major, minor = version.lstrip("v").split(".")[:2]
    ldflags = " ".join(
        f"-X k8s.io/{module}/pkg/version.{key}={value}" if module == "client-go" else
        f"-X k8s.io/component-base/version.{key}={value}"
        for module in ("component-base", "client-go")
        for key, value in (("gitVersion", version), ("gitMajor", major), ("gitMinor", minor),
                           ("gitTreeState", "clean"))
    )  # fmt: skip
    go_build = [GO, "build", "-trimpath", f"-ldflags={ldflags}", "-o"]
    # etcd's main package is go.etcd.io/etcd/server/v3: named by its own -o
    subprocess.run([*go_build, str(BIN / "etcd"), GO_PACKAGES[0]], cwd=HERE, check=True, env=env)
    subprocess.run([*go_build, f"{BIN}/", *GO_PACKAGES[1:]], cwd=HERE, check=True, env=env)
    module = "github.com/kubeflow/training-operator/cmd/training-operator.v1"
    operator = f"{module}@{VERSIONS['TRAINING_OPERATOR']}"
    subprocess.run([GO, "install", operator], check=True, env={**env, "GOBIN": str(BIN)})
    kserve.build(GO, VERSIONS["KSERVE"], BIN / "kserve-manager", env)
    prometheus.build(GO, VERSIONS["PROMETHEUS"], BIN, env)
    log(f"binaries ready in {BIN} ({time.monotonic() - started:.0f} s)")


def training_operator_module() -> Path:
    """The Training Operator module's folder (its CRDs and manifests are used as shipped)."""
    out = subprocess.run(
        [GO, "mod", "download", "-json",
         f"github.com/kubeflow/training-operator@{VERSIONS['TRAINING_OPERATOR']}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return Path(json.loads(out.stdout)["Dir"])


# ----------------------------------------------------------------------------- processes
def _pidfile(name: str) -> Path:
    return STATE / "run" / f"{name}.pid"


def _alive(name: str) -> bool:
    try:
        os.kill(int(_pidfile(name).read_text()), 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False


def start(name: str, argv: list[str]) -> None:
    """Start a daemon (detached, logs in .cluster/logs/NAME.log) unless it runs already."""
    if _alive(name):
        return
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    (STATE / "run").mkdir(parents=True, exist_ok=True)
    with open(STATE / "logs" / f"{name}.log", "ab") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=STATE,
        )  # fmt: skip
    _pidfile(name).write_text(str(process.pid))


def stop(name: str, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if not _alive(name):
        _pidfile(name).unlink(missing_ok=True)
        return
    pid = int(_pidfile(name).read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(name):
        time.sleep(0.2)
    if _alive(name):
        os.kill(pid, signal.SIGKILL)
    _pidfile(name).unlink(missing_ok=True)


def _sh(*argv: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def kubectl(*args: str, check: bool = True, kubeconfig: Path | None = None, **kwargs):
    """Run the cluster's own kubectl (same version as the API server) as admin."""
    return subprocess.run(
        [str(BIN / "kubectl"), f"--kubeconfig={kubeconfig or STATE / 'kubeconfig'}", *args],
        check=check, capture_output=True, text=True, **kwargs,
    )  # fmt: skip


def wait_for(what: str, probe, timeout: float = 120.0) -> None:
    """Poll ``probe()`` until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}; logs in {STATE / 'logs'}")


def _readyz() -> bool:
    context = ssl.create_default_context(cafile=str(STATE / "pki" / "ca.crt"))
    context.load_cert_chain(str(STATE / "pki" / "admin.crt"), str(STATE / "pki" / "admin.key"))
    with urllib.request.urlopen(f"{SERVER}/readyz", context=context, timeout=2) as response:
        return response.status == 200


# ----------------------------------------------------------------------------- up / down
def network() -> None:
    """The cluster bridge, forwarding and bridged traffic through iptables (kube-proxy)."""
    if _sh("ip", "link", "show", BRIDGE).returncode != 0:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge", check=True)
        _sh("ip", "addr", "add", f"{HOST_IP}/16", "dev", BRIDGE, check=True)
    _sh("ip", "link", "set", BRIDGE, "up", check=True)
    for key, value in {
        "/proc/sys/net/ipv4/ip_forward": "1",
        "/proc/sys/net/bridge/bridge-nf-call-iptables": "1",
    }.items():
        Path(key).write_text(value)


def control_plane() -> None:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler."""
    p = STATE / "pki"
    start("etcd", [
        str(BIN / "etcd"), "--name=default", f"--data-dir={STATE / 'etcd'}",
        f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}",
        f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
        f"--listen-peer-urls=http://127.0.0.1:{ETCD_PORT + 10}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PORT + 10}",
        f"--initial-cluster=default=http://127.0.0.1:{ETCD_PORT + 10}",
        "--unsafe-no-fsync", "--log-level=warn",
    ])  # fmt: skip
    start("kube-apiserver", [
        str(BIN / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
        f"--bind-address={HOST_IP}", f"--secure-port={API_PORT}", f"--advertise-address={HOST_IP}",
        f"--client-ca-file={p / 'ca.crt'}", f"--tls-cert-file={p / 'apiserver.crt'}",
        f"--tls-private-key-file={p / 'apiserver.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p / 'sa.pub'}",
        f"--service-account-signing-key-file={p / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
        f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
        "--kubelet-preferred-address-types=InternalIP",
        "--enable-aggregator-routing=true",  # webhooks reached on endpoint IPs
        "--allow-privileged=true", "--profiling=false", "--v=1",
        f"--audit-policy-file={HERE / 'manifests' / 'audit-policy.yaml'}",
        f"--audit-log-path={STATE / 'logs' / 'audit.log'}", "--audit-log-maxsize=200",
        "--audit-log-maxbackup=3", "--audit-log-mode=batch", "--audit-log-batch-max-wait=1s",
    ])  # fmt: skip
    wait_for("kube-apiserver /readyz", _readyz, 180)
    start("kube-controller-manager", [
        str(BIN / "kube-controller-manager"),
        f"--kubeconfig={STATE / 'controller-manager.kubeconfig'}",
        f"--authentication-kubeconfig={STATE / 'controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={STATE / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1", "--secure-port=10257",
        f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
        "--use-service-account-credentials=true", "--leader-elect=false",
        f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
        "--enable-hostpath-provisioner=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--controllers=*,-nodeipam", "--v=1",
    ])  # fmt: skip
    start("kube-scheduler", [
        str(BIN / "kube-scheduler"), f"--kubeconfig={STATE / 'scheduler.kubeconfig'}",
        f"--authentication-kubeconfig={STATE / 'scheduler.kubeconfig'}",
        f"--authorization-kubeconfig={STATE / 'scheduler.kubeconfig'}",
        "--bind-address=127.0.0.1", "--secure-port=10259", "--leader-elect=false", "--v=1",
    ])  # fmt: skip


def node_components(catalog: Path) -> None:
    """kube-proxy, cluster DNS and the node agents."""
    p = STATE / "pki"
    start("kube-proxy", [
        str(BIN / "kube-proxy"), f"--kubeconfig={STATE / 'kube-proxy.kubeconfig'}",
        "--proxy-mode=iptables", f"--cluster-cidr={POD_NETWORK}", f"--hostname-override={NODES[0]}",
        "--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256",
        "--conntrack-max-per-core=0", "--v=1",
    ])  # fmt: skip
    start("recjob-dns", [
        str(BIN / "recjob-dns"), f"--kubeconfig={STATE / 'dns.kubeconfig'}",
        f"--listen={HOST_IP}:53",
    ])  # fmt: skip
    start("recjob-netpol", [
        str(BIN / "recjob-netpol"), f"--kubeconfig={STATE / 'netpol.kubeconfig'}",
    ])  # fmt: skip
    for index, node in enumerate(NODES, start=1):
        start(node, [
            str(BIN / "recjob-node"), f"--name={node}",
            f"--kubeconfig={STATE / f'{node}.kubeconfig'}",
            f"--images={catalog}", f"--state-dir={STATE / 'nodes' / node}", f"--bridge={BRIDGE}",
            f"--gateway={HOST_IP}", f"--pod-cidr=10.244.{index}.0/24", f"--port={10250 + index}",
            f"--tls-cert={p / f'kubelet-{node}.crt'}", f"--tls-key={p / f'kubelet-{node}.key'}",
            f"--client-ca={p / 'ca.crt'}",
        ])  # fmt: skip


def up(skip_build: bool = False) -> None:
    """Build, start and wait until nodes are Ready and the Training Operator is Available."""
    if os.geteuid() != 0:
        raise SystemExit("the test cluster needs root (network namespaces, mounts, iptables)")
    started = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    debian_packages()
    if not skip_build:
        build()
    module = training_operator_module()
    catalog = images.build(STATE, BIN / "training-operator.v1", BIN / "kserve-manager", log)
    pki.ensure(STATE / "pki", HOST_IP, SERVICE_IP, NODES)
    p = STATE / "pki"
    for name in ("admin", "controller-manager", "scheduler", "kube-proxy", "dns", "netpol"):
        target = STATE / ("kubeconfig" if name == "admin" else f"{name}.kubeconfig")
        pki.kubeconfig(target, SERVER, p / "ca.crt", p / f"{name}.crt", p / f"{name}.key")
    for node in NODES:
        pki.kubeconfig(STATE / f"{node}.kubeconfig", SERVER, p / "ca.crt",
                       p / f"node-{node}.crt", p / f"node-{node}.key")  # fmt: skip
    network()
    control_plane()
    kubectl("apply", "--server-side", "-f", str(HERE / "manifests" / "bootstrap.yaml"))
    node_components(catalog)
    wait_for("nodes Ready", lambda: all(
        kubectl("get", "node", n, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False).stdout == "True" for n in NODES))  # fmt: skip
    wait_for(
        "the default ServiceAccount",
        lambda: kubectl("get", "sa", "default", check=False).returncode == 0,
    )
    kubectl("apply", "--server-side", "--force-conflicts", "-k",
            str(module / "manifests" / "overlays" / "standalone"))  # fmt: skip
    kubectl("apply", "--server-side", "-f", str(HERE / "manifests" / "training-operator-init.yaml"))
    init = {"name": "init-container", "configMap": {"name": "training-operator-init-container"}}
    kubectl("-n", "kubeflow", "patch", "deployment", "training-operator", "--type=strategic",
            "-p", json.dumps({
        "spec": {"template": {"spec": {
            "volumes": [init],
            "containers": [{"name": "training-operator", "volumeMounts": [
                {"name": "init-container", "mountPath": "/etc/config", "readOnly": True}]}],
        }}}}))  # fmt: skip
    wait_for("the Training Operator", lambda: kubectl(
        "-n", "kubeflow", "wait", "--for=condition=Available", "deployment/training-operator",
        "--timeout=5s", check=False).returncode == 0, 300)  # fmt: skip
    install_kserve()
    gateway.install(kubectl, log)
    start("recjob-gateway", gateway.argv(BIN, STATE))
    wait_for("the test Gateway", lambda: gateway.programmed(kubectl), 60)
    start("prometheus", prometheus.argv(STATE, BIN))
    kubectl("apply", "--server-side", "-f", "-", input=prometheus.SERVICE)
    log(
        f"cluster up in {time.monotonic() - started:.0f} s; "
        f"export KUBECONFIG={STATE / 'kubeconfig'}"
    )


def install_kserve() -> None:
    """The KServe controller and its ClusterServingRuntimes (see kserve.py)."""
    version = VERSIONS["KSERVE"]
    module = kserve.module_dir(GO, version)
    service = f"{kserve.WEBHOOK_SERVICE}.{kserve.NAMESPACE}.svc"
    names = [service, f"{service}.cluster.local"]
    cert, key = pki.serving_cert(STATE / "pki", "kserve-webhook", names)
    ca_bundle = (STATE / "pki" / "ca.crt").read_bytes()
    docs = kserve.manifests(kubectl, module, version, ca_bundle)
    crds = [d for d in docs if d["kind"] in ("Namespace", "CustomResourceDefinition")]
    kserve.apply(kubectl, crds)
    kserve.apply(kubectl, [kserve.webhook_secret(cert, key)])
    kserve.apply(kubectl, [d for d in docs if d not in crds])
    available = ("-n", kserve.NAMESPACE, "wait", "--for=condition=Available",
                 f"deployment/{kserve.CONTROLLER}", "--timeout=5s")  # fmt: skip
    wait_for("the KServe controller", lambda: kubectl(*available, check=False).returncode == 0, 300)
    # the runtimes pass KServe's validating webhook: the controller must answer first
    runtimes = yaml.safe_dump_all(kserve.runtimes(kubectl, module))
    apply = ("apply", "--server-side", "--force-conflicts", "-f", "-")
    wait_for("KServe's ClusterServingRuntimes",
             lambda: kubectl(*apply, check=False, input=runtimes).returncode == 0, 120)  # fmt: skip


def down() -> None:
    """Stop every component (node agents stop their pods first) and clean the network."""
    components = ["prometheus", "recjob-gateway", *NODES, "recjob-netpol", "recjob-dns",
                  "kube-proxy"]
    components += ["kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
    for name in components:
        stop(name)
    for line in _sh("ip", "netns", "list").stdout.splitlines():
        if line.startswith("rj-"):
            _sh("ip", "netns", "del", line.split()[0])
    if (BIN / "kube-proxy").exists():
        _sh(str(BIN / "kube-proxy"), "--cleanup")
    if (BIN / "recjob-netpol").exists():
        _sh(str(BIN / "recjob-netpol"), "--cleanup")
    _sh("ip", "link", "del", BRIDGE)
    log("cluster down")


def reset() -> None:
    """Down, and forget all cluster state (etcd data, node folders; PKI is kept)."""
    down()
    for folder in ("etcd", "nodes", "logs", "images.json"):
        path = STATE / folder
        if path.is_dir():
            subprocess.run(["rm", "-rf", str(path)], check=False)
        elif path.exists():
            path.unlink()


def status() -> int:
    """Which components run."""
    names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
             "kube-proxy", "recjob-dns", "recjob-netpol", *NODES, "recjob-gateway",
             "prometheus"]  # fmt: skip
    for name in names:
        print(f"{name:26} {'running' if _alive(name) else 'stopped'}")
    return 0 if all(_alive(n) for n in names) else 1


def main() -> int:
    """CLI."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "reset", "status", "build"])
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    if args.command == "up":
        up(args.skip_build)
    elif args.command == "down":
        down()
    elif args.command == "reset":
        reset()
    elif args.command == "build":
        build()
    else:
        return status()
    return 0


if __name__ == "__main__":
    sys.exit(main())
