"""The RollingOut phase: the first model straight to 100%, a canary step by step.

Canary analysis (``analysis``) decides each step: pass advances (or promotes at the last
step), fail counts toward the failure limit and rolls back there, no data holds until the
deadline. A spec edit that keeps the model and its conversion changes the rollout in
flight in place (:func:`remap_rollout`).
"""

from __future__ import annotations

from ..api.v1alpha1.common import parse_duration
from ..api.v1alpha1.status import MAX_HISTORY, AnalysisRecord, Lineage, RolloutStatus
from .actions import (
    POLL_SECONDS,
    DeployStable,
    Observed,
    Promote,
    ReleaseService,
    RollBack,
    ServingObservation,
    SetCanary,
)
from .analysis import Reading, analyse, describe, seconds_between
from .plan import Plan


def revision_name(service: str, model_version: int) -> str:
    """The serving revision that carries ``model_version``: its metrics label (local mode,
    both KServe modes), and in RawDeployment/Standard mode its InferenceService's name."""
    return f"{service}-v{model_version}"


def rolling_out(plan: Plan, observed: Observed, readings: list[Reading] | None) -> None:
    """Deploy, analyse and step the converted model version (phase RollingOut)."""
    recjob, status, now = plan.recjob, plan.status, plan.now
    spec = recjob.spec.rollout
    version = status.conversion.model_version if status.conversion else None
    if version is None:  # cannot happen from a status this core wrote
        plan.finish("Failed", "rolling out without a converted model version")
        return
    serving = observed.serving or ServingObservation()
    service = recjob.service_name
    if serving.waiting_for:  # another RecJob's rollout to the service goes first
        _wait_for_service(plan, service, serving.waiting_for)
        return
    rollout = status.rollout
    if rollout is None:
        rollout = status.rollout = RolloutStatus(started_at=now)
        if serving.stable_version is None or serving.stable_version == version:
            rollout.state = "Progressing"
            rollout.canary_weight = 100
            rollout.stable_model_version = None
            plan.event(
                "Normal", "Deploying", f"first model of {service}: version {version} at 100%"
            )
        else:
            rollout.state = "Progressing"
            rollout.stable_model_version = serving.stable_version
            rollout.canary_model_version = version
            rollout.stable_revision = revision_name(service, serving.stable_version)
            rollout.canary_revision = revision_name(service, version)
            set_step(plan, rollout, 0)
        plan.condition("Deployed", False, "RolloutStarted", f"model version {version}")
    if rollout.canary_model_version is None:  # first model: straight to 100%
        if serving.failure:
            reason = f"model version {version} cannot serve: {serving.failure}"
            plan.condition("Deployed", False, "ModelFailed", reason)
            plan.event("Warning", "ModelFailed", reason)
            plan.actions.append(ReleaseService())
            plan.finish("Failed", reason)
        elif serving.stable_version == version and serving.ready:
            _succeed(plan, version, revision_name(service, version), serving.stable_revision)
        else:
            plan.actions.append(DeployStable(version))
            status.message = f"deploying model version {version} (first model of {service})"
            plan.watch_children()
        return
    # a canary: make the service match the status, then analyse when due
    desired = SetCanary(version, rollout.canary_weight)
    mismatch = serving.canary_version != version or serving.canary_weight != rollout.canary_weight
    if mismatch and desired not in plan.actions:
        plan.actions.append(desired)
    if serving.failure:  # KServe says the canary cannot start: no need to wait for data
        _roll_back(plan, rollout, version, f"canary cannot serve: {serving.failure}")
        return
    if not serving.canary_ready:
        _await_canary(plan, rollout, version)
        return
    if rollout.state == "AwaitingApproval":
        if observed.approved_generation == recjob.generation:
            plan.event("Normal", "Approved", f"generation {recjob.generation} approved")
            rollout.state = "Progressing"
            set_step(plan, rollout, len(spec.steps) - 1)
        else:
            status.message = (
                f"awaiting approval: annotate recjob.dev/approve-generation={recjob.generation}"
            )
            return
    due = rollout.next_analysis_time is None or now >= rollout.next_analysis_time
    if not due or readings is None:
        if rollout.next_analysis_time is not None:
            plan.requeue(seconds_between(rollout.next_analysis_time, now))
        else:
            plan.requeue(POLL_SECONDS)
        return
    _analyse(plan, rollout, readings, version, serving.canary_revision)


def _wait_for_service(plan: Plan, service: str, why: str) -> None:
    """Another RecJob's rollout to ``service`` goes first: wait, saying for whom."""
    status = plan.status
    message = f"waiting to roll out to {service}: {why}"
    if status.message != message:
        plan.event("Normal", "WaitingForService", message)
    status.rollout = None  # started afresh (from the then stable model) once it is free
    status.message = message
    plan.condition("Deployed", False, "WaitingForService", message)
    plan.requeue(POLL_SECONDS)


def _await_canary(plan: Plan, rollout: RolloutStatus, version: int) -> None:
    """The canary's pods are not ready yet: no traffic, no analysis; roll back once the
    no-data deadline has passed since the step began."""
    spec = plan.recjob.spec.rollout
    waited = seconds_between(plan.now, rollout.step_started_at)
    deadline = parse_duration(spec.no_data.deadline).total_seconds()
    if waited >= deadline:
        _roll_back(plan, rollout, version,
                   f"canary version {version} not ready after {waited:.0f}s "
                   f"(deadline {spec.no_data.deadline})")  # fmt: skip
        return
    rollout.next_analysis_time = plan.now + parse_duration(spec.interval)
    plan.status.message = f"canary version {version}: waiting for its pods to be ready"
    plan.watch_children()
    plan.requeue(deadline - waited)  # then rolled back


def set_step(plan: Plan, rollout: RolloutStatus, step: int) -> None:
    """Move the canary to ``spec.rollout.steps[step]`` and restart the step's analyses."""
    spec = plan.recjob.spec.rollout
    rollout.step = step
    rollout.canary_weight = spec.steps[step]
    rollout.passed_analyses = 0
    rollout.step_started_at = plan.now
    rollout.next_analysis_time = plan.now + parse_duration(spec.interval)
    assert rollout.canary_model_version is not None
    plan.actions.append(SetCanary(rollout.canary_model_version, rollout.canary_weight))
    plan.event(
        "Normal",
        "CanaryWeight",
        f"canary model version {rollout.canary_model_version} at {rollout.canary_weight}% "
        f"(step {step + 1} of {len(spec.steps)})",
    )
    plan.status.message = (
        f"canary version {rollout.canary_model_version} at {rollout.canary_weight}%"
    )
    plan.requeue(parse_duration(spec.interval).total_seconds())


def _analyse(
    plan: Plan,
    rollout: RolloutStatus,
    readings: list[Reading],
    version: int,
    kserve_revision: str | None,
) -> None:
    spec, now = plan.recjob.spec.rollout, plan.now
    interval = parse_duration(spec.interval)
    outcome = analyse(spec, readings)
    by_name = {r.metric: r for r in readings}
    lines = []
    for check in spec.metrics:
        reading = by_name.get(check.name, Reading(check.name))
        verdict_ = outcome.verdicts[check.name]
        line = describe(check, reading, verdict_)
        lines.append(line)
        rollout.history.append(
            AnalysisRecord(
                time=now,
                step=rollout.step,
                weight=rollout.canary_weight,
                metric=check.name,
                revision=rollout.canary_revision,
                value=reading.value
                if reading.value is not None and reading.value == reading.value
                else None,
                min=check.min,
                max=check.max,
                verdict=verdict_,
                message=line,
            )
        )
    del rollout.history[:-MAX_HISTORY]
    rollout.last_analysis_time = now
    rollout.next_analysis_time = now + interval
    summary = "; ".join(lines)
    if outcome.result == "pass":
        rollout.passed_analyses += 1
        rollout.no_data_since = None
        rollout.state = "Progressing"
        plan.event("Normal", "AnalysisPassed", summary)
        if rollout.passed_analyses < spec.analyses_per_step:
            plan.requeue(interval.total_seconds())
            return
        if rollout.step == len(spec.steps) - 1:
            plan.actions.append(Promote(version))
            _succeed(plan, version, rollout.canary_revision, kserve_revision)
            return
        nxt = rollout.step + 1
        if spec.manual_approval and nxt == len(spec.steps) - 1:
            rollout.state = "AwaitingApproval"
            plan.status.message = (
                "awaiting approval before the last step: annotate "
                f"recjob.dev/approve-generation={plan.recjob.generation}"
            )
            plan.event("Normal", "AwaitingApproval", plan.status.message)
            return
        set_step(plan, rollout, nxt)
        return
    if outcome.result == "fail":
        rollout.failed_checks += 1
        plan.event(
            "Warning",
            "AnalysisFailed",
            f"{summary} (failed analyses {rollout.failed_checks}/{spec.failure_limit})",
        )
        if rollout.failed_checks >= spec.failure_limit:
            _roll_back(
                plan, rollout, version, f"{rollout.failed_checks} failed analyses: {summary}"
            )
            return
        plan.status.message = (
            f"canary at {rollout.canary_weight}%: analysis failed "
            f"({rollout.failed_checks}/{spec.failure_limit})"
        )
        plan.requeue(interval.total_seconds())
        return
    # inconclusive: no data or query errors. Hold; never promote; roll back at the deadline.
    rollout.query_errors += outcome.errors
    rollout.no_data_since = rollout.no_data_since or now
    rollout.state = "Holding"
    waited = seconds_between(now, rollout.no_data_since)
    deadline = parse_duration(spec.no_data.deadline).total_seconds()
    plan.event("Warning", "AnalysisInconclusive", f"{summary} (holding for {waited:.0f}s)")
    if waited >= deadline:
        _roll_back(
            plan,
            rollout,
            version,
            f"no conclusive analysis for {waited:.0f}s (deadline {spec.no_data.deadline}): "
            f"{summary}",
        )
        return
    plan.status.message = f"canary at {rollout.canary_weight}%: holding (inconclusive analysis)"
    plan.requeue(interval.total_seconds())


def _roll_back(plan: Plan, rollout: RolloutStatus, version: int, reason: str) -> None:
    plan.actions.append(RollBack(version, rollout.stable_model_version, reason))
    plan.actions.append(ReleaseService())
    rollout.state = "RolledBack"
    rollout.canary_weight = 0
    rollout.next_analysis_time = None
    rollout.message = reason
    plan.condition("Promoted", False, "RolledBack", reason)
    plan.condition("Deployed", False, "RolledBack", reason)
    plan.event("Warning", "RolledBack", f"model version {version} rolled back: {reason}")
    plan.finish("RolledBack", f"rolled back: {reason}")


def _succeed(plan: Plan, version: int, revision: str | None, kserve_revision: str | None) -> None:
    """``version`` serves all traffic: lineage, conditions, the service released.
    ``revision`` is the serving revision (metrics label); ``kserve_revision`` KServe's own
    revision name where it has one (Serverless)."""
    plan.actions.append(ReleaseService())
    status = plan.status
    rollout = status.rollout
    assert rollout is not None
    previous = status.lineage.model_version if status.lineage else None
    rollout.state, rollout.canary_weight = "Promoted", 100
    rollout.next_analysis_time = None
    status.lineage = status.lineage or Lineage()
    status.lineage.previous_model_version = previous if previous != version else None
    status.lineage.model_version = version
    status.lineage.inference_service_revision = kserve_revision or revision
    plan.condition("Deployed", True, "Serving", f"model version {version} serves all traffic")
    plan.condition("Promoted", True, "Promoted", f"model version {version} promoted")
    plan.event("Normal", "Promoted", f"model version {version} serves 100% of traffic")
    plan.finish("Succeeded", f"model version {version} serves all traffic")


def remap_rollout(plan: Plan, rollout: RolloutStatus) -> None:
    """Carry a canary in flight over to an edited ``spec.rollout`` (and ``spec.serving``).

    The canary keeps its weight and its passed analyses: its step becomes the last new
    step at or below that weight, so the next passing analyses advance to the next new
    step above it. A canary below the new first step moves up to it (as a new canary
    starts there). A canary waiting for an approval that is no longer asked for takes the
    last step, as an approval would. The service gets the canary again, so serving
    settings apply now.
    """
    spec = plan.recjob.spec.rollout
    steps, weight = spec.steps, rollout.canary_weight
    version = rollout.canary_model_version
    assert version is not None
    at_or_below = [i for i, percent in enumerate(steps) if percent <= weight]
    if not at_or_below:
        rollout.state = "Progressing"
        set_step(plan, rollout, 0)
        return
    rollout.step = at_or_below[-1]
    waiting = rollout.state == "AwaitingApproval"
    if waiting and not (spec.manual_approval and rollout.step == len(steps) - 2):
        rollout.state = "Progressing"
        if rollout.step == len(steps) - 2:  # it had passed its analyses: take the last step
            plan.event("Normal", "ApprovalWithdrawn", "manual approval is no longer required")
            set_step(plan, rollout, len(steps) - 1)
            return
    plan.actions.append(SetCanary(version, weight))
    plan.event(
        "Normal",
        "RolloutUpdated",
        f"spec edited: canary model version {version} stays at {weight}% (step "
        f"{rollout.step + 1} of {len(steps)}: {steps})",
    )
    plan.status.message = f"canary version {version} at {weight}%"
