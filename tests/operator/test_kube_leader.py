"""Leader election on a coordination.k8s.io/v1 Lease, against a real API server (envtest,
or a whole cluster: see kube_target.py). Candidates get fake monotonic clocks: expiry is
judged by each candidate's own clock, so the tests move time instead of waiting for it,
and the API server's optimistic concurrency (resourceVersion, 409) is the real one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import httpx
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from recjob_operator.kube.health import HealthServer
from recjob_operator.kube.leader import LeaseConfig, LeaseElector, micro_time
from recjob_operator.local.backend import free_port
from tests.operator.kube_target import kube_target, unique


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with kube_target(tmp_path_factory.mktemp("leader")) as target:
        yield target


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lease(target):
    """A fresh Lease name (deleted afterwards) and a factory of candidates for it."""
    name = unique("recjob-lease")
    api = client.CoordinationV1Api(target.api)

    def candidate(identity: str, **timing) -> tuple[LeaseElector, Clock]:
        clock = Clock()
        config = LeaseConfig(namespace=target.namespace, identity=identity, name=name, **timing)
        return LeaseElector(api, config, clock=clock), clock

    yield SimpleNamespace(name=name, api=api, candidate=candidate, namespace=target.namespace)
    with contextlib.suppress(ApiException):
        api.delete_namespaced_lease(name, target.namespace)


def holder(lease) -> client.V1LeaseSpec:
    return lease.api.read_namespaced_lease(lease.name, lease.namespace).spec


def test_the_first_candidate_leads_and_the_other_waits(lease) -> None:
    a, _ = lease.candidate("a")
    b, _ = lease.candidate("b")
    assert a.try_acquire_or_renew() and a.is_leading()
    assert not b.try_acquire_or_renew() and not b.is_leading()
    spec = holder(lease)
    assert spec.holder_identity == "a" and spec.lease_duration_seconds == 15
    assert a.try_acquire_or_renew()  # renewing keeps acquireTime, moves renewTime
    renewed = holder(lease)
    assert renewed.acquire_time == spec.acquire_time and renewed.renew_time >= spec.renew_time


def test_the_standby_takes_over_after_the_lease_duration_by_its_own_clock(lease) -> None:
    a, a_clock = lease.candidate("a")
    b, b_clock = lease.candidate("b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b sees a's record now
    b_clock.now += 14
    assert not b.try_acquire_or_renew()  # not expired yet
    assert a.try_acquire_or_renew()  # a renews: b sees the record change ...
    b_clock.now += 14
    assert not b.try_acquire_or_renew()  # ... and counts from there
    b_clock.now += 15.5  # a died: no renewal for longer than the lease duration
    assert b.try_acquire_or_renew() and b.is_leading()
    spec = holder(lease)
    assert spec.holder_identity == "b" and spec.lease_transitions == 1
    a_clock.now += 1  # a comes back (a stalled process): it must not lead any more
    assert not a.try_acquire_or_renew() and not a.is_leading()


def test_a_leader_that_cannot_renew_stops_within_the_renew_deadline(lease) -> None:
    a, clock = lease.candidate("a")
    assert a.try_acquire_or_renew()

    class Unreachable:
        def __getattr__(self, _):
            def fail(*args, **kwargs):
                raise ConnectionError("API server unreachable")

            return fail

    a.api = Unreachable()
    clock.now += 9.5
    assert not a.try_acquire_or_renew() and a.is_leading()  # still within the deadline
    clock.now += 0.6
    assert not a.is_leading()  # 10 s without renewal: < lease duration, so before takeover


def test_a_leaders_requests_may_take_what_is_left_of_its_renew_deadline(lease) -> None:
    """A slow API server: a leader's Lease request may take until its renew deadline (not
    the retry period), a candidate's the retry period."""
    timeouts: list[float] = []

    class Recording:
        def __getattr__(self, attribute):
            method = getattr(lease.api, attribute)

            def call(*args, **kwargs):
                timeouts.append(kwargs["_request_timeout"])
                return method(*args, **kwargs)

            return call

    a, clock = lease.candidate("a")
    assert a.try_acquire_or_renew()
    a.api = Recording()
    clock.now += 3
    assert a.try_acquire_or_renew()
    assert timeouts == [pytest.approx(7.0)] * 2  # the GET and the PUT of the renewal
    b, _ = lease.candidate("b")
    b.api = Recording()
    timeouts.clear()
    assert not b.try_acquire_or_renew()
    assert timeouts == [2.0]


def test_of_two_candidates_taking_an_expired_lease_one_wins(lease) -> None:
    dead, _ = lease.candidate("dead")
    assert dead.try_acquire_or_renew()
    a, a_clock = lease.candidate("a")
    b, b_clock = lease.candidate("b")
    assert not a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    a_clock.now += 16
    b_clock.now += 16
    stale = lease.api.read_namespaced_lease(lease.name, lease.namespace)
    assert a.try_acquire_or_renew()  # a takes over first

    class ReadBeforeA:  # b read the Lease before a wrote it, then writes
        def __getattr__(self, attribute):
            return getattr(lease.api, attribute)

        def read_namespaced_lease(self, *args, **kwargs):
            return stale

    b.api = ReadBeforeA()
    assert not b.try_acquire_or_renew() and not b.is_leading()  # 409 on the stale version
    assert holder(lease).holder_identity == "a"


def test_a_released_lease_is_taken_at_once(lease) -> None:
    a, _ = lease.candidate("a")
    b, _ = lease.candidate("b")
    assert a.try_acquire_or_renew() and not b.try_acquire_or_renew()
    assert a.release() and not a.is_leading()
    assert holder(lease).holder_identity in (None, "")
    assert b.try_acquire_or_renew()  # no waiting for the lease duration
    assert holder(lease).holder_identity == "b"
    assert not a.release()  # only a holder releases


def test_the_renewer_reports_a_lost_lease(lease) -> None:
    timing = {"lease_duration": 0.6, "renew_deadline": 0.4, "retry_period": 0.1}
    a, _ = lease.candidate("a", **timing)
    a.clock = time.monotonic
    lost: list[bool] = []

    async def scenario() -> None:
        await a.acquire()
        renewer = asyncio.create_task(a.keep_renewing(lambda: lost.append(True)))
        await asyncio.sleep(0.5)
        assert a.is_leading() and not lost  # renewing fine
        a.api = SimpleNamespace(read_namespaced_lease=lambda *a, **k: 1 / 0)
        await asyncio.wait_for(renewer, 3)

    asyncio.run(scenario())
    assert lost == [True] and not a.is_leading()


def test_lease_settings() -> None:
    with pytest.raises(ValueError, match="lease_duration > renew_deadline"):
        LeaseConfig(namespace="n", identity="i", lease_duration=10, renew_deadline=10)
    config = LeaseConfig.from_env({"POD_NAME": "op-1", "POD_NAMESPACE": "ops",
                                   "RECJOB_LEASE_DURATION_SECONDS": "30"})  # fmt: skip
    assert (config.identity, config.namespace, config.name) == ("op-1", "ops", "recjob-operator")
    assert config.lease_duration == 30 and config.renew_deadline == 10
    unnamed = LeaseConfig.from_env({"POD_NAMESPACE": "ops"})
    assert unnamed.identity != LeaseConfig.from_env({"POD_NAMESPACE": "ops"}).identity
    assert micro_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000001Z"


def test_the_health_endpoint_answers_for_leader_and_standby() -> None:
    state = {"healthy": True, "leader": False, "identity": "op-1"}
    port = free_port()

    async def scenario() -> list[tuple[int, dict]]:
        server = HealthServer(lambda: dict(state), "127.0.0.1", port)
        await server.start()
        answers = []
        async with httpx.AsyncClient() as http:
            for healthy in (True, False):
                state["healthy"] = healthy
                response = await http.get(f"http://127.0.0.1:{port}/healthz")
                answers.append((response.status_code, json.loads(response.text)))
        await server.stop()
        return answers

    (ok, standby), (code, _) = asyncio.run(scenario())
    assert ok == 200 and standby == {"healthy": True, "leader": False, "identity": "op-1"}
    assert code == 503
