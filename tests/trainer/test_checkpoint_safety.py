"""Checkpoints are on storage every RecJob of the namespace can write: a checkpoint file
must never run code in the trainer (issue 14, item 3). DeepSpeed's own loaders unpickle
(``weights_only=False``); the trainer's go through ``recjob_trainer.safe_load``."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recjob_trainer.checkpoints import consolidated_state_dict
from recjob_trainer.safe_load import (
    UnsafeCheckpointError,
    _names,
    allowed_globals,
    harden_checkpoint_loading,
    load_checkpoint_file,
    safe_zero_to_fp32,
)
from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[2]


class Planted:
    """What an attacker leaves on shared storage: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, form: str) -> None:
    """A checkpoint-looking file (real tensors beside the payload) in one of the forms
    ``torch.load`` reads: torch's zip format, its legacy format, or a bare pickle."""
    payload = {"module": {"w": torch.ones(2)}, "global_steps": 2, "x": Planted(marker)}
    if form == "zip":
        torch.save(payload, path)
    elif form == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("form", ["zip", "legacy", "pickle"])
def test_a_planted_file_is_refused_where_deepspeeds_loader_runs_it(
    tmp_path: Path, form: str
) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    marker = tmp_path / "ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    plant(path, marker, form)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint_file(path, map_location="cpu")
    message = str(refused.value)
    assert "refusing to unpickle" in message and str(path) in message
    assert "posix.system" in message  # the global, named
    assert not marker.exists()
    # the same file through DeepSpeed's stock loader: the command runs (a bare pickle is
    # then rejected for its missing magic number, after it ran)
    with contextlib.suppress(RuntimeError):
        TorchCheckpointEngine().load(str(path), map_location="cpu")
    assert marker.exists()


class EnumByName:
    """An Enum member as Python 3.11.2 pickles it: getattr(cls, name) (the test cluster's
    trainer image wrote ZeroStageEnum this way; 3.11.7 pickles it by value)."""

    def __init__(self, cls, name: str) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_an_enum_member_pickled_by_name_loads_and_no_other_getattr(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": EnumByName(ZeroStageEnum, "gradients")}, good)
    assert load_checkpoint_file(good)["zero_stage"] is ZeroStageEnum.gradients
    for cls, name in [(ZeroStageEnum, "__init__"), (LossScaler, "__init__"), (ZeroStageEnum, 1)]:
        bad = tmp_path / "bad.pt"
        torch.save({"zero_stage": EnumByName(cls, name)}, bad)
        with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
            load_checkpoint_file(bad)


def test_consolidation_refuses_a_planted_zero_checkpoint(tmp_path: Path) -> None:
    """``checkpoints.consolidated_state_dict`` (ZeRO 1-3) reads through zero_to_fp32,
    whose ``torch.load`` is guarded only inside the block and restored after."""
    from deepspeed.utils import zero_to_fp32

    marker, tag = tmp_path / "ran", tmp_path / "checkpoints" / "step-00000004"
    tag.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt"):  # fmt: skip
        plant(tag / name, marker, "zip")
    (tag / "COMPLETE.json").write_text(json.dumps({"step": 4, "world_size": 1}))

    class Engine:  # what consolidated_state_dict asks of a ZeRO-2 bf16 engine
        zero_optimization_stage = staticmethod(lambda: 2)
        bfloat16_enabled = fp16_enabled = staticmethod(lambda: True)

    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle.*posix\.system"):
        consolidated_state_dict(Engine(), tmp_path / "checkpoints", 4)
    assert not marker.exists()
    assert zero_to_fp32.torch is torch  # restored, after an error too
    with safe_zero_to_fp32() as guarded:
        assert guarded.torch is not torch and guarded.torch.cat is torch.cat
    assert zero_to_fp32.torch is torch


def test_the_engine_loads_through_the_weights_only_engine_and_no_other() -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from recjob_trainer.safe_load import SafeTorchCheckpointEngine

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    engine.checkpoint_engine.zipfile_serialization = True
    harden_checkpoint_loading(engine)
    hardened = engine.checkpoint_engine
    assert type(hardened) is SafeTorchCheckpointEngine and hardened.zipfile_serialization
    harden_checkpoint_loading(engine)
    assert engine.checkpoint_engine is hardened  # idempotent

    class Other(TorchCheckpointEngine):  # e.g. a checkpoint engine from configOverrides
        pass

    engine.checkpoint_engine = Other()
    with pytest.raises(RuntimeError, match=r"Other .*not supported"):
        harden_checkpoint_loading(engine)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_every_supported_configuration_resumes_and_consolidates_weights_only(
    tmp_path: Path, world: int
) -> None:
    """Real DeepSpeed checkpoints (ZeRO 0-3 x fp32/bf16 x LoRA, optimizer/parameter
    offload) saved as the trainer saves them, resumed through the hardened engine: the
    resumed engine continues with exactly the original's losses, the client state comes
    back, guarded consolidation equals DeepSpeed's own; and the allow-list is exactly
    the globals these files hold (fp16's DynamicLossScaler aside: GPUs only)."""
    from tests.trainer.test_training import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "trainer")}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(Path(__file__).parent / "checkpoint_roundtrip.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=960,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    results = json.loads((tmp_path / f"result-w{world}.json").read_text())
    assert len(results) == 22
    seen: set[str] = set()
    for name, record in results.items():
        assert record["client_state"], name
        assert record["same_continuation"], (name, record["losses"])
        if not name.startswith("z0"):
            assert record["consolidated"], name
        for found in record["globals"].values():
            seen |= set(found)
    allowed = set(_names(allowed_globals()))
    # fp16 only (GPUs); getattr only where Python pickles Enum members by name (3.11.2)
    optional = {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "builtins.getattr"}
    assert allowed - optional <= seen <= allowed


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data not present")
def test_a_planted_checkpoint_is_refused_on_resume_and_never_run(tmp_path: Path) -> None:
    """A real run's newest complete checkpoint (valid COMPLETE.json) with its model states
    file replaced: the rerun fails naming the file and the global, and the payload never
    runs; the same file through DeepSpeed's stock loader would have run it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from tests.trainer.test_training import launch, search_config, train

    run, marker = tmp_path / "run", tmp_path / "ran"
    steps = dict(maxSteps=2, precision="fp32", deepspeed={"zeroStage": 2})
    config = search_config(tmp_path, run, baselines=False, **steps)
    train(config)
    checkpoint = run / "checkpoints" / "step-00000002"
    assert json.loads((checkpoint / "COMPLETE.json").read_text())["step"] == 2
    planted = checkpoint / "mp_rank_00_model_states.pt"
    plant(planted, marker, "zip")

    process = launch(config)
    out, _ = process.communicate(timeout=600)
    assert not marker.exists(), "the planted checkpoint ran code in the trainer"
    assert process.returncode != 0
    assert f"refusing to unpickle checkpoint file {planted}" in out, out[-4000:]
    assert "posix.system" in out
    TorchCheckpointEngine().load(str(planted), map_location="cpu")
    assert marker.exists()  # DeepSpeed's own load_checkpoint would have run it
