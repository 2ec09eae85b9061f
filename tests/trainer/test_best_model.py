"""Early stopping exports the best model validation saw, also across a kill and resume.

One real 2-process DeepSpeed run (ZeRO-2, fp32) on a tiny Home Depot slice, with the
validation metric scripted per step (``scripted_validation_run.py``): best at step 4, then
worse until patience runs out at step 8; every rank dies right after the step-8 checkpoint
is complete and the rerun must finish without training on, with step 4's weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recjob_trainer.progress import read_events
from recjob_trainer.safe_load import safe_zero_to_fp32
from tests.conftest import REPO, SHARED
from tests.trainer.test_training import free_port, search_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data not present"),
]
SCRIPT = {2: 0.10, 4: 0.50, 6: 0.30, 8: 0.20, 10: 0.90, 12: 0.95}


def run_scripted(config: Path, die_after: int | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "RECJOB_TEST_SCRIPT": json.dumps(SCRIPT),
        "RECJOB_TEST_DIE_AFTER": str(die_after or ""),
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(Path(__file__).parent / "scripted_validation_run.py"), "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def consolidated(checkpoints: Path, step: int) -> dict[str, torch.Tensor]:
    with safe_zero_to_fp32() as zero_to_fp32:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoints), tag=f"step-{step:08d}"
        )


# extended: make test resumes killed runs (test_training.py) but leaves early stopping and
# the best step's export across a resume to make test-extended
@pytest.mark.extended
def test_early_stopping_exports_the_best_step_across_a_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = search_config(
        tmp_path, run, baselines=False, maxSteps=12, precision="fp32",
        deepspeed={"zeroStage": 2}, evalIntervalSteps=2,
        checkpoint={"intervalSteps": 3, "keep": 1},
        earlyStopping={"metric": "ndcg@10", "patience": 2},
    )  # fmt: skip
    killed = run_scripted(config, die_after=8)
    assert killed.returncode != 0 and not (run / "metrics.json").exists(), killed.stdout[-3000:]
    checkpoints = run / "checkpoints"
    # keep 1: the newest (8, where patience ran out) and the best (4, checkpointed when
    # validation saw it, though not a checkpoint step) survive rotation
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000004", "step-00000008"]

    done = run_scripted(config)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    events = read_events(run)
    resumed = next(i for i, e in enumerate(events) if e["event"] == "resumed")
    assert events[resumed]["step"] == 8
    assert not [e for e in events[resumed:] if e["event"] == "batch"]  # stopped: no training on
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4, 6, 8]

    exported = load_file(run / "model" / "model.safetensors")
    best, last = consolidated(checkpoints, 4), consolidated(checkpoints, 8)
    assert exported.keys() == best.keys()
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert not all(torch.equal(exported[k], last[k]) for k in last)

    card = json.loads((run / "model-card.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert card["steps"] == 8 and card["kept_step"] == 4
    selection = metrics["model_selection"]
    assert selection == card["model_selection"]
    assert selection["kept_step"] == selection["best_step"] == 4
    assert selection["metric"] == "ndcg@10"
    assert selection["best_value"] == 0.5 and selection["stopped_early"]
    assert "best validation ndcg@10 = 0.5 at step 4" in selection["reason"]
    assert "stopped early at step 8" in selection["reason"]
    # the engine was restored to step 4 too: the DeepSpeed model and the export agree
    assert metrics["consolidation_max_abs_diff"] < 1e-4
