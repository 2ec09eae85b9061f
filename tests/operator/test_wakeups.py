"""Waking a RecJob's daemon when its children change (kube/wakeups.py), with kopf's own
daemon stopper."""

from __future__ import annotations

import asyncio

from kopf._cogs.aiokits.aioenums import FlagSetter

from recjob_operator.kube.wakeups import Wakeups

NS = "shop"


def child(name: str, **labels: str) -> dict:
    return {"metadata": {"namespace": NS, "name": name, "labels": labels}}


def recjob(name: str, generation: int = 1, **annotations: str) -> dict:
    meta = {"namespace": NS, "name": name, "generation": generation, "annotations": annotations}
    return {"metadata": meta}


async def sleeping(wakeups: Wakeups, name: str, stopped, seconds: float = 5.0):
    """A started sleep of ``name`` (a task) once it waits."""
    task = asyncio.ensure_future(wakeups.sleep((NS, name), stopped, seconds))
    await asyncio.sleep(0.01)
    assert not task.done()
    return task


def test_a_child_wakes_its_recjob_and_no_other() -> None:
    async def main() -> None:
        wakeups, stopped = Wakeups(), FlagSetter().async_waiter
        a, b = await sleeping(wakeups, "a", stopped), await sleeping(wakeups, "b", stopped, 0.5)
        wakeups.child_changed(child("a-g1-train", **{"recjob.dev/recjob": "a"}))
        assert await asyncio.wait_for(a, 1) is True
        await asyncio.sleep(0.05)
        assert not b.done()
        wakeups.child_changed(child("unrelated"))  # no label: nobody
        assert await asyncio.wait_for(b, 2) is False  # its time ran out

    asyncio.run(main())


def test_a_change_while_the_recjob_was_busy_is_not_lost() -> None:
    async def main() -> None:
        wakeups, stopped = Wakeups(), FlagSetter().async_waiter
        wakeups.flag((NS, "a"))  # its daemon exists (between two sleeps)
        wakeups.child_changed(child("a-g1-train", **{"recjob.dev/recjob": "a"}))
        assert await wakeups.sleep((NS, "a"), stopped, 5) is True  # at once
        assert await wakeups.sleep((NS, "a"), stopped, 0.05) is False  # consumed

    asyncio.run(main())


def test_service_objects_wake_the_recjobs_that_follow_the_service() -> None:
    async def main() -> None:
        wakeups, stopped = Wakeups(), FlagSetter().async_waiter
        wakeups.follow((NS, "a"), "svc")
        wakeups.follow((NS, "b"), "svc")
        a, b = await sleeping(wakeups, "a", stopped), await sleeping(wakeups, "b", stopped)
        wakeups.child_changed(child("svc", **{"recjob.dev/service": "svc"}))
        assert await asyncio.wait_for(a, 1) and await asyncio.wait_for(b, 1)
        wakeups.follow((NS, "a"), "other")  # its spec now names another service
        a = await sleeping(wakeups, "a", stopped, 0.2)
        wakeups.child_changed(child("svc", **{"recjob.dev/service": "svc"}))
        assert await asyncio.wait_for(a, 1) is False

    asyncio.run(main())


def test_spec_edits_and_annotations_wake_a_recjob_its_status_writes_do_not() -> None:
    async def main() -> None:
        wakeups, stopped = Wakeups(), FlagSetter().async_waiter
        wakeups.recjob_changed("ADDED", recjob("a"))
        task = await sleeping(wakeups, "a", stopped, 0.3)
        written = recjob("a")
        written["status"] = {"phase": "Training"}
        wakeups.recjob_changed("MODIFIED", written)  # its own status write
        assert await asyncio.wait_for(task, 1) is False
        for changed in (
            recjob("a", generation=2),
            recjob("a", generation=2, **{"recjob.dev/approve-generation": "2"}),
        ):
            task = await sleeping(wakeups, "a", stopped)
            wakeups.recjob_changed("MODIFIED", changed)
            assert await asyncio.wait_for(task, 1) is True
        wakeups.follow((NS, "a"), "svc")
        wakeups.recjob_changed("DELETED", recjob("a", generation=2))
        assert wakeups._flags == {} and wakeups._followers == {} and wakeups._seen == {}

    asyncio.run(main())


def test_the_daemon_being_stopped_ends_the_sleep() -> None:
    async def main() -> None:
        wakeups, setter = Wakeups(), FlagSetter()
        task = await sleeping(wakeups, "a", setter.async_waiter, 30)
        setter.set()
        assert await asyncio.wait_for(task, 1) is False
        assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    asyncio.run(main())
