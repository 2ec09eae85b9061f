"""A small RBAC evaluator for the shipped manifests: which requests the operator's service
account may make (ClusterRoleBindings, RoleBindings to Roles or ClusterRoles, resourceNames)."""

from __future__ import annotations

from dataclasses import dataclass

SUBJECT = ("recjob-operator", "recjob-system")


@dataclass(frozen=True)
class Grant:
    """One rule, granted cluster-wide (namespace None) or in one namespace."""

    namespace: str | None
    rule: dict


def _bound(binding: dict) -> bool:
    return any(
        s.get("kind") == "ServiceAccount" and (s["name"], s.get("namespace")) == SUBJECT
        for s in binding.get("subjects") or []
    )


def grants(objects: list[dict]) -> list[Grant]:
    """The rules granted to the operator's service account by ``objects``."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("Role", "ClusterRole")}  # fmt: skip
    out = []
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding") or not _bound(binding):
            continue
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace")
        role_ns = namespace if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_ns, ref["name"])]
        scope = None if binding["kind"] == "ClusterRoleBinding" else namespace
        out += [Grant(scope, rule) for rule in role.get("rules") or []]
    return out


def matches(grant: Grant, verb: str, group: str, resource: str, namespace: str | None,
            name: str | None) -> bool:  # fmt: skip
    """Whether ``grant`` allows the request (``resource`` with ``/subresource``)."""
    rule = grant.rule
    if grant.namespace is not None and namespace != grant.namespace:
        return False
    names = rule.get("resourceNames")
    return (
        group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
        and verb in rule.get("verbs", []) and (not names or name in names)
    )  # fmt: skip


def allowed(granted: list[Grant], verb: str, group: str, resource: str,
            namespace: str | None = None, name: str | None = None) -> bool:  # fmt: skip
    """Whether any grant allows the request."""
    return any(matches(g, verb, group, resource, namespace, name) for g in granted)
