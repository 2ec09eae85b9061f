"""The reconcile core: (RecJob, observed children, analysis readings, now) -> (actions, status).

Pure and level-triggered: it reads only its arguments, and running it again on the same
observations asks for the same (idempotent) actions — backends create children by their
deterministic names and treat "already exists" as done. Progress lives only in the
returned status; the spec is never changed.

Phases: Pending -> Training -> Converting -> RollingOut -> Succeeded, or Failed /
RolledBack. The first model of a service goes straight to 100%; later ones are canaried
step by step (``rollout``, ``analysis``).

A spec edit (a new ``metadata.generation``) does only what it must (``identity``):

- a new **model generation** (data, model, training, compression, artifactsUri changed)
  supersedes the running one: its children are cleaned up, an in-flight canary is rolled
  back, and training starts again from Pending; the stable model keeps serving;
- a new **conversion revision** (export, serving.name or serving.storageUri changed)
  converts the trained model again without retraining: a running conversion is stopped,
  an in-flight canary of the old conversion rolled back, and the new one rolled out;
- anything else (rollout, the other serving fields) applies in place: a canary in flight
  continues on the edited steps with the edited settings, nothing is retrained or
  rolled back.
"""

from __future__ import annotations

from datetime import datetime

from ..api.v1alpha1.common import parse_duration
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.status import (
    TERMINAL_PHASES,
    ConversionStatus,
    FederationStatus,
    Lineage,
    QualityGateStatus,
    QualitySummary,
    RecJobStatus,
    RolloutStatus,
    TrainingProgress,
    TrainingStatus,
)
from .actions import (
    POLL_SECONDS,
    Action,
    ChildObservation,
    CleanupGeneration,
    CreateConversion,
    CreateTraining,
    Decision,
    DeployStable,
    EmitEvent,
    Observed,
    Promote,
    ReleaseService,
    RollBack,
    ServingObservation,
    SetCanary,
    StopFederation,
)
from .analysis import Reading, query_values
from .identity import Identity, conversion_name, identity, training_name
from .plan import Plan, set_condition
from .rollout import remap_rollout, revision_name, rolling_out

__all__ = [
    "POLL_SECONDS",
    "Action",
    "ChildObservation",
    "CleanupGeneration",
    "CreateConversion",
    "CreateTraining",
    "Decision",
    "DeployStable",
    "EmitEvent",
    "Observed",
    "Promote",
    "ReleaseService",
    "RollBack",
    "ServingObservation",
    "SetCanary",
    "StopFederation",
    "analysis_due",
    "analysis_query_values",
    "conversion_name",
    "reconcile",
    "revision_name",
    "set_condition",
    "training_name",
]

#: Conditions about one conversion and its rollout (cleared when the model is reconverted).
_CONVERSION_CONDITIONS = ("QualityGatePassed", "Deployed", "Promoted")


# --------------------------------------------------------------------------- spec edits
def _canary_in_flight(status: RecJobStatus) -> RolloutStatus | None:
    """The rollout of ``status`` if a canary is being analysed (not yet promoted)."""
    rollout = status.rollout
    if (
        status.phase == "RollingOut"
        and rollout is not None
        and rollout.canary_model_version is not None
        and rollout.state in ("Progressing", "Holding", "AwaitingApproval")
    ):
        return rollout
    return None


def _record_identity(status: RecJobStatus, ident: Identity) -> None:
    status.model_generation, status.model_digest = ident.model_generation, ident.model_digest
    status.conversion_revision = ident.conversion_revision
    status.conversion_digest = ident.conversion_digest


def _spec_accepted(plan: Plan, ident: Identity) -> None:
    plan.status.observed_generation = plan.recjob.generation
    _record_identity(plan.status, ident)
    plan.condition("Valid", True, "SpecAccepted", "the spec passed validation")


def _new_model(plan: Plan, previous: RecJobStatus | None, ident: Identity) -> None:
    """Start a new model generation, superseding whatever the previous one was doing."""
    recjob, now = plan.recjob, plan.now
    lineage = previous.lineage if previous else None
    if previous is not None and previous.observed_generation is not None:
        old = previous.observed_generation
        if previous.phase not in TERMINAL_PHASES:
            plan.actions.append(
                CleanupGeneration(
                    previous.model_generation or old,
                    training=True,
                    conversion=(previous.conversion_revision or 1)
                    if previous.conversion is not None
                    else None,
                )
            )
            rollout = _canary_in_flight(previous)
            if rollout is not None:
                assert rollout.canary_model_version is not None
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
                f"generation {old} ({previous.phase}) superseded by generation "
                f"{recjob.generation} (model generation {ident.model_generation})",
            )
    plan.status = RecJobStatus(
        phase="Pending",
        message="waiting to start training",
        lineage=Lineage(
            model_version=lineage.model_version if lineage else None,
            inference_service_revision=lineage.inference_service_revision if lineage else None,
            model_repository=lineage.model_repository if lineage else None,
        ),
        start_time=now,
    )
    _spec_accepted(plan, ident)


def _new_conversion(plan: Plan, previous: RecJobStatus, ident: Identity) -> None:
    """Convert the trained model again (export or the target repository changed)."""
    status, recjob = plan.status, plan.recjob
    _spec_accepted(plan, ident)
    if status.training is None or status.training.state != "Succeeded":
        return  # training failed: there is nothing to convert
    if previous.conversion is not None and previous.conversion.state in ("Created", "Running"):
        plan.actions.append(
            CleanupGeneration(
                ident.model_generation,
                training=False,
                conversion=previous.conversion_revision or 1,
            )
        )
    rollout = _canary_in_flight(previous)
    if rollout is not None:
        assert rollout.canary_model_version is not None
        plan.actions.append(
            RollBack(
                rollout.canary_model_version,
                rollout.stable_model_version,
                f"superseded by generation {recjob.generation} (conversion changed)",
            )
        )
    plan.event(
        "Normal",
        "Reconverting",
        f"generation {recjob.generation} changes the conversion: converting model "
        f"generation {ident.model_generation} again (revision {ident.conversion_revision}) "
        "without retraining",
    )
    status.conditions = [c for c in status.conditions if c.type not in _CONVERSION_CONDITIONS]
    status.rollout = None
    status.completion_time = None
    _start_conversion(plan, create=False)  # _converting creates it (the child is unseen)
    plan.condition("Ready", False, "Converting", f"converting with {status.conversion.job_name}")


def _apply_in_place(
    plan: Plan, previous: RecJobStatus, ident: Identity, observed: Observed
) -> None:
    """An edit that keeps the model and its conversion: rollout and serving settings."""
    status, recjob = plan.status, plan.recjob
    _spec_accepted(plan, ident)
    rollout = _canary_in_flight(status)
    if rollout is not None:
        remap_rollout(plan, rollout)
        return
    serving, lineage = observed.serving, status.lineage
    if (  # a promoted model still serving: re-apply the serving settings to it
        status.phase == "Succeeded"
        and serving is not None
        and serving.ready
        and serving.canary_version is None
        and lineage is not None
        and lineage.model_version is not None
        and serving.stable_version == lineage.model_version
    ):
        plan.actions.append(DeployStable(lineage.model_version))
    plan.event(
        "Normal",
        "SpecApplied",
        f"generation {recjob.generation} keeps model generation {status.model_generation} "
        f"(phase {previous.phase}): nothing to retrain or reconvert",
    )


def _on_spec(plan: Plan, previous: RecJobStatus | None, observed: Observed) -> None:
    """Bring the status to the current spec: a new model, a new conversion, or in place."""
    recjob = plan.recjob
    ident = identity(recjob)
    if previous is None:
        _new_model(plan, None, ident)
        return
    if previous.model_generation is None:  # a status from before model generations
        if previous.observed_generation == recjob.generation:
            _record_identity(plan.status, ident)  # same spec: its children keep their names
        else:
            _new_model(plan, previous, ident)
        return
    if (previous.model_generation, previous.conversion_revision) == (
        ident.model_generation,
        ident.conversion_revision,
    ) and previous.observed_generation == recjob.generation:
        return
    invalid = any(c.type == "Valid" and c.status == "False" for c in previous.conditions)
    if invalid or ident.model_generation != previous.model_generation:
        _new_model(plan, previous, ident)  # an invalid spec's status says too little to resume
    elif ident.conversion_revision != previous.conversion_revision:
        _new_conversion(plan, previous, ident)
    elif ident.conversion_digest != previous.conversion_digest:  # not converted yet
        _spec_accepted(plan, ident)  # the conversion, when it starts, uses the new settings
    else:
        _apply_in_place(plan, previous, ident, observed)


# --------------------------------------------------------------------------- phases
def _pending(plan: Plan, observed: Observed) -> None:
    name = training_name(plan.recjob)
    if observed.training is None:  # else created by a pass that ended before its status
        plan.actions.append(CreateTraining(name))
    plan.event("Normal", "TrainingCreated", f"created training {name}")
    plan.status.phase = "Training"
    plan.status.message = f"training {name}: created"  # as _training says it: no rewrite
    training = plan.recjob.spec.training
    plan.status.training = TrainingStatus(
        job_name=name,
        state="Created",
        start_time=plan.now,
        world_size=training.nodes * training.processes_per_node,
    )
    plan.condition("Trained", False, "TrainingStarted", f"training {name}")
    if observed.training is None:
        plan.watch_children()
    else:  # it may have run, even ended, since: no change of it would wake this RecJob
        _training(plan, observed)


def _training(plan: Plan, observed: Observed) -> None:
    status, child = plan.status, observed.training
    training = status.training or TrainingStatus(job_name=training_name(plan.recjob))
    status.training = training
    if child is None:  # not visible yet, or deleted behind our back: (re)create by name
        plan.actions.append(CreateTraining(training_name(plan.recjob)))
        plan.watch_children()
        return
    if child.restarts > training.restarts:
        plan.event(
            "Warning",
            "TrainingRestarted",
            f"{child.name} restarted ({child.restarts} so far): {child.message or 'no reason'}",
        )
    training.state, training.restarts = child.state, child.restarts
    if child.state in ("Succeeded", "Failed") and plan.recjob.spec.training.federated:
        plan.actions.append(StopFederation(child.name))
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
        plan.watch_children()
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
    training.federation = federation_status(result.get("federated"))
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
    _start_conversion(plan, create=observed.conversion is None)
    if observed.conversion is not None:  # created by a pass that ended before its status:
        _converting(plan, observed)  # it may have run, even ended, since


def federation_status(account: dict | None) -> FederationStatus | None:
    """A federated run's account, from metrics.json's ``federated`` section (local mode) or
    the training Job's termination summary (the same keys, privacy flattened)."""
    if not isinstance(account, dict):
        return None
    privacy = account.get("privacy") or {}
    return FederationStatus(
        silos=account.get("silos"),
        rounds_completed=account.get("rounds_completed"),
        bytes_exchanged=account.get("bytes_total"),
        epsilon=account.get("epsilon", privacy.get("epsilon")),
        delta=account.get("delta", privacy.get("delta")),
    )


def _start_conversion(plan: Plan, create: bool) -> None:
    """Enter Converting with the conversion child of the spec's conversion revision."""
    status, name = plan.status, conversion_name(plan.recjob)
    target = plan.recjob.spec.export.target
    status.phase = "Converting"
    status.message = f"converting ({target})"
    status.conversion = ConversionStatus(
        job_name=name, state="Created", target=target, start_time=plan.now
    )
    if create:  # else created by a pass that ended before its status was written
        plan.actions.append(CreateConversion(name))
    plan.event("Normal", "ConversionCreated", f"created conversion {name}")
    plan.condition("Converted", False, "ConversionStarted", f"converting with {name}")
    if create:  # else the caller goes on to what the child is (_converting)
        plan.watch_children()


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


def _converting(plan: Plan, observed: Observed) -> None:
    status, child = plan.status, observed.conversion
    conversion = status.conversion or ConversionStatus(job_name=conversion_name(plan.recjob))
    status.conversion = conversion
    if child is None:
        plan.actions.append(CreateConversion(conversion_name(plan.recjob)))
        plan.watch_children()
        return
    conversion.state = child.state if child.state != "Restarting" else "Running"
    report = child.result
    if report and "passed" in report:
        conversion.quality_gate = _gate_status(report)
    if child.state not in ("Succeeded", "Failed"):
        plan.watch_children()
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
    rolling_out(plan, observed, None)


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
    plan = Plan(recjob, status or RecJobStatus(), now)
    _on_spec(plan, previous, observed)
    phase = plan.status.phase
    if phase == "Pending":
        _pending(plan, observed)
    elif phase == "Training":
        _training(plan, observed)
    elif phase == "Converting":
        _converting(plan, observed)
    elif phase == "RollingOut":
        rolling_out(plan, observed, readings)
    return Decision(
        plan.printable_status(), plan.actions, plan.requeue_after, plan.wait_for_children
    )
