"""NetworkPolicy enforced on the real cluster (hack/cluster/cmd/recjob-netpol, iptables on
the pods' bridge, what a CNI's policy engine does): BusyBox pods serve HTTP and others
connect to them once a second, logging each outcome; a policy applied or deleted changes what
the probes reach. Then the operator's own fences of a federation
(controller.federation.network_policies, a silo in another namespace included) on pods
labelled as its SuperLink, SuperNodes and submitter: only the federation reaches the
SuperLink, and a SuperNode reaches nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.conftest import Cluster

pytestmark = pytest.mark.cluster

IMAGE = "alpine:3.10"  # the test cluster maps it to BusyBox (hack/cluster/images.py)
DNS = [{"protocol": p, "port": 53} for p in ("UDP", "TCP")]


@pytest.fixture
def other_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _pod(name: str, namespace: str, labels: dict, command: str, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {"name": "main", "image": IMAGE, "command": ["sh", "-c", command], **spec}
            ],
        },
    }


def server(name: str, namespace: str, labels: dict, port: int = 8080) -> dict:
    """An HTTP server on ``port`` (named ``http``)."""
    command = (
        f"mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p {port} -h /tmp/www"
    )
    ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    return _pod(name, namespace, labels, command, ports=ports)


def prober(name: str, namespace: str, labels: dict, targets: dict[str, str]) -> dict:
    """Opens a TCP connection to each target (``ip:port``) once a second, logging
    ``<target> ok`` or ``<target> no`` (refused or timed out)."""
    loop = " ".join(f"{key}={address}" for key, address in targets.items())
    command = (
        f"while true; do for t in {loop}; do k=${{t%%=*}}; a=${{t#*=}}; "
        'if nc -w 2 "${a%:*}" "${a##*:}" </dev/null >/dev/null 2>&1; then echo "$k ok"; '
        'else echo "$k no"; fi; done; sleep 1; done'
    )
    return _pod(name, namespace, labels, command)


def running_ips(cluster: Cluster, pods: list[tuple[str, str]]) -> dict[str, str]:
    """Each pod's IP once all are Running."""

    def ips() -> dict[str, str] | None:
        out = {}
        for namespace, name in pods:
            pod = cluster.get("pod", name, namespace) or {}
            status = pod.get("status") or {}
            if status.get("phase") != "Running" or not status.get("podIP"):
                return None
            out[name] = status["podIP"]
        return out

    return cluster.wait("pods running", ips, timeout=120)


class Probes:
    """Reads the probers' logs."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def latest(self, namespace: str, pod: str, target: str, count: int = 3) -> list[str]:
        logs = self.cluster.kubectl("logs", "-n", namespace, pod, "--tail=200", check=False).stdout
        return [line.split()[1] for line in logs.splitlines()
                if line.startswith(f"{target} ")][-count:]  # fmt: skip

    def expect(self, expected: dict[tuple[str, str, str], str], timeout: float = 60) -> None:
        """Wait until the last three outcomes of each (namespace, pod, target) are the
        expected one ("ok" or "no")."""

        def reached() -> bool:
            return all(self.latest(*key) == [want] * 3 for key, want in expected.items())

        self.cluster.wait(
            f"probe outcomes {expected}", reached, timeout=timeout,
            on_timeout=lambda: "\n".join(f"{k}: {self.latest(*k, count=8)}" for k in expected),
        )  # fmt: skip


def _policy(name: str, namespace: str, spec: dict) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def test_policies_decide_what_pods_reach(cluster: Cluster, namespace: str, other_namespace: str):
    ns, ns2 = namespace, other_namespace
    cluster.apply(server("web", ns, {"app": "web"}), server("web2", ns2, {"app": "web"}))
    ips = running_ips(cluster, [(ns, "web"), (ns2, "web2")])
    web, web2 = (f"{ips[n]}:8080" for n in ("web", "web2"))
    cluster.apply(
        prober("client", ns, {"role": "client"}, {"web": web, "web2": web2}),
        prober("stranger", ns, {}, {"web": web}),
        prober("remote", ns2, {"role": "client"}, {"web": web}),
        prober("remote-other", ns2, {"role": "other"}, {"web": web}),
    )
    running_ips(cluster, [(ns, "client"), (ns, "stranger"), (ns2, "remote"), (ns2, "remote-other")])
    probes = Probes(cluster)
    everything = {(ns, "client", "web"): "ok", (ns, "client", "web2"): "ok",
                  (ns, "stranger", "web"): "ok", (ns2, "remote", "web"): "ok",
                  (ns2, "remote-other", "web"): "ok"}  # fmt: skip
    probes.expect(everything)  # no policy: every pod reaches every pod

    # ingress of web: this namespace's clients and ns2's clients, on the port named http
    cluster.apply(_policy("web", ns, {
        "podSelector": {"matchLabels": {"app": "web"}},
        "policyTypes": ["Ingress"],
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"role": "client"}}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns2}},
                 "podSelector": {"matchLabels": {"role": "client"}}},
            ],
            "ports": [{"protocol": "TCP", "port": "http"}],
        }],
    }))  # fmt: skip
    probes.expect({(ns, "client", "web"): "ok", (ns, "stranger", "web"): "no",
                   (ns2, "remote", "web"): "ok", (ns2, "remote-other", "web"): "no",
                   (ns, "client", "web2"): "ok"})  # fmt: skip

    # egress of this namespace's clients: only to this namespace's web pods (and DNS)
    cluster.apply(_policy("clients", ns, {
        "podSelector": {"matchLabels": {"role": "client"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}]},
                   {"ports": DNS}],
    }))  # fmt: skip
    probes.expect({(ns, "client", "web"): "ok", (ns, "client", "web2"): "no"})

    # the policies deleted, everything is reachable again
    cluster.kubectl("delete", "networkpolicy", "web", "clients", "-n", ns)
    probes.expect(everything)


def test_a_federations_fences_hold(cluster: Cluster, namespace: str, other_namespace: str):
    """The operator's policies for a federation with silo south in another namespace,
    applied as it creates them (without the ownerReference: no such RecJob exists here)."""
    from recjob_operator.api.v1alpha1.tls import make_tls_material
    from recjob_operator.controller.federation import federation_objects, superlink_dns_names
    from tests.conftest import EXAMPLES, load_yaml
    from tests.operator.test_children import job

    ns, ns2 = namespace, other_namespace
    document = load_yaml(EXAMPLES[0].parent / "federated" / "recjob-federated.yaml")
    document["spec"]["training"]["federated"]["silos"][1]["namespace"] = ns2
    recjob = job(document)
    recjob.metadata.namespace = ns
    objects = federation_objects(recjob, make_tls_material(superlink_dns_names(recjob)))
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for policy in policies:
        policy["metadata"].pop("ownerReferences", None)
    assert {p["metadata"]["namespace"] for p in policies} == {ns, ns2}
    template = {(o["metadata"]["namespace"], o["kind"], o["metadata"]["name"]):
                o["spec"]["template"]["metadata"]["labels"]
                for o in objects if o["kind"] in ("Deployment", "Job")}  # fmt: skip
    t = "federated-search-g3-train"
    link_labels = template[(ns, "Deployment", f"{t}-link")]
    cluster.apply(*policies)
    cluster.apply(server("superlink", ns, link_labels, port=9093),
                  server("web", ns, {"app": "web"}))  # fmt: skip
    ips = running_ips(cluster, [(ns, "superlink"), (ns, "web")])
    link, web = f"{ips['superlink']}:9093", f"{ips['web']}:8080"
    cluster.apply(
        prober("north", ns, template[(ns, "Deployment", f"{t}-silo-north")],
               {"link": link, "web": web}),
        prober("south", ns2, template[(ns2, "Deployment", f"{t}-silo-south-from-{ns}")],
               {"link": link}),
        prober("submitter", ns, template[(ns, "Job", t)], {"link": link}),
        prober("stranger", ns, {"app": "stranger"}, {"link": link, "web": web}),
        prober("stranger", ns2, {"app": "stranger"}, {"link": link}),
    )  # fmt: skip
    running_ips(cluster, [(ns, "north"), (ns2, "south"), (ns, "submitter"), (ns, "stranger"),
                          (ns2, "stranger")])  # fmt: skip
    Probes(cluster).expect({
        (ns, "north", "link"): "ok",  # a SuperNode reaches its SuperLink
        (ns2, "south", "link"): "ok",  # across namespaces too
        (ns, "submitter", "link"): "ok",
        (ns, "north", "web"): "no",  # and nothing else: its data has no other way out
        (ns, "stranger", "link"): "no",  # nobody else reaches the SuperLink
        (ns2, "stranger", "link"): "no",
        (ns, "stranger", "web"): "ok",  # (web itself is not fenced)
    })  # fmt: skip
