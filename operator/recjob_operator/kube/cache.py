"""What the operator reads about its children: from watch caches, not by polling.

The reconcile loop looks at an in-flight RecJob whenever one of its children changes and
at its deadlines (:mod:`.wakeups`). Reading its PyTorchJob, Job, pods and InferenceService
from the API server each time made the API load grow with the number of RecJobs times the
rate of looks. Instead, kopf watches the children
(``@kopf.index`` handlers in ``handlers.py``; server-side filtered by
:data:`MANAGED_SELECTOR`, so only the operator's own objects travel) and keeps one small
entry per object in memory; :class:`IndexView` answers from those entries.

- The index functions (:func:`index_pytorchjob`, ...) are pure: object -> ``{key: entry}``
  with ``key = (namespace, name)`` and only what :mod:`.backend` reads in the entry.
- :class:`ApiView` reads the same through the API (GET / LIST): the fallback where no
  cache can answer, and the view for code running without kopf.
- :class:`IndexView` reads the caches; a kind whose watch is not running (its CRD was
  absent at startup and kopf does not watch CRDs) is read through :class:`ApiView`. A
  finished child's termination message missing from the pod cache (the pod's watch event
  not in yet) is listed once through the API.

The caches are kopf ``Index`` objects, written by the event loop and read by the reconcile
threads: reads are single ``dict`` lookups and ``list()`` copies, atomic under the GIL.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .metrics import api_call

log = logging.getLogger("recjob_operator.kube")

#: Label on every child the operator creates (and on their pods): the server-side filter of
#: the watches, so the caches hold only the operator's objects.
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=recjob-operator"
#: Pods worth watching: the training and conversion pods (serving pods are KServe's).
POD_SELECTOR = f"{MANAGED_SELECTOR},app.kubernetes.io/component!=serving"

KUBEFLOW = ("kubeflow.org", "v1", "pytorchjobs")
KSERVE = ("serving.kserve.io", "v1beta1", "inferenceservices")
BATCH_JOBS = ("batch", "v1", "jobs")
PODS = ("", "v1", "pods")
CONFIGMAPS = ("", "v1", "configmaps")
HTTPROUTES = ("gateway.networking.k8s.io", "v1", "httproutes")
RECJOBS = ("recjob.dev", "v1alpha1", "recjobs")
#: ConfigMaps worth watching: the service records (not the children's configs).
RECORD_SELECTOR = f"{MANAGED_SELECTOR},app.kubernetes.io/component=serving"
#: The kinds cached, by the name of their index (the kopf handler id).
INDEXES = {
    "recjob_pytorchjobs": KUBEFLOW,
    "recjob_jobs": BATCH_JOBS,
    "recjob_inferenceservices": KSERVE,
    "recjob_records": CONFIGMAPS,
    "recjob_httproutes": HTTPROUTES,
    "recjob_services": RECJOBS,
    "recjob_pods": PODS,
}

TRAINING_JOB_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")

Key = tuple[str, str]
Entry = dict[str, Any]


# --------------------------------------------------------------------------- index functions
def _key(obj: Mapping) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "default", meta.get("name") or "")


def _copy(value: Any) -> Any:
    return copy.deepcopy(value) if value is not None else None


def index_pytorchjob(obj: Mapping) -> dict[Key, Entry]:
    """A PyTorchJob's status (conditions, replica statuses): what its state comes from."""
    return {_key(obj): {"status": _copy(obj.get("status")) or {}}}


def index_job(obj: Mapping) -> dict[Key, Entry]:
    """A batch Job's status (its Complete / Failed conditions)."""
    return {_key(obj): {"status": _copy(obj.get("status")) or {}}}


def index_inferenceservice(obj: Mapping) -> dict[Key, Entry]:
    """An InferenceService's annotations, generation, canaryTrafficPercent and status."""
    meta = obj.get("metadata") or {}
    predictor = (obj.get("spec") or {}).get("predictor") or {}
    return {
        _key(obj): {
            "metadata": {
                "annotations": _copy(meta.get("annotations")) or {},
                "generation": meta.get("generation"),
            },
            "spec": {"predictor": {"canaryTrafficPercent": predictor.get("canaryTrafficPercent")}},
            "status": _copy(obj.get("status")) or {},
        }
    }


def index_record(obj: Mapping) -> dict[Key, Entry]:
    """A service record's data (see ``controller.serving_objects``)."""
    return {_key(obj): {"data": dict(obj.get("data") or {})}}


def index_httproute(obj: Mapping) -> dict[Key, Entry]:
    """An HTTPRoute's rules (the weights) and status."""
    return {
        _key(obj): {
            "spec": {"rules": _copy((obj.get("spec") or {}).get("rules")) or []},
            "status": _copy(obj.get("status")) or {},
        }
    }


def index_recjob_service(obj: Mapping) -> dict[Key, Entry]:
    """A RecJob under ``(namespace, its service)``: what waiting in line for the service
    needs (name, uid, phase, creation time)."""
    meta = obj.get("metadata") or {}
    serving = (obj.get("spec") or {}).get("serving") or {}
    service = serving.get("name") or meta.get("name") or ""
    return {
        (meta.get("namespace") or "default", service): {
            "name": meta.get("name"),
            "uid": meta.get("uid"),
            "created": meta.get("creationTimestamp") or "",
            "phase": (obj.get("status") or {}).get("phase"),
        }
    }


def pod_child(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """``("pytorchjobs", name)`` for a PyTorchJob's master pod, ``("jobs", name)`` for a
    Job's pod, None for any other pod."""
    if TRAINING_JOB_LABEL in labels:
        if str(labels.get(REPLICA_TYPE_LABEL, "")).lower() != "master":
            return None
        return ("pytorchjobs", labels[TRAINING_JOB_LABEL])
    for label in JOB_NAME_LABELS:
        if label in labels:
            return ("jobs", labels[label])
    return None


def termination_message(pod: Mapping) -> str | None:
    """The first termination message a container of ``pod`` left, if any: of its current
    state, else of its last one (a container restarted in place, e.g. ``OnFailure``, or
    waiting in CrashLoopBackOff, keeps the message of its last run there)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for state in ("state", "lastState"):
        for container in statuses:
            terminated = (container.get(state) or {}).get("terminated") or {}
            if terminated.get("message"):
                return str(terminated["message"])
    return None


def index_pod(obj: Mapping) -> dict[tuple[str, str, str], str]:
    """A finished child pod's termination message under ``(namespace, kind, child name)``;
    nothing for pods without one (``{}`` also drops what the pod had indexed before)."""
    meta = obj.get("metadata") or {}
    child = pod_child(meta.get("labels") or {})
    message = termination_message(obj)
    if child is None or message is None:
        return {}
    return {(meta.get("namespace") or "default", *child): message}


def parse_report(message: str | None, where: str) -> dict | None:
    """The JSON report in a termination message (None when absent or unreadable)."""
    if not message:
        return None
    try:
        report = json.loads(message)
    except ValueError:
        log.warning("unreadable termination message in %s", where)
        return None
    return report if isinstance(report, dict) else None


def best_report(messages: list[tuple[str | None, str]]) -> dict | None:
    """The report of a child from its pods' (termination message, where) pairs: a Job
    retried after a failure has a pod with the error and one with the finished run's
    summary, and the summary is the child's result (else the first report found)."""
    reports = [r for message, where in messages if (r := parse_report(message, where))]
    return next((r for r in reports if "error" not in r), reports[0] if reports else None)


def unserved_kinds(api: client.ApiClient) -> frozenset[str]:
    """Plurals of the cached custom kinds the API server does not serve now (discovery)."""
    discovery = client.CustomObjectsApi(api)
    absent = set()
    for group, version, plural in INDEXES.values():
        if not group:
            continue
        try:
            served = discovery.get_api_resources(group, version).resources or []
        except ApiException as error:
            if error.status != 404:
                log.warning("discovery of %s/%s failed: %s", group, version, error.reason)
                continue
            served = []
        if plural not in {r.name for r in served}:
            absent.add(plural)
    return frozenset(absent)


# --------------------------------------------------------------------------- views
class ChildView(Protocol):
    """Read access to the children, by namespace and name (None: absent)."""

    def pytorchjob(self, namespace: str, name: str) -> dict | None:
        """The PyTorchJob (at least its status)."""

    def job(self, namespace: str, name: str) -> dict | None:
        """The batch Job (at least its status)."""

    def inferenceservice(self, namespace: str, name: str) -> dict | None:
        """The InferenceService (annotations, predictor's canaryTrafficPercent, status)."""

    def report(self, namespace: str, kind: str, name: str) -> dict | None:
        """The JSON termination message of a finished child (``kind``: pytorchjobs for
        its master pod, jobs for its pods)."""

    def httproute(self, namespace: str, name: str) -> dict | None:
        """A service's HTTPRoute (rules, status)."""

    def record(self, namespace: str, name: str) -> dict | None:
        """A service record (``{"data": ...}``)."""

    def service_recjobs(self, namespace: str, service: str) -> list[dict]:
        """The RecJobs of ``service`` (:func:`index_recjob_service` entries)."""


class ApiView:
    """The children read through the API server (a LIST on every call). One child is
    listed by ``metadata.name`` field selector rather than fetched with GET: the shipped
    roles grant the children's kinds list/watch (what the caches need), not get."""

    def __init__(self, api: client.ApiClient):
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)

    def _list_custom(self, kind: tuple[str, str, str], namespace: str, name: str) -> dict | None:
        try:
            found = api_call(
                "list", kind[2], self.custom.list_namespaced_custom_object,
                kind[0], kind[1], namespace, kind[2], field_selector=f"metadata.name={name}",
            )  # fmt: skip
        except ApiException as error:
            if error.status == 404:  # the kind is not served (its CRD is not installed)
                return None
            raise
        items = found.get("items") or []
        return items[0] if items else None

    def pytorchjob(self, namespace: str, name: str) -> dict | None:
        return self._list_custom(KUBEFLOW, namespace, name)

    def inferenceservice(self, namespace: str, name: str) -> dict | None:
        return self._list_custom(KSERVE, namespace, name)

    def httproute(self, namespace: str, name: str) -> dict | None:
        return self._list_custom(HTTPROUTES, namespace, name)

    def job(self, namespace: str, name: str) -> dict | None:
        found = api_call(
            "list", "jobs", self.batch.list_namespaced_job, namespace,
            field_selector=f"metadata.name={name}",
        ).items  # fmt: skip
        return self.api.sanitize_for_serialization(found[0]) if found else None

    def report(self, namespace: str, kind: str, name: str) -> dict | None:
        if kind == "pytorchjobs":
            selector = f"{TRAINING_JOB_LABEL}={name},{REPLICA_TYPE_LABEL}=master"
        else:
            selector = f"{JOB_NAME_LABELS[1]}={name}"
        pods = api_call(
            "list", "pods", self.core.list_namespaced_pod, namespace, label_selector=selector
        ).items
        return best_report([
            (termination_message(self.api.sanitize_for_serialization(pod)), pod.metadata.name)
            for pod in pods
        ])  # fmt: skip

    def record(self, namespace: str, name: str) -> dict | None:
        found = api_call(
            "list", "configmaps", self.core.list_namespaced_config_map, namespace,
            field_selector=f"metadata.name={name}",
        ).items  # fmt: skip
        return index_record(self.api.sanitize_for_serialization(found[0]))[
            (namespace, name)] if found else None  # fmt: skip

    def service_recjobs(self, namespace: str, service: str) -> list[dict]:
        items = api_call(
            "list", "recjobs", self.custom.list_namespaced_custom_object, *RECJOBS[:2],
            namespace, RECJOBS[2],
        ).get("items", [])  # fmt: skip
        entries = [next(iter(index_recjob_service(item).items())) for item in items]
        return [entry for key, entry in entries if key == (namespace, service)]


def _first(index: Any, key: Any) -> Any:
    """The first value stored under ``key`` in a kopf Index (None if none)."""
    try:
        values = list(index[key])
    except KeyError:
        return None
    return values[0] if values else None


def _remember(memory: dict, key: Any, value: Any, limit: int) -> None:
    """``memory[key] = value``, forgetting the oldest entry when ``limit`` is reached."""
    if len(memory) >= limit:
        del memory[next(iter(memory))]
    memory[key] = value


class DeletedPodMessages:
    """The termination messages of child pods that were deleted, remembered (at most
    :attr:`LIMIT`, oldest forgotten first): the Training Operator deletes a PyTorchJob's
    pods when it exceeds its backoff limit, taking the trainer's error with them before the
    RecJob's pass reads it. Kept in memory: an operator restarted meanwhile has only the
    Training Operator's own message."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._messages: dict[tuple[str, str, str], str] = {}

    def remember(self, pod: Mapping) -> None:
        """Keep what :func:`index_pod` finds in ``pod`` (its last state, on deletion)."""
        for key, message in index_pod(pod).items():
            self._messages.pop(key, None)
            _remember(self._messages, key, message, self.LIMIT)

    def get(self, key: tuple[str, str, str]) -> str | None:
        """The remembered message of a deleted pod of child ``key``, if any."""
        return self._messages.get(key)


class IndexView:
    """The children read from kopf's indexes (see the module docstring)."""

    #: Most remembered fallback reads of termination messages (oldest forgotten first).
    MAX_REMEMBERED = 4096

    def __init__(
        self,
        indexes: Mapping[str, Any],
        fallback: ChildView,
        uncached: frozenset[str] = frozenset(),
        deleted: DeletedPodMessages | None = None,
    ):
        """``indexes``: kopf's indexes by id (:data:`INDEXES`); ``uncached``: plurals of
        kinds whose watch is not running (read through ``fallback``)."""
        self.indexes = indexes
        self.fallback = fallback
        self.uncached = uncached
        self.deleted = deleted
        self._reports: dict[tuple[str, str, str], dict | None] = {}

    def _entry(self, index: str, namespace: str, name: str) -> dict | None:
        value = _first(self.indexes[index], (namespace, name))
        return copy.deepcopy(value) if value is not None else None

    def pytorchjob(self, namespace: str, name: str) -> dict | None:
        if "pytorchjobs" in self.uncached:
            return self.fallback.pytorchjob(namespace, name)
        return self._entry("recjob_pytorchjobs", namespace, name)

    def job(self, namespace: str, name: str) -> dict | None:
        if "jobs" in self.uncached:
            return self.fallback.job(namespace, name)
        return self._entry("recjob_jobs", namespace, name)

    def inferenceservice(self, namespace: str, name: str) -> dict | None:
        if "inferenceservices" in self.uncached:
            return self.fallback.inferenceservice(namespace, name)
        return self._entry("recjob_inferenceservices", namespace, name)

    def httproute(self, namespace: str, name: str) -> dict | None:
        if "httproutes" in self.uncached:
            return self.fallback.httproute(namespace, name)
        return self._entry("recjob_httproutes", namespace, name)

    def record(self, namespace: str, name: str) -> dict | None:
        if "configmaps" in self.uncached:
            return self.fallback.record(namespace, name)
        return self._entry("recjob_records", namespace, name)

    def service_recjobs(self, namespace: str, service: str) -> list[dict]:
        if "recjobs" in self.uncached:
            return self.fallback.service_recjobs(namespace, service)
        try:
            return copy.deepcopy(list(self.indexes["recjob_services"][(namespace, service)]))
        except KeyError:
            return []

    def report(self, namespace: str, kind: str, name: str) -> dict | None:
        key = (namespace, kind, name)
        cached = "pods" not in self.uncached
        if cached:
            try:  # one message per pod of the child (a retried Job has several)
                messages = list(self.indexes["recjob_pods"][key])
            except KeyError:
                messages = []
            if not messages and self.deleted is not None:
                messages = [m for m in [self.deleted.get(key)] if m is not None]
            if messages:
                return best_report([(m, f"a pod of {kind}/{name}") for m in messages])
        if key in self._reports:
            return copy.deepcopy(self._reports[key])
        # not in the cache (the pod's watch event may lag): listed once per child; without
        # a pod cache, listed until a report is found
        report = self.fallback.report(namespace, kind, name)
        if cached or report is not None:
            _remember(self._reports, key, report, self.MAX_REMEMBERED)
        return copy.deepcopy(report)
