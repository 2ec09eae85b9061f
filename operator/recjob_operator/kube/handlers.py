"""kopf handlers: thin glue between the API server and the reconcile core.

    kopf run -m recjob_operator.kube.handlers --standalone [--namespace NS | --all-namespaces]

Startup configures kopf, serves ``/healthz`` (:mod:`.health`) and the metrics, then waits
for the leader Lease (:mod:`.leader`): a standby replica stays inside startup, so kopf
neither watches nor writes anything until it leads; a leader that cannot renew exits.
kopf's own peering stays off (``--standalone``): it needs cluster-wide peering CRDs, and
only pauses handlers instead of guaranteeing one writer.

kopf watches the children (``@kopf.index``, server-side filtered to the operator's own
objects, see :mod:`.cache`). One daemon per RecJob loops: one pass of
:func:`.reconciler.reconcile_pass` (observe from the caches, read the canary metrics when
an analysis is due, reconcile, act, write the status with a resourceVersion precondition,
recomputed on 409), then sleeps until the core wants to look again, the RecJob's spec or
annotations change, one of its children changes (:mod:`.wakeups`: a RecJob waiting for its
PyTorchJob is not looked at every few seconds), or (after refused child writes) its
backoff ends. A RecJob that fails validation
gets Phase Failed with every problem in its message and is not acted on. Deleting a RecJob
mid-rollout rolls its canary back before the finalizer is released; children go with it
(ownerReferences). Nothing is created for a RecJob being deleted, nor in a namespace being
deleted (the API server's 403 NamespaceTerminating is final, not retried; a canary there is
not rolled back, its service goes with the namespace).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import kopf
from kubernetes import client, config

from ..api.semantics import SemanticsByGeneration
from ..api.semantics_federated import cluster_problems
from ..api.v1alpha1 import RecJob
from ..api.v1alpha1.common import FINALIZER
from ..api.v1alpha1.status import TERMINAL_PHASES, RecJobStatus
from ..api.validation import validate_document
from ..controller.reconcile import ReleaseService, RollBack, set_condition
from ..prometheus import PrometheusSources
from . import cache, gc_tuning, metrics
from .backend import KubeBackend
from .diffbase import AnnotationsProgressStorage, MemoryDiffBaseStorage
from .errors import ChildWriteError
from .health import HealthServer
from .leader import LeaseConfig, LeaseElector
from .reconciler import Backoff, NotLeading, PassResult, recjob_document, reconcile_pass
from .wakeups import Wakeups, recjob_key

log = logging.getLogger("recjob_operator.kube")
gc_tuning.tune_thresholds()

#: Longest sleep between two looks at a RecJob (the core usually asks for less).
MAX_SLEEP = float(os.environ.get("RECJOB_MAX_SLEEP_SECONDS", "10"))
#: Longest sleep of a RecJob waiting for its children: their changes wake it
#: (:mod:`.wakeups`); this look is only a safety net.
RESYNC_SECONDS = float(os.environ.get("RECJOB_RESYNC_SECONDS", "60"))
#: The daemons' wake-up flags, set by the watch handlers below.
WAKEUPS = Wakeups()
#: kopf's record of the last spec it handled, kept in memory (see :mod:`.diffbase`).
DIFFBASES = MemoryDiffBaseStorage()
#: Longest wait for kopf's finalizer on a new RecJob before its first pass.
SETTLE_SECONDS = 5.0
#: Threads for the blocking API calls (the reconcile passes run in asyncio's default
#: executor) and as many pooled connections to the API server; asyncio's own default,
#: min(32, cpus + 4), made RecJobs queue for a thread while others waited on the API server.
API_THREADS = max(1, int(os.environ.get("RECJOB_API_THREADS", "32")))


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def _api() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # one kept-alive connection per thread (urllib3 discards connections beyond the pool)
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize or 1, API_THREADS
    )
    return client.ApiClient(configuration)


class Runtime:
    """The process's singletons (created at startup, after kopf has started)."""

    backend: KubeBackend | None = None
    api_view: cache.ApiView | None = None
    uncached: frozenset[str] = frozenset()
    elector: LeaseElector | None = None
    renewer: asyncio.Task | None = None
    health: HealthServer | None = None
    serving = False
    lost = False


def backend() -> KubeBackend:
    """The process's backend (created on first use, after kopf has started)."""
    if Runtime.backend is None:
        api = _api()
        Runtime.backend = KubeBackend(api, PrometheusSources.from_env())
        Runtime.api_view = cache.ApiView(api)
    return Runtime.backend


def may_act() -> bool:
    """Whether this replica may write (it leads, or runs without leader election)."""
    return not Runtime.lost and (Runtime.elector is None or Runtime.elector.is_leading())


def exit_on_lost() -> None:
    """Leadership lapsed: nothing more may be written; exit (the Deployment restarts us)."""
    Runtime.lost = True
    log.critical("lost the leader Lease; exiting")
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(1)


#: What to do when leadership lapses (tests replace it).
ON_LOST: Callable[[], None] = exit_on_lost


def _health_state() -> dict:
    elector = Runtime.elector
    return {
        "healthy": not Runtime.lost,
        "leader": may_act(),
        "identity": elector.config.identity if elector else None,
    }


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, **_) -> None:
    """Configure kopf; serve health and metrics; wait until this replica leads."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = AnnotationsProgressStorage(prefix="recjob.dev")
    settings.persistence.diffbase_storage = DIFFBASES  # no annotation, no PATCH
    settings.posting.enabled = False  # our events come from the core, with reasons
    watch_crds = _flag("RECJOB_WATCH_CRDS", True)
    settings.scanning.disabled = not watch_crds  # namespaced mode: no cluster-wide lists
    selectors = {"pods": cache.POD_SELECTOR, "configmaps": cache.RECORD_SELECTOR}
    for group, version, plural in cache.INDEXES.values():
        if plural == "recjobs":  # the RecJobs themselves: all of them
            continue
        key = (version, plural) if not group else (group, version, plural)
        settings.watching.label_selectors[key] = selectors.get(plural, cache.MANAGED_SELECTOR)
    backend()
    if not Runtime.serving:  # once: kopf retries a startup handler that raised
        Runtime.serving = True
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(API_THREADS, thread_name_prefix="recjob-api")
        )
        port = int(os.environ.get("RECJOB_METRICS_PORT", "8000"))
        if port:
            from prometheus_client import start_http_server

            start_http_server(port, os.environ.get("RECJOB_METRICS_ADDRESS", "0.0.0.0"))
        if _flag("RECJOB_LEADER_ELECTION", True):
            Runtime.elector = LeaseElector.for_client(_api(), LeaseConfig.from_env())
        health_port = int(os.environ.get("RECJOB_HEALTH_PORT", "8080"))
        if health_port:
            address = os.environ.get("RECJOB_HEALTH_ADDRESS", "0.0.0.0")
            Runtime.health = HealthServer(_health_state, address, health_port)
            try:
                await Runtime.health.start()
            except OSError as error:  # in a pod, the failing probes restart the container
                log.error("no health endpoint on %s:%s: %s", address, health_port, error)
    assert Runtime.api_view is not None
    if not watch_crds:  # kopf will not notice a CRD installed later: read those kinds
        Runtime.uncached = await asyncio.to_thread(cache.unserved_kinds, Runtime.api_view.api)
    if Runtime.uncached:
        log.warning("not cached (API group absent at startup; restart the operator once it "
                    "is installed): %s", ", ".join(sorted(Runtime.uncached)))  # fmt: skip
    gc_tuning.freeze_startup_objects()  # everything loaded and built so far stays
    if Runtime.elector is not None:
        await Runtime.elector.acquire()
        Runtime.renewer = asyncio.create_task(Runtime.elector.keep_renewing(ON_LOST))


@kopf.on.cleanup()
async def stop(**_) -> None:
    """Hand the Lease over at once (daemons are stopped by now); stop the health server."""
    if Runtime.renewer is not None:
        Runtime.renewer.cancel()
    if Runtime.elector is not None:
        await Runtime.elector.release_async()
    if Runtime.health is not None:
        await Runtime.health.stop()


# ------------------------------------------------------------------ caches of the children
@kopf.index(*cache.KUBEFLOW, id="recjob_pytorchjobs")
async def recjob_pytorchjobs(body: kopf.Body, **_) -> dict:
    """PyTorchJobs by (namespace, name)."""
    return cache.index_pytorchjob(body)


@kopf.index(*cache.BATCH_JOBS, id="recjob_jobs")
async def recjob_jobs(body: kopf.Body, **_) -> dict:
    """batch Jobs by (namespace, name)."""
    return cache.index_job(body)


@kopf.index(*cache.KSERVE, id="recjob_inferenceservices")
async def recjob_inferenceservices(body: kopf.Body, **_) -> dict:
    """InferenceServices by (namespace, name)."""
    return cache.index_inferenceservice(body)


@kopf.index("v1", "configmaps", id="recjob_records")
async def recjob_records(body: kopf.Body, **_) -> dict:
    """Service records by (namespace, name)."""
    return cache.index_record(body)


@kopf.index(*cache.HTTPROUTES, id="recjob_httproutes")
async def recjob_httproutes(body: kopf.Body, **_) -> dict:
    """HTTPRoutes by (namespace, name)."""
    return cache.index_httproute(body)


@kopf.index("recjob.dev", "v1alpha1", "recjobs", id="recjob_services")
async def recjob_services(body: kopf.Body, **_) -> dict:
    """RecJobs by (namespace, service): who waits for a service."""
    return cache.index_recjob_service(body)


@kopf.index("v1", "pods", id="recjob_pods")
async def recjob_pods(body: kopf.Body, **_) -> dict:
    """Termination messages of finished child pods by (namespace, child kind, name)."""
    return cache.index_pod(body)


#: Termination messages of child pods deleted before a pass read them.
DELETED_POD_MESSAGES = cache.DeletedPodMessages()


@kopf.on.event("v1", "pods")
async def pod_changed(event: dict, body: kopf.Body, **_) -> None:
    """Wake the pod's RecJob; keep a deleted child pod's termination message (the index
    forgets the pod)."""
    if event.get("type") == "DELETED":
        DELETED_POD_MESSAGES.remember(body)
    WAKEUPS.child_changed(body)


@kopf.on.event(*cache.KUBEFLOW)
@kopf.on.event(*cache.BATCH_JOBS)
@kopf.on.event(*cache.KSERVE)
@kopf.on.event("v1", "configmaps")
@kopf.on.event(*cache.HTTPROUTES)
async def child_changed(body: kopf.Body, **_) -> None:
    """A child (added, changed, deleted; kopf has updated its cache): wake its RecJob."""
    WAKEUPS.child_changed(body)


@kopf.on.event("recjob.dev", "v1alpha1", "recjobs")
async def recjob_changed(event: dict, body: kopf.Body, **_) -> None:
    """A spec edit or new annotation wakes the RecJob; one gone for good: drop kopf's
    in-memory diff-base and the wake-up flag of it."""
    WAKEUPS.recjob_changed(event.get("type"), body)
    if event.get("type") == "DELETED":
        DIFFBASES.forget(body.get("metadata", {}).get("uid") or "")


# ------------------------------------------------------------------ the RecJobs
def _invalid_status(body: dict, problems: list) -> RecJobStatus:
    status = RecJobStatus.model_validate(body.get("status") or {}) if body.get("status") else None
    status = status or RecJobStatus()
    now = datetime.now(UTC)
    generation = body["metadata"].get("generation") or 1
    message = "; ".join(str(p) for p in problems)[:4000]
    status.phase, status.message, status.observed_generation = "Failed", message, generation
    set_condition(status, "Valid", False, "InvalidSpec", message, now, generation)
    return status


async def _sleep(stopped: kopf.DaemonStopped, body: kopf.Body, seconds: float) -> None:
    """Sleep ``seconds``, waking early when the RecJob's spec or annotations or one of its
    children change (:data:`WAKEUPS`) or kopf stops the daemon."""
    await WAKEUPS.sleep(recjob_key(body), stopped, seconds)


#: The custom kinds (which may be read without a watch) a RecJob waits for, by its phase;
#: batch Jobs, pods and ConfigMaps are always watched.
WAITED_KINDS = {"Training": {"pytorchjobs"}, "RollingOut": {"inferenceservices", "httproutes"}}


def _next_look(result: PassResult) -> float:
    """Seconds until the next pass after a successful one: the core's deadline, at most
    :data:`MAX_SLEEP`; while it only waits for its children, whose changes wake it, at most
    :data:`RESYNC_SECONDS` (:data:`MAX_SLEEP` if it waits for a kind read without a watch)."""
    waiting = result.decision is not None and result.decision.wait_for_children
    phase = result.recjob.status.phase if result.recjob.status else None
    if waiting and not WAITED_KINDS.get(phase or "", set()) & Runtime.uncached:
        limit = RESYNC_SECONDS
    else:
        limit = MAX_SLEEP
    return min(result.requeue_after or limit, limit)


async def _kopf_settled(stopped: kopf.DaemonStopped, body: kopf.Body) -> None:
    """Until kopf has added its finalizer to a new RecJob (at most :data:`SETTLE_SECONDS`):
    a status written before it would conflict (409, re-read, recompute)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while not stopped and (left := deadline - time.monotonic()) > 0:
        if FINALIZER in ((body.get("metadata") or {}).get("finalizers") or []):
            return
        await stopped.wait(min(left, 0.1))


@kopf.daemon("recjob.dev", "v1alpha1", "recjobs", cancellation_timeout=10.0)
async def run_recjob(body: kopf.Body, stopped: kopf.DaemonStopped, logger, **kwargs) -> None:
    """Reconcile one RecJob until it is deleted (``body`` is kopf's live view)."""
    kube = backend()
    assert Runtime.api_view is not None
    view = cache.IndexView({i: kwargs[i] for i in cache.INDEXES}, Runtime.api_view,
                           Runtime.uncached, DELETED_POD_MESSAGES)  # fmt: skip
    backoff, semantics = Backoff(), SemanticsByGeneration()
    # valid RecJobs by resourceVersion: a pass validates only a version it has not seen (the
    # API types parse each version once; 11% of the operator's CPU was parsing versions
    # already parsed, at 1,000 new RecJobs). The version this daemon wrote stands for both
    # the one it read (until the watch brings the write) and itself.
    known: dict[str, RecJob] = {}
    # from now on a child's change is kept until the next sleep (the first pass reads the
    # caches as they were after every change before this)
    WAKEUPS.flag(recjob_key(body))
    await _kopf_settled(stopped, body)
    while not stopped:
        if not may_act() or (body.get("metadata") or {}).get("deletionTimestamp"):
            # being deleted: kopf stops this daemon once its watch has the deletion; until
            # then nothing is created (children being deleted would be re-created)
            await stopped.wait(MAX_SLEEP)
            continue
        recjob = known.get((body.get("metadata") or {}).get("resourceVersion", ""))
        problems = []
        if recjob is None:
            recjob, problems = validate_document(recjob_document(dict(body)), semantics)
        if recjob is not None and not problems:
            problems = cluster_problems(recjob)
        if problems or recjob is None:
            known.clear()
            await _write_invalid(kube, body, _invalid_status(dict(body), problems))
            await _sleep(stopped, body, MAX_SLEEP)
            continue
        if recjob.metadata.resource_version not in known:
            known = {recjob.metadata.resource_version: recjob}
        status = recjob.status
        if (
            status
            and status.phase in TERMINAL_PHASES
            and (status.observed_generation == recjob.generation)
        ):
            await _sleep(stopped, body, MAX_SLEEP)
            continue
        ns, name = recjob.metadata.namespace or "default", recjob.metadata.name
        WAKEUPS.follow((ns, name), recjob.service_name)  # its service's objects wake it too
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(
                reconcile_pass, kube, view, recjob, backoff, may_act=may_act
            )
        except NotLeading:
            continue
        except Exception:
            metrics.RECONCILE_ERRORS.labels(ns, name).inc()
            logger.exception("reconcile failed; retrying")
            await _sleep(stopped, body, backoff.failed())
            continue
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        if result.recjob is not recjob:  # written
            versions = (recjob.metadata.resource_version, result.recjob.metadata.resource_version)
            known = dict.fromkeys(versions, result.recjob)
        if result.decision is not None:
            metrics.record(
                result.recjob, result.decision.status, list(result.applied), result.analysed
            )
            for event in result.decision.actions:
                if getattr(event, "reason", None) and hasattr(event, "message"):
                    logger.info(f"[{event.reason}] {event.message}")
        if result.terminating:  # the namespace is going: wait for the RecJob's deletion
            await stopped.wait()
            continue
        if result.failure is not None:
            logger.warning(f"{result.failure}; next try in {result.requeue_after:.0f}s")
            await _sleep(stopped, body, result.requeue_after or MAX_SLEEP)
        else:
            await _sleep(stopped, body, _next_look(result))


async def _write_invalid(kube: KubeBackend, body: kopf.Body, status: RecJobStatus) -> None:
    payload = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    if (body.get("status") or {}).get("message") == payload.get("message") or not may_act():
        return
    meta = body["metadata"]
    await asyncio.to_thread(kube.write_status_body, meta["namespace"], meta["name"], payload)


@kopf.on.delete("recjob.dev", "v1alpha1", "recjobs")
async def finalize(body: kopf.Body, logger, **_) -> None:
    """Roll an in-flight canary back and let go of the service before the RecJob goes
    (its other children are owned and garbage-collected, but for a federation's silos in
    other namespaces, deleted here)."""
    status = body.get("status") or {}
    rollout = status.get("rollout") or {}
    ns, name = body["metadata"].get("namespace") or "default", body["metadata"]["name"]
    metrics.forget(ns, name)
    if ((body.get("spec") or {}).get("training") or {}).get("federated"):
        if not may_act():
            raise kopf.TemporaryError("not the leader", delay=MAX_SLEEP)
        await asyncio.to_thread(backend().delete_silos_elsewhere, ns, name)
    if status.get("phase") != "RollingOut":
        return
    if not may_act():
        raise kopf.TemporaryError("not the leader", delay=MAX_SLEEP)
    recjob, _ = validate_document(recjob_document(dict(body)))
    if recjob is None:
        return
    actions: list = [ReleaseService()]
    if rollout.get("canaryModelVersion"):
        actions.insert(0, RollBack(
            rollout["canaryModelVersion"], rollout.get("stableModelVersion"), "RecJob deleted"
        ))  # fmt: skip
    try:
        await asyncio.to_thread(backend().apply, recjob, actions)
    except ChildWriteError as error:
        if not error.namespace_terminating:
            raise
        # the whole namespace is being deleted, its service with it: nothing to roll back to
        logger.info(f"namespace being deleted; canary not rolled back: {error}")
        return
    if len(actions) == 1:
        logger.info("released its service: RecJob deleted")
        return
    logger.info(f"rolled back canary version {rollout['canaryModelVersion']}: RecJob deleted")
