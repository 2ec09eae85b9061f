"""bench/api_write_costs.py: it sends what the operator's first pass sends for a new
RecJob, and states its floors from the phases it measured (no cluster needed)."""

from __future__ import annotations

import pytest

from tests.bench.scripts import BENCH, load_script


@pytest.fixture
def costs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # its siblings operator_scale.py, cpu_use.py
    return load_script(BENCH / "api_write_costs.py")


def created(costs, name: str = "w0001", namespace: str = "bench-scale-1") -> dict:
    """The bench's RecJob as the API server answers its create."""
    answer = costs.recjob(name, namespace)
    answer["metadata"] |= {"uid": "3f1c", "resourceVersion": "42", "generation": 1,
                           "creationTimestamp": "2026-12-06T12:00:00Z"}  # fmt: skip
    return answer


def test_first_pass_is_the_operators_training_create(costs):
    recjob, config_map, job, events, status = costs.first_pass(created(costs))
    assert (recjob.metadata.uid, recjob.metadata.resource_version) == ("3f1c", "42")
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "PyTorchJob"
    for child in (config_map, job):
        assert child["metadata"]["namespace"] == "bench-scale-1"
        assert child["metadata"]["ownerReferences"][0]["uid"] == "3f1c"
    assert [e.reason for e in events] == ["TrainingCreated"]
    assert status.phase == "Training" and status.training.job_name == job["metadata"]["name"]


def test_first_pass_refuses_a_recjob_the_operator_would_refuse(costs):
    answer = created(costs)
    answer["spec"]["training"]["maxSteps"] = -1
    with pytest.raises(RuntimeError, match="maxSteps"):
        costs.first_pass(answer)


def test_floors_add_the_creates_and_the_chosen_writes(costs):
    phases = [
        costs.per_write("create recjobs", 100, 1.0, {"kube-apiserver": 1.5, "etcd": 0.1,
                                                     "bench": 9.0}),
        costs.per_write("create configmaps", 100, 1.0, {"kube-apiserver": 0.8, "bench": 0.2}),
        costs.per_write("create pytorchjobs", 100, 1.0, {"kube-apiserver": 2.0, "bench": 0.3}),
        costs.per_write("update recjobs/status", 100, 1.0, {"kube-apiserver": 1.0,
                                                            "bench": 0.5}),
    ]  # fmt: skip
    assert phases[0]["cluster_cpu_ms_per_write"] == pytest.approx(16.0)  # the bench's left out
    every = costs.floor(phases, 2000, 2, None)
    assert every["cluster_cpu_ms_per_recjob"] == pytest.approx(16 + 8 + 20 + 10)
    assert every["seconds"] == pytest.approx(54 * 2000 / 1000 / 2)
    least = costs.floor(phases, 2000, 2, costs.INDISPENSABLE)
    assert least["phases"] == ["create recjobs", "create pytorchjobs", "update recjobs/status"]
    assert least["cluster_cpu_ms_per_recjob"] == pytest.approx(46)
    # the clients' CPU (the bench's process) comes on top, per write of each phase used
    assert every["client_cpu_ms_per_recjob"] == pytest.approx(90 + 2 + 3 + 5)
    assert every["seconds_with_clients"] == pytest.approx((54 + 100) * 2000 / 1000 / 2)
    assert least["client_cpu_ms_per_recjob"] == pytest.approx(90 + 3 + 5)
    assert least["seconds_with_clients"] == pytest.approx((46 + 98) * 2000 / 1000 / 2)
