"""Canary analysis, Flagger-style, as pure functions.

Every ``interval`` each metric's PromQL template is rendered for the canary (and stable)
revision and read; each reading gets a verdict against its thresholds:

- ``pass`` / ``fail``: a number inside / outside [min, max];
- ``no-data``: the query answered with nothing (or NaN): inconclusive, never a pass;
- ``error``: the metric source failed (Prometheus down, bad query): counted apart.

One analysis passes only when every metric passes. It fails when any metric fails
(or, with ``noData.action: fail``, has no data); failures accumulate up to
``failureLimit``. Otherwise it is inconclusive and the rollout holds, until
``noData.deadline`` has passed since the first inconclusive analysis: then it rolls back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ..api.v1alpha1.spec_delivery import MetricCheck, RolloutSpec

Verdict = Literal["pass", "fail", "no-data", "error"]


@dataclass(frozen=True)
class Reading:
    """What the metric source answered for one metric."""

    metric: str
    value: float | None = None
    error: str | None = None


def query_values(
    canary: str, stable: str | None, namespace: str, service: str, interval_seconds: float
) -> dict[str, str]:
    """Placeholder values for one analysis."""
    return {
        "revision": canary,
        "stable": stable or "",
        "namespace": namespace,
        "service": service,
        "interval": f"{max(int(interval_seconds), 1)}s",
    }


def verdict(check: MetricCheck, reading: Reading, no_data_fails: bool) -> Verdict:
    """The verdict of one reading against its check."""
    if reading.error is not None:
        return "error"
    if reading.value is None or math.isnan(reading.value):
        return "fail" if no_data_fails else "no-data"
    if check.min is not None and reading.value < check.min:
        return "fail"
    if check.max is not None and reading.value > check.max:
        return "fail"
    return "pass"


@dataclass(frozen=True)
class AnalysisOutcome:
    """One analysis: per-metric verdicts and the overall result."""

    verdicts: dict[str, Verdict]
    result: Literal["pass", "fail", "inconclusive"]
    errors: int
    """Metrics whose query failed."""


def analyse(spec: RolloutSpec, readings: list[Reading]) -> AnalysisOutcome:
    """Judge one analysis (a metric without a reading counts as no data)."""
    by_name = {r.metric: r for r in readings}
    no_data_fails = spec.no_data.action == "fail"
    verdicts = {
        check.name: verdict(check, by_name.get(check.name, Reading(check.name)), no_data_fails)
        for check in spec.metrics
    }
    values = set(verdicts.values())
    if "fail" in values:
        result = "fail"
    elif values <= {"pass"}:
        result = "pass"
    else:
        result = "inconclusive"
    return AnalysisOutcome(verdicts, result, sum(v == "error" for v in verdicts.values()))


def describe(check: MetricCheck, reading: Reading, verdict_: Verdict) -> str:
    """One line for events and history: value, threshold, verdict."""
    bounds = []
    if check.min is not None:
        bounds.append(f">= {check.min:g}")
    if check.max is not None:
        bounds.append(f"<= {check.max:g}")
    wanted = " and ".join(bounds)
    if verdict_ == "error":
        return f"{check.name}: query failed ({reading.error})"
    if verdict_ == "no-data" or reading.value is None:
        return f"{check.name}: no data (wanted {wanted})"
    return f"{check.name} = {reading.value:.4g} (wanted {wanted}): {verdict_}"


def seconds_between(later: datetime, earlier: datetime | None) -> float:
    """``later - earlier`` in seconds (infinite when ``earlier`` is None)."""
    return math.inf if earlier is None else (later - earlier).total_seconds()
