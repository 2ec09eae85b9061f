"""The shipped manifests: kustomize builds, core objects valid, restricted security,
alerts and dashboard about metrics that exist, the Argo CD health check in Lua."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO
from tests.operator.rbac import allowed, grants

MANIFESTS = REPO / "manifests"
KUBECTL = shutil.which("kubectl")


def build(overlay: str) -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl (kustomize) is not installed")
    out = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def exposed_metric_names() -> set[str]:
    """Metric names the operator, the router and the model server define."""
    names = set()
    for path in (
        REPO / "operator/recjob_operator/kube/metrics.py",
        REPO / "operator/recjob_operator/local/router.py",
        REPO / "serving/recjob_serving/server.py",
        REPO / "serving/recjob_serving/revision.py",
    ):
        names |= set(re.findall(r'"(recjob_[a-z_]+)"', path.read_text()))
    return names


def referenced_metrics(expr: str) -> set[str]:
    names = set(re.findall(r"\b(recjob_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


@pytest.mark.parametrize("overlay", ["default", "overlays/namespaced", "overlays/cluster-wide"])
def test_overlays_build_and_core_objects_validate(overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = build(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "Deployment", "Role", "ServiceAccount"} <= kinds
    assert ("ClusterRole" in kinds) == (overlay != "overlays/namespaced")
    for obj in objects:
        if obj["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            continue  # Prometheus Operator CRDs: checked below
        # the finalizer policy's API is GA since 1.36; the rest since 1.32 at least
        version = "1.37" if obj["kind"].startswith("MutatingAdmissionPolicy") else "1.32"
        kubernetes_validate.validate(obj, version, strict=True)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    binding = next(o for o in objects if o["kind"] == "MutatingAdmissionPolicyBinding")
    scope = binding["spec"].get("matchResources", {}).get("namespaceSelector")
    if overlay == "overlays/namespaced":
        assert "--namespace=shop" in command and "--all-namespaces" not in command
        # a finalizer in a namespace no operator watches would hold deletions forever
        assert scope == {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}
    else:
        assert "--all-namespaces" in command
        assert scope is None


def test_operator_deployment_is_restricted() -> None:
    deployment = next(o for o in build("default") if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == "recjob-operator"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert "recjob_operator.kube.handlers" in container["command"]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", ["default", "overlays/namespaced"])
def test_two_replicas_elect_a_leader(overlay: str) -> None:
    objects = build(overlay)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "status.podIP" not in json.dumps(deployment)
    assert "--standalone" in container["command"]
    assert not any(arg.startswith("--liveness") for arg in container["command"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["port"] == "health"
    assert str(ports["health"]) == env["RECJOB_HEALTH_PORT"]
    # the Lease: a Role in the operator's namespace, bound to its service account
    namespace = deployment["metadata"]["namespace"]
    granted = grants(objects)
    for verb in ("get", "update"):
        assert allowed(granted, verb, "coordination.k8s.io", "leases", namespace,
                       "recjob-operator")  # fmt: skip
        assert not allowed(granted, verb, "coordination.k8s.io", "leases", namespace, "other")
    assert allowed(granted, "create", "coordination.k8s.io", "leases", namespace)
    assert not allowed(granted, "get", "coordination.k8s.io", "leases", "shop", "recjob-operator")


def test_children_owned_with_block_owner_deletion_are_allowed() -> None:
    """OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs update on
    recjobs/finalizers, wherever the operator creates children."""
    for overlay, namespace in (("default", "anywhere"), ("overlays/namespaced", "shop")):
        granted = grants(build(overlay))
        assert allowed(granted, "update", "recjob.dev", "recjobs/finalizers", namespace)


def test_namespaced_overlay_needs_no_cluster_wide_permission() -> None:
    objects = build("overlays/namespaced")
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    granted = grants(objects)
    assert granted and all(g.namespace in ("shop", "recjob-system") for g in granted)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["RECJOB_WATCH_CRDS"] == "false"  # kopf lists no CRDs/namespaces
    # the same rules as the cluster-wide ClusterRole, less the cluster-scoped CRD one
    cluster_role = next(o for o in build("default") if o["kind"] == "ClusterRole")
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] ==
                "recjob-operator")  # fmt: skip
    assert role["metadata"]["namespace"] == "shop"
    namespaced = [r for r in cluster_role["rules"] if "apiextensions.k8s.io" not in r["apiGroups"]]
    crd_rules = [r for r in cluster_role["rules"] if r not in namespaced]
    crd = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"]}
    assert crd_rules == [{**crd, "verbs": ["list", "watch"]}]
    # less what only a silo in another namespace needs (kube/silo_namespaces.py)
    elsewhere = {("", "configmaps", "deletecollection"),
                 ("networking.k8s.io", "networkpolicies", "deletecollection"),
                 ("gateway.networking.k8s.io", "referencegrants", "list")}  # fmt: skip
    expected = []
    for rule in namespaced:
        key = (rule["apiGroups"][0], rule["resources"][0])
        verbs = [v for v in rule["verbs"] if (*key, v) not in elsewhere]
        if verbs:
            expected.append({**rule, "verbs": verbs})
    assert expected != namespaced  # the ClusterRole has them
    assert role["rules"] == expected


def test_alerts_and_dashboard_use_metrics_that_exist() -> None:
    exposed = exposed_metric_names()
    rule = yaml.safe_load((MANIFESTS / "monitoring" / "prometheusrule.yaml").read_text())
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"RecJobStuckInPhase", "RecJobRolledBack", "RecJobAnalysisErrors"} <= set(alerts)
    for alert in alerts.values():
        used = referenced_metrics(alert["expr"])
        assert used and used <= exposed, (alert["alert"], used - exposed)
    dashboard = json.loads((MANIFESTS / "monitoring" / "recjob-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        used = referenced_metrics(expr)
        assert used and used <= exposed, (expr, used - exposed)


@pytest.mark.parametrize(
    ("obj", "health"),
    [
        ({"metadata": {"generation": 1}}, "Progressing"),
        ({"metadata": {"generation": 2},
          "status": {"phase": "Succeeded", "observedGeneration": 1}}, "Progressing"),
        ({"metadata": {"generation": 1},
          "status": {"phase": "Training", "observedGeneration": 1}}, "Progressing"),
        ({"metadata": {"generation": 1},
          "status": {"phase": "Succeeded", "observedGeneration": 1}}, "Healthy"),
        ({"metadata": {"generation": 1},
          "status": {"phase": "RolledBack", "observedGeneration": 1, "message": "x"}}, "Degraded"),
        ({"metadata": {"generation": 1}, "status": {"phase": "Failed"}}, "Degraded"),
        ({"metadata": {"generation": 1}, "status": {"phase": "RollingOut",
          "rollout": {"state": "AwaitingApproval"}}}, "Suspended"),
    ],
)  # fmt: skip
def test_argocd_health_check(obj: dict, health: str) -> None:
    lupa = pytest.importorskip("lupa")
    script = (MANIFESTS / "argocd" / "recjob-health.lua").read_text()
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return runtime.table_from({k: to_lua(v) for k, v in value.items()})
        return value

    runtime.globals().obj = to_lua(obj)
    result = runtime.execute(script)
    assert result["status"] == health
    assert result["message"]
    patch = yaml.safe_load((MANIFESTS / "argocd" / "argocd-cm-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.recjob.dev_RecJob"] == script


@pytest.mark.parametrize("component", ["operator", "trainer", "serving"])
def test_dockerfiles_run_as_non_root_and_pin_the_lock(component: str) -> None:
    text = (REPO / component / "Dockerfile").read_text()
    assert re.search(r"^USER \d+", text, re.MULTILINE)
    # hash-checked lock files whose versions are constraints.txt's (tests/test_images.py)
    assert "--require-hashes" in text
    if component != "operator":
        assert "torch==2.13.0" in text
