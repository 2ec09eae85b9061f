"""A federation's silos in namespaces other than the RecJob's (:mod:`..controller.federation`):
the consent checked before anything is created, and the deletion of what was made there
(an ownerReference cannot reach across namespaces, so the garbage collector never will).

Consent is the Gateway API's ReferenceGrant, made by the silo namespace's owners: from
RecJobs of the owner's namespace to the PersistentVolumeClaims the silo reads. Without it
the training child is not created and the RecJob's ChildrenCreated condition (and an
event) says which grant is missing; it is retried with backoff, so creating the grant is
all it takes."""

from __future__ import annotations

import json

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..api.v1alpha1.common import GROUP
from ..api.v1alpha1.recjob import RecJob
from ..controller.children import pvc_claims
from ..controller.federation import (
    OWNER_NAMESPACE_LABEL,
    owner_namespace,
    silo_namespace,
    silo_namespaces,
    silo_object_name,
)
from .errors import ChildWriteError
from .metrics import api_call

#: The Gateway API's ReferenceGrant (group, version, plural), read in a silo's namespace.
REFERENCE_GRANTS = ("gateway.networking.k8s.io", "v1beta1", "referencegrants")


def _grants(grant: dict, namespace: str, claim: str) -> bool:
    """Whether one ReferenceGrant lets RecJobs of ``namespace`` use PersistentVolumeClaim
    ``claim`` of its own namespace (Gateway API semantics: any ``from`` to any ``to``; a
    ``to`` without a name grants every object of its kind)."""
    spec = grant.get("spec") or {}
    sources = [f for f in spec.get("from") or [] if isinstance(f, dict)]
    targets = [t for t in spec.get("to") or [] if isinstance(t, dict)]
    return any(
        f.get("group") == GROUP and f.get("kind") == "RecJob" and f.get("namespace") == namespace
        for f in sources
    ) and any(
        t.get("group") in ("", None) and t.get("kind") == "PersistentVolumeClaim"
        and t.get("name") in (None, "", claim)
        for t in targets
    )  # fmt: skip


def ungranted_claims(recjob: RecJob, grants: dict[str, list[dict]]) -> list[tuple[int, str]]:
    """``(silo index, claim)`` of every claim of a silo in another namespace that no
    ReferenceGrant there (``grants``: the grants by namespace) lets RecJobs of the
    RecJob's namespace use."""
    own, out = owner_namespace(recjob), []
    for i, silo in enumerate(recjob.spec.training.federated.silos or []):
        namespace = silo_namespace(recjob, silo)
        if namespace == own:
            continue
        for claim in pvc_claims(silo.data.uris().values()):
            if not any(_grants(g, own, claim) for g in grants.get(namespace, [])):
                out.append((i, claim))
    return out


def grant_missing_message(recjob: RecJob, index: int, claim: str) -> str:
    """What to create so that silo ``index`` may use ``claim``."""
    silo = recjob.spec.training.federated.silos[index]
    namespace, own = silo_namespace(recjob, silo), owner_namespace(recjob)
    return (
        f"spec.training.federated.silos[{index}].namespace: namespace {namespace} does not "
        f"grant RecJobs of namespace {own} its PersistentVolumeClaim {claim}: its owners "
        f"grant it with a ReferenceGrant ({REFERENCE_GRANTS[0]}/{REFERENCE_GRANTS[1]}) in "
        f"{namespace} from {{group: {GROUP}, kind: RecJob, namespace: {own}}} to "
        f'{{group: "", kind: PersistentVolumeClaim, name: {claim}}}'
    )


def refusal(kind: str, name: str, reason: str, message: str) -> ChildWriteError:
    """A create the operator refuses itself, reported like the API server's 403s."""
    error = ApiException(status=403, reason="Forbidden")
    error.body = json.dumps({"kind": "Status", "reason": reason, "message": message})
    return ChildWriteError("create", kind, name, error)


def check_grants(custom: client.CustomObjectsApi, recjob: RecJob) -> None:
    """Raise :class:`ChildWriteError` unless every silo in another namespace is granted
    each of its claims there (read now: a grant withdrawn stops the next federation)."""
    grants: dict[str, list[dict]] = {}
    silos = recjob.spec.training.federated.silos or []
    for namespace in silo_namespaces(recjob):
        first = next(s for s in silos if s.namespace == namespace)
        name = silo_object_name(recjob, first)
        try:
            found = api_call(
                "list", REFERENCE_GRANTS[2], custom.list_namespaced_custom_object,
                *REFERENCE_GRANTS[:2], namespace, REFERENCE_GRANTS[2],
            )  # fmt: skip
        except ApiException as error:
            if error.status != 404:
                raise ChildWriteError("create", "Deployment", name, error) from None
            raise refusal(
                "Deployment", name, "NotServed",
                f"a silo in namespace {namespace} needs a ReferenceGrant there, and this "
                f"cluster does not serve {REFERENCE_GRANTS[0]}/{REFERENCE_GRANTS[1]} "
                f"{REFERENCE_GRANTS[2]} (install the Gateway API's standard CRDs)",
            ) from None  # fmt: skip
        grants[namespace] = list(found.get("items") or [])
    missing = ungranted_claims(recjob, grants)
    if missing:
        index, claim = missing[0]
        name = silo_object_name(recjob, silos[index])
        raise refusal("Deployment", name, "NotGranted", grant_missing_message(recjob, index, claim))


def federation_selector(namespace: str, **labels: str) -> str:
    """The label selector of the federation objects the RecJobs of ``namespace`` made,
    narrowed by ``labels``."""
    pairs = {**labels, OWNER_NAMESPACE_LABEL: namespace}
    return ",".join(f"{k}={v}" for k, v in pairs.items())


def recjob_selector(namespace: str, name: str) -> str:
    """Every federation object of RecJob ``namespace/name``, of every generation."""
    return federation_selector(namespace, **{f"{GROUP}/recjob": name})


class SiloNamespaces:
    """Deletes what a RecJob's federations made outside its namespace."""

    def __init__(self, api: client.ApiClient):
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.networking = client.NetworkingV1Api(api)
        self.authorization = client.AuthorizationV1Api(api)
        self._cluster_wide: bool | None = None

    def cluster_wide(self) -> bool:
        """Whether this operator may list ConfigMaps in every namespace (asked once of the
        authorizer with a SelfSubjectAccessReview, which needs no RBAC). Installed for one
        namespace it may not, and cannot have created anything elsewhere either: it then
        never lists there, so the authorizer refuses it nothing."""
        if self._cluster_wide is None:
            review = {"spec": {"resourceAttributes": {"verb": "list", "resource": "configmaps"}}}
            ask = self.authorization.create_self_subject_access_review
            answer = api_call("create", "selfsubjectaccessreviews", ask, review)
            self._cluster_wide = bool(answer.status and answer.status.allowed)
        return self._cluster_wide

    def namespaces(self, own: str, selector: str) -> list[str]:
        """The namespaces other than ``own`` holding a silo's ConfigMap (created before
        the silo's other objects, deleted after them) that ``selector`` selects (none for an
        operator installed for one namespace, :meth:`cluster_wide`)."""
        if not self.cluster_wide():
            return []
        try:
            found = api_call(
                "list", "configmaps", self.core.list_config_map_for_all_namespaces,
                label_selector=selector,
            )  # fmt: skip
        except ApiException as error:
            if error.status == 403:
                return []
            raise ChildWriteError("list", "ConfigMap", selector, error) from None
        return sorted({cm.metadata.namespace for cm in found.items} - {own})

    def delete(self, own: str, selector: str) -> None:
        """Delete the Deployments, NetworkPolicies and then the ConfigMaps ``selector``
        selects in every namespace but ``own`` (none left is fine)."""
        calls = (
            ("deployments", self.apps.delete_collection_namespaced_deployment),
            ("networkpolicies", self.networking.delete_collection_namespaced_network_policy),
            ("configmaps", self.core.delete_collection_namespaced_config_map),
        )
        for namespace in self.namespaces(own, selector):
            for plural, call in calls:
                try:
                    api_call("deletecollection", plural, call, namespace,
                             label_selector=selector, propagation_policy="Background")  # fmt: skip
                except ApiException as error:
                    if error.status != 404:
                        raise ChildWriteError("delete", plural, selector, error) from None
