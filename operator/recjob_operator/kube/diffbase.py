"""kopf's diff-base (the last spec it handled) kept in the operator's memory.

kopf compares each RecJob with the diff-base to detect creations and changes for its
on.create/on.update handlers, and by default stores it in an annotation: one more PATCH of
every new RecJob and of every spec edit. The operator has no such handlers (a daemon per
RecJob reads the spec itself; only on.delete is a kopf handler, and it is found from
``deletionTimestamp``, not from a diff), so nothing ever reads the diff-base back after a
restart. Kept in memory, it costs no request; the patch it saves also raced with the status
writes (409, re-read, recompute), about every other write at 2,000 RecJobs.
"""

from __future__ import annotations

import kopf


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """Diff-bases by object uid, in this process only (a restart starts from none: kopf
    then sees each object as new, which runs no handler of this operator)."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, kopf.BodyEssence] = {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """The essence stored for ``body``'s object, if any."""
        return self._essences.get(body.metadata.uid or "")

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Remember ``essence`` for ``body``'s object (``patch`` is left alone)."""
        self._essences[body.metadata.uid or ""] = essence

    def forget(self, uid: str) -> None:
        """Drop a deleted object's essence."""
        self._essences.pop(uid, None)
