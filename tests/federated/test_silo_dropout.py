"""A silo that drops out mid-run, on Flower's deployment engine with real processes: three
silos, participation.minSilos 2; once the ServerApp has started its rounds the third
silo's SuperNode (and the ClientApp it runs) is stopped. The rounds complete with the two
others, each round's record says who replied, and the final evaluation comes from the two
silos still there. Also with secure aggregation, where SecAgg+ goes on without the silo
(its masks, if it had shared its keys, rebuilt from the others' shares)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from recjob_trainer.config import load_config
from recjob_trainer.federated.local import launch, wait
from tests.federated.test_local_federation import config_file, silo_logs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "secure",
    # plain dropout is the easier case: secure aggregation must also unmask without the silo
    [
        pytest.param(False, id="plain", marks=pytest.mark.extended),
        pytest.param(True, id="secure-aggregation"),
    ],
)
def test_rounds_complete_without_a_silo_that_dropped_out(tmp_path: Path, secure: bool) -> None:
    owners = tmp_path / "owners"
    data = {
        "north": silo_logs(owners / "north", "north"),
        "south": silo_logs(owners / "south", "south"),
        "east": silo_logs(owners / "east", "north", seed=1),
    }
    output, work = tmp_path / "run", tmp_path / "federation"
    config = load_config(config_file(tmp_path, data, output, secureAggregation=secure))
    # minSilos 2, 2 rounds
    federation, run_id, since = launch(config, work)
    try:
        progress = output / "progress.jsonl"
        deadline = time.time() + 600
        while not (progress.exists() and '"start"' in progress.read_text()):
            assert time.time() < deadline, "the ServerApp did not start its rounds in 600 s"
            assert federation.processes["superlink"].poll() is None
            time.sleep(0.2)
        federation.stop("supernode-east")  # the silo leaves as round 1 is sent
        run = wait(federation, run_id, output, since, timeout=1200)
    finally:
        federation.stop()
    assert run["status"] == "finished:completed" and run["server-error"] is None, run

    metrics = json.loads((output / "metrics.json").read_text())
    fed = metrics["federated"]
    assert fed["silos"] == 3 and fed["rounds_completed"] == 2
    assert (fed["secure_aggregation"] or {}).get("protocol") == ("secagg+" if secure else None)
    for r in fed["rounds"]:
        assert r["replied_silos"] == 2, r  # the round went on with the two others
        assert r["sampled_silos"] - r["replied_silos"] == r["failed_silos"] <= 1
        assert r["examples"] == 2 * 2 * 4  # 2 silos x localSteps x microBatchSize
    assert len(metrics["test_per_silo"]) == 2
    events = [json.loads(x) for x in (output / "progress.jsonl").read_text().splitlines()]
    assert [e["silos"] for e in events if e["event"] == "progress"] == [2, 2]
