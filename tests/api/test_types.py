"""Field types and model behaviour of the RecJob API."""

from __future__ import annotations

from datetime import timedelta

import pytest

from recjob_operator.api.v1alpha1 import RecJob, RecJobStatus, parse_duration, parse_quantity
from recjob_operator.api.validation import parse_recjob
from tests.conftest import EXAMPLES, load_yaml


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("1m30s", 90), ("2h", 7200), ("1.5m", 90), ("250ms", 0.25), ("1h0m1s", 3601)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5", "5x", "m", "-1s", "1 m", "1m-"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2", 2.0),
        ("500m", 0.5),
        ("1Gi", 2**30),
        ("8Mi", 8 * 2**20),
        ("1k", 1000.0),
        ("1e3", 1000.0),
        ("0.5", 0.5),
    ],
)
def test_parse_quantity(text: str, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "Gi", "1Gx", "one"])
def test_parse_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(text)


def test_integer_quantities_become_strings(minimal: dict) -> None:
    minimal["spec"]["training"] = {"resources": {"cpu": 4, "memory": "16Gi"}}
    job = parse_recjob(minimal)
    assert job.spec.training.resources.cpu == "4"


def test_defaults_fill_a_minimal_recjob(minimal: dict) -> None:
    job = parse_recjob(minimal)
    spec = job.spec
    assert spec.model.base_model == "all-MiniLM-L6-v2"
    assert spec.training.deepspeed.zero_stage == 2
    assert spec.rollout.steps == [10, 25, 50, 100]
    assert [m.name for m in spec.rollout.metrics] == ["error-rate", "latency-p99"]
    assert job.service_name == "minimal"
    assert job.generation == 1


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_wire_round_trip(path) -> None:
    """What the operator writes back (to_wire) parses to the same object."""
    job = parse_recjob(load_yaml(path))
    again = RecJob.model_validate(job.to_wire())
    assert again == job
    assert "microBatchSize" in again.to_wire()["spec"]["training"]


def test_status_accepts_api_server_timestamps() -> None:
    status = RecJobStatus.model_validate(
        {
            "phase": "RollingOut",
            "conditions": [
                {
                    "type": "Trained",
                    "status": "True",
                    "reason": "JobSucceeded",
                    "lastTransitionTime": "2026-11-29T12:00:00Z",
                }
            ],
            "rollout": {
                "step": 1,
                "canaryWeight": 25,
                "history": [
                    {
                        "time": "2026-11-29T12:01:00Z",
                        "step": 1,
                        "weight": 25,
                        "metric": "error-rate",
                        "value": 0.001,
                        "max": 0.01,
                        "verdict": "pass",
                    }
                ],
            },
        }
    )
    assert status.conditions[0].last_transition_time.year == 2026
    assert status.rollout.history[0].verdict == "pass"
    wire = status.to_wire()
    assert wire["conditions"][0]["lastTransitionTime"].startswith("2026-11-29T12:00:00")
