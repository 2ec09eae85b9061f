"""The operator's own Prometheus metrics (served on ``RECJOB_METRICS_PORT``, default 8000).

- ``recjob_phase{namespace,recjob,phase}``: 1 for the RecJob's current phase, 0 otherwise;
- ``recjob_canary_weight{namespace,recjob}``: percent of traffic on the canary;
- ``recjob_analysis_value{namespace,recjob,metric}`` beside
  ``recjob_analysis_threshold{namespace,recjob,metric,bound}`` (min / max) and
  ``recjob_analysis_verdicts_total{namespace,recjob,metric,verdict}``;
- ``recjob_reconcile_duration_seconds`` (histogram) and
  ``recjob_reconcile_errors_total{namespace,recjob}``;
- ``recjob_rollbacks_total{namespace,recjob}``;
- ``recjob_api_requests_total{verb,resource,code}``: the operator's own requests to the
  API server (kopf's watches aside), by answer (HTTP code, or ``error`` when none came);
- ``recjob_child_write_failures_total{namespace,recjob}``: creates/patches of children the
  API server refused (quota, admission, validation);
- ``recjob_leader``: 1 while this replica holds the leader Lease.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge, Histogram

from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import Phase, RecJobStatus
from ..controller.reconcile import RollBack

PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]

PHASE = Gauge("recjob_phase", "1 for the RecJob's current phase", ["namespace", "recjob", "phase"])
CANARY_WEIGHT = Gauge("recjob_canary_weight", "Canary traffic percent", ["namespace", "recjob"])
ANALYSIS_VALUE = Gauge(
    "recjob_analysis_value", "Last value of a canary check", ["namespace", "recjob", "metric"]
)
ANALYSIS_THRESHOLD = Gauge(
    "recjob_analysis_threshold",
    "Threshold of a canary check",
    ["namespace", "recjob", "metric", "bound"],
)
VERDICTS = Counter(
    "recjob_analysis_verdicts_total",
    "Canary check verdicts (pass, fail, no-data, error)",
    ["namespace", "recjob", "metric", "verdict"],
)
RECONCILE_SECONDS = Histogram(
    "recjob_reconcile_duration_seconds",
    "Time of one reconcile (observe, analyse, act, write status)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECONCILE_ERRORS = Counter(
    "recjob_reconcile_errors_total", "Reconciles that raised", ["namespace", "recjob"]
)
ROLLBACKS = Counter("recjob_rollbacks_total", "Canaries rolled back", ["namespace", "recjob"])
API_REQUESTS = Counter(
    "recjob_api_requests_total",
    "Requests the operator made to the API server (watches aside)",
    ["verb", "resource", "code"],
)
CHILD_WRITE_FAILURES = Counter(
    "recjob_child_write_failures_total",
    "Creates or patches of children refused by the API server",
    ["namespace", "recjob"],
)
LEADER = Gauge("recjob_leader", "1 while this replica holds the leader Lease")

T = TypeVar("T")


def api_call(verb: str, resource: str, call: Callable[..., T], *args, **kwargs) -> T:
    """``call(*args, **kwargs)``, counted in ``recjob_api_requests_total`` by its answer."""
    code = "error"
    try:
        result = call(*args, **kwargs)
        code = "201" if verb == "create" else "200"
        return result
    except ApiException as error:
        code = str(error.status or 0)
        raise
    finally:
        API_REQUESTS.labels(verb, resource, code).inc()


def record(recjob: RecJob, status: RecJobStatus, actions: list, analysed: bool) -> None:
    """Update the gauges and counters after one reconcile."""
    ns, name = recjob.metadata.namespace or "default", recjob.metadata.name
    for phase in PHASES:
        PHASE.labels(ns, name, phase).set(1.0 if status.phase == phase else 0.0)
    rollout = status.rollout
    CANARY_WEIGHT.labels(ns, name).set(rollout.canary_weight if rollout else 0)
    for check in recjob.spec.rollout.metrics:
        if check.min is not None:
            ANALYSIS_THRESHOLD.labels(ns, name, check.name, "min").set(check.min)
        if check.max is not None:
            ANALYSIS_THRESHOLD.labels(ns, name, check.name, "max").set(check.max)
    if analysed and rollout and rollout.history:
        latest = {}
        for record_ in rollout.history:
            if record_.time == rollout.last_analysis_time:
                latest[record_.metric] = record_
        for metric, entry in latest.items():
            VERDICTS.labels(ns, name, metric, entry.verdict).inc()
            if entry.value is not None:
                ANALYSIS_VALUE.labels(ns, name, metric).set(entry.value)
    if any(isinstance(a, RollBack) for a in actions):
        ROLLBACKS.labels(ns, name).inc()


def forget(namespace: str, name: str) -> None:
    """Drop a deleted RecJob's series."""
    for metric in (
        PHASE,
        CANARY_WEIGHT,
        ANALYSIS_VALUE,
        ANALYSIS_THRESHOLD,
        VERDICTS,
        CHILD_WRITE_FAILURES,
    ):
        for labels in list(metric._metrics):
            if labels[:2] == (namespace, name):
                metric.remove(*labels)
