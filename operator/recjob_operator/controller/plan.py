"""The state of one reconcile run: the status being written and the actions asked for."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from ..api.text import one_line
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import Condition, RecJobStatus
from .actions import EmitEvent

#: Longest Event message (what the operator sends Kubernetes; the rest is cut with ...).
MAX_EVENT_MESSAGE = 1024


def set_condition(
    status: RecJobStatus,
    type_: str,
    value: bool | None,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> None:
    """Set a condition; its transition time changes only when its status does."""
    text = {True: "True", False: "False", None: "Unknown"}[value]
    for condition in status.conditions:
        if condition.type == type_:
            if condition.status != text:
                condition.last_transition_time = now
            condition.status, condition.reason, condition.message = text, reason, message
            condition.observed_generation = generation
            return
    status.conditions.append(
        Condition(
            type=type_,
            status=text,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=generation,
        )
    )


class Plan:
    """Accumulates actions and the status while one reconcile runs."""

    def __init__(self, recjob: RecJob, status: RecJobStatus, now: datetime):
        self.recjob, self.status, self.now = recjob, status, now
        self.actions: list = []
        self.requeue_after: float | None = None
        self.wait_for_children = False

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        """An Event whose message is one printable line (it often quotes a child's log or
        error, which may hold escape codes, line breaks or a user's data)."""
        self.actions.append(EmitEvent(type_, reason, one_line(message, MAX_EVENT_MESSAGE)))

    def printable_status(self) -> RecJobStatus:
        """The status with every message a person reads (the RecJob's, its conditions',
        training's, conversion's, the rollout's) as one printable line."""
        status = self.status
        for holder in (status, status.training, status.conversion, status.rollout,
                       *status.conditions):  # fmt: skip
            if holder is not None and holder.message:
                holder.message = one_line(holder.message)
        return status

    def condition(self, type_: str, value: bool | None, reason: str, message: str = "") -> None:
        set_condition(self.status, type_, value, reason, message, self.now, self.recjob.generation)

    def watch_children(self) -> None:
        """Look again when a child changes (see :attr:`.Decision.wait_for_children`)."""
        self.wait_for_children = True

    def requeue(self, seconds: float) -> None:
        """Look again after ``seconds`` at the latest (a deadline, an analysis interval)."""
        seconds = max(seconds, 0.0)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )

    def finish(self, phase: str, message: str) -> None:
        self.status.phase = phase
        self.status.message = message
        self.status.completion_time = self.now
        ready = phase == "Succeeded"
        self.condition("Ready", ready, phase, message)
