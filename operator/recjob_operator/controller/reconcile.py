"""The reconcile core: (RecJob, observed children, analysis readings, now) -> (actions, status).

Pure and level-triggered: it reads only its arguments, and running it again on the same
observations asks for the same (idempotent) actions — backends create children by their
deterministic names and treat "already exists" as done. Progress lives only in the
returned status; the spec is never changed.

Phases: Pending -> Training -> Converting -> RollingOut -> Succeeded, or Failed /
RolledBack. The first model of a service goes straight to 100%; later ones are canaried
step by step (see ``analysis``). A new generation (spec change) supersedes the running
one: its children are cleaned up, an in-flight canary is rolled back, and the new
generation starts from Pending; the stable model keeps serving throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from ..api.v1alpha1.common import parse_duration
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import (
    MAX_HISTORY,
    TERMINAL_PHASES,
    AnalysisRecord,
    Condition,
    ConversionStatus,
    Lineage,
    QualityGateStatus,
    QualitySummary,
    RecJobStatus,
    RolloutStatus,
    TrainingProgress,
    TrainingStatus,
)
from .analysis import Reading, analyse, describe, query_values, seconds_between

#: How often to look again at a running child (the backend may watch instead).
POLL_SECONDS = 5.0


# --------------------------------------------------------------------------- observations
@dataclass(frozen=True)
class ChildObservation:
    """A training or conversion child as the backend sees it."""

    name: str
    state: Literal["Created", "Running", "Restarting", "Succeeded", "Failed"]
    message: str | None = None
    restarts: int = 0
    progress: dict | None = None
    """Training: step, total_steps, loss, samples_per_second, resumed_from_step."""
    result: dict | None = None
    """Training: metrics.json (+ ``card``: model-card.json); conversion: quality-gate.json."""


@dataclass(frozen=True)
class ServingObservation:
    """The service the RecJob rolls out to."""

    stable_version: int | None = None
    canary_version: int | None = None
    canary_weight: int = 0
    ready: bool = False
    stable_revision: str | None = None
    canary_revision: str | None = None


@dataclass(frozen=True)
class Observed:
    """Everything the backend observed for the RecJob's current generation."""

    training: ChildObservation | None = None
    conversion: ChildObservation | None = None
    serving: ServingObservation | None = None
    approved_generation: int | None = None
    """The generation named by the recjob.dev/approve-generation annotation."""


# --------------------------------------------------------------------------- actions
@dataclass(frozen=True)
class CreateTraining:
    """Create the training child (PyTorchJob / local processes) if it does not exist."""

    name: str


@dataclass(frozen=True)
class CreateConversion:
    """Create the conversion child (Job / local process) if it does not exist."""

    name: str


@dataclass(frozen=True)
class DeployStable:
    """Serve ``model_version`` to all traffic (the service's first model)."""

    model_version: int


@dataclass(frozen=True)
class SetCanary:
    """Serve ``model_version`` as the canary with ``weight`` percent of traffic."""

    model_version: int
    weight: int


@dataclass(frozen=True)
class Promote:
    """Make the canary ``model_version`` the stable model (all traffic)."""

    model_version: int


@dataclass(frozen=True)
class RollBack:
    """Send all traffic back to ``stable_version`` and remove the canary."""

    canary_version: int
    stable_version: int | None
    reason: str


@dataclass(frozen=True)
class CleanupGeneration:
    """Stop and remove the (superseded) children of ``generation``."""

    generation: int


@dataclass(frozen=True)
class EmitEvent:
    """A Kubernetes event on the RecJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = (
    CreateTraining
    | CreateConversion
    | DeployStable
    | SetCanary
    | Promote
    | RollBack
    | CleanupGeneration
    | EmitEvent
)


@dataclass
class Decision:
    """What to do and the status to write."""

    status: RecJobStatus
    actions: list = field(default_factory=list)
    requeue_after: float | None = None
    """Seconds until the core wants to look again (None: only on change)."""


# --------------------------------------------------------------------------- names
def training_name(recjob: RecJob) -> str:
    """Deterministic name of the generation's training child."""
    return f"{recjob.metadata.name}-g{recjob.generation}-train"


def conversion_name(recjob: RecJob) -> str:
    """Deterministic name of the generation's conversion child."""
    return f"{recjob.metadata.name}-g{recjob.generation}-convert"


def revision_name(service: str, model_version: int) -> str:
    """The serving revision that carries ``model_version`` (local mode's naming)."""
    return f"{service}-v{model_version}"


# --------------------------------------------------------------------------- helpers
def set_condition(
    status: RecJobStatus,
    type_: str,
    value: bool | None,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> None:
    """Set a condition; its transition time changes only when its status does."""
    text = {True: "True", False: "False", None: "Unknown"}[value]
    for condition in status.conditions:
        if condition.type == type_:
            if condition.status != text:
                condition.last_transition_time = now
            condition.status, condition.reason, condition.message = text, reason, message
            condition.observed_generation = generation
            return
    status.conditions.append(
        Condition(
            type=type_,
            status=text,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=generation,
        )
    )


class _Plan:
    """Accumulates actions and the status while one reconcile runs."""

    def __init__(self, recjob: RecJob, status: RecJobStatus, now: datetime):
        self.recjob, self.status, self.now = recjob, status, now
        self.actions: list = []
        self.requeue_after: float | None = None

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.actions.append(EmitEvent(type_, reason, message))

    def condition(self, type_: str, value: bool | None, reason: str, message: str = "") -> None:
        set_condition(self.status, type_, value, reason, message, self.now, self.recjob.generation)

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )

    def finish(self, phase: str, message: str) -> None:
        self.status.phase = phase
        self.status.message = message
        self.status.completion_time = self.now
        ready = phase == "Succeeded"
        self.condition("Ready", ready, phase, message)


# --------------------------------------------------------------------------- phases
def _new_generation(plan: _Plan, previous: RecJobStatus | None) -> None:
    """Start the current generation, superseding whatever the previous one was doing."""
    recjob, now = plan.recjob, plan.now
    lineage = previous.lineage if previous else None
    if previous is not None and previous.observed_generation is not None:
        old = previous.observed_generation
        if previous.phase not in TERMINAL_PHASES:
            plan.actions.append(CleanupGeneration(old))
            rollout = previous.rollout
            if (
                previous.phase == "RollingOut"
                and rollout is not None
                and rollout.canary_model_version is not None
            ):
                plan.actions.append(
                    RollBack(
                        rollout.canary_model_version,
                        rollout.stable_model_version,
                        f"superseded by generation {recjob.generation}",
                    )
                )
            plan.event(
                "Normal",
                "Superseded",
                f"generation {old} ({previous.phase}) superseded by generation {recjob.generation}",
            )
    plan.status = RecJobStatus(
        phase="Pending",
        observed_generation=recjob.generation,
        message="waiting to start training",
        lineage=Lineage(
            model_version=lineage.model_version if lineage else None,
            inference_service_revision=lineage.inference_service_revision if lineage else None,
            model_repository=lineage.model_repository if lineage else None,
        ),
        start_time=now,
    )
    plan.condition("Valid", True, "SpecAccepted", "the spec passed validation")


def _pending(plan: _Plan, observed: Observed) -> None:
    name = training_name(plan.recjob)
    if observed.training is None:
        plan.actions.append(CreateTraining(name))
        plan.event("Normal", "TrainingCreated", f"created training {name}")
    plan.status.phase = "Training"
    plan.status.message = f"training {name}"
    plan.status.training = TrainingStatus(job_name=name, state="Created", start_time=plan.now)
    plan.condition("Trained", False, "TrainingStarted", f"training {name}")
    plan.requeue(POLL_SECONDS)


def _training(plan: _Plan, observed: Observed) -> None:
    status, child = plan.status, observed.training
    training = status.training or TrainingStatus(job_name=training_name(plan.recjob))
    status.training = training
    if child is None:  # not visible yet, or deleted behind our back: (re)create by name
        plan.actions.append(CreateTraining(training_name(plan.recjob)))
        plan.requeue(POLL_SECONDS)
        return
    if child.restarts > training.restarts:
        plan.event(
            "Warning",
            "TrainingRestarted",
            f"{child.name} restarted ({child.restarts} so far): {child.message or 'no reason'}",
        )
    training.state, training.restarts = child.state, child.restarts
    if child.progress:
        progress = {k: v for k, v in child.progress.items() if k != "resumed_from_step"}
        training.progress = TrainingProgress.model_validate(progress)
        if child.progress.get("resumed_from_step") is not None:
            training.resumed_from_step = child.progress["resumed_from_step"]
    if child.state == "Failed":
        message = f"training {child.name} failed: {child.message or 'no reason given'}"
        training.completion_time, training.message = plan.now, child.message
        plan.condition("Trained", False, "TrainingFailed", message)
        plan.event("Warning", "TrainingFailed", message)
        plan.finish("Failed", message)
        return
    if child.state != "Succeeded":
        plan.status.message = f"training {child.name}: {child.state.lower()}" + (
            f", step {training.progress.step}" if training.progress else ""
        )
        plan.requeue(POLL_SECONDS)
        return
    training.completion_time = plan.now
    result = child.result or {}
    model_metrics = result.get("model") or {}
    main = result.get("main_metric")
    if main in model_metrics and model_metrics[main] is not None:
        status.quality = QualitySummary(metric=main, value=float(model_metrics[main]))
    training.metrics = {
        k: float(v) for k, v in model_metrics.items() if isinstance(v, int | float)
    } or None
    card = result.get("card") or {}
    status.lineage = status.lineage or Lineage()
    for attribute, key in (
        ("data_snapshot", "data_snapshot"),
        ("base_model", "base_model"),
        ("checkpoint_digest", "checkpoint_digest"),
    ):
        if isinstance(card.get(key), str):
            setattr(status.lineage, attribute, card[key])
    plan.condition("Trained", True, "TrainingSucceeded", f"{child.name} succeeded")
    plan.event("Normal", "TrainingSucceeded", f"{child.name} succeeded")
    name = conversion_name(plan.recjob)
    status.phase = "Converting"
    status.message = f"converting ({plan.recjob.spec.export.target})"
    status.conversion = ConversionStatus(
        job_name=name, state="Created", target=plan.recjob.spec.export.target, start_time=plan.now
    )
    if observed.conversion is None:
        plan.actions.append(CreateConversion(name))
        plan.event("Normal", "ConversionCreated", f"created conversion {name}")
    plan.condition("Converted", False, "ConversionStarted", f"converting with {name}")
    plan.requeue(POLL_SECONDS)


def _gate_status(report: dict) -> QualityGateStatus:
    return QualityGateStatus(
        metric=report.get("metric", "unknown"),
        source_value=report.get("source_value"),
        converted_value=report.get("converted_value"),
        teacher_value=report.get("teacher_value"),
        relative_drop=report.get("relative_drop"),
        relative_drop_vs_teacher=report.get("relative_drop_vs_teacher"),
        budget=report.get("budget", 0.0),
        rank_correlation=report.get("rank_correlation"),
        top_k_overlap=report.get("top_k_overlap"),
        passed=bool(report.get("passed")),
        report_uri=report.get("report_uri"),
    )


def _converting(plan: _Plan, observed: Observed) -> None:
    status, child = plan.status, observed.conversion
    conversion = status.conversion or ConversionStatus(job_name=conversion_name(plan.recjob))
    status.conversion = conversion
    if child is None:
        plan.actions.append(CreateConversion(conversion_name(plan.recjob)))
        plan.requeue(POLL_SECONDS)
        return
    conversion.state = child.state if child.state != "Restarting" else "Running"
    report = child.result
    if report and "passed" in report:
        conversion.quality_gate = _gate_status(report)
    if child.state not in ("Succeeded", "Failed"):
        plan.requeue(POLL_SECONDS)
        return
    conversion.completion_time = plan.now
    if report and report.get("passed") is False:
        reasons = "; ".join(report.get("reasons") or []) or "over budget"
        message = f"quality gate failed, nothing deployed: {reasons}"
        plan.condition("QualityGatePassed", False, "QualityGateFailed", message)
        plan.condition("Converted", False, "QualityGateFailed", message)
        plan.event("Warning", "QualityGateFailed", message)
        plan.finish("Failed", message)
        return
    if child.state == "Failed" or not report or not report.get("published_version"):
        message = f"conversion {child.name} failed: {child.message or 'no model was published'}"
        conversion.message = child.message
        plan.condition("Converted", False, "ConversionFailed", message)
        plan.event("Warning", "ConversionFailed", message)
        plan.finish("Failed", message)
        return
    version = int(report["published_version"])
    conversion.model_version = version
    gate = conversion.quality_gate
    gate_text = (
        f"{gate.metric} {gate.converted_value:.4f} vs source {gate.source_value:.4f}"
        if gate and gate.converted_value is not None and gate.source_value is not None
        else "passed"
    )
    plan.condition("QualityGatePassed", True, "QualityGatePassed", gate_text)
    plan.condition("Converted", True, "Published", f"model version {version} published")
    plan.event("Normal", "Converted", f"model version {version} published; gate: {gate_text}")
    status.phase = "RollingOut"
    status.message = f"rolling out model version {version}"
    _rolling_out(plan, observed, None)


def _rolling_out(plan: _Plan, observed: Observed, readings: list[Reading] | None) -> None:
    recjob, status, now = plan.recjob, plan.status, plan.now
    spec = recjob.spec.rollout
    version = status.conversion.model_version if status.conversion else None
    if version is None:  # cannot happen from a status this core wrote
        plan.finish("Failed", "rolling out without a converted model version")
        return
    serving = observed.serving or ServingObservation()
    service = recjob.service_name
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
            rollout.stable_revision = serving.stable_revision or revision_name(
                service, serving.stable_version
            )
            rollout.canary_revision = revision_name(service, version)
            _set_step(plan, rollout, 0)
        plan.condition("Deployed", False, "RolloutStarted", f"model version {version}")
    if rollout.canary_model_version is None:  # first model: straight to 100%
        if serving.stable_version == version and serving.ready:
            _succeed(plan, version, serving.stable_revision or revision_name(service, version))
        else:
            plan.actions.append(DeployStable(version))
            status.message = f"deploying model version {version} (first model of {service})"
            plan.requeue(POLL_SECONDS)
        return
    # a canary: make the service match the status, then analyse when due
    if serving.canary_version != version or serving.canary_weight != rollout.canary_weight:
        plan.actions.append(SetCanary(version, rollout.canary_weight))
    rollout.canary_revision = serving.canary_revision or rollout.canary_revision
    if rollout.state == "AwaitingApproval":
        if observed.approved_generation == recjob.generation:
            plan.event("Normal", "Approved", f"generation {recjob.generation} approved")
            rollout.state = "Progressing"
            _set_step(plan, rollout, len(spec.steps) - 1)
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
    _analyse(plan, rollout, readings, version)


def _set_step(plan: _Plan, rollout: RolloutStatus, step: int) -> None:
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


def _analyse(plan: _Plan, rollout: RolloutStatus, readings: list[Reading], version: int) -> None:
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
            _succeed(plan, version, rollout.canary_revision)
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
        _set_step(plan, rollout, nxt)
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


def _roll_back(plan: _Plan, rollout: RolloutStatus, version: int, reason: str) -> None:
    plan.actions.append(RollBack(version, rollout.stable_model_version, reason))
    rollout.state = "RolledBack"
    rollout.canary_weight = 0
    rollout.next_analysis_time = None
    rollout.message = reason
    plan.condition("Promoted", False, "RolledBack", reason)
    plan.condition("Deployed", False, "RolledBack", reason)
    plan.event("Warning", "RolledBack", f"model version {version} rolled back: {reason}")
    plan.finish("RolledBack", f"rolled back: {reason}")


def _succeed(plan: _Plan, version: int, revision: str | None) -> None:
    status = plan.status
    rollout = status.rollout
    assert rollout is not None
    previous = status.lineage.model_version if status.lineage else None
    rollout.state, rollout.canary_weight = "Promoted", 100
    rollout.next_analysis_time = None
    status.lineage = status.lineage or Lineage()
    status.lineage.previous_model_version = previous if previous != version else None
    status.lineage.model_version = version
    status.lineage.inference_service_revision = revision
    plan.condition("Deployed", True, "Serving", f"model version {version} serves all traffic")
    plan.condition("Promoted", True, "Promoted", f"model version {version} promoted")
    plan.event("Normal", "Promoted", f"model version {version} serves 100% of traffic")
    plan.finish("Succeeded", f"model version {version} serves all traffic")


# --------------------------------------------------------------------------- entry points
def analysis_due(recjob: RecJob, now: datetime) -> bool:
    """Whether the backend should read the canary metrics before calling reconcile."""
    status = recjob.status
    if status is None or status.phase != "RollingOut" or status.rollout is None:
        return False
    if status.observed_generation != recjob.generation:
        return False
    rollout = status.rollout
    if rollout.canary_model_version is None or rollout.state not in ("Progressing", "Holding"):
        return False
    return rollout.next_analysis_time is None or now >= rollout.next_analysis_time


def analysis_query_values(recjob: RecJob, namespace: str = "default") -> dict[str, str]:
    """Placeholder values of the RecJob's canary queries for its current analysis."""
    rollout = recjob.status.rollout if recjob.status else None
    return query_values(
        rollout.canary_revision or "" if rollout else "",
        rollout.stable_revision if rollout else None,
        recjob.metadata.namespace or namespace,
        recjob.service_name,
        parse_duration(recjob.spec.rollout.interval).total_seconds(),
    )


def reconcile(
    recjob: RecJob, observed: Observed, readings: list[Reading] | None, now: datetime
) -> Decision:
    """One reconcile step. ``readings`` are the canary metrics read because
    :func:`analysis_due` said so (None otherwise)."""
    previous = recjob.status
    status = previous.model_copy(deep=True) if previous is not None else None
    plan = _Plan(recjob, status or RecJobStatus(), now)
    if status is None or status.observed_generation != recjob.generation:
        _new_generation(plan, status)
    phase = plan.status.phase
    if phase == "Pending":
        _pending(plan, observed)
    elif phase == "Training":
        _training(plan, observed)
    elif phase == "Converting":
        _converting(plan, observed)
    elif phase == "RollingOut":
        _rolling_out(plan, observed, readings)
    return Decision(plan.status, plan.actions, plan.requeue_after)
