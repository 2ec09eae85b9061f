"""A reader of the test cluster's kube-apiserver audit log (``.cluster/logs/audit.log``).

The API server writes one JSON object a line per audited request and stage (policy:
``hack/cluster/manifests/audit-policy.yaml``, Metadata level: who, verb, object, response
code; no bodies). Rotated files lie beside it (``audit-<time>.log``). A request can appear
once per stage (a watch at ``ResponseStarted`` when it opens, at ``ResponseComplete`` when
it ends); :func:`read_events` keeps one event per ``auditID``, the latest stage.

Used by the RBAC tests (``test_zz_rbac.py``: what the operator's ServiceAccount asked for
and whether it was allowed) and by benchmarks (:func:`requests_per_minute`: requests per
user per minute over a time window).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("RECJOB_CLUSTER_DIR", REPO / ".cluster")).resolve()
#: Where hack/cluster/cluster.py has the API server write its audit log.
AUDIT_LOG = STATE / "logs" / "audit.log"

#: Stages in the order a request passes them; the latest one seen describes it best.
_STAGE_ORDER = {"RequestReceived": 0, "ResponseStarted": 1, "ResponseComplete": 2, "Panic": 3}

#: A permission as RBAC rules name it: (apiGroup, resource[/subresource], verb).
Permission = tuple[str, str, str]


def _time(text: str | None) -> datetime:
    """An audit timestamp (RFC 3339, microseconds, ``Z``) as an aware datetime."""
    if not text:
        return datetime.min.replace(tzinfo=UTC)
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class AuditEvent:
    """One audited request (at its latest stage) with the fields the tests read."""

    audit_id: str
    stage: str
    user: str
    """``user.username``: who authenticated (for ``kubectl --as``: the impersonator)."""
    impersonated_user: str | None
    """``impersonatedUser.username`` when the request was made ``--as`` someone."""
    verb: str
    request_uri: str
    api_group: str | None
    """``objectRef.apiGroup`` ("" for the core group); None for non-resource URLs."""
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    code: int | None
    """``responseStatus.code`` (None when the stage carries no response yet)."""
    decision: str | None
    """The authorizer's annotation ``authorization.k8s.io/decision``: allow / forbid."""
    received: datetime
    """``requestReceivedTimestamp``."""
    stage_time: datetime
    """``stageTimestamp``: when the logged stage was reached (the response, for most)."""
    user_agent: str

    @classmethod
    def from_json(cls, entry: dict) -> AuditEvent:
        """The event of one parsed audit line."""
        ref = entry.get("objectRef") or {}
        impersonated = entry.get("impersonatedUser") or {}
        annotations = entry.get("annotations") or {}
        return cls(
            audit_id=entry.get("auditID", ""),
            stage=entry.get("stage", ""),
            user=(entry.get("user") or {}).get("username", ""),
            impersonated_user=impersonated.get("username"),
            verb=entry.get("verb", ""),
            request_uri=entry.get("requestURI", ""),
            api_group=ref.get("apiGroup", "") if ref else None,
            resource=ref.get("resource"),
            subresource=ref.get("subresource"),
            namespace=ref.get("namespace"),
            name=ref.get("name"),
            code=(entry.get("responseStatus") or {}).get("code"),
            decision=annotations.get("authorization.k8s.io/decision"),
            received=_time(entry.get("requestReceivedTimestamp")),
            stage_time=_time(entry.get("stageTimestamp")),
            user_agent=entry.get("userAgent", ""),
        )

    @property
    def effective_user(self) -> str:
        """Whom the request was authorized as (the impersonated user, if any)."""
        return self.impersonated_user or self.user

    @property
    def denied(self) -> bool:
        """Refused by the authorizer (RBAC/Node): its ``forbid`` decision. A 403 that the
        authorizer allowed came from admission (e.g. a ResourceQuota refusing a create)."""
        return self.decision == "forbid" or (self.code == 403 and self.decision is None)

    @property
    def authorized(self) -> bool:
        """Passed authorization: the authorizer said allow (or, without its annotation, the
        response is neither 401, 403 nor 429, which come before authorization)."""
        if self.decision is not None:
            return self.decision == "allow"
        return self.code is not None and self.code not in (401, 403, 429)

    @property
    def full_resource(self) -> str | None:
        """``resource`` or ``resource/subresource`` as RBAC rules write it."""
        if self.resource is None:
            return None
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    @property
    def permission(self) -> Permission | None:
        """(apiGroup, resource[/subresource], verb); None for non-resource requests."""
        if self.resource is None:
            return None
        return (self.api_group or "", self.full_resource or "", self.verb)

    def describe(self) -> str:
        """A one-line summary for failure messages."""
        where = "/".join(p for p in (self.namespace, self.name) if p)
        target = f"{self.api_group or 'core'}/{self.full_resource}" if self.resource else ""
        return (
            f"{self.received:%H:%M:%S} {self.effective_user} {self.verb} "
            f"{target or self.request_uri} {where} -> {self.code}"
        ).replace("  ", " ")


def log_files(path: Path = AUDIT_LOG) -> list[Path]:
    """The audit log and its rotated backups (``audit-<time>.log``), oldest first."""
    backups = sorted(
        path.parent.glob(f"{path.stem}-*{path.suffix}"), key=lambda p: p.stat().st_mtime
    )
    return [*backups, *([path] if path.exists() else [])]


def _lines(files: Iterable[Path]) -> Iterator[dict]:
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line being written right now
                    continue
                if isinstance(entry, dict) and entry.get("kind") == "Event":
                    yield entry


def read_events(
    path: Path = AUDIT_LOG,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    user: str | None = None,
    where: Callable[[AuditEvent], bool] | None = None,
) -> list[AuditEvent]:
    """Every audited request in the log and its backups, one per ``auditID`` (its latest
    stage), in order of arrival; FileNotFoundError when there is no log at all.

    ``since`` / ``until``: keep requests received in [since, until); ``user``: those whose
    ``user.username`` is it (impersonated requests count as their impersonator's);
    ``where``: any other filter.
    """
    files = log_files(path)
    if not files:
        raise FileNotFoundError(path)
    latest: dict[str, AuditEvent] = {}
    for entry in _lines(files):
        event = AuditEvent.from_json(entry)
        if user is not None and event.user != user:
            continue
        if since is not None and event.received < since:
            continue
        if until is not None and event.received >= until:
            continue
        if where is not None and not where(event):
            continue
        seen = latest.get(event.audit_id)
        if seen is None or _STAGE_ORDER.get(event.stage, 0) >= _STAGE_ORDER.get(seen.stage, 0):
            latest[event.audit_id] = event
    return sorted(latest.values(), key=lambda e: e.received)


def first_event_time(path: Path = AUDIT_LOG) -> datetime | None:
    """When the oldest request in the retained log arrived (None for an empty log)."""
    for entry in _lines(log_files(path)):
        return AuditEvent.from_json(entry).received
    return None


def requests_per_minute(
    events: Iterable[AuditEvent],
    start: datetime,
    end: datetime,
    key: Callable[[AuditEvent], str] = lambda e: e.effective_user,
) -> dict[str, float]:
    """Requests per minute of each user (or other ``key``) received in [start, end)."""
    minutes = (end - start).total_seconds() / 60
    if minutes <= 0:
        raise ValueError(f"empty window: {start} .. {end}")
    counts = Counter(key(e) for e in events if start <= e.received < end)
    return {who: count / minutes for who, count in counts.most_common()}


def requests_by_minute(
    events: Iterable[AuditEvent],
    start: datetime,
    end: datetime,
    key: Callable[[AuditEvent], str] = lambda e: e.effective_user,
) -> dict[str, list[int]]:
    """Each user's (or ``key``'s) request count in every whole minute from ``start`` to
    ``end`` (the last, partial minute included)."""
    buckets = max(1, -(-int((end - start).total_seconds()) // 60))
    out: dict[str, list[int]] = defaultdict(lambda: [0] * buckets)
    for event in events:
        if start <= event.received < end:
            out[key(event)][int((event.received - start) / timedelta(minutes=1))] += 1
    return dict(out)


def used_permissions(events: Iterable[AuditEvent]) -> dict[Permission, list[AuditEvent]]:
    """The requests that were allowed, by the permission (group, resource, verb) they used."""
    out: dict[Permission, list[AuditEvent]] = defaultdict(list)
    for event in events:
        if event.permission is not None and event.authorized:
            out[event.permission].append(event)
    return dict(out)
