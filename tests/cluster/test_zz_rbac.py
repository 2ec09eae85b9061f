"""The shipped RBAC under the real API server's authorizer (Node,RBAC), from its audit log.

Named to sort last among the cluster tests, so the audit checks see the traffic the other
cluster tests made the operator produce:

- what the operator must not do, ``kubectl auth can-i --as`` its ServiceAccount says no
  (and yes, as controls, to what it must do);
- every request of the operator's ServiceAccount during this session was allowed;
- every permission its ClusterRole and leader-election Role grant was used by an audited
  request (those no request can show stand on other evidence, listed in the test).

The audit log (``.cluster/logs/audit.log``, Metadata level, one line per request) is
written once the API server runs with the audit flags of ``hack/cluster/cluster.py``; the
policy logs a request when it completes, so a watch appears when it ends.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.cluster import audit
from tests.cluster.conftest import OPERATOR_NS, REPO, Cluster
from tests.operator.rbac import Grant, grants, matches

pytestmark = pytest.mark.cluster

OPERATOR_SA = "recjob-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
LEASE = "recjob-operator"
#: When this module was collected: before any test of the session ran.
SESSION_STARTED = datetime.now(UTC) - timedelta(seconds=1)

Permission = audit.Permission


# --------------------------------------------------------------------------- helpers
def shipped_grants(cluster: Cluster) -> list[Grant]:
    """The rules manifests/default grants the operator's ServiceAccount."""
    out = cluster.kubectl("kustomize", str(REPO / "manifests" / "default")).stdout
    return grants([d for d in yaml.safe_load_all(out) if d])


def expand(grant: Grant) -> list[Permission]:
    """Each (apiGroup, resource, verb) a rule grants."""
    rule = grant.rule
    return [(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]]


def audit_events(cluster: Cluster, **filters) -> list[audit.AuditEvent]:
    """The audit log's events, once everything up to now is in it (the API server writes
    batches within a second): an admin request with a unique marker is waited for."""
    if not audit.AUDIT_LOG.exists():
        pytest.fail(
            f"no audit log at {audit.AUDIT_LOG}: the kube-apiserver runs without the audit "
            "flags of hack/cluster/cluster.py (--audit-policy-file, --audit-log-path); "
            "restart it (cluster.py down && cluster.py up)"
        )
    marker = f"audit-marker-{uuid.uuid4().hex}"
    cluster.kubectl("get", "--raw", f"/api?{marker}=1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = audit.read_events(where=lambda e: marker in e.request_uri)
        if events:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the request {marker} did not reach {audit.AUDIT_LOG} within 30 s")
    return audit.read_events(**filters)


def operator_events(cluster: Cluster, **filters) -> list[audit.AuditEvent]:
    """Requests the operator made as its ServiceAccount (not ``kubectl --as`` it)."""
    return [
        e
        for e in audit_events(cluster, user=OPERATOR_USER, **filters)
        if e.impersonated_user is None
    ]


def can_i(cluster: Cluster, verb: str, resource: str, *scope: str) -> bool:
    """``kubectl auth can-i`` as the operator's ServiceAccount."""
    result = cluster.kubectl(
        "auth", "can-i", verb, resource, *scope, f"--as={OPERATOR_USER}", check=False
    )
    answer = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert answer.startswith(("yes", "no")), f"can-i {verb} {resource}: {result.stderr}"
    return answer.startswith("yes")


# --------------------------------------------------------------------------- the reader
def test_the_reader_keeps_one_event_per_request_and_counts_per_minute(tmp_path: Path) -> None:
    """One event per auditID (the latest stage), torn lines skipped, rates per user."""

    def line(audit_id: str, stage: str, user: str, second: int, code: int = 200) -> str:
        stamp = f"2026-01-01T00:0{second // 60}:{second % 60:02d}.000001Z"
        return json.dumps({
            "kind": "Event", "auditID": audit_id, "stage": stage, "verb": "watch",
            "user": {"username": user}, "requestURI": "/api/v1/pods?watch=1",
            "objectRef": {"resource": "pods", "apiVersion": "v1"},
            "responseStatus": {"code": code}, "requestReceivedTimestamp": stamp,
            "stageTimestamp": stamp,
        })  # fmt: skip

    log = tmp_path / "audit.log"
    (tmp_path / "audit-2026-01-01T00-00-30.000.log").write_text(
        line("a", "ResponseStarted", "alice", 0) + "\n"
    )
    log.write_text("\n".join([
        line("a", "ResponseComplete", "alice", 0),
        line("b", "ResponseComplete", "bob", 30, code=403),
        line("c", "ResponseComplete", "alice", 90),
        '{"kind": "Event", "auditID": "d", "sta',
    ]))  # fmt: skip
    events = audit.read_events(log)
    assert [(e.audit_id, e.stage) for e in events] == [
        ("a", "ResponseComplete"), ("b", "ResponseComplete"), ("c", "ResponseComplete"),
    ]  # fmt: skip
    assert [e.denied for e in events] == [False, True, False]
    assert events[0].permission == ("", "pods", "watch")
    start, end = events[0].received, events[0].received + timedelta(minutes=2)
    assert audit.requests_per_minute(events, start, end) == {"alice": 1.0, "bob": 0.5}
    assert audit.requests_by_minute(events, start, end) == {"alice": [1, 1], "bob": [1, 0]}
    assert audit.used_permissions(events).keys() == {("", "pods", "watch")}


def test_the_audit_log_shows_a_refused_request(operator: Cluster) -> None:
    """A request the operator's account may not make appears as denied (so the check that
    none of the operator's was denied is not blind); made ``--as`` it, it is not counted
    as the operator's own."""
    result = operator.kubectl("get", "secrets", "-n", OPERATOR_NS, f"--as={OPERATOR_USER}",
                              check=False)  # fmt: skip
    assert result.returncode != 0 and "Forbidden" in result.stderr, result.stderr
    events = audit_events(
        operator,
        since=datetime.now(UTC) - timedelta(minutes=2),
        where=lambda e: e.impersonated_user == OPERATOR_USER and e.resource == "secrets",
    )
    assert events and events[-1].denied and events[-1].code == 403, events
    assert events[-1].effective_user == OPERATOR_USER
    assert events[-1].audit_id not in {e.audit_id for e in operator_events(operator)}


# --------------------------------------------------------------------------- (c) can-i
#: What the operator must never do: (verb, resource, scope flags).
FORBIDDEN = [
    ("delete", "namespaces", ()),
    ("create", "namespaces", ()),
    ("get", "secrets", ("-A",)),
    ("list", "secrets", ("-A",)),
    ("watch", "secrets", ("-A",)),
    ("get", "secrets", ("-n", OPERATOR_NS)),
    ("create", "pods", ("-n", "default")),
    ("delete", "pods", ("-A",)),
    ("create", "pods", ("--subresource=exec", "-n", "default")),
    ("get", "pods", ("--subresource=log", "-n", "default")),
    # a federation's SuperLink and SuperNodes are created, never changed or read
    ("patch", "deployments.apps", ("-A",)),
    ("update", "deployments.apps", ("-A",)),
    ("get", "deployments.apps", ("-A",)),
    # its TLS Secret is left to garbage collection: no Secret can be deleted
    ("delete", "secrets", ("-A",)),
    ("deletecollection", "secrets", ("-A",)),
    ("update", "recjobs.recjob.dev", ("-A",)),
    ("delete", "recjobs.recjob.dev", ("-A",)),
    ("create", "recjobs.recjob.dev", ("-A",)),
    ("patch", "pytorchjobs.kubeflow.org", ("-A",)),
    ("get", "configmaps", ("-A",)),
    ("delete", "configmaps", ("-A",)),
    ("create", "serviceaccounts", ("--subresource=token", "-n", OPERATOR_NS)),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ()),
    ("create", "rolebindings.rbac.authorization.k8s.io", ("-n", OPERATOR_NS)),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", ()),
    ("bind", "clusterroles.rbac.authorization.k8s.io", ()),
    ("impersonate", "serviceaccounts", ("-A",)),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", ()),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", ()),
    ("get", "nodes", ()),
    ("update", "leases.coordination.k8s.io/someone-else", ("-n", OPERATOR_NS)),
    ("update", f"leases.coordination.k8s.io/{LEASE}", ("-n", "default")),
    ("create", "leases.coordination.k8s.io", ("-n", "default")),
    ("*", "*", ("-A",)),
]
#: What it must be able to do (controls: ``--as`` works and the RBAC is installed).
ALLOWED = [
    ("patch", "recjobs.recjob.dev", ("--subresource=status", "-n", "default")),
    ("update", "recjobs.recjob.dev", ("--subresource=status", "-n", "default")),
    ("update", "recjobs.recjob.dev", ("--subresource=finalizers", "-n", "default")),
    ("create", "pytorchjobs.kubeflow.org", ("-n", "default")),
    ("list", "pods", ("-A",)),
    ("create", "events", ("-n", "default")),
    ("create", "deployments.apps", ("-n", "default")),  # a federation (controller/federation)
    ("create", "secrets", ("-n", "default")),  # its TLS material: written, never read
    ("create", "networkpolicies.networking.k8s.io", ("-n", "default")),  # its fences
    ("update", f"leases.coordination.k8s.io/{LEASE}", ("-n", OPERATOR_NS)),
]


@pytest.mark.parametrize(
    ("verb", "resource", "scope"),
    FORBIDDEN,
    ids=[f"{v} {r} {' '.join(s)}".strip() for v, r, s in FORBIDDEN],
)
def test_the_operator_cannot(operator: Cluster, verb: str, resource: str, scope: tuple) -> None:
    assert not can_i(operator, verb, resource, *scope)


@pytest.mark.parametrize(
    ("verb", "resource", "scope"),
    ALLOWED,
    ids=[f"{v} {r} {' '.join(s)}".strip() for v, r, s in ALLOWED],
)
def test_the_operator_can(operator: Cluster, verb: str, resource: str, scope: tuple) -> None:
    assert can_i(operator, verb, resource, *scope)


def test_the_operator_cannot_change_configmaps_it_did_not_create(operator: Cluster) -> None:
    """RBAC grants update on ConfigMaps (the service records, in any namespace with
    RecJobs); the shipped ValidatingAdmissionPolicy narrows it to the operator's own: the
    real API server refuses the operator's update of anyone else's ConfigMap."""
    name, ns = f"not-the-operators-{uuid.uuid4().hex[:6]}", "default"
    operator.kubectl("create", "configmap", name, "-n", ns, "--from-literal=a=1")

    def update_as_operator(value: str) -> subprocess.CompletedProcess:
        obj = operator.get("configmap", name, ns)
        obj["data"]["a"] = value
        return operator.kubectl("replace", f"--as={OPERATOR_USER}", "-f", "-",
                                input=json.dumps(obj), check=False)  # fmt: skip

    try:
        refused = update_as_operator("2")
        assert refused.returncode != 0
        assert "ValidatingAdmissionPolicy 'recjob-operator-configmaps'" in refused.stderr
        assert "may change only the ConfigMaps it created" in refused.stderr
        operator.kubectl("label", "configmap", name, "-n", ns,
                         "app.kubernetes.io/managed-by=recjob-operator")  # fmt: skip
        assert update_as_operator("3").returncode == 0  # its own: allowed (control)
    finally:
        operator.kubectl("delete", "configmap", name, "-n", ns, check=False)


def test_the_cluster_runs_the_shipped_rbac(operator: Cluster) -> None:
    """The rules in the cluster are manifests/rbac's (what the audit tests judge)."""
    shipped = {(g.namespace, json.dumps(g.rule, sort_keys=True)) for g in shipped_grants(operator)}
    role = operator.get("clusterrole", "recjob-operator")
    election = operator.get("role", "recjob-operator-leader-election", OPERATOR_NS)
    assert role is not None and election is not None
    live = {(None, json.dumps(r, sort_keys=True)) for r in role["rules"]}
    live |= {(OPERATOR_NS, json.dumps(r, sort_keys=True)) for r in election["rules"]}
    assert live == shipped


# --------------------------------------------------------------------------- (b) all needed
# Permissions no audited request can show, and what shows their use instead
# (other_evidence):
# - recjobs/finalizers update is never requested: the OwnerReferencesPermissionEnforcement
#   admission plugin checks it when a child with ``blockOwnerDeletion`` is created, so an
#   allowed create of a child is its use;
# - an open watch is in the log only once it ends (kopf sets no timeout: the API server
#   ends it after 30-60 min): kopf lists each kind it watches and opens the watch right
#   after, so its list stands for the watch;
# - serving.kserve.io: only where KServe is installed (it is, since issue 13);
# - the leader Lease is created once per cluster: if before the audit log began, its
#   ``create`` cannot be in it.
CHILD_CREATES = {
    ("", "configmaps", "create"),
    ("kubeflow.org", "pytorchjobs", "create"),
    ("batch", "jobs", "create"),
}


def _evidence(
    permission: Permission, grant: Grant, events: list[audit.AuditEvent]
) -> audit.AuditEvent | None:
    """An allowed request of the operator that used ``permission`` as ``grant`` grants it."""
    group, resource, verb = permission
    for event in events:
        if (
            event.authorized
            and event.permission == permission
            and matches(grant, verb, group, resource, event.namespace, event.name)
        ):
            return event
    return None


@dataclass(frozen=True)
class Facts:
    """What the cluster says about permissions no audited request shows."""

    kserve_installed: bool
    lease_created: datetime
    log_started: datetime

    @classmethod
    def read(cls, cluster: Cluster) -> Facts:
        """Read them from the cluster and the audit log."""
        lease = cluster.get("lease", LEASE, OPERATOR_NS) or {}
        created = (lease.get("metadata") or {}).get("creationTimestamp", "2000-01-01T00:00:00Z")
        return cls(
            kserve_installed=cluster.get("crd", "inferenceservices.serving.kserve.io") is not None,
            lease_created=datetime.fromisoformat(created),
            log_started=audit.first_event_time() or datetime.now(UTC),
        )


def other_evidence(
    permission: Permission, events: list[audit.AuditEvent], facts: Facts
) -> str | None:
    """Why ``permission`` counts as used without an audited request of it (None: it
    does not)."""
    group, resource, verb = permission
    used = {e.permission for e in events if e.authorized}
    if permission == ("recjob.dev", "recjobs/finalizers", "update") and CHILD_CREATES & used:
        return "checked in admission of a child create"
    if verb == "watch" and any(
        e.permission == (group, resource, "list")
        and e.authorized
        and e.user_agent.startswith("kopf/")
        for e in events
    ):
        return "kopf list followed by its watch (still open)"
    if permission == ("recjob.dev", "recjobs", "get") and not any(
        e.permission == ("recjob.dev", "recjobs/status", "update") and e.code == 409 for e in events
    ):
        return (
            "needed to re-read a RecJob after a 409 on its status write, and no write met "
            "one this session (tests/operator/test_kopf_integration.py provokes conflicts "
            "under the same rules and checks every rule was used)"
        )
    if group == "serving.kserve.io" and not facts.kserve_installed:
        return "KServe is not installed in this cluster"
    if permission == ("coordination.k8s.io", "leases", "create") and (
        facts.lease_created < facts.log_started
    ):
        return "the Lease was created before the audit log began"
    return None


def test_every_granted_permission_was_used(operator: Cluster) -> None:
    """For each (apiGroup, resource, verb) of manifests/rbac's rules, some allowed request
    of the operator in the retained audit log used it; the unused ones are listed."""
    events = operator_events(operator)
    assert events, f"no request of {OPERATOR_USER} in {audit.AUDIT_LOG}"
    facts = Facts.read(operator)
    unused: list[str] = []
    elsewhere: dict[str, list[str]] = defaultdict(list)
    for grant in shipped_grants(operator):
        for permission in expand(grant):
            label = f"{permission[0] or 'core'}/{permission[1]} {permission[2]}"
            if _evidence(permission, grant, events):
                continue
            if why := other_evidence(permission, events, facts):
                elsewhere[why].append(label)
            else:
                unused.append(label)
    if elsewhere:
        warnings.warn(
            "permissions shown by other evidence than an audited request: "
            + "; ".join(f"{why}: {', '.join(p)}" for why, p in elsewhere.items()),
            stacklevel=1,
        )
    assert not unused, (
        f"granted to {OPERATOR_USER} but used by no audited request since "
        f"{facts.log_started:%Y-%m-%d %H:%M:%S} (a test must exercise them, or the rules "
        "go): " + ", ".join(unused)
    )


# --------------------------------------------------------------------------- (a) allowed
def test_every_request_of_the_operator_this_session_was_allowed(operator: Cluster) -> None:
    """No request the operator made during this session was refused (403). Runs last, so
    it covers what the other cluster tests made the operator do."""
    events = operator_events(operator, since=SESSION_STARTED)
    assert events, f"no request of {OPERATOR_USER} since {SESSION_STARTED:%H:%M:%S}"
    denied = [e for e in events if e.denied]
    assert not denied, "refused requests of the operator:\n" + "\n".join(
        e.describe() for e in denied[:50]
    )
