"""Waking a RecJob's daemon when something it waits for changes.

controller-runtime's habit: a change of an owned object enqueues its owner. The daemon of a
RecJob whose core waits for a child (a PyTorchJob or Job to finish, an InferenceService
to be ready; :attr:`..controller.actions.Decision.wait_for_children`) sleeps until one of
its children changes, instead of looking at the caches every few seconds: at 2,000 RecJobs
in training, a look every 5 s each was 400 passes a second of validation and
reconciliation that found nothing new. A spec edit or a new annotation (an approval)
wakes the RecJob at once too.

kopf calls :meth:`Wakeups.child_changed` and :meth:`Wakeups.recjob_changed` from its watch
handlers (after it has updated the caches, so the woken pass sees the change). Children are
matched to a RecJob by the ``recjob.dev/recjob`` label (training and conversion children and
their pods), the objects of a shared service by ``recjob.dev/service`` (every RecJob that
said it follows that service). Everything here runs in the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from ..controller.children import RECJOB_LABEL
from ..controller.serving_objects import SERVICE_LABEL

Key = tuple[str, str]


def recjob_key(obj: Mapping) -> Key:
    """(namespace, name) of a RecJob object (a kopf body or an API answer)."""
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name") or ""


def _namespace_labels(obj: Mapping) -> tuple[str, Mapping[str, str]]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("labels") or {}


class Wakeups:
    """One wake-up flag per RecJob (by namespace and name) and who follows which service."""

    def __init__(self) -> None:
        self._flags: dict[Key, asyncio.Event] = {}
        self._services: dict[Key, str] = {}  # RecJob -> the service it follows
        self._followers: dict[Key, set[str]] = {}  # (namespace, service) -> RecJob names
        self._seen: dict[Key, tuple[Any, Any]] = {}  # RecJob -> (generation, annotations)

    def flag(self, key: Key) -> asyncio.Event:
        """The RecJob's wake-up flag (created on first use)."""
        flag = self._flags.get(key)
        if flag is None:  # not setdefault: that builds an Event on every sleep
            flag = self._flags[key] = asyncio.Event()
        return flag

    def follow(self, key: Key, service: str) -> None:
        """The RecJob ``key`` is woken by changes of ``service``'s objects too."""
        before = self._services.get(key)
        if before == service:
            return
        self._unfollow(key, before)
        self._services[key] = service
        self._followers.setdefault((key[0], service), set()).add(key[1])

    def _unfollow(self, key: Key, service: str | None) -> None:
        followers = self._followers.get((key[0], service or ""), set())
        followers.discard(key[1])
        if not followers:
            self._followers.pop((key[0], service or ""), None)

    def forget(self, key: Key) -> None:
        """The RecJob is gone: drop its flag and what it followed."""
        self._flags.pop(key, None)
        self._seen.pop(key, None)
        self._unfollow(key, self._services.pop(key, None))

    def wake(self, key: Key) -> None:
        """Wake the RecJob ``key`` if its daemon sleeps (nothing happens for others)."""
        flag = self._flags.get(key)
        if flag is not None:
            flag.set()

    def child_changed(self, obj: Mapping) -> None:
        """A child of some RecJob, or an object of a service, was added, changed or deleted."""
        namespace, labels = _namespace_labels(obj)
        if owner := labels.get(RECJOB_LABEL):
            self.wake((namespace, owner))
        if service := labels.get(SERVICE_LABEL):
            for name in list(self._followers.get((namespace, service), ())):
                self.wake((namespace, name))

    def recjob_changed(self, event_type: str | None, obj: Mapping) -> None:
        """A RecJob's watch event: its spec (generation) or annotations changed -> wake it;
        deleted -> forget it. Its own status writes wake nothing."""
        meta, key = obj.get("metadata") or {}, recjob_key(obj)
        if event_type == "DELETED":
            self.forget(key)
            return
        seen = (meta.get("generation"), dict(meta.get("annotations") or {}))
        if self._seen.get(key, seen) != seen:
            self.wake(key)
        self._seen[key] = seen

    async def sleep(self, key: Key, stopped: Any, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when woken (the flag is cleared), False when the
        time ran out or ``stopped`` (kopf's DaemonStopped) was set."""
        flag = self.flag(key)
        if flag.is_set():
            flag.clear()
            return True
        woken = asyncio.ensure_future(flag.wait())
        stopping = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait((woken, stopping), timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            for task in (woken, stopping):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if flag.is_set():
            flag.clear()
            return True
        return False
