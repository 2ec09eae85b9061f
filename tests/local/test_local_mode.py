"""`recjob run` end to end on a small slice of Amazon Scientific: real 2-process training,
real conversion and gate, real servers behind the router, replayed traffic, a real
Prometheus, the reconcile core deciding. Promote, roll back, and kill/resume mid-canary."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from recjob_operator.local.processes import group_members
from recjob_operator.prometheus import prometheus_binary
from tests.conftest import SHARED

AMAZON = SHARED / "data" / "amazon-scientific"
BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not AMAZON.exists(), reason="../shared/data not present"),
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus not installed"),
]


def tiny_dataset(target: Path, users: int = 60) -> None:
    """The first ``users`` users of each split and only the items they touch."""
    target.mkdir(parents=True, exist_ok=True)
    items: set[str] = set()
    for split in ("train", "valid", "test"):
        lines = (AMAZON / f"Scientific.{split}.inter").read_text().splitlines()
        kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t", 1)[0]) < users]
        for line in kept[1:]:
            _, history, item = line.split("\t")
            items.update(history.split())
            items.add(item)
        (target / f"Scientific.{split}.inter").write_text("\n".join(kept) + "\n")
    index_lines = (AMAZON / "Scientific.item2index").read_text().splitlines()
    (target / "Scientific.item2index").write_text("\n".join(index_lines) + "\n")
    asins = {line.split("\t")[0] for line in index_lines if line.split("\t")[-1].strip() in items}
    text = (AMAZON / "Scientific.text").read_text().splitlines()
    kept_text = [text[0]] + [line for line in text[1:] if line.split("\t", 1)[0] in asins]
    (target / "Scientific.text").write_text("\n".join(kept_text) + "\n")


def recjob(data: Path, name: str, ctr_min: float, interval: str = "4s", processes: int = 1) -> dict:
    return {
        "apiVersion": "recjob.dev/v1alpha1",
        "kind": "RecJob",
        "metadata": {"name": name},
        "spec": {
            "data": {
                "task": "recommendation",
                "format": "atomic",
                "train": str(data / "Scientific.train.inter"),
                "validation": str(data / "Scientific.valid.inter"),
                "test": str(data / "Scientific.test.inter"),
                "catalog": str(data / "Scientific.text"),
                "preprocessing": {"negativeSampling": {"strategy": "uniform", "perPositive": 1}},
            },
            "model": {"maxSequenceLength": 24, "historyLength": 3},
            "training": {
                "processesPerNode": processes,
                "microBatchSize": 8,
                "maxSteps": 3,
                # fp32: CPUs without bf16 arithmetic (AVX2; CI's too) emulate bf16, and
                # a 3-step RecJob like this trained in 103 s instead of 40 s (trainer/README.md)
                "precision": "fp32",
                "evalIntervalSteps": 3,
                "checkpoint": {"intervalSteps": 3},
            },
            # fp32: these tests are about local mode; int8 is covered by the serving tests
            "export": {"target": "onnxruntime-fp32", "qualityBudget": {"maxRelativeDrop": 0.5}},
            "serving": {"name": "tiny"},
            "rollout": {
                "steps": [50, 100],
                "interval": interval,
                "failureLimit": 1,
                "noData": {"action": "hold", "deadline": "60s"},
                "metrics": [
                    {
                        "name": "error-rate",
                        "query": "sum(rate(recjob_inference_errors_total"
                        '{revision="{{revision}}",namespace="{{namespace}}"}'
                        "[{{interval}}])) / sum(rate(recjob_inference_requests_total"
                        '{revision="{{revision}}",namespace="{{namespace}}"}[{{interval}}]))',
                        "max": 0.01,
                    },
                    {
                        "name": "ctr-vs-stable",
                        "query": "(sum(rate(recjob_feedback_clicks_total"
                        '{revision="{{revision}}",namespace="{{namespace}}"}'
                        "[1m])) + 1) / (sum(rate(recjob_feedback_clicks_total"
                        '{revision="{{stable}}",namespace="{{namespace}}"}[1m])) + 1)',
                        "min": ctr_min,
                    },
                ],
            },
        },
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("local")
    tiny_dataset(root / "data")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # models and checkpoints: GBs of CI's disk


def write(root: Path, name: str, ctr_min: float, interval: str = "4s", processes: int = 1) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recjob(root / "data", name, ctr_min, interval, processes)))
    return path


def recjob_run(root: Path, file: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "recjob"), "run", str(file), "--workdir", str(root / "work"),
         "--eval-groups", "10", "--replay-rate", "20", "--no-baselines", *extra],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip


def status(root: Path, name: str) -> dict:
    return yaml.safe_load((root / "work" / name / "status.yaml").read_text())


def listening_ports(root: Path, service: str = "tiny") -> list[int]:
    """Ports recorded by the service's processes that still accept connections."""
    ports = []
    for record in (root / "work" / "services" / service / "run").glob("*.json"):
        if record.name == "routes.json":
            continue
        meta = json.loads(record.read_text()).get("meta", {})
        for port in (meta.get("port"), meta.get("http_port"), meta.get("grpc_port")):
            if port:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        ports.append(port)
    return ports


def test_first_model_then_a_promoted_canary(workspace: Path) -> None:
    first = recjob_run(workspace, write(workspace, "first", 0.0))
    assert first.returncode == 0, first.stderr[-3000:]
    assert status(workspace, "first")["status"]["phase"] == "Succeeded"
    assert listening_ports(workspace) == []

    good = recjob_run(workspace, write(workspace, "good", 0.0, processes=2))  # 2 trainers
    assert good.returncode == 0, good.stderr[-3000:]
    done = status(workspace, "good")["status"]
    assert done["phase"] == "Succeeded" and done["lineage"]["modelVersion"] == 2
    history = done["rollout"]["history"]
    weights = [h["weight"] for h in history if h["metric"] == "error-rate"]
    assert weights == sorted(weights) and set(weights) == {50, 100}  # may hold on no data
    assert {h["verdict"] for h in history} <= {"pass", "no-data"}
    assert history[-1]["verdict"] == "pass"
    state = json.loads((workspace / "work/services/tiny/state.json").read_text())
    assert state["stable_version"] == 2
    progress = (workspace / "work" / "good" / "g1" / "train" / "progress.jsonl").read_text()
    start = next(json.loads(x) for x in progress.splitlines() if '"start"' in x)
    assert start["world_size"] == 2  # processesPerNode: 2 -> two trainer processes
    report = workspace / "work" / "good" / "g1" / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["live_by_revision"]["tiny-v2"]["impressions"] > 0
    assert summary["live_by_revision"]["tiny-v1"]["impressions"] > 0
    assert "canary-timeline.png" in summary["charts"]
    assert (report / "report.html").exists()
    assert listening_ports(workspace) == []


# extended: make test kills the operator mid-flight on the cluster (test_lifecycle.py) and
# rolls a bad canary back there (test_serving.py); this is `recjob run`'s own resume
@pytest.mark.extended
def test_killed_mid_canary_resumes_and_rolls_back_without_duplicates(workspace: Path) -> None:
    """A canary whose business metric cannot reach its threshold; `recjob run` is killed
    mid-canary and started again: it adopts what runs and the analysis rolls it back."""
    if not (workspace / "work/services/tiny/state.json").exists():
        first = recjob_run(workspace, write(workspace, "first", 0.0))
        assert first.returncode == 0, first.stderr[-3000:]
    stable = json.loads((workspace / "work/services/tiny/state.json").read_text())
    file = write(workspace, "resumed", 1000.0, interval="6s")
    command = [str(BIN / "recjob"), "run", str(file), "--workdir", str(workspace / "work"),
               "--eval-groups", "10", "--replay-rate", "20", "--no-baselines"]  # fmt: skip
    log = (workspace / "resumed-1.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    routes = workspace / "work" / "services" / "tiny" / "run" / "routes.json"
    deadline = time.time() + 800
    while time.time() < deadline:  # the router sends 50% to the new canary
        table = json.loads(routes.read_text()) if routes.exists() else {}
        if table.get("weight") == 50 and table.get("canary"):
            break
        assert process.poll() is None, (workspace / "resumed-1.log").read_text()[-3000:]
        time.sleep(0.5)
    else:
        pytest.fail("the canary never started")
    run_dir = workspace / "work" / "services" / "tiny" / "run"
    generation = workspace / "work" / "resumed" / "g1"
    before = {
        p.name: json.loads(p.read_text())["pid"]
        for p in [*run_dir.glob("server-v*.json"), generation / "train-node0.json",
                  generation / "convert.json"]
    }  # fmt: skip
    process.send_signal(signal.SIGKILL)  # no chance to clean up: children keep running
    process.wait()
    again = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 3, again.stderr[-3000:]
    final = status(workspace, "resumed")["status"]
    assert final["phase"] == "RolledBack"
    assert "ctr-vs-stable" in final["message"] and "wanted >= 1000" in final["message"]
    state = json.loads((workspace / "work/services/tiny/state.json").read_text())
    assert state["stable_version"] == stable["stable_version"]  # the stable model stays
    after = {
        p.name: json.loads(p.read_text())["pid"]
        for p in [*run_dir.glob("server-v*.json"), generation / "train-node0.json",
                  generation / "convert.json"]
    }  # fmt: skip
    assert after["train-node0.json"] == before["train-node0.json"]  # not retrained
    assert after["convert.json"] == before["convert.json"]  # not reconverted
    canary = final["conversion"]["modelVersion"]
    assert after[f"server-v{canary}.json"] == before[f"server-v{canary}.json"]  # adopted
    events = [
        json.loads(line)["reason"]
        for line in (workspace / "work" / "resumed" / "events.jsonl").read_text().splitlines()
    ]
    assert events.count("TrainingCreated") == 1 and events.count("ConversionCreated") == 1
    assert events.count("RolledBack") == 1 and "Promoted" not in events
    assert listening_ports(workspace) == []
    shown = subprocess.run(
        [str(BIN / "recjob"), "status", "resumed", "--workdir", str(workspace / "work")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert yaml.safe_load(shown.stdout)["status"]["phase"] == "RolledBack"


def test_interrupt_stops_every_child(workspace: Path) -> None:
    file = write(workspace, "interrupted", 0.0)
    process = subprocess.Popen(
        [str(BIN / "recjob"), "run", str(file), "--workdir", str(workspace / "work")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    record = workspace / "work" / "interrupted" / "g1" / "train-node0.json"
    deadline = time.time() + 120
    while not record.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert record.exists()
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "run it again to continue" in err
    pid = json.loads(record.read_text())["pid"]
    assert group_members(pid) == []  # the trainer's whole process group is gone
