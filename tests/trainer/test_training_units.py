"""Pieces of the training loop that need no processes: schedule, DeepSpeed config, data
order, sharding, checkpoint discovery."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from recjob_trainer.batches import Shard, epoch_order, micro_batches, shard_rows
from recjob_trainer.config import TrainerConfig
from recjob_trainer.train import (
    CHECKPOINT_MARKER,
    complete_checkpoints,
    deepspeed_config,
    loss_fn,
    lr_lambda,
)


def config(**training) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "name": "t",
            "outputUri": "/tmp/x",
            "data": {
                "task": "search-ranking",
                "train": "x.csv",
                "columns": {"query": "q", "itemText": "t", "label": "l"},
            },
            "training": training,
        }
    )


def test_deepspeed_config_follows_the_spec() -> None:
    c = config(
        microBatchSize=8,
        gradientAccumulationSteps=4,
        precision="bf16",
        deepspeed={
            "zeroStage": 3,
            "offloadOptimizer": "cpu",
            "offloadParameters": "nvme",
            "nvmePath": "/nvme",
            "configOverrides": {"zero_optimization": {"overlap_comm": True}},
        },
    )
    ds = deepspeed_config(c, world=4)
    assert ds["train_batch_size"] == 8 * 4 * 4
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "nvme", "nvme_path": "/nvme"},
        "overlap_comm": True,
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedule_warms_up_then_decays(kind: str) -> None:
    f = lr_lambda(config(schedule={"type": kind, "warmupSteps": 10}), total_steps=100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    if kind == "constant":
        assert f(99) == 1.0
    else:
        assert f(50) < 1.0 and f(99) < 0.05
    ratio = lr_lambda(config(schedule={"type": kind, "warmupRatio": 0.2}), total_steps=100)
    assert ratio(19) == pytest.approx(1.0) and ratio(9) == pytest.approx(0.5)


def test_shards_are_equal_sized_and_cover_every_row() -> None:
    frame = pl.DataFrame({"x": list(range(10))})
    shards = [shard_rows(frame, r, 3) for r in range(3)]
    assert {s.height for s in shards} == {4}
    assert set().union(*(set(s["x"]) for s in shards)) == set(range(10))
    assert set(shards[0]["x"]) & set(shards[1]["x"]) <= {0}  # only wrap-around padding repeats


def test_resumed_micro_batches_continue_the_same_order() -> None:
    rows = pl.DataFrame(
        {
            "query": [f"q{i}" for i in range(40)],
            "item_text": [f"t{i}" for i in range(40)],
            "label": [1.0] * 40,
        }
    )

    class FakeBatcher:
        task = "search-ranking"

        def search_batch(self, r):
            return {"labels": r["label"].to_list()}

    shard = Shard(rows, 0, 1)
    full = [idx for idx, _ in micro_batches(shard, FakeBatcher(), 4, 7, 2, 0, 1, None)]
    resumed = [idx for idx, _ in micro_batches(shard, FakeBatcher(), 4, 7, 2, 6, 1, None)]
    assert resumed == full[6:] and len(full) == 10
    assert (epoch_order(40, 7, 2) != epoch_order(40, 7, 3)).any()


def test_only_complete_checkpoints_are_used(tmp_path: Path) -> None:
    for step, complete in ((2, True), (4, True), (6, False)):
        path = tmp_path / f"step-{step:08d}"
        path.mkdir()
        if complete:
            (path / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "world_size": 2}))
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 4]


def test_losses() -> None:
    import torch

    from recjob_trainer.models import ModelInfo

    logits = torch.tensor([[5.0, -5.0, -5.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    assert loss_fn(ModelInfo("bi-encoder", "listwise"), logits, labels) < 0.01
    assert loss_fn(ModelInfo("bi-encoder", "listwise"), -logits, labels) > 5
    assert (
        loss_fn(ModelInfo("cross-encoder", "regression"), torch.tensor([0.0]), torch.tensor([0.5]))
        == 0.0
    )
