"""Pieces of the training loop that need no processes: schedule, DeepSpeed config, data
order, sharding, checkpoint discovery."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from recjob_trainer.batches import Shard, epoch_order, micro_batches, shard_rows
from recjob_trainer.checkpoints import CHECKPOINT_MARKER, complete_checkpoints, training_digest
from recjob_trainer.config import TrainerConfig
from recjob_trainer.objective import loss_fn
from recjob_trainer.optimisation import deepspeed_config, lr_lambda, precision_warning


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

    # two users, one negative each: columns (u0 true, u0 neg, u1 true, u1 neg)
    logits = torch.tensor([[9.0, -9.0, -9.0, -9.0], [-9.0, -9.0, 9.0, -9.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert loss_fn(ModelInfo("bi-encoder", "listwise"), logits, labels) < 0.01
    assert loss_fn(ModelInfo("bi-encoder", "listwise"), -logits, labels) > 5
    assert loss_fn(ModelInfo("bi-encoder", "binary"), logits, labels) < 0.01
    in_batch_wrong = torch.tensor([[9.0, -9.0, 9.5, -9.0], [-9.0, -9.0, 9.0, -9.0]])
    assert loss_fn(ModelInfo("bi-encoder", "listwise"), in_batch_wrong, labels) > 0.4
    assert (
        loss_fn(ModelInfo("cross-encoder", "regression"), torch.tensor([0.0]), torch.tensor([0.5]))
        == 0.0
    )


def test_item_embedding_histories_pool_the_items_own_vectors() -> None:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from recjob_trainer.batches import Batcher
    from recjob_trainer.evaluation import text_vectors, user_item_scores
    from recjob_trainer.models import ModelInfo, base_model_path, build_model

    path = base_model_path("all-MiniLM-L6-v2")
    catalog = pl.DataFrame(
        {"item_id": ["a", "b", "c"], "item_text": ["cordless drill", "hand saw", "safety goggles"]}
    )
    batcher = Batcher(
        "recommendation",
        AutoTokenizer.from_pretrained(path),
        16,
        catalog,
        history_encoding="item-embeddings",
    )
    batch = batcher.history_batch([["a", "b"], []])
    assert batch["history_mask"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert batch["history_input_ids"].shape[0] == 4
    model = build_model(
        ModelInfo("bi-encoder", "listwise", history_encoding="item-embeddings"), path
    ).eval()
    with torch.no_grad():
        users = model.user_vectors(batch)
    vectors = text_vectors(model, batcher, ["hand saw", "cordless drill"], 8)
    expected = vectors.mean(0) / np.linalg.norm(vectors.mean(0))
    assert np.allclose(users[0].numpy(), expected, atol=1e-5)
    frame = pl.DataFrame({"user_id": ["u"], "history": [["a", "b"]], "item_id": ["c"]})
    scores = user_item_scores(model, batcher, frame, ["c"], 8)
    goggles = text_vectors(model, batcher, ["safety goggles"], 8)[0]
    assert scores[0, 0] == pytest.approx(float(expected @ goggles), abs=1e-5)


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    import socket

    import torch.distributed as dist

    from recjob_trainer.train import _early_stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        c = config(earlyStopping={"metric": "ndcg@10", "patience": 2, "minDelta": 0.01})
        state = {"best": None, "evals_without_improvement": 0}
        decisions = [_early_stop(c, state, v) for v in (0.50, 0.55, 0.555, 0.56, 0.60, 0.59, 0.605)]
        # 0.555 and 0.56 are within minDelta of 0.55 -> patience 2 runs out at 0.56
        assert decisions == [False, False, False, True, False, False, True]
        assert state["best"] == 0.60
        no_rule = config()
        state = {"best": None, "evals_without_improvement": 0}
        assert not any(_early_stop(no_rule, state, v) for v in (0.5, 0.4, 0.3, 0.2))
    finally:
        dist.destroy_process_group()


def test_termination_message_fits_and_keeps_the_main_metric(tmp_path, monkeypatch) -> None:
    import json as _json

    from recjob_trainer.finish import TERMINATION_LOG_ENV, write_termination_message

    target = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(target))
    model = {f"metric-{i:03d}@10": 0.123456789 for i in range(300)}
    model["ndcg@10"] = 0.91
    card = {"base_model": "all-MiniLM-L6-v2", "checkpoint_digest": "sha256:ab",
            "data_snapshot": "sha256:cd", "steps": 3}  # fmt: skip
    write_termination_message({"main_metric": "ndcg@10", "model": model}, card)
    text = target.read_text()
    summary = _json.loads(text)
    assert len(text.encode()) <= 4096
    assert summary["model"]["ndcg@10"] == 0.91 and summary["main_metric"] == "ndcg@10"
    assert summary["card"] == {k: card[k] for k in ("base_model", "checkpoint_digest",
                                                    "data_snapshot")}  # fmt: skip


def test_stage_digests_keep_the_teacher_when_only_compression_changes() -> None:
    plain = config(maxSteps=10)
    distilled = TrainerConfig.model_validate(
        {**plain.to_wire(), "compression": {"distillation": {"student": {"numLayers": 2}}}}
    )
    pruned = TrainerConfig.model_validate(
        {**distilled.to_wire(), "compression": {**distilled.compression.to_wire(),
                                                "pruning": {"amount": 0.2}}}
    )  # fmt: skip
    other_student = TrainerConfig.model_validate(
        {**distilled.to_wire(), "compression": {"distillation": {"student": {"numLayers": 3}}}}
    )
    # the teacher's checkpoints stay valid whatever the compression settings
    assert len({training_digest(c) for c in (plain, distilled, pruned, other_student)}) == 1
    assert training_digest(config(maxSteps=11)) != training_digest(plain)
    # distillation checkpoints depend on the distillation, not on the pruning after it
    assert training_digest(distilled, "distill") == training_digest(pruned, "distill")
    assert training_digest(other_student, "distill") != training_digest(distilled, "distill")
    # recovery (and the pruning decision) on everything
    assert training_digest(pruned, "recover") != training_digest(distilled, "recover")
    assert training_digest(pruned, "recover").endswith("/recover")


def test_a_failed_trainer_leaves_its_error_once(tmp_path, monkeypatch) -> None:
    """The first failing rank's error is the container's termination message (the
    kubelet's empty file, or none yet); later ranks do not overwrite it; long errors fit."""
    import json as _json

    from recjob_trainer.cli import MAX_ERROR_CHARS, write_error_message
    from recjob_trainer.finish import TERMINATION_LOG_ENV

    target = tmp_path / "termination-log"
    target.touch()  # as the kubelet leaves it
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(target))
    write_error_message("FileNotFoundError: /data/train.inter")
    write_error_message("RuntimeError: rank 0 is gone")
    assert _json.loads(target.read_text()) == {"error": "FileNotFoundError: /data/train.inter"}
    target.unlink()
    write_error_message("x" * 10_000)
    error = _json.loads(target.read_text())["error"]
    assert len(error) == MAX_ERROR_CHARS and error.endswith("...")
    monkeypatch.delenv(TERMINATION_LOG_ENV)
    target.unlink()
    write_error_message("not in a pod")
    assert not target.exists()


def test_random_states_round_trip_without_pickle(tmp_path) -> None:
    """torch and NumPy states saved as arrays come back bit for bit; the file holds no
    pickle (np.load refuses object arrays), so a planted file cannot run code."""
    import numpy as np
    import torch

    from recjob_trainer.checkpoints import load_rng_state, rng_file, save_rng_state

    torch.manual_seed(7)
    np.random.seed(7)
    np.random.normal()  # a cached Gaussian in the NumPy state
    path = rng_file(tmp_path, 3)
    save_rng_state(path)
    expected = (torch.rand(4), np.random.rand(4), np.random.normal())
    torch.manual_seed(0)
    np.random.seed(0)
    load_rng_state(path)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1]) and np.random.normal() == expected[2]
    with np.load(path, allow_pickle=False) as saved:
        assert all(saved[k].dtype != object for k in saved.files)
    np.savez(path, torch=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_rng_state(path)


def test_a_corrupt_marker_is_skipped_not_fatal(tmp_path, capsys) -> None:
    for step in (10, 20, 30):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / CHECKPOINT_MARKER).write_text(json.dumps({"step": step}))
    (tmp_path / "step-00000030" / CHECKPOINT_MARKER).write_text('{"step": 3')  # torn
    (tmp_path / "step-00000040").mkdir()  # being written when the pod died: no marker
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 20]
    assert "skipping checkpoint step-00000030: unreadable marker" in capsys.readouterr().err


def test_test_report_has_a_candidates_block_for_the_model_and_the_baselines() -> None:
    """What finish.py writes to metrics.json: candidates/... beside full/... and
    sampled/... for the model and for every baseline (spec.data.candidates)."""
    from transformers import AutoTokenizer

    from recjob_trainer.batches import Batcher
    from recjob_trainer.evaluation import evaluate_recommendation, recommendation_baselines
    from recjob_trainer.models import ModelInfo, base_model_path, build_model

    path = base_model_path("all-MiniLM-L6-v2")
    texts = ["cordless drill", "drill bits", "hand saw", "safety goggles", "garden hose"]
    catalog = pl.DataFrame({"item_id": list("abcde"), "item_text": texts})
    batcher = Batcher("recommendation", AutoTokenizer.from_pretrained(path), 16, catalog)
    test = pl.DataFrame(
        {
            "user_id": ["u", "v"],
            "history": [["a"], ["c"]],
            "item_id": ["b", "d"],
            "candidates": [["b", "e"], None],
        }
    )
    model = build_model(ModelInfo("bi-encoder", "listwise"), path).eval()
    report = evaluate_recommendation(model, batcher, test, [1], 8, 2)
    splits = {"train": test.drop("candidates"), "test": test}
    baselines = recommendation_baselines(model, batcher, splits, [1], 8, 2, None)
    for name, metrics in {"model": report, **baselines}.items():
        assert metrics["full/users"] == 2 and "sampled/hr@1" in metrics, name
        assert metrics["candidates/users"] == 1 and metrics["candidates/target_in_list"] == 1
    # drill bits is closer to a drill owner than a garden hose is
    assert report["candidates/hr@1"] == 1.0


@pytest.mark.parametrize(
    ("precision", "capability", "cuda", "warned"),
    [
        ("bf16", "AVX2", False, True),  # emulated: ~10x slower than fp32 on such a CPU
        ("bf16", "AVX512", False, False),  # native or fast enough
        ("bf16", "AVX2", True, False),  # a GPU computes it
        ("fp32", "AVX2", False, False),
    ],
)
def test_precision_warning_names_the_field_and_the_way_out(
    monkeypatch, precision: str, capability: str, cuda: bool, warned: bool
) -> None:
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    warning = precision_warning(precision)
    assert (warning is not None) == warned
    if warned:
        assert "spec.training.precision" in warning and "precision: fp32" in warning
        assert capability in warning
