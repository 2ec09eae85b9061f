"""Leader election on a coordination.k8s.io/v1 Lease, so two operator replicas run safely.

Only the replica holding the Lease (``recjob-operator`` in the operator's namespace)
reconciles; the other waits, and takes over once the holder has not renewed for the
Lease's duration. The algorithm is client-go's ``leaderelection``:

- a candidate reads the Lease; absent -> it creates it (409 = someone else was first);
- held by another identity whose record changed less than ``leaseDurationSeconds`` ago
  *by this candidate's clock* (the local time it last saw the record change, never the
  holder's timestamps: no clock-skew assumptions) -> it waits;
- otherwise it replaces the Lease with itself as holder, with the resourceVersion it read
  as precondition (optimistic concurrency: of two candidates, one gets 409);
- the leader renews every ``retry_period``; :meth:`LeaseElector.is_leading` is true only
  within ``renew_deadline`` (< lease duration) of its last successful renewal, and a
  leader that cannot renew for that long gives up (the operator exits and the Deployment
  restarts it) before any other replica may take over;
- on a clean shutdown the leader releases the Lease (empty holder), so a standby takes
  over at its next try instead of after a full lease duration.

Why not ``kubernetes.leaderelection``: it does have a Lease lock (``LeaseLock``), but it is
thread-based (blocking ``run()`` with callbacks in daemon threads), uses the default
client configuration, ``sys.exit``s on bad settings and cannot release on shutdown; this
small elector is asyncio-friendly, takes its API object and clocks as arguments (unit
tests drive it with fake time) and releases.

Identity: ``POD_NAME`` (downward API; a restarted container in the same pod takes its own
Lease back at once, safe because the previous process is gone), else host name + a random
suffix. Namespace: ``POD_NAMESPACE``, else the service account's namespace, else
``default``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import metrics

log = logging.getLogger("recjob_operator.kube.leader")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    return float(environ.get(name) or default)


@dataclass(frozen=True)
class LeaseConfig:
    """Where the Lease is, who we are, and the timing (client-go's defaults)."""

    namespace: str
    identity: str
    name: str = "recjob-operator"
    lease_duration: float = 15.0
    """A holder that has not renewed for this long may be replaced."""
    renew_deadline: float = 10.0
    """A leader that has not renewed for this long stops leading."""
    retry_period: float = 2.0
    """Between two tries (to acquire, or to renew)."""

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > 1.2 * self.retry_period > 0:
            raise ValueError(
                "leader election needs lease_duration > renew_deadline > 1.2 * retry_period "
                f"> 0 (got {self.lease_duration}, {self.renew_deadline}, {self.retry_period})"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> LeaseConfig:
        """From ``POD_NAME``, ``POD_NAMESPACE`` and ``RECJOB_LEASE_*`` (see the README)."""
        return cls(
            namespace=default_namespace(environ),
            identity=default_identity(environ),
            name=environ.get("RECJOB_LEASE_NAME") or "recjob-operator",
            lease_duration=_seconds(environ, "RECJOB_LEASE_DURATION_SECONDS", 15.0),
            renew_deadline=_seconds(environ, "RECJOB_LEASE_RENEW_DEADLINE_SECONDS", 10.0),
            retry_period=_seconds(environ, "RECJOB_LEASE_RETRY_PERIOD_SECONDS", 2.0),
        )


def default_identity(environ: Mapping[str, str] = os.environ) -> str:
    """``POD_NAME``, else ``<hostname>_<random>`` (unique per process)."""
    return environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:10]}"


def default_namespace(environ: Mapping[str, str] = os.environ) -> str:
    """``POD_NAMESPACE``, else the service account's namespace, else ``default``."""
    if environ.get("POD_NAMESPACE"):
        return environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def micro_time(moment: datetime) -> str:
    """A MicroTime (RFC 3339, always 6 fractional digits; the Python client re-serialises
    with ``isoformat()``, which drops them at exactly 0 microseconds)."""
    moment = moment.astimezone(UTC)
    if moment.microsecond == 0:
        moment = moment.replace(microsecond=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """One candidate. :meth:`try_acquire_or_renew` is one synchronous round (tests call it
    directly); :meth:`acquire` and :meth:`keep_renewing` are the asyncio loops."""

    def __init__(
        self,
        api: Any,
        config: LeaseConfig,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        """``api``: a ``CoordinationV1Api`` (or an object with its lease methods)."""
        self.api, self.config, self.clock, self.wall = api, config, clock, wall
        self._observed: tuple | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def for_client(cls, api: client.ApiClient, config: LeaseConfig) -> LeaseElector:
        """An elector with its own CoordinationV1Api on ``api``."""
        return cls(client.CoordinationV1Api(api), config)

    # ------------------------------------------------------------------ state
    def is_leading(self) -> bool:
        """Whether this candidate holds the Lease (renewed within the renew deadline)."""
        return self._renewed_at is not None and (
            self.clock() - self._renewed_at < self.config.renew_deadline
        )

    def request_timeout(self) -> float:
        """Seconds one Lease request may take. A leader's: what is left of its renew
        deadline (client-go bounds a renewal by the deadline, not each request: an API
        server busy deleting 2,000 RecJobs answered a Lease GET in over 2 s, and with 2 s
        per request the leader gave up with 8 s of its deadline left). A candidate's: the
        retry period (at least 1 s)."""
        floor = max(self.config.retry_period, 1.0)
        if self._renewed_at is None:
            return floor
        return max(floor, self.config.renew_deadline - (self.clock() - self._renewed_at))

    def _call(self, verb: str, method: Callable, *args) -> Any:
        timeout = self.request_timeout()
        return metrics.api_call(verb, "leases", method, *args, _request_timeout=timeout)

    def _spec(self, acquired: str, transitions: int, holder: str | None = None) -> dict:
        return {
            "holderIdentity": self.config.identity if holder is None else holder,
            "leaseDurationSeconds": max(1, math.ceil(self.config.lease_duration)),
            "acquireTime": acquired,
            "renewTime": micro_time(self.wall()),
            "leaseTransitions": transitions,
        }

    # ------------------------------------------------------------------ one round
    def try_acquire_or_renew(self) -> bool:
        """One round: create, take over or renew the Lease. True when we hold it."""
        cfg, now = self.config, self.clock()
        try:
            lease = self._call("get", self.api.read_namespaced_lease, cfg.name, cfg.namespace)
        except ApiException as error:
            if error.status != 404:
                log.info("cannot read lease %s/%s: %s", cfg.namespace, cfg.name, error.reason)
                return False
            return self._create(now)
        except Exception as error:  # unreachable API server, timeout
            log.info("cannot read lease %s/%s: %s", cfg.namespace, cfg.name, error)
            return False
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        record = (holder, spec.renew_time, spec.acquire_time, spec.lease_duration_seconds)
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = spec.lease_duration_seconds or cfg.lease_duration
        if holder and holder != cfg.identity:
            self._renewed_at = None  # whatever we thought, another candidate holds it
            if now < self._observed_at + duration:
                return False  # and it has not expired
        transitions = spec.lease_transitions or 0
        if holder == cfg.identity and spec.acquire_time is not None:
            acquired = micro_time(spec.acquire_time)
        else:
            acquired, transitions = micro_time(self.wall()), transitions + 1
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": cfg.name,
                "namespace": cfg.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": self._spec(acquired, transitions),
        }
        try:
            self._call("update", self.api.replace_namespaced_lease, cfg.name, cfg.namespace, body)
        except ApiException as error:  # 409: another candidate was faster
            log.info("lease %s/%s not taken: %s", cfg.namespace, cfg.name, error.reason)
            return False
        except Exception as error:
            log.info("lease %s/%s not renewed: %s", cfg.namespace, cfg.name, error)
            return False
        if not self.is_leading():
            log.info("%s holds lease %s/%s (holder was %r)", cfg.identity, cfg.namespace,
                     cfg.name, holder or None)  # fmt: skip
        self._renewed_at = now
        return True

    def _create(self, now: float) -> bool:
        cfg = self.config
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": cfg.name, "namespace": cfg.namespace},
            "spec": self._spec(micro_time(self.wall()), 0),
        }
        try:
            self._call("create", self.api.create_namespaced_lease, cfg.namespace, body)
        except Exception as error:  # 409: created by another candidate meanwhile
            log.info("lease %s/%s not created: %s", cfg.namespace, cfg.name, error)
            return False
        log.info("%s created and holds lease %s/%s", cfg.identity, cfg.namespace, cfg.name)
        self._renewed_at = now
        return True

    def release(self) -> bool:
        """Give the Lease up (empty holder) if we hold it; True when released."""
        if not self.is_leading():
            return False
        cfg = self.config
        self._renewed_at = None
        try:
            lease = self._call("get", self.api.read_namespaced_lease, cfg.name, cfg.namespace)
            if (lease.spec.holder_identity if lease.spec else None) != cfg.identity:
                return False
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": cfg.name,
                    "namespace": cfg.namespace,
                    "resourceVersion": lease.metadata.resource_version,
                },
                "spec": {
                    **self._spec(micro_time(self.wall()), lease.spec.lease_transitions or 0, ""),
                    "leaseDurationSeconds": 1,
                },
            }
            self._call("update", self.api.replace_namespaced_lease, cfg.name, cfg.namespace, body)
        except Exception as error:
            log.warning("lease %s/%s not released: %s", cfg.namespace, cfg.name, error)
            return False
        log.info("%s released lease %s/%s", cfg.identity, cfg.namespace, cfg.name)
        return True

    # ------------------------------------------------------------------ asyncio loops
    async def _round(self, function: Callable[[], bool]) -> bool:
        # a thread of its own: busy reconcile threads must not delay a renewal
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="recjob-lease")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def _jittered(self) -> float:
        return self.config.retry_period * (1.0 + 0.2 * random.random())

    async def acquire(self) -> None:
        """Return once this candidate leads (tries every retry period, jittered)."""
        cfg = self.config
        log.info("%s waiting for lease %s/%s", cfg.identity, cfg.namespace, cfg.name)
        while True:
            try:
                if await self._round(self.try_acquire_or_renew):
                    break
            except Exception:
                log.exception("acquiring lease %s/%s failed", cfg.namespace, cfg.name)
            await asyncio.sleep(self._jittered())
        metrics.LEADER.set(1)

    async def keep_renewing(self, on_lost: Callable[[], None]) -> None:
        """Renew every retry period; call ``on_lost`` once leadership has lapsed (no
        successful renewal within the renew deadline) and return."""
        while True:
            await asyncio.sleep(self.config.retry_period)
            try:
                await self._round(self.try_acquire_or_renew)
            except Exception:  # a failed round, whatever failed: the deadline decides
                log.exception("renewing lease %s/%s failed", self.config.namespace,
                              self.config.name)  # fmt: skip
            if not self.is_leading():
                metrics.LEADER.set(0)
                log.error(
                    "%s could not renew lease %s/%s for %.0fs: no longer leading",
                    self.config.identity, self.config.namespace, self.config.name,
                    self.config.renew_deadline,
                )  # fmt: skip
                on_lost()
                return

    async def release_async(self) -> bool:
        """:meth:`release` from the event loop."""
        released = await self._round(self.release)
        metrics.LEADER.set(0)
        return released
