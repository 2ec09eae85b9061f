"""kopf handlers: thin glue between the API server and the reconcile core.

    kopf run -m recjob_operator.kube.handlers --standalone [--namespace NS | --all-namespaces]

One daemon per RecJob loops: observe the children (KubeBackend), read the canary metrics
when an analysis is due, reconcile, act, write the status (a resourceVersion-checked
patch of the status subresource, retried on 409), then sleep until the core wants to look
again or the RecJob changes. A RecJob that fails validation gets Phase Failed with every
problem in its message and is not acted on. Deleting a RecJob mid-rollout rolls its canary
back before the finalizer is released; children go with it (ownerReferences).
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime

import kopf
from kubernetes import client, config

from ..api.v1alpha1.status import TERMINAL_PHASES, RecJobStatus
from ..controller.reconcile import RollBack, analysis_due, reconcile, set_condition
from ..validation import validate_document
from . import metrics
from .backend import KubeBackend

#: Longest sleep between two looks at a RecJob (the core usually asks for less).
MAX_SLEEP = float(os.environ.get("RECJOB_MAX_SLEEP_SECONDS", "10"))
FINALIZER = "recjob.dev/finalizer"


def _api() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


BACKEND: KubeBackend | None = None


def backend() -> KubeBackend:
    """The process's backend (created on first use, after kopf has started)."""
    global BACKEND
    if BACKEND is None:
        BACKEND = KubeBackend(_api(), os.environ.get("RECJOB_PROMETHEUS_URL"))
    return BACKEND


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    """Our own finalizer name; status written by us, not by kopf's progress storage."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="recjob.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="recjob.dev", key="last-handled-configuration"
    )
    settings.posting.enabled = False  # our events come from the core, with reasons
    port = int(os.environ.get("RECJOB_METRICS_PORT", "8000"))
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, os.environ.get("RECJOB_METRICS_ADDRESS", "0.0.0.0"))


def _invalid_status(body: dict, problems: list) -> RecJobStatus:
    status = RecJobStatus.model_validate(body.get("status") or {}) if body.get("status") else None
    status = status or RecJobStatus()
    now = datetime.now(UTC)
    generation = body["metadata"].get("generation") or 1
    message = "; ".join(str(p) for p in problems)[:4000]
    status.phase, status.message, status.observed_generation = "Failed", message, generation
    set_condition(status, "Valid", False, "InvalidSpec", message, now, generation)
    return status


@kopf.daemon("recjob.dev", "v1alpha1", "recjobs", cancellation_timeout=10.0)
async def run_recjob(body: kopf.Body, stopped: kopf.DaemonStopped, logger, **_) -> None:
    """Reconcile one RecJob until it is deleted (``body`` is kopf's live view)."""
    kube = backend()
    while not stopped:
        document = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status")
                    if k in body}  # fmt: skip
        document["metadata"] = {
            k: v for k, v in dict(body["metadata"]).items()
            if k in ("name", "namespace", "labels", "annotations", "generation", "uid",
                     "resourceVersion")
        }  # fmt: skip
        recjob, problems = validate_document(document)
        if problems or recjob is None:
            await _write_invalid(kube, body, _invalid_status(dict(body), problems))
            await stopped.wait(MAX_SLEEP)
            continue
        if (
            recjob.status
            and recjob.status.phase in TERMINAL_PHASES
            and (recjob.status.observed_generation == recjob.generation)
        ):
            await stopped.wait(MAX_SLEEP)
            continue
        started = time.perf_counter()
        try:
            decision = await _reconcile_once(kube, recjob)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(
                recjob.metadata.namespace or "default", recjob.metadata.name
            ).inc()
            logger.exception("reconcile failed; retrying")
            await stopped.wait(MAX_SLEEP)
            continue
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        for event in decision.actions:
            if getattr(event, "reason", None) and hasattr(event, "message"):
                logger.info(f"[{event.reason}] {event.message}")
        await stopped.wait(min(decision.requeue_after or MAX_SLEEP, MAX_SLEEP))


async def _reconcile_once(kube: KubeBackend, recjob):
    """Observe, analyse when due, reconcile, act, write the status; record metrics."""
    now = datetime.now(UTC)
    observed = await asyncio.to_thread(kube.observe, recjob)
    due = analysis_due(recjob, now)
    readings = await asyncio.to_thread(kube.read_metrics, recjob) if due else None
    decision = reconcile(recjob, observed, readings, now)
    await asyncio.to_thread(kube.apply, recjob, decision.actions)
    if decision.status != recjob.status:
        await asyncio.to_thread(kube.write_status, recjob, decision.status)
    metrics.record(recjob, decision.status, decision.actions, readings is not None)
    return decision


async def _write_invalid(kube: KubeBackend, body: kopf.Body, status: RecJobStatus) -> None:
    from .backend import RECJOBS

    payload = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    if (body.get("status") or {}).get("message") == payload.get("message"):
        return
    await asyncio.to_thread(
        kube.custom.patch_namespaced_custom_object_status,
        *RECJOBS[:2], body["metadata"]["namespace"], RECJOBS[2], body["metadata"]["name"],
        {"status": payload},
    )  # fmt: skip


@kopf.on.delete("recjob.dev", "v1alpha1", "recjobs")
async def finalize(body: kopf.Body, logger, **_) -> None:
    """Roll an in-flight canary back before the RecJob goes (children are owned)."""
    status = body.get("status") or {}
    rollout = status.get("rollout") or {}
    if status.get("phase") != "RollingOut" or not rollout.get("canaryModelVersion"):
        return
    document = {k: body[k] for k in ("apiVersion", "kind", "spec") if k in body}
    document["metadata"] = {
        k: v for k, v in dict(body["metadata"]).items()
        if k in ("name", "namespace", "generation", "uid", "resourceVersion")
    }  # fmt: skip
    metrics.forget(body["metadata"].get("namespace") or "default", body["metadata"]["name"])
    recjob, _ = validate_document(document)
    if recjob is None:
        return
    action = RollBack(
        rollout["canaryModelVersion"], rollout.get("stableModelVersion"), "RecJob deleted"
    )
    await asyncio.to_thread(backend().apply, recjob, [action])
    logger.info(f"rolled back canary version {rollout['canaryModelVersion']}: RecJob deleted")
