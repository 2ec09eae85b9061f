"""One reconcile pass of a RecJob against the API server, around the pure core.

observe (the watch caches) -> read the canary metrics when due -> ``reconcile`` -> apply
the actions -> write the status with a resourceVersion precondition. Two things the core
does not know about are handled here:

- **Conflicts.** A 409 on the status write means the RecJob changed since it was read (a
  user edited it, kopf patched its annotations): the status computed from the stale copy
  must not be written over it. The pass re-reads the RecJob and runs the core again on the
  fresh object (observations included), then writes with the new resourceVersion; at most
  ``attempts`` times. Actions already carried out in this pass are not repeated (creates
  are idempotent anyway; events would be duplicated). Children an earlier attempt created
  from the stale copy are deleted when the fresh decision does not want them (no status
  ever named them, so the core would not) or wants a child of that name built from the
  new spec (it is then created afresh).
- **A namespace being deleted.** Creates there are refused (403, cause
  NamespaceTerminating) until the namespace and the RecJob are gone. That refusal is final
  and expected: the pass stops there without condition, event or retry
  (:attr:`PassResult.terminating`), as Kubernetes' own controllers do.
- **Refused writes.** A child the API server will not create or patch (quota 403,
  admission webhook, 422 Invalid, CRD not installed) sets the ``ChildrenCreated``
  condition to False with the API server's message, records a Warning event (once per
  distinct message) and backs the RecJob off exponentially (:class:`Backoff`, capped at
  5 minutes); the first pass that carries out its writes sets the condition back to True.
  The events that came with the refused action (``TrainingCreated`` after its create) are
  held and recorded when a later pass carries that action out.
  The status written is the core's (its phase says what is being attempted; the core
  re-issues a missing child's create on every pass).

Runs in a worker thread (blocking client calls); ``may_act`` is checked before anything is
written, so a replica that lost its leadership stops at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..api.v1alpha1.common import GROUP
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import RecJobStatus
from ..api.validation import validate_document
from ..controller.reconcile import (
    CreateConversion,
    CreateTraining,
    Decision,
    EmitEvent,
    analysis_due,
    reconcile,
    set_condition,
)
from . import metrics
from .backend import ChildWriteError, KubeBackend, StatusConflict
from .cache import ChildView

log = logging.getLogger("recjob_operator.kube")

#: The children's label naming the RecJob's metadata.generation they were built from.
GENERATION_LABEL = f"{GROUP}/generation"

#: The condition this module owns (one entry in status.conditions, added on first failure).
CHILDREN_CONDITION = "ChildrenCreated"
#: metadata fields the operator reads (the rest of kopf's body is not validated).
METADATA_FIELDS = (
    "name", "namespace", "labels", "annotations", "generation", "uid", "resourceVersion"
)  # fmt: skip


class NotLeading(Exception):
    """This replica is not (or no longer) the leader: nothing may be written."""


class ConflictsExhausted(Exception):
    """The status write conflicted on every attempt of the pass."""


@dataclass
class Backoff:
    """Exponential backoff of one RecJob's failing passes: ``base * 2**(n-1)`` seconds
    after the n-th failure in a row, at most ``cap``; and the events a refused write kept
    from being recorded (:attr:`held`)."""

    base: float = 5.0
    cap: float = 300.0
    failures: int = 0
    held: dict = field(default_factory=dict)
    """The events that followed a refused action in its decision (``TrainingCreated``
    after ``CreateTraining``), by that action: recorded once a later pass carries the
    action out (the core re-issues a missing child's create on every pass, but its event
    only with the first), dropped once a decision no longer asks for it."""

    def failed(self) -> float:
        """Record a failure; the seconds to wait before the next pass."""
        self.failures += 1
        return min(self.cap, self.base * 2 ** min(self.failures - 1, 30))

    def succeeded(self) -> None:
        """Forget the failures."""
        self.failures = 0


@dataclass
class PassResult:
    """What one pass did."""

    recjob: RecJob
    """The RecJob as last read or written."""
    decision: Decision | None = None
    """The core's decision that was written (None: the RecJob went away or turned invalid)."""
    failure: ChildWriteError | None = None
    requeue_after: float | None = None
    """Seconds until the pass wants to run again (None: only on change)."""
    applied: set = field(default_factory=set)
    """The actions carried out (over all attempts)."""
    analysed: bool = False
    """Whether the written decision included a canary analysis (metrics were read)."""

    @property
    def terminating(self) -> bool:
        """The RecJob's namespace is being deleted (a create was refused with the cause
        NamespaceTerminating): final, so the pass neither reports it nor runs again."""
        return self.failure is not None and self.failure.namespace_terminating


def recjob_document(obj: dict) -> dict:
    """The parts of a RecJob object (kopf body or API answer) the operator validates."""
    document = {k: obj[k] for k in ("apiVersion", "kind", "spec", "status") if k in obj}
    meta = dict(obj.get("metadata") or {})
    document["metadata"] = {k: v for k, v in meta.items() if k in METADATA_FIELDS}
    return document


def children_condition(
    status: RecJobStatus, failure: ChildWriteError | None, now: datetime, generation: int
) -> RecJobStatus:
    """``status`` with the ChildrenCreated condition for this pass's outcome: False with
    the API server's message on a refused write; True again after one (left out when there
    never was one)."""
    current = next((c for c in status.conditions if c.type == CHILDREN_CONDITION), None)
    if failure is None and (current is None or current.status == "True"):
        return status
    status = status.model_copy(deep=True)
    if failure is None:
        set_condition(
            status, CHILDREN_CONDITION, True, "Created", "children written", now, generation
        )
    else:
        reason = "CreateFailed" if failure.verb == "create" else f"{failure.verb.title()}Failed"
        set_condition(status, CHILDREN_CONDITION, False, reason, str(failure), now, generation)
    return status


@dataclass(frozen=True)
class Created:
    """A child one attempt of a pass created, and the RecJob it was built from."""

    action: CreateTraining | CreateConversion
    recjob: RecJob

    @property
    def role(self) -> str:
        return "training" if isinstance(self.action, CreateTraining) else "conversion"


def created_children(recjob: RecJob, actions: list) -> dict[str, Created]:
    """The children ``actions`` create, by name."""
    return {
        action.name: Created(action, recjob)
        for action in actions
        if isinstance(action, CreateTraining | CreateConversion)
    }


def _without_generation(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_generation(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_generation(v) for k, v in value.items() if k != GENERATION_LABEL}
    return value


def _content(objects: list[dict]) -> list:
    """What children do: without their metadata and the spec-generation label (their pod
    templates carry it too), which change with every spec edit."""
    return [_without_generation({k: v for k, v in o.items() if k != "metadata"}) for o in objects]


def stale_children(
    backend: KubeBackend, created: dict[str, Created], recjob: RecJob, decision: Decision
) -> list[str]:
    """Children an earlier attempt of this pass created, on a RecJob that has changed
    since, which the decision on the fresh ``recjob`` must not keep: those it neither
    creates nor names in a status (the core removes only children a status recorded), and
    those it creates under the same name but would build differently from the new spec
    ("already exists" would keep the stale one)."""
    wanted = created_children(recjob, decision.actions)
    named = set()
    for status in (recjob.status, decision.status):
        if status is not None:
            named |= {status.training.job_name if status.training else None,
                      status.conversion.job_name if status.conversion else None}  # fmt: skip
    stale = []
    for name, child in created.items():
        if name in wanted:
            before = backend.child_objects(child.recjob, child.action)
            if _content(before) != _content(backend.child_objects(recjob, wanted[name].action)):
                stale.append(name)
        elif name not in named:
            stale.append(name)
    return stale


def _condition_message(status: RecJobStatus | None) -> str | None:
    for condition in status.conditions if status else []:
        if condition.type == CHILDREN_CONDITION and condition.status == "False":
            return condition.message
    return None


def reconcile_pass(
    backend: KubeBackend,
    view: ChildView,
    recjob: RecJob,
    backoff: Backoff,
    *,
    may_act: Callable[[], bool] = lambda: True,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    attempts: int = 5,
) -> PassResult:
    """One pass (see the module docstring). Raises :class:`NotLeading`,
    :class:`ConflictsExhausted`, and API errors other than refused child writes."""
    applied: set = set()
    created: dict[str, Created] = {}  # children this pass created, by name
    current = recjob
    for _ in range(attempts):
        now = clock()
        observed = backend.observe(current, view)
        readings = backend.read_metrics(current) if analysis_due(current, now) else None
        decision = reconcile(current, observed, readings, now)
        if not may_act():
            raise NotLeading(current.metadata.name)
        failure = None
        try:
            for name in stale_children(backend, created, current, decision):
                backend.delete_child(current.metadata.namespace or "default",
                                     created[name].role, name)  # fmt: skip
                applied.discard(created.pop(name).action)  # to be created afresh
            created.update(created_children(current, decision.actions))
            backend.apply(current, [a for a in decision.actions if a not in applied], applied)
        except ChildWriteError as error:
            failure = error
            hold_events(backoff, decision.actions, applied)
        terminating = failure is not None and failure.namespace_terminating
        status = children_condition(decision.status, None if terminating else failure, now,
                                    current.generation)  # fmt: skip
        stored = current
        if status != current.status:
            if not may_act():
                raise NotLeading(current.metadata.name)
            try:
                stored = backend.write_status(current, status)
            except StatusConflict:
                fresh = _reread(backend, current)
                if fresh is None:
                    return PassResult(current, applied=applied)
                log.info(
                    "%s changed while reconciling; recomputing on resourceVersion %s",
                    current.metadata.name, fresh.metadata.resource_version,
                )  # fmt: skip
                current = fresh
                continue
        decision.status = status
        if terminating:
            log.info("%s/%s: namespace being deleted; nothing more to create",
                     current.metadata.namespace, current.metadata.name)  # fmt: skip
            return PassResult(stored, decision, failure, None, applied, readings is not None)
        if failure is not None:
            ns = current.metadata.namespace or "default"
            metrics.CHILD_WRITE_FAILURES.labels(ns, current.metadata.name).inc()
            log.warning("%s/%s: %s", ns, current.metadata.name, failure)
            if _condition_message(recjob.status) != str(failure):
                backend.emit_event(stored, EmitEvent("Warning", failure.verb.title() + "Failed",
                                                     str(failure)))  # fmt: skip
            delay = backoff.failed()
            release_events(backend, stored, backoff, decision.actions, applied)
            return PassResult(stored, decision, failure, delay, applied, readings is not None)
        backoff.succeeded()
        release_events(backend, stored, backoff, decision.actions, applied)
        return PassResult(
            stored, decision, None, decision.requeue_after, applied, readings is not None
        )
    raise ConflictsExhausted(f"status of {recjob.metadata.name}: {attempts} conflicts in a row")


def hold_events(backoff: Backoff, actions: list, applied: set) -> None:
    """Keep the events that follow the refused action (the first of ``actions`` not
    carried out) until that action is carried out."""
    pending = [a for a in actions if a not in applied]
    if not pending or isinstance(pending[0], EmitEvent):
        return
    events = [a for a in pending[1:] if isinstance(a, EmitEvent)]
    if events:
        held = backoff.held.setdefault(pending[0], [])
        held += [e for e in events if e not in held]


def release_events(
    backend: KubeBackend, recjob: RecJob, backoff: Backoff, actions: list, applied: set
) -> None:
    """Record the held events of actions this pass carried out; forget those of actions
    it no longer asks for."""
    for action in list(backoff.held):
        if action in applied:
            for event in backoff.held.pop(action):
                backend.emit_event(recjob, event)
        elif action not in actions:
            del backoff.held[action]


def _reread(backend: KubeBackend, recjob: RecJob) -> RecJob | None:
    """The RecJob as stored now; None when it is gone or no longer valid (the caller's
    next pass reports the problems)."""
    obj = backend.read_recjob(recjob.metadata.namespace or "default", recjob.metadata.name)
    if obj is None:
        return None
    fresh, problems = validate_document(recjob_document(obj))
    return fresh if fresh is not None and not problems else None
