"""A federated RecJob through `recjob run` (issue 16): the federation (a SuperLink and one
SuperNode per silo, real Flower processes on loopback with TLS) trains; its model then
takes the same road as any other: conversion and quality gate on the owner's held-out
data, a canary against the stable model, promotion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.local.test_local_mode import (
    AMAZON,
    listening_ports,
    recjob,
    recjob_run,
    status,
    tiny_dataset,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not AMAZON.exists(), reason="../shared/data not present"),
]


def document(data: Path, name: str, federated: bool) -> dict:
    """The tiny recommendation RecJob of test_local_mode on service ``fed``; federated:
    LoRA, spec.data split into two silos by user hash, two rounds of two steps."""
    doc = recjob(data, name, ctr_min=0.0)
    spec = doc["spec"]
    spec["serving"]["name"] = "fed"
    if federated:
        spec["model"]["fineTuning"] = {"method": "lora", "lora": {"rank": 4, "alpha": 8.0}}
        spec["training"] = {
            "microBatchSize": 8,
            "learningRate": 1e-3,
            "federated": {
                "partition": {"by": "hash", "count": 2},
                "rounds": 2,
                "localSteps": 2,
                "participation": {"minSilos": 2, "roundDeadlineSeconds": 600},
            },
        }
    return doc


# extended: make test proves its parts (tests/cluster/test_federated.py: a federated RecJob
# through the operator, SecAgg+, conversion and the gate; tests/local/test_local_mode.py:
# `recjob run`'s canary; tests/federated: the deployment engine with SecAgg+ and DP)
@pytest.mark.extended
def test_a_federated_model_is_gated_and_rolled_out_by_a_canary(tmp_path: Path) -> None:
    tiny_dataset(tmp_path / "data")
    for name, federated in (("central", False), ("federated", True)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document(tmp_path / "data", name, federated)))
        done = recjob_run(tmp_path, path)
        assert done.returncode == 0, done.stderr[-3000:]

    state = status(tmp_path, "federated")["status"]
    assert state["phase"] == "Succeeded", state
    assert state["lineage"]["modelVersion"] == 2
    # rolled out as a canary over the first (central) model, then promoted
    history = state["rollout"]["history"]
    assert {h["weight"] for h in history} == {50, 100} and history[-1]["verdict"] == "pass"
    service = json.loads((tmp_path / "work/services/fed/state.json").read_text())
    assert service["stable_version"] == 2

    run = tmp_path / "work" / "federated" / "g1"
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    fed = metrics["federated"]
    assert fed["engine"] == "flower-deployment" and fed["silos"] == 2
    assert fed["rounds_completed"] == 2 and fed["superlink"]["tls"]
    # the round progress the status showed came from the ServerApp's progress events
    events = [json.loads(x) for x in (run / "train" / "progress.jsonl").read_text().split("\n")
              if x]  # fmt: skip
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2]
    assert state["training"]["progress"]["step"] == 2
    # the gate measured the converted model on the owner's held-out data (prepared beside
    # the model by the launcher), which the ServerApp never opened
    gate = json.loads(next(run.glob("convert*/quality-gate.json")).read_text())
    assert gate["passed"] is True
    assert (run / "train" / "data" / "report.json").exists()
    opened = json.loads((run / "train" / "federated" / "server-opened-files.json").read_text())
    silos = run / "federation" / "silos"
    assert silos.is_dir() and not [p for p in opened if p.startswith(str(silos))]
    assert not [p for p in opened if p.startswith(str(run / "train" / "data"))]
    assert not [p for p in opened if p.startswith(str(tmp_path / "data"))]
    assert listening_ports(tmp_path, "fed") == []
