"""kopf's diff-base (the last spec it handled) kept in the operator's memory.

kopf compares each RecJob with the diff-base to detect creations and changes for its
on.create/on.update handlers, and by default stores it in an annotation: one more PATCH of
every new RecJob and of every spec edit. The operator has no such handlers (a daemon per
RecJob reads the spec itself; only on.delete is a kopf handler, and it is found from
``deletionTimestamp``, not from a diff), so nothing ever reads the diff-base back after a
restart. Kept in memory, it costs no request; the patch it saves also raced with the status
writes (409, re-read, recompute), about every other write at 2,000 RecJobs.

kopf builds an essence from every event of every RecJob by deep-copying the whole object,
status and managedFields included, and then dropping all but the spec, labels and
annotations: 15% of the operator's CPU while 2,000 new RecJobs were reconciled
(``bench/operator_scale.py``, py-spy). :meth:`MemoryDiffBaseStorage.build` hands kopf only
those parts, so it copies only what it keeps; the essence is the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import kopf


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """Diff-bases by object uid, in this process only (a restart starts from none: kopf
    then sees each object as new, which runs no handler of this operator)."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, kopf.BodyEssence] = {}

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[str] | None = None
    ) -> kopf.BodyEssence:
        """kopf's essence of ``body``, built from its spec (and other top-level fields but
        the status), labels and annotations only. With ``extra_fields`` (handlers reading
        status fields; this operator has none) the whole body, as kopf does."""
        if extra_fields:
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        kept = {key: value for key, value in body.items() if key not in ("metadata", "status")}
        kept["metadata"] = {key: meta[key] for key in ("labels", "annotations") if key in meta}
        return super().build(body=kopf.Body(kept))

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """The essence stored for ``body``'s object, if any."""
        return self._essences.get(body.metadata.uid or "")

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Remember ``essence`` for ``body``'s object (``patch`` is left alone)."""
        self._essences[body.metadata.uid or ""] = essence

    def forget(self, uid: str) -> None:
        """Drop a deleted object's essence."""
        self._essences.pop(uid, None)


class AnnotationsProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's progress in annotations, with :meth:`clear` free of deep copies.

    kopf clears both essences (the stored one and the new one) of every event of every
    RecJob before it compares them: a deep copy of each, then the progress annotations and
    empty stanzas removed in place (6% of the operator's CPU at 1,000 new RecJobs, py-spy).
    Copying only the dictionaries it changes gives the same essence and leaves the one
    passed in as it was."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        """``essence`` without this storage's annotations nor empty stanzas (a new
        object; the parts it shares with ``essence`` are not changed)."""
        cleared: dict = dict(essence)
        meta = dict(cleared.get("metadata") or {})
        if "annotations" in meta:  # kopf refuses an annotations storage without prefix
            ours = f"{self.prefix}/"
            meta["annotations"] = {
                key: value for key, value in meta["annotations"].items()
                if not key.startswith(ours)
            }  # fmt: skip
        for stanza in ("annotations", "labels"):
            if stanza in meta and not meta[stanza]:
                del meta[stanza]
        if "metadata" in cleared:
            cleared["metadata"] = meta
            if not meta:
                del cleared["metadata"]
        if "status" in cleared and not cleared["status"]:
            del cleared["status"]
        return cleared  # type: ignore[return-value]
