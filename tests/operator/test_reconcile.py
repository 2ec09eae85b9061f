"""The pure reconcile core: phases, idempotency, canary analysis, rollback, generations,
and what each kind of spec edit does (retrain, reconvert, or apply in place)."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from recjob_operator.api.v1alpha1.promql import render_query
from recjob_operator.api.validation import parse_recjob
from recjob_operator.controller.analysis import Reading
from recjob_operator.controller.reconcile import (
    ChildObservation,
    CleanupGeneration,
    CreateConversion,
    CreateTraining,
    DeployStable,
    EmitEvent,
    Observed,
    Promote,
    ReleaseService,
    RollBack,
    ServingObservation,
    SetCanary,
    analysis_due,
    conversion_name,
    reconcile,
    training_name,
)
from tests.conftest import MINIMAL

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
METRICS = {
    "model": {"ndcg@10": 0.91, "rmse": 0.47},
    "main_metric": "ndcg@10",
    "card": {"base_model": "all-MiniLM-L6-v2", "data_snapshot": "sha256:aa"},
}
GATE_OK = {
    "metric": "ndcg@10",
    "source_value": 0.91,
    "converted_value": 0.905,
    "relative_drop": 0.0055,
    "budget": 0.01,
    "rank_correlation": 0.99,
    "passed": True,
    "reasons": [],
    "published_version": 2,
}


def make(rollout: dict | None = None, generation: int = 1, status=None, **spec):
    """The minimal RecJob with a canary rollout; ``spec`` sets other spec sections."""
    document = copy.deepcopy(MINIMAL)
    document["metadata"]["generation"] = generation
    document["spec"].update(spec)
    document["spec"]["rollout"] = {
        "steps": [20, 50, 100],
        "interval": "30s",
        "failureLimit": 2,
        "noData": {"action": "hold", "deadline": "2m"},
        "metrics": [
            {
                "name": "error-rate",
                "query": 'errors{revision="{{revision}}",namespace="{{namespace}}"}',
                "max": 0.01,
            },
            {
                "name": "ctr-vs-stable",
                "query": 'ctr{revision="{{revision}}",namespace="{{namespace}}"}'
                ' / ctr{revision="{{stable}}",namespace="{{namespace}}"}',
                "min": 0.95,
            },
        ],
        **(rollout or {}),
    }
    job = parse_recjob(document)
    if status is not None:
        job.status = status
    return job


def step(job, observed: Observed, now: datetime, readings=None):
    """Reconcile and feed the status back, as a backend does."""
    decision = reconcile(job, observed, readings, now)
    job.status = decision.status
    return decision


def kinds(decision) -> list[type]:
    return [type(a) for a in decision.actions if not isinstance(a, EmitEvent)]


def trained(name: str = "minimal-g1-train") -> ChildObservation:
    return ChildObservation(name, "Succeeded", result=METRICS)


def converted(gate: dict = GATE_OK, state: str = "Succeeded") -> ChildObservation:
    return ChildObservation("minimal-g1-convert", state, result=gate)


def to_rollout(job, stable: int | None = 1) -> Observed:
    """Drive a fresh job to RollingOut against a service whose stable version is ``stable``."""
    step(job, Observed(), T0)
    step(job, Observed(training=trained()), T0)
    serving = (
        ServingObservation(stable_version=stable, ready=True, stable_revision=f"svc-v{stable}")
        if stable
        else None
    )
    observed = Observed(training=trained(), conversion=converted(), serving=serving)
    step(job, observed, T0)
    return observed


def test_pending_creates_training_once_by_deterministic_name() -> None:
    job = make()
    first = step(job, Observed(), T0)
    assert first.actions[0] == CreateTraining("minimal-g1-train")
    assert job.status.phase == "Training" and job.status.observed_generation == 1
    training = job.spec.training
    assert job.status.training.world_size == training.nodes * training.processes_per_node
    # the child is not visible yet: asking again is safe (create-if-absent by name)
    again = reconcile(job, Observed(), None, T0 + timedelta(seconds=5))
    assert kinds(again) == [CreateTraining]
    # once it exists nothing more is created
    running = ChildObservation(
        "minimal-g1-train", "Running", progress={"step": 40, "total_steps": 100, "loss": 0.3}
    )
    seen = step(job, Observed(training=running), T0 + timedelta(seconds=10))
    assert kinds(seen) == [] and job.status.training.progress.step == 40
    assert "step 40" in job.status.message
    # it waits for the child, with no deadline: a watching backend looks again on a change
    assert seen.wait_for_children and seen.requeue_after is None


def test_waiting_for_conversion_or_a_first_deployment_is_waiting_for_children() -> None:
    job = make()
    step(job, Observed(), T0)
    converting = step(job, Observed(training=trained()), T0)
    assert kinds(converting) == [CreateConversion]
    assert converting.wait_for_children and converting.requeue_after is None
    running = step(job, Observed(training=trained(), conversion=converted(state="Running")), T0)
    assert running.wait_for_children and running.requeue_after is None
    first = make()
    to_rollout(first, stable=None)  # no model yet: straight to 100%, once it is ready
    assert first.status.phase == "RollingOut" and "first model" in first.status.message
    deploying = step(first, Observed(training=trained(), conversion=converted()), T0)
    assert kinds(deploying) == [DeployStable] and deploying.wait_for_children


def test_a_child_created_by_a_pass_that_ended_before_its_status_is_judged_now() -> None:
    """An operator killed after a create and before the status write: the next pass sees
    the child (which may have run, even ended, meanwhile, and will not change again to
    wake the RecJob) and takes it as it is, in the same pass, creating nothing twice."""
    job = make()
    decision = step(job, Observed(training=trained()), T0)  # Pending, training ended
    assert job.status.phase == "Converting" and kinds(decision) == [CreateConversion]
    assert job.status.training.state == "Succeeded" and decision.wait_for_children
    running = make()
    decision = step(running, Observed(training=ChildObservation("minimal-g1-train", "Running")), T0)
    assert running.status.phase == "Training" and running.status.training.state == "Running"
    assert kinds(decision) == [] and decision.wait_for_children
    converted_meanwhile = make()
    step(converted_meanwhile, Observed(), T0)  # Training; then the conversion ended unseen
    decision = step(converted_meanwhile, Observed(training=trained(), conversion=converted()), T0)
    assert converted_meanwhile.status.phase == "RollingOut", converted_meanwhile.status.message
    assert CreateConversion not in kinds(decision)
    assert converted_meanwhile.status.conversion.state == "Succeeded"


def test_a_canary_whose_pods_are_not_ready_is_looked_at_again_at_its_deadline() -> None:
    """Its readiness comes from a watched child (any change wakes a watching backend), but
    the no-data deadline passes with no change: the core asks to look again then."""
    job = make()  # noData deadline 2m
    observed = to_rollout(job)
    waiting = dataclasses.replace(
        observed, serving=dataclasses.replace(observed.serving, canary_ready=False)
    )
    early = step(job, waiting, T0 + timedelta(seconds=30))
    assert "waiting for its pods" in job.status.message
    assert early.wait_for_children and early.requeue_after == 90.0
    late = step(job, waiting, T0 + timedelta(seconds=121))
    assert RollBack in kinds(late) and "not ready after 121s" in job.status.message


def test_the_pass_that_sees_its_new_training_child_writes_no_status() -> None:
    """The status the creating pass writes already says what the next pass sees (the
    child Created, no pod yet): at 2,000 new RecJobs, a second status PATCH each cost
    the API server 2,000 writes for a changed message."""
    job = make()
    step(job, Observed(), T0)
    written = job.status.model_copy(deep=True)
    seen = reconcile(job, Observed(training=ChildObservation("minimal-g1-train", "Created")),
                     None, T0 + timedelta(seconds=5))  # fmt: skip
    assert seen.status == written and seen.actions == []


def test_training_success_starts_conversion_and_records_quality() -> None:
    job = make()
    step(job, Observed(), T0)
    decision = step(job, Observed(training=trained()), T0)
    assert kinds(decision) == [CreateConversion]
    assert decision.actions[-1] != CreateConversion("x")
    assert job.status.phase == "Converting"
    assert job.status.quality.metric == "ndcg@10" and job.status.quality.value == 0.91
    assert job.status.lineage.base_model == "all-MiniLM-L6-v2"
    trained_condition = next(c for c in job.status.conditions if c.type == "Trained")
    assert trained_condition.status == "True"


def test_training_failure_fails_with_its_reason() -> None:
    job = make()
    step(job, Observed(), T0)
    failed = ChildObservation("minimal-g1-train", "Failed", message="OOMKilled on worker-1")
    decision = step(job, Observed(training=failed), T0)
    assert job.status.phase == "Failed" and "OOMKilled on worker-1" in job.status.message
    warnings = [a for a in decision.actions if isinstance(a, EmitEvent) and a.type == "Warning"]
    assert warnings and warnings[0].reason == "TrainingFailed"
    assert reconcile(job, Observed(training=failed), None, T0).actions == []  # terminal


def test_quality_gate_failure_never_deploys() -> None:
    job = make()
    step(job, Observed(), T0)
    step(job, Observed(training=trained()), T0)
    bad = dict(GATE_OK, passed=False, published_version=None, reasons=["ndcg@10 dropped 4%"])
    decision = step(job, Observed(training=trained(), conversion=converted(bad, "Failed")), T0)
    assert job.status.phase == "Failed"
    assert (
        "quality gate failed" in job.status.message and "ndcg@10 dropped 4%" in job.status.message
    )
    assert not any(isinstance(a, DeployStable | SetCanary) for a in decision.actions)
    gate = next(c for c in job.status.conditions if c.type == "QualityGatePassed")
    assert gate.status == "False" and job.status.conversion.quality_gate.passed is False


def test_first_model_goes_straight_to_100_percent() -> None:
    job = make()
    observed = to_rollout(job, stable=None)
    assert job.status.phase == "RollingOut"
    decision = reconcile(job, observed, None, T0)
    assert kinds(decision) == [DeployStable]
    serving = ServingObservation(stable_version=2, ready=True, stable_revision="minimal-v2")
    done = step(job, Observed(serving=serving), T0 + timedelta(seconds=5))
    assert job.status.phase == "Succeeded" and job.status.lineage.model_version == 2
    assert kinds(done) == [ReleaseService]
    ready = next(c for c in job.status.conditions if c.type == "Ready")
    assert ready.status == "True"


def healthy(**override) -> list[Reading]:
    values = {"error-rate": 0.0, "ctr-vs-stable": 1.04, **override}
    return [Reading(k, v) for k, v in values.items()]


def canary_serving(weight: int, version: int = 2) -> ServingObservation:
    return ServingObservation(
        stable_version=1,
        canary_version=version,
        canary_weight=weight,
        ready=True,
        stable_revision="svc-v1",
        canary_revision=f"minimal-v{version}",
    )


def test_good_canary_advances_each_step_and_is_promoted() -> None:
    job = make()
    to_rollout(job)
    rollout = job.status.rollout
    assert rollout.canary_weight == 20 and rollout.stable_model_version == 1
    now = T0
    assert not analysis_due(job, now + timedelta(seconds=10))
    weights = []
    for weight in (20, 50, 100):
        now += timedelta(seconds=30)
        assert analysis_due(job, now)
        decision = step(job, Observed(serving=canary_serving(weight)), now, healthy())
        weights.append([a for a in decision.actions if isinstance(a, SetCanary | Promote)])
    assert weights[0] == [SetCanary(2, 50)] and weights[1] == [SetCanary(2, 100)]
    assert weights[2] == [Promote(2)]
    assert job.status.phase == "Succeeded" and job.status.rollout.state == "Promoted"
    assert [r.verdict for r in job.status.rollout.history] == ["pass"] * 6
    assert (
        job.status.lineage.model_version == 2 and job.status.lineage.previous_model_version is None
    )


def test_bad_canary_is_rolled_back_at_the_failure_limit() -> None:
    job = make()
    to_rollout(job)
    now = T0 + timedelta(seconds=30)
    first = step(job, Observed(serving=canary_serving(20)), now, healthy(**{"ctr-vs-stable": 0.7}))
    assert job.status.phase == "RollingOut" and job.status.rollout.failed_checks == 1
    assert not any(isinstance(a, RollBack) for a in first.actions)
    now += timedelta(seconds=30)
    second = step(job, Observed(serving=canary_serving(20)), now, healthy(**{"ctr-vs-stable": 0.7}))
    rollback = next(a for a in second.actions if isinstance(a, RollBack))
    assert (rollback.canary_version, rollback.stable_version) == (2, 1)
    assert job.status.phase == "RolledBack"
    assert "ctr-vs-stable = 0.7 (wanted >= 0.95): fail" in job.status.message
    record = job.status.rollout.history[-1]
    assert record.metric == "ctr-vs-stable" and record.value == 0.7 and record.min == 0.95


def test_no_data_holds_then_rolls_back_at_the_deadline() -> None:
    job = make()
    to_rollout(job)
    now = T0
    for _ in range(6):  # 30 s .. 180 s without data; the hold clock starts at 30 s
        now += timedelta(seconds=30)
        decision = step(job, Observed(serving=canary_serving(20)), now, [])
        if job.status.phase != "RollingOut":
            break
        assert job.status.rollout.state == "Holding"
        assert job.status.rollout.canary_weight == 20  # held, never advanced
    assert job.status.phase == "RolledBack"
    assert any(isinstance(a, RollBack) for a in decision.actions)
    assert "no conclusive analysis for 120s" in job.status.message
    assert {r.verdict for r in job.status.rollout.history} == {"no-data"}


def test_no_data_can_count_as_failure() -> None:
    job = make({"noData": {"action": "fail", "deadline": "2m"}})
    to_rollout(job)
    step(job, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=30), [])
    assert job.status.rollout.failed_checks == 1


def test_query_errors_are_counted_apart_and_hold() -> None:
    job = make()
    to_rollout(job)
    readings = [
        Reading("error-rate", error="connection refused"),
        Reading("ctr-vs-stable", error="connection refused"),
    ]
    step(job, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=30), readings)
    rollout = job.status.rollout
    assert rollout.query_errors == 2 and rollout.failed_checks == 0
    assert rollout.state == "Holding" and job.status.phase == "RollingOut"
    # Prometheus is back: analysis passes and the hold clock resets
    step(job, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=60), healthy())
    assert job.status.rollout.no_data_since is None and job.status.rollout.canary_weight == 50


def test_manual_approval_pauses_before_the_last_step() -> None:
    job = make({"manualApproval": True})
    to_rollout(job)
    now = T0
    for weight in (20, 50):
        now += timedelta(seconds=30)
        step(job, Observed(serving=canary_serving(weight)), now, healthy())
    assert job.status.rollout.state == "AwaitingApproval" and job.status.rollout.canary_weight == 50
    assert not analysis_due(job, now + timedelta(minutes=5))
    waiting = step(job, Observed(serving=canary_serving(50)), now + timedelta(minutes=5))
    assert job.status.rollout.state == "AwaitingApproval" and kinds(waiting) == []
    approved = step(
        job,
        Observed(serving=canary_serving(50), approved_generation=1),
        now + timedelta(minutes=6),
    )
    assert SetCanary(2, 100) in approved.actions


def test_restart_mid_canary_restores_the_weight_without_duplicates() -> None:
    job = make()
    to_rollout(job)
    step(job, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=30), healthy())
    assert job.status.rollout.canary_weight == 50
    # a restarted operator reads the stored status; the service still shows 20%
    restored = make(status=job.status.model_copy(deep=True))
    decision = reconcile(
        restored, Observed(serving=canary_serving(20)), None, T0 + timedelta(seconds=40)
    )
    assert kinds(decision) == [SetCanary] and decision.actions[0] == SetCanary(2, 50)
    assert not any(isinstance(a, CreateTraining | CreateConversion) for a in decision.actions)


def test_new_model_generation_supersedes_an_inflight_canary() -> None:
    job = make()
    to_rollout(job)
    newer = make(
        generation=2, status=job.status.model_copy(deep=True), training={"learningRate": 1e-4}
    )
    decision = step(newer, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=10))
    assert CleanupGeneration(1) in decision.actions
    rollback = next(a for a in decision.actions if isinstance(a, RollBack))
    assert rollback.canary_version == 2 and rollback.stable_version == 1
    assert "superseded by generation 2" in rollback.reason
    assert CreateTraining("minimal-g2-train") in decision.actions
    assert newer.status.observed_generation == 2 and newer.status.phase == "Training"
    assert newer.status.model_generation == 2


def test_history_is_capped() -> None:
    job = make({"analysesPerStep": 100, "noData": {"action": "hold", "deadline": "10h"}})
    to_rollout(job)
    now = T0
    for _ in range(40):
        now += timedelta(seconds=30)
        step(job, Observed(serving=canary_serving(20)), now, healthy())
    assert len(job.status.rollout.history) == 50
    assert job.status.rollout.history[-1].time == now


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ('x{revision="{{revision}}"}', 'x{revision="c"}'),
        ("a{r='{{ stable }}'}[{{interval}}]", "a{r='s'}[30s]"),
    ],
)
def test_render_query(template: str, expected: str) -> None:
    values = {"revision": "c", "stable": "s", "interval": "30s"}
    assert render_query(template, values) == expected


# --------------------------------------------------------------------------- spec edits
def edited(job, generation: int = 2, rollout: dict | None = None, **spec):
    """``job`` after a spec edit: the next generation, carrying the stored status."""
    return make(rollout, generation=generation, status=job.status.model_copy(deep=True), **spec)


def retraining_or_rollback(decision) -> list:
    return [
        a
        for a in decision.actions
        if isinstance(a, CreateTraining | CreateConversion | CleanupGeneration | RollBack)
    ]


def test_rollout_edit_mid_canary_neither_retrains_nor_rolls_back() -> None:
    job = make()
    to_rollout(job)
    step(job, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=30), healthy())
    assert job.status.rollout.canary_weight == 50
    newer = edited(job, rollout={"steps": [10, 30, 60, 100], "failureLimit": 3})
    now = T0 + timedelta(seconds=40)
    decision = step(newer, Observed(serving=canary_serving(50)), now)
    assert retraining_or_rollback(decision) == []
    assert training_name(newer) == "minimal-g1-train"
    assert conversion_name(newer) == "minimal-g1-convert"
    status = newer.status
    assert status.phase == "RollingOut" and status.observed_generation == 2
    assert status.model_generation == 1 and status.conversion_revision == 1
    # the canary keeps its 50% at the new step 30 (index 1), and advances to 60 next
    assert status.rollout.canary_weight == 50 and status.rollout.step == 1
    assert status.rollout.canary_model_version == 2 and status.training.state == "Succeeded"
    now += timedelta(seconds=30)
    assert analysis_due(newer, now)
    decision = step(newer, Observed(serving=canary_serving(50)), now, healthy())
    assert SetCanary(2, 60) in decision.actions and retraining_or_rollback(decision) == []
    for weight in (60, 100):
        now += timedelta(seconds=30)
        decision = step(newer, Observed(serving=canary_serving(weight)), now, healthy())
    assert Promote(2) in decision.actions and newer.status.phase == "Succeeded"


def test_serving_edit_mid_canary_reapplies_the_canary_only() -> None:
    job = make()
    to_rollout(job)
    newer = edited(job, serving={"maxReplicas": 7, "resources": {"cpu": "4"}})
    decision = step(newer, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=10))
    assert retraining_or_rollback(decision) == []
    assert kinds(decision) == [SetCanary] and decision.actions[0] == SetCanary(2, 20)
    assert newer.status.rollout.canary_weight == 20 and newer.status.phase == "RollingOut"


def test_canary_below_the_edited_first_step_moves_up_to_it() -> None:
    job = make()
    to_rollout(job)
    newer = edited(job, rollout={"steps": [40, 100]})
    decision = step(newer, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=10))
    assert retraining_or_rollback(decision) == [] and SetCanary(2, 40) in decision.actions
    assert newer.status.rollout.step == 0 and newer.status.rollout.canary_weight == 40


def test_withdrawn_manual_approval_takes_the_last_step() -> None:
    job = make({"manualApproval": True})
    to_rollout(job)
    now = T0
    for weight in (20, 50):
        now += timedelta(seconds=30)
        step(job, Observed(serving=canary_serving(weight)), now, healthy())
    assert job.status.rollout.state == "AwaitingApproval"
    newer = edited(job, rollout={"manualApproval": False})
    decision = step(newer, Observed(serving=canary_serving(50)), now + timedelta(seconds=5))
    assert SetCanary(2, 100) in decision.actions and retraining_or_rollback(decision) == []
    assert newer.status.rollout.state == "Progressing"


def test_training_edit_retrains_and_rolls_out_the_new_model() -> None:
    job = make()
    observed = to_rollout(job, stable=None)
    step(job, observed, T0)
    serving = ServingObservation(stable_version=2, ready=True, stable_revision="minimal-v2")
    step(job, Observed(serving=serving), T0 + timedelta(seconds=5))
    assert job.status.phase == "Succeeded"
    newer = edited(job, training={"epochs": 2})
    decision = step(newer, Observed(serving=serving), T0 + timedelta(minutes=1))
    assert CreateTraining("minimal-g2-train") in decision.actions
    assert not any(isinstance(a, RollBack) for a in decision.actions)  # it was promoted
    assert newer.status.model_generation == 2 and newer.status.phase == "Training"
    assert newer.status.lineage.model_version == 2  # still what the service serves


def test_export_edit_mid_canary_reconverts_without_retraining() -> None:
    job = make()
    to_rollout(job)
    newer = edited(job, export={"qualityBudget": {"maxRelativeDrop": 0.05}})
    assert conversion_name(newer) == "minimal-g1-convert-2"
    decision = step(newer, Observed(serving=canary_serving(20)), T0 + timedelta(seconds=10))
    assert not any(isinstance(a, CreateTraining) for a in decision.actions)
    rollback = next(a for a in decision.actions if isinstance(a, RollBack))
    assert (rollback.canary_version, rollback.stable_version) == (2, 1)
    assert CreateConversion("minimal-g1-convert-2") in decision.actions
    status = newer.status
    assert status.phase == "Converting" and status.model_generation == 1
    assert status.conversion_revision == 2 and status.rollout is None
    assert status.training.state == "Succeeded" and training_name(newer) == "minimal-g1-train"
    # the new conversion publishes version 3, canaried against the stable version 1
    gate = dict(GATE_OK, published_version=3)
    reconverted = ChildObservation("minimal-g1-convert-2", "Succeeded", result=gate)
    serving = ServingObservation(stable_version=1, ready=True, stable_revision="svc-v1")
    decision = step(newer, Observed(conversion=reconverted, serving=serving), T0 + timedelta(1))
    assert newer.status.phase == "RollingOut" and SetCanary(3, 20) in decision.actions


def test_export_edit_during_conversion_stops_only_the_conversion() -> None:
    job = make()
    step(job, Observed(), T0)
    step(job, Observed(training=trained()), T0)
    assert job.status.phase == "Converting"
    newer = edited(job, export={"opset": 18})
    decision = step(newer, Observed(training=trained()), T0 + timedelta(seconds=5))
    assert CleanupGeneration(1, training=False, conversion=1) in decision.actions
    assert CreateConversion("minimal-g1-convert-2") in decision.actions
    assert not any(isinstance(a, CreateTraining) for a in decision.actions)


def test_export_edit_during_training_changes_no_name() -> None:
    job = make()
    step(job, Observed(), T0)
    newer = edited(job, export={"opset": 18})
    running = ChildObservation("minimal-g1-train", "Running")
    decision = step(newer, Observed(training=running), T0 + timedelta(seconds=5))
    assert retraining_or_rollback(decision) == [] and newer.status.phase == "Training"
    assert conversion_name(newer) == "minimal-g1-convert"  # nothing was converted yet
    decision = step(newer, Observed(training=trained()), T0 + timedelta(seconds=10))
    assert CreateConversion("minimal-g1-convert") in decision.actions


def test_status_from_before_model_generations_keeps_child_names() -> None:
    job = make(generation=3)
    step(job, Observed(), T0)
    legacy = job.status.model_copy(deep=True)
    legacy.model_generation = legacy.model_digest = None
    legacy.conversion_revision = legacy.conversion_digest = None
    restored = make(generation=3, status=legacy)
    assert training_name(restored) == "minimal-g3-train"
    running = ChildObservation("minimal-g3-train", "Running")
    decision = step(restored, Observed(training=running), T0 + timedelta(seconds=5))
    assert retraining_or_rollback(decision) == [] and restored.status.model_generation == 3


def test_every_spec_field_has_a_declared_edit_behaviour() -> None:
    """A new top-level spec field must be classified: retrain, reconvert or in place."""
    from recjob_operator.api.v1alpha1 import RecJobSpec
    from recjob_operator.controller.identity import IN_PLACE_FIELDS, MODEL_FIELDS

    assert set(RecJobSpec.model_fields) <= {*MODEL_FIELDS, "export", *IN_PLACE_FIELDS}


def test_spec_digests_are_computed_once_per_spec_and_forgotten_with_it() -> None:
    """A pass asks for its spec's identity many times: the digests are kept while the spec
    lives, and an edited spec (a new object, as from the API server) gets its own."""
    import gc

    from recjob_operator.controller import identity as identity_module

    job = make()
    digests = identity_module.spec_digests(job.spec)
    expected = identity_module.model_digest(job.spec), identity_module.conversion_digest(job.spec)
    assert digests == expected
    assert identity_module.spec_digests(job.spec) is digests
    edited = make(export={"target": "onnxruntime-fp32"})
    assert identity_module.spec_digests(edited.spec)[1] != digests[1]
    key = id(edited.spec)
    assert key in identity_module._DIGESTS
    del edited
    gc.collect()
    assert key not in identity_module._DIGESTS


def test_a_pass_cut_short_before_its_status_still_records_its_events() -> None:
    """The operator created a child and died before writing the status: the repeated pass
    finds the child, creates nothing, and still emits the creation event (the backend
    names events by content, so one the dead pass did post is not posted twice)."""
    job = make()
    running = ChildObservation("minimal-g1-train", "Running")
    decision = reconcile(job, Observed(training=running), None, T0)
    assert kinds(decision) == []
    assert [e.reason for e in decision.actions if isinstance(e, EmitEvent)] == ["TrainingCreated"]
    step(job, Observed(training=running), T0)
    converting = ChildObservation("minimal-g1-convert", "Running")
    decision = reconcile(job, Observed(training=trained(), conversion=converting), None, T0)
    assert CreateConversion not in kinds(decision)
    reasons = [e.reason for e in decision.actions if isinstance(e, EmitEvent)]
    assert reasons == ["TrainingSucceeded", "ConversionCreated"]


def test_events_are_named_by_what_they_say() -> None:
    from recjob_operator.kube.backend import event_name

    job = make()
    job.metadata.uid = "0b1c"
    first = event_name(job, EmitEvent("Normal", "TrainingCreated", "created training x"))
    assert first == event_name(job, EmitEvent("Normal", "TrainingCreated", "created training x"))
    assert first.startswith("minimal.") and len(first) == len("minimal.") + 16
    assert first != event_name(job, EmitEvent("Normal", "TrainingCreated", "created training y"))
    job.metadata.generation = 2
    assert first != event_name(job, EmitEvent("Normal", "TrainingCreated", "created training x"))
