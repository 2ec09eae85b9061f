"""``recjob run FILE``: one RecJob on this machine, driven by the operator's reconcile core.

The loop is the operator's: observe, read the canary metrics when an analysis is due,
reconcile, act, write the status — every second until the RecJob reaches a terminal
phase. The status lives in ``<workdir>/<name>/status.yaml``: a run that is killed and
started again continues from it (children that kept running are adopted, a training run
resumes from its checkpoint). Editing the file's spec starts a new generation, as
``kubectl apply`` would. Ctrl-C / SIGTERM stops every child process; serving processes
stop when the run ends, so nothing is left listening.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import TERMINAL_PHASES, RecJobStatus
from ..controller.reconcile import analysis_due, reconcile
from .backend import LocalBackend
from .options import LocalOptions
from .workdir import write_atomic

#: Exit status of `recjob run` per terminal phase.
EXIT_CODES = {"Succeeded": 0, "Failed": 1, "RolledBack": 3}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM."""


def spec_digest(recjob: RecJob) -> str:
    """Digest of the spec: a change is a new generation."""
    text = json.dumps(recjob.spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def status_path(workdir: Path, name: str) -> Path:
    """Where the RecJob of ``name`` is mirrored with its status."""
    return workdir / name / "status.yaml"


def restore(recjob: RecJob, workdir: Path) -> RecJob:
    """Give ``recjob`` its generation and last status from the work directory."""
    path = status_path(workdir, recjob.metadata.name)
    digest = spec_digest(recjob)
    if not path.exists():
        recjob.metadata.generation = 1
        recjob.metadata.annotations = {
            **(recjob.metadata.annotations or {}),
            "recjob.dev/spec-digest": digest,
        }
        return recjob
    stored = yaml.safe_load(path.read_text())
    generation = int(stored["metadata"].get("generation") or 1)
    stored_digest = (stored["metadata"].get("annotations") or {}).get("recjob.dev/spec-digest")
    if stored_digest != digest:
        generation += 1
    recjob.metadata.generation = generation
    recjob.metadata.annotations = {
        **(recjob.metadata.annotations or {}),
        "recjob.dev/spec-digest": digest,
    }
    if stored.get("status"):
        recjob.status = RecJobStatus.model_validate(stored["status"])
    return recjob


def save(recjob: RecJob, workdir: Path) -> None:
    """Write the RecJob with its status, as `kubectl get -o yaml` shows it."""
    document = recjob.model_dump(mode="json", by_alias=True, exclude_none=True)
    write_atomic(
        status_path(workdir, recjob.metadata.name), yaml.safe_dump(document, sort_keys=False)
    )


def run(
    recjob: RecJob,
    source_file: Path,
    workdir: Path,
    options: LocalOptions | None = None,
    view=None,
    poll_seconds: float = 1.0,
) -> RecJob:
    """Run ``recjob`` to a terminal phase (or until interrupted); returns it with its
    final status. ``view`` (optional) is called with the RecJob and backend each loop."""
    workdir = workdir.resolve()
    recjob = restore(recjob, workdir)
    (workdir / recjob.metadata.name).mkdir(parents=True, exist_ok=True)
    backend = LocalBackend(workdir, source_file, options)

    def interrupt(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            now = datetime.now(UTC)
            observed = backend.observe(recjob)
            readings = backend.read_metrics(recjob) if analysis_due(recjob, now) else None
            decision = reconcile(recjob, observed, readings, now)
            recjob.status = decision.status
            save(recjob, workdir)
            backend.apply(recjob, decision.actions)
            if view is not None:
                view(recjob, backend, decision)
            if recjob.status.phase in TERMINAL_PHASES:
                break
            time.sleep(min(decision.requeue_after or poll_seconds, poll_seconds))
    except Interrupted:
        backend.stop_jobs(recjob)
        raise
    finally:
        live = backend.live_metrics(recjob)
        if live:  # the router's per-revision counters, for the report
            write_atomic(backend.generation_dir(recjob) / "live-metrics.prom", live)
        backend.stop_serving(recjob)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return recjob
