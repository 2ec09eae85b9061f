"""bench/federated_tuned.py: a learning rate per method is chosen on validation users only,
and inputs that differ in more than the rate, or scored other users, are refused (plain
dicts in the shape bench/federated.py writes; milliseconds)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.bench.scripts import BENCH, load_script


@pytest.fixture(scope="module")
def tuned():
    return load_script(BENCH / "federated_tuned.py")


def result(rate: float, test: dict[str, float], validation: dict[str, float]) -> dict:
    """A bench/federated.py result: 4 test users, each model's per-user NDCG@10 constant."""
    names = ("zero-shot", "centralized", "federated IID", "federated non-IID", "federated IID + DP")
    return {
        "settings": {"learning_rate": rate, "rounds": 6, "silos": 4, "runs": f"r{rate}"},
        "eval_users": 4,
        "total_optimizer_steps": 192,
        "metrics": {n: {"full/ndcg@10": test.get(n, 0.04)} for n in names},
        "validation": {n: {"full/ndcg@10": validation.get(n, 0.04)} for n in names},
        "test_ndcg@10_per_user": {
            n: [test.get(n, 0.04)] * 4 if n != "zero-shot" else [0.0, 1.0, 0.0, 0.5] for n in names
        },
    }


def test_the_rate_is_chosen_on_validation_and_reported_on_test(tuned):
    # IID: best on *test* at 5e-4, best on validation at 2e-3; the chooser must take 2e-3
    low = result(5e-4, {"centralized": 0.050, "federated IID": 0.049},
                 {"centralized": 0.060, "federated IID": 0.050})  # fmt: skip
    high = result(2e-3, {"centralized": 0.040, "federated IID": 0.045},
                  {"centralized": 0.055, "federated IID": 0.058})  # fmt: skip
    tuned.check_comparable([low, high], [Path("low"), Path("high")])
    out = tuned.tune([low, high])
    assert out["chosen_learning_rate"]["centralized"] == 5e-4
    assert out["chosen_learning_rate"]["federated IID"] == 2e-3
    assert out["test_ndcg@10"]["federated IID"] == 0.045
    assert out["iid_ratio"] == pytest.approx(0.045 / 0.050)
    band = out["ndcg@10_minus_centralized"]["federated IID"]
    assert band["mean_difference"] == pytest.approx(-0.005)


def test_inputs_differing_in_more_than_the_rate_are_refused(tuned):
    a = result(5e-4, {}, {})
    b = result(2e-3, {}, {})
    b["settings"]["rounds"] = 24
    with pytest.raises(ValueError, match=r"\['rounds'\]"):
        tuned.check_comparable([a, b], [Path("a"), Path("b")])
    with pytest.raises(ValueError, match="same learning rate"):
        tuned.check_comparable([a, copy.deepcopy(a)], [Path("a"), Path("a2")])


def test_inputs_scored_on_other_users_are_refused(tuned):
    a, b = result(5e-4, {}, {}), result(2e-3, {}, {})
    b["test_ndcg@10_per_user"]["zero-shot"] = [1.0, 0.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="other test users"):
        tuned.check_comparable([a, b], [Path("a"), Path("b")])
    del b["validation"]
    with pytest.raises(ValueError, match="no validation scores"):
        tuned.check_comparable([a, b], [Path("a"), Path("b")])
