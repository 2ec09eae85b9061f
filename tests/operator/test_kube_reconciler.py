"""One reconcile pass around the core: status conflicts recomputed on the fresh RecJob,
refused child writes surfaced (condition, event, backoff), no writes without leadership.

The first tests use an in-memory backend (the logic alone); the last ones run the real
KubeBackend against a real API server (envtest or a whole cluster: see kube_target.py),
where the conflict is a genuine concurrent write and the refusal a genuine API answer
(a ResourceQuota)."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from recjob_operator.api.v1alpha1.recjob import RecJob
from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller.reconcile import (
    ChildObservation,
    CreateConversion,
    CreateTraining,
    EmitEvent,
    Observed,
)
from recjob_operator.kube.backend import ChildWriteError, KubeBackend, StatusConflict
from recjob_operator.kube.cache import ApiView
from recjob_operator.kube.reconciler import (
    CHILDREN_CONDITION,
    Backoff,
    ConflictsExhausted,
    NotLeading,
    recjob_document,
    reconcile_pass,
)
from tests.conftest import MINIMAL
from tests.operator.kube_target import kube_target, unique

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
QUOTA_MESSAGE = (
    'pytorchjobs.kubeflow.org "q-g1-train" is forbidden: exceeded quota: rq, '
    "requested: count/pytorchjobs.kubeflow.org=1, used: 0, limited: 0"
)
QUOTA = json.dumps({"kind": "Status", "reason": "Forbidden", "code": 403, "message": QUOTA_MESSAGE})


def stored_recjob(generation: int = 1, version: int = 1, **annotations) -> dict:
    document = copy.deepcopy(MINIMAL)
    document["metadata"] = {"name": "r", "namespace": "shop", "uid": "u-1",
                            "generation": generation, "resourceVersion": str(version),
                            "annotations": annotations}  # fmt: skip
    return document


class MemoryBackend:
    """The backend's interface over one stored RecJob; nothing observed exists yet."""

    child_objects = staticmethod(KubeBackend.child_objects)

    def __init__(self, stored: dict):
        self.stored = stored
        self.applied: list = []
        self.deleted: list[tuple[str, str]] = []
        self.events: list[EmitEvent] = []
        self.refuse: ChildWriteError | None = None
        self.writes = 0
        self.observed = Observed()

    def observe(self, recjob, view) -> Observed:
        return self.observed

    def delete_child(self, namespace, role, name) -> None:
        self.deleted.append((role, name))

    def read_metrics(self, recjob) -> list:
        return []

    def apply(self, recjob, actions, done) -> None:
        for action in actions:
            if isinstance(action, CreateTraining) and self.refuse is not None:
                raise self.refuse
            self.applied.append(action)
            done.add(action)

    def emit_event(self, recjob, event) -> None:
        self.events.append(event)

    def write_status(self, recjob: RecJob, status) -> RecJob:
        self.writes += 1
        if recjob.metadata.resource_version != self.stored["metadata"]["resourceVersion"]:
            raise StatusConflict(recjob.metadata.name)
        self.stored["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        self.bump()
        return parse_recjob(copy.deepcopy(self.stored))

    def bump(self) -> None:
        meta = self.stored["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)

    def read_recjob(self, namespace, name) -> dict:
        return copy.deepcopy(self.stored)


def run(backend, recjob: RecJob, backoff: Backoff | None = None, **kwargs):
    return reconcile_pass(backend, None, recjob, backoff or Backoff(), clock=lambda: NOW,
                          **kwargs)  # fmt: skip


def test_a_conflict_recomputes_on_the_fresh_recjob() -> None:
    backend = MemoryBackend(stored_recjob())
    stale = parse_recjob(copy.deepcopy(backend.stored))
    backend.stored["metadata"]["generation"] = 2  # a user's spec change meanwhile
    backend.bump()
    result = run(backend, stale)
    status = backend.stored["status"]
    assert status["observedGeneration"] == 2 and status["phase"] == "Training"
    assert status["training"]["jobName"] == "r-g2-train"
    assert result.recjob.generation == 2 and backend.writes == 2
    creates = [a for a in backend.applied if isinstance(a, CreateTraining)]
    assert creates == [CreateTraining("r-g1-train"), CreateTraining("r-g2-train")]
    # g1's training was created by the first attempt, and no status ever named it
    assert backend.deleted == [("training", "r-g1-train")]


def converting_race(spec_change: dict) -> MemoryBackend:
    """Training succeeded; the pass that creates the conversion runs on a copy read
    before ``spec_change`` (a new metadata.generation) was stored."""
    backend = MemoryBackend(stored_recjob())
    run(backend, parse_recjob(copy.deepcopy(backend.stored)))  # Pending -> Training
    backend.observed = Observed(training=ChildObservation("r-g1-train", "Succeeded", result={}))
    stale = parse_recjob(copy.deepcopy(backend.stored))
    for section, fields in spec_change.items():
        backend.stored["spec"].setdefault(section, {}).update(fields)
    backend.stored["metadata"]["generation"] = 2
    backend.bump()
    backend.applied.clear()
    run(backend, stale)
    return backend


def test_a_child_built_from_the_stale_spec_is_replaced() -> None:
    backend = converting_race({"export": {"opset": 18}})  # what the conversion depends on
    assert backend.deleted == [("conversion", "r-g1-convert")]
    creates = [a for a in backend.applied if isinstance(a, CreateConversion)]
    assert creates == [CreateConversion("r-g1-convert")] * 2  # stale, then afresh
    assert backend.stored["status"]["observedGeneration"] == 2
    assert backend.stored["status"]["phase"] == "Converting"


def test_a_child_the_spec_change_does_not_affect_is_kept() -> None:
    backend = converting_race({"rollout": {"interval": "45s"}})
    assert backend.deleted == []
    assert [a for a in backend.applied if isinstance(a, CreateConversion)] == [
        CreateConversion("r-g1-convert")
    ]
    assert backend.stored["status"]["observedGeneration"] == 2


def test_a_conflict_on_the_same_generation_repeats_no_action() -> None:
    backend = MemoryBackend(stored_recjob())
    stale = parse_recjob(copy.deepcopy(backend.stored))
    backend.stored["metadata"]["annotations"] = {"kopf.zalando.org/x": "y"}  # kopf's patch
    backend.bump()
    run(backend, stale)
    assert backend.stored["status"]["phase"] == "Training"
    assert [type(a).__name__ for a in backend.applied] == ["CreateTraining", "EmitEvent"]


def test_conflicts_are_bounded() -> None:
    class Contested(MemoryBackend):
        def write_status(self, recjob, status):
            self.bump()  # someone else writes every time
            raise StatusConflict(recjob.metadata.name)

    backend = Contested(stored_recjob())
    with pytest.raises(ConflictsExhausted):
        run(backend, parse_recjob(copy.deepcopy(backend.stored)), attempts=3)


def test_a_refused_create_is_surfaced_backed_off_and_cleared() -> None:
    backend = MemoryBackend(stored_recjob())
    error = ApiException(status=403, reason="Forbidden", body=QUOTA)
    backend.refuse = ChildWriteError("create", "PyTorchJob", "r-g1-train", error)
    backoff = Backoff(base=5, cap=300)
    first = run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    condition = {c["type"]: c for c in backend.stored["status"]["conditions"]}[CHILDREN_CONDITION]
    assert condition["status"] == "False" and condition["reason"] == "CreateFailed"
    assert "exceeded quota" in condition["message"] and "403" in condition["message"]
    assert [(e.type, e.reason) for e in backend.events] == [("Warning", "CreateFailed")]
    assert "exceeded quota" in backend.events[0].message
    assert first.failure is backend.refuse and first.requeue_after == 5
    second = run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    assert second.requeue_after == 10 and len(backend.events) == 1  # same message: no event
    assert [run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff).requeue_after
            for _ in range(6)] == [20, 40, 80, 160, 300, 300]  # fmt: skip
    backend.refuse = None  # the quota was raised
    third = run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    condition = {c["type"]: c for c in backend.stored["status"]["conditions"]}[CHILDREN_CONDITION]
    assert condition["status"] == "True" and condition["reason"] == "Created"
    assert third.failure is None and backoff.failures == 0
    assert CreateTraining("r-g1-train") in backend.applied


#: The API server's answer to a create in a namespace being deleted (NamespaceLifecycle).
TERMINATING = json.dumps({
    "kind": "Status", "reason": "Forbidden", "code": 403,
    "message": 'configmaps "r-g1-train-config" is forbidden: unable to create new content in '
               "namespace shop because it is being terminated",
    "details": {"causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                            "message": "namespace shop is being terminated"}]},
})  # fmt: skip


def test_a_namespace_being_deleted_ends_the_creates_without_condition_event_or_retry() -> None:
    backend = MemoryBackend(stored_recjob())
    error = ApiException(status=403, reason="Forbidden", body=TERMINATING)
    backend.refuse = ChildWriteError("create", "ConfigMap", "r-g1-train-config", error)
    assert backend.refuse.namespace_terminating
    backoff = Backoff()
    result = run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    assert result.terminating and result.requeue_after is None
    assert backoff.failures == 0 and backend.events == []
    conditions = {c["type"] for c in backend.stored.get("status", {}).get("conditions", [])}
    assert CHILDREN_CONDITION not in conditions


def test_only_the_namespace_terminating_cause_is_final() -> None:
    quota = ChildWriteError("create", "PyTorchJob", "r-g1-train",
                            ApiException(status=403, reason="Forbidden", body=QUOTA))  # fmt: skip
    no_body = ChildWriteError("create", "PyTorchJob", "r-g1-train",
                              ApiException(status=403, reason="Forbidden"))  # fmt: skip
    assert not quota.namespace_terminating and not no_body.namespace_terminating


def refusing_backend() -> MemoryBackend:
    backend = MemoryBackend(stored_recjob())
    error = ApiException(status=403, reason="Forbidden", body=QUOTA)
    backend.refuse = ChildWriteError("create", "PyTorchJob", "r-g1-train", error)
    return backend


def test_the_event_of_a_refused_create_is_recorded_once_it_is_created() -> None:
    """The core asks for TrainingCreated only with the first create; that create was
    refused, so the event waits for the retry that creates the child (found on the real
    cluster: a RecJob held back by a quota never got its TrainingCreated event)."""
    backend, backoff = refusing_backend(), Backoff()
    for _ in range(2):
        run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    reasons = [e.reason for e in [*backend.applied, *backend.events] if isinstance(e, EmitEvent)]
    assert "TrainingCreated" not in reasons and list(backoff.held) == [CreateTraining("r-g1-train")]
    backend.refuse = None  # the quota was raised
    for _ in range(2):  # the core re-issues the create on every pass: one event
        run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    created = [e for e in backend.events if e.reason == "TrainingCreated"]
    assert created == [EmitEvent("Normal", "TrainingCreated", "created training r-g1-train")]
    assert backoff.held == {}


def test_held_events_of_a_create_no_longer_wanted_are_dropped() -> None:
    backend, backoff = refusing_backend(), Backoff()
    run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    assert list(backoff.held) == [CreateTraining("r-g1-train")]
    backend.refuse = None
    backend.stored["spec"]["training"] = {"epochs": 2}  # a new model generation
    backend.stored["metadata"]["generation"] = 2
    run(backend, parse_recjob(copy.deepcopy(backend.stored)), backoff)
    assert backoff.held == {}
    created = [e.message for e in [*backend.applied, *backend.events]
               if isinstance(e, EmitEvent) and e.reason == "TrainingCreated"]  # fmt: skip
    assert created == ["created training r-g2-train"]


def test_without_leadership_nothing_is_written() -> None:
    backend = MemoryBackend(stored_recjob())
    with pytest.raises(NotLeading):
        run(backend, parse_recjob(copy.deepcopy(backend.stored)), may_act=lambda: False)
    assert backend.applied == [] and backend.writes == 0


# --------------------------------------------------------------------------- API server
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with kube_target(tmp_path_factory.mktemp("reconciler")) as target:
        target.require("recjob.dev", "v1alpha1", "recjobs")
        yield target


RECJOBS = ("recjob.dev", "v1alpha1")


def create_recjob(target, name: str) -> dict:
    document = copy.deepcopy(MINIMAL)
    document["metadata"] = {"name": name}
    return client.CustomObjectsApi(target.api).create_namespaced_custom_object(
        *RECJOBS, target.namespace, "recjobs", document
    )


def delete_recjob(target, name: str) -> None:
    try:
        client.CustomObjectsApi(target.api).delete_namespaced_custom_object(
            *RECJOBS, target.namespace, "recjobs", name, propagation_policy="Background"
        )
    except ApiException as error:
        if error.status != 404:
            raise


def test_a_concurrent_spec_change_is_not_overwritten(target) -> None:
    target.require("kubeflow.org", "v1", "pytorchjobs")
    name = unique("race")
    custom = client.CustomObjectsApi(target.api)
    stale = parse_recjob(recjob_document(create_recjob(target, name)))
    try:
        custom.patch_namespaced_custom_object(*RECJOBS, target.namespace, "recjobs", name,
                                              {"spec": {"training": {"epochs": 2}}})  # fmt: skip
        backend = KubeBackend(target.api)
        result = reconcile_pass(backend, ApiView(target.api), stale, Backoff())
        stored = custom.get_namespaced_custom_object(*RECJOBS, target.namespace, "recjobs", name)
        assert stored["metadata"]["generation"] == 2
        assert stored["status"]["observedGeneration"] == 2
        assert stored["status"]["training"]["jobName"] == f"{name}-g2-train"
        assert result.recjob.generation == 2
        jobs = custom.list_namespaced_custom_object(
            "kubeflow.org", "v1", target.namespace, "pytorchjobs",
            label_selector=f"recjob.dev/recjob={name}",
        )["items"]  # fmt: skip
        live = [j["metadata"]["name"] for j in jobs if not j["metadata"].get("deletionTimestamp")]
        assert live == [f"{name}-g2-train"]  # g1's, created from the stale copy, removed
    finally:
        delete_recjob(target, name)


def test_a_refused_create_gets_a_condition_and_an_event(target) -> None:
    name = unique("refused")
    core = client.CoreV1Api(target.api)
    quota = unique("no-pytorchjobs")
    target.require("kubeflow.org", "v1", "pytorchjobs")
    hard = {"count/pytorchjobs.kubeflow.org": "0"}
    core.create_namespaced_resource_quota(target.namespace, {
        "metadata": {"name": quota}, "spec": {"hard": hard}})  # fmt: skip
    if target.env is not None:  # no quota controller: write the usage it would
        core.patch_namespaced_resource_quota_status(
            quota, target.namespace, {"status": {"hard": hard, "used": {k: "0" for k in hard}}}
        )
    recjob = parse_recjob(recjob_document(create_recjob(target, name)))
    try:
        result = reconcile_pass(KubeBackend(target.api), ApiView(target.api), recjob, Backoff())
        assert result.failure is not None and result.requeue_after == 5.0
        stored = client.CustomObjectsApi(target.api).get_namespaced_custom_object(
            *RECJOBS, target.namespace, "recjobs", name
        )
        conditions = {c["type"]: c for c in stored["status"]["conditions"]}
        refused = conditions[CHILDREN_CONDITION]
        assert refused["status"] == "False" and refused["reason"] == "CreateFailed"
        assert f"create PyTorchJob {name}-g1-train" in refused["message"]
        assert "exceeded quota" in refused["message"]
        events = core.list_namespaced_event(target.namespace).items
        mine = [e for e in events if e.involved_object.name == name]
        assert [(e.type, e.reason) for e in mine] == [("Warning", "CreateFailed")]
        assert mine[0].message == refused["message"]
    finally:
        core.delete_namespaced_resource_quota(quota, target.namespace)
        delete_recjob(target, name)


def test_a_create_in_a_namespace_being_deleted_is_final(target) -> None:
    """The real API server's refusal (NamespaceLifecycle admission) carries the cause the
    operator reads; envtest runs no namespace controller, so the namespace stays
    Terminating, as a namespace still holding a RecJob's finalizer does."""
    if target.env is None:
        pytest.skip("needs a namespace that stays Terminating (no namespace controller)")
    core = client.CoreV1Api(target.api)
    namespace = unique("going")
    core.create_namespace({"metadata": {"name": namespace}})
    document = copy.deepcopy(MINIMAL)
    document["metadata"] = {"name": "r"}
    stored = client.CustomObjectsApi(target.api).create_namespaced_custom_object(
        *RECJOBS, namespace, "recjobs", document
    )
    core.delete_namespace(namespace)
    assert core.read_namespace(namespace).status.phase == "Terminating"
    backoff = Backoff()
    result = reconcile_pass(KubeBackend(target.api), ApiView(target.api),
                            parse_recjob(recjob_document(stored)), backoff)  # fmt: skip
    assert result.terminating and result.requeue_after is None, result.failure
    assert result.failure is not None and result.failure.status == 403
    assert "being terminated" in result.failure.message
    assert backoff.failures == 0
    assert core.list_namespaced_event(namespace).items == []
