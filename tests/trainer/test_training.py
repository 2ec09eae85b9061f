"""Real multi-process DeepSpeed training on CPU (gloo), on tiny slices of the real data.

Each test launches `torchrun --nproc_per_node 2 -m recjob_trainer` as a user would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from recjob_trainer.batches import Batcher
from recjob_trainer.data.prepared import read_prepared
from recjob_trainer.evaluation import evaluate_recommendation, evaluate_search
from recjob_trainer.models import load_model
from recjob_trainer.progress import read_events
from tests.conftest import SHARED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data not present"),
]
BIN = Path(sys.executable).parent
HOMEDEPOT = SHARED / "data" / "homedepot-search" / "queries-dev.csv"
AMAZON = SHARED / "data" / "amazon-scientific"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def search_slice(tmp: Path, queries: int = 40) -> Path:
    """Every pair of the first ``queries`` queries (so queries have several candidates)."""
    frame = pl.read_csv(HOMEDEPOT, infer_schema=False)
    keep = frame["search_term"].unique(maintain_order=True)[:queries]
    path = tmp / "homedepot.csv"
    frame.filter(pl.col("search_term").is_in(keep.to_list())).write_csv(path)
    return path


def atomic_slice(tmp: Path, users: int = 30) -> dict[str, str]:
    """The first ``users`` users of Amazon Scientific and only the items they touched."""
    out, items = {}, set()
    for part in ("train", "valid", "test"):
        lines = (AMAZON / f"Scientific.{part}.inter").read_text().splitlines()
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) < users]
        for line in kept[1:]:
            _, history, target = line.split("\t")
            items |= set(history.split()) | {target}
        path = tmp / f"tiny.{part}.inter"
        path.write_text("\n".join(kept) + "\n")
        out[part] = str(path)
    codes = {
        ln.split("\t")[0]
        for ln in (AMAZON / "Scientific.item2index").read_text().splitlines()
        if ln.split("\t")[1] in items
    }
    index = [
        ln
        for ln in (AMAZON / "Scientific.item2index").read_text().splitlines()
        if ln.split("\t")[0] in codes
    ]
    (tmp / "tiny.item2index").write_text("\n".join(index) + "\n")
    text = (AMAZON / "Scientific.text").read_text().splitlines()
    (tmp / "tiny.text").write_text(
        "\n".join([text[0]] + [ln for ln in text[1:] if ln.split("\t")[0] in codes]) + "\n"
    )
    out["catalog"] = str(tmp / "tiny.text")
    return out


def search_config(tmp: Path, run: Path, baselines: bool = True, **training) -> Path:
    doc = {
        "name": "test",
        "outputUri": str(run),
        "logIntervalSteps": 2,
        "data": {
            "task": "search-ranking",
            "train": str(search_slice(tmp)),
            "columns": {
                "query": "search_term",
                "itemId": "product_uid",
                "itemText": "product_title",
                "label": "relevance",
            },
            "preprocessing": {"split": {"validationFraction": 0.2, "testFraction": 0.2}},
        },
        "model": {"maxSequenceLength": 24},
        "training": {
            "processesPerNode": 2,
            "microBatchSize": 4,
            "learningRate": 1e-4,
            "evalIntervalSteps": 100,
            "checkpoint": {"intervalSteps": 2, "keep": 3},
            **training,
        },
        "evaluation": {"batchSize": 32, "baselines": baselines},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def launch(config: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "recjob_trainer",
            "--config",
            str(config),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts ranks in new sessions)."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


def train(config: Path, timeout: float = 300) -> str:
    process = launch(config)
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def losses(run: Path, stage: str = "train") -> list[float]:
    events = read_events(run)
    return [
        e["loss"] for e in events if e["event"] == "progress" and e.get("stage", "train") == stage
    ]


@pytest.mark.extended  # ZeRO-2 and -3 consolidation stay in make test
def test_zero0_bf16_consolidates(tmp_path: Path) -> None:
    """ZeRO stage 0 under the default bf16: DeepSpeed's zero_to_fp32 cannot read a stage-0
    checkpoint (it failed with "'NoneType' object is not iterable" on param_shapes); the
    module's own weights are the model."""
    run = tmp_path / "run"
    train(search_config(tmp_path, run, maxSteps=4, deepspeed={"zeroStage": 0}))
    metrics = json.loads((run / "metrics.json").read_text())
    card = json.loads((run / "model-card.json").read_text())
    assert (card["zero_stage"], card["precision"], card["steps"]) == (0, "bf16", 4)
    assert metrics["ranks"]["agree"]
    assert metrics["consolidation_max_abs_diff"] < 0.05


# extended: test_killed_run_resumes_at_the_right_step_with_the_same_data trains ZeRO-2 with
# two processes, and tests/cluster/test_training.py 4 ranks, in make test
@pytest.mark.extended
def test_zero2_bf16_two_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(search_config(tmp_path, run, maxSteps=8, deepspeed={"zeroStage": 2}))
    metrics = json.loads((run / "metrics.json").read_text())
    card = json.loads((run / "model-card.json").read_text())
    curve = losses(run)
    assert len(curve) == 4 and curve[-1] < curve[0], curve
    assert metrics["ranks"]["agree"] and len(metrics["ranks"]["parameter_digests"]) == 2
    assert (card["world_size"], card["zero_stage"], card["precision"]) == (2, 2, "bf16")
    assert card["data_snapshot"].startswith("sha256:") and card["steps"] == 8
    assert metrics["consolidation_max_abs_diff"] < 0.05  # bf16 engine vs fp32 consolidation
    for name in ("bm25", "zero-shot", "constant"):
        assert name in metrics["baselines"]
    assert (run / "curves.png").stat().st_size > 1000
    # the saved plain model is the one that was evaluated
    model, tokenizer = load_model(run / "model")
    prepared = read_prepared(run / "data")
    batcher = Batcher(
        "search-ranking",
        tokenizer,
        model.info.max_length,
        None,
        model.info.label_min,
        model.info.label_max,
    )
    again = evaluate_search(model, batcher, prepared.splits["test"], [1, 5, 10], 32)
    assert again["ndcg@10"] == pytest.approx(metrics["model"]["ndcg@10"], abs=1e-6)
    assert again["rmse"] == pytest.approx(metrics["model"]["rmse"], abs=1e-6)


@pytest.mark.parametrize(
    "history_encoding",
    # the same ZeRO-3 consolidation; item embeddings only change the history's encoder
    ["text", pytest.param("item-embeddings", marks=pytest.mark.extended)],
)
def test_zero3_lora_recommendation_consolidates_exactly(
    tmp_path: Path, history_encoding: str
) -> None:
    files, run = atomic_slice(tmp_path), tmp_path / "run"
    doc = {
        "name": "rec",
        "outputUri": str(run),
        "logIntervalSteps": 2,
        "data": {
            "task": "recommendation",
            "format": "atomic",
            "train": files["train"],
            "validation": files["valid"],
            "test": files["test"],
            "catalog": files["catalog"],
            "preprocessing": {"negativeSampling": {"perPositive": 3}},
        },
        "model": {
            "maxSequenceLength": 24,
            "historyLength": 3,
            "historyEncoding": history_encoding,
            "fineTuning": {"method": "lora", "lora": {"rank": 4}},
        },
        "training": {
            "processesPerNode": 2,
            "deepspeed": {"zeroStage": 3},
            "precision": "fp32",
            "microBatchSize": 4,
            "maxSteps": 6,
            "learningRate": 1e-3,
            "evalIntervalSteps": 6,
            "checkpoint": {"intervalSteps": 3},
        },
        "evaluation": {"sampledNegatives": 20, "batchSize": 64},
    }
    if history_encoding == "item-embeddings":  # compression under ZeRO-3 too
        doc["compression"] = {
            "distillation": {
                "student": {"numLayers": 2},
                "maxSteps": 4,
                "loss": "listwise-kl",
                "intermediateWeight": 0.5,
            },
            "pruning": {"method": "ffn-channels", "amount": 0.5, "recoverySteps": 2},
        }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    out = train(config)
    # torch 2.13 deprecates the collectives ZeRO-3 runs each step: silenced on every rank
    assert "is deprecated. Please use `torch.distributed." not in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["consolidation_max_abs_diff"] < 1e-4  # fp32: the same model
    assert metrics["ranks"]["agree"]
    # validation's encoding shared by the ranks (under ZeRO-3: the same number of forwards
    # on each) and the end-of-run evaluation reporting its progress, readable in the log
    evaluate = [e for e in read_events(run) if e["event"] == "evaluate"]
    assert {"validation at step 6", "test"} <= {e["phase"].split(",")[0] for e in evaluate}
    assert "evaluate test, pass 1: " in out
    curve = losses(run)
    assert curve[-1] < curve[0], curve
    assert {"popularity", "zero-shot"} <= set(metrics["baselines"])
    assert 0 <= metrics["model"]["full/ndcg@10"] <= 1
    assert metrics["model"]["full/users"] == 30
    model, _ = load_model(run / "model")  # LoRA merged: a plain encoder again
    assert not any("lora" in name for name in model.state_dict())
    if history_encoding == "item-embeddings":
        compression = metrics["compression"]
        assert compression["student"]["structure"] == {"heads": [12, 12], "ffn": [768, 768]}
        assert compression["distillation"]["teacher_layers"] == [2, 5]
        assert losses(run, "distill") and losses(run, "recover")
        teacher, _ = load_model(run / "teacher")
        assert not any("lora" in name for name in teacher.state_dict())


def test_killed_run_resumes_at_the_right_step_with_the_same_data(tmp_path: Path) -> None:
    steps = dict(maxSteps=10, precision="fp32", deepspeed={"zeroStage": 2})
    reference = tmp_path / "reference"
    (tmp_path / "a").mkdir()
    train(search_config(tmp_path / "a", reference, baselines=False, **steps))

    killed = tmp_path / "killed"
    (tmp_path / "b").mkdir()
    config = search_config(tmp_path / "b", killed, baselines=False, **steps)
    process = launch(config)
    deadline = time.time() + 480
    while time.time() < deadline:
        checkpoints = [e["step"] for e in read_events(killed) if e["event"] == "checkpoint"]
        if checkpoints and checkpoints[-1] >= 4:
            break
        time.sleep(0.05)
    kill_tree(process.pid)  # like a pod dying: torchrun and every rank at once
    process.communicate()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    # a checkpoint half-written when the pod died must never be picked up
    half = killed / "checkpoints" / "step-00000009"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    train(config)
    events = read_events(killed)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 4 and resumed[0]["step"] % 2 == 0
    start = resumed[0]["step"]
    after = [e for e in events[events.index(resumed[0]) :] if e["event"] == "batch"]
    assert [e["step"] for e in after] == list(range(start + 1, 11))
    expected = {e["step"]: e["digest"] for e in read_events(reference) if e["event"] == "batch"}
    assert all(e["digest"] == expected[e["step"]] for e in after)
    card = json.loads((killed / "model-card.json").read_text())
    reference_card = json.loads((reference / "model-card.json").read_text())
    assert card["resumed_from_step"] == start
    assert card["checkpoint_digest"] == reference_card["checkpoint_digest"]

    # the same run directory with another training configuration is refused, not mixed
    doc = yaml.safe_load(config.read_text())
    doc["training"]["learningRate"] = 3e-4
    config.write_text(yaml.safe_dump(doc))
    process = launch(config)
    out, _ = process.communicate(timeout=480)
    assert process.returncode != 0
    assert "holds checkpoints of a different data/model/training configuration" in out


def test_distillation_and_pruning_resume_in_their_own_stage(tmp_path: Path) -> None:
    """Teacher -> 2-layer student (KL + hidden states) -> heads pruned -> recovery, killed
    mid-distillation like a dying pod: the rerun reloads the finished teacher, resumes the
    distillation at its checkpoint with the same data and finishes every stage."""
    run = tmp_path / "run"
    config = search_config(
        tmp_path, run, False, maxSteps=4, precision="fp32", deepspeed={"zeroStage": 2}
    )
    doc = yaml.safe_load(config.read_text())
    doc["compression"] = {
        "distillation": {
            "student": {"numLayers": 2},
            "maxSteps": 8,
            "loss": "kl",
            "intermediateWeight": 0.1,
        },
        "pruning": {"method": "attention-heads", "amount": 0.25, "recoverySteps": 2},
    }
    config.write_text(yaml.safe_dump(doc))
    process = launch(config)
    deadline = time.time() + 480
    while time.time() < deadline:
        saved = [
            e["step"]
            for e in read_events(run)
            if e["event"] == "checkpoint" and e.get("stage") == "distill"
        ]
        if saved and saved[-1] >= 2:
            break
        time.sleep(0.05)
    kill_tree(process.pid)
    process.communicate()
    assert not (run / "metrics.json").exists(), "the run finished before it was killed"
    before = read_events(run)
    first = {
        e["step"]: e["digest"]
        for e in before
        if e.get("stage") == "distill" and e["event"] == "batch"
    }

    train(config)
    events = read_events(run)[len(before) :]
    resumed = {e.get("stage", "train"): e["step"] for e in events if e["event"] == "resumed"}
    assert resumed["train"] == 4  # the teacher finished: reloaded, not trained again
    assert not [e for e in events if e["event"] == "progress" and "stage" not in e]
    start = resumed["distill"]
    assert start >= 2 and start % 2 == 0
    again = [e for e in events if e.get("stage") == "distill" and e["event"] == "batch"]
    assert [e["step"] for e in again] == list(range(start + 1, 9))
    # the resumed steps see the micro-batches the killed run saw at those steps
    assert all(first[e["step"]] == e["digest"] for e in again if e["step"] in first)

    metrics = json.loads((run / "metrics.json").read_text())
    compression = metrics["compression"]
    assert [s["name"] for s in compression["stages"]] == ["train", "distill", "recover"]
    assert compression["stages"][1]["resumed_from_step"] == start
    assert compression["distillation"]["teacher_layers"] == [2, 5]
    assert compression["student"]["layers"] == 2
    assert sum(compression["student"]["structure"]["heads"]) == 24 - 6
    assert compression["student"]["parameters"] < compression["teacher"]["parameters"]
    assert compression["teacher_value"] == compression["teacher"]["metrics"]["ndcg@10"]
    assert metrics["consolidation_max_abs_diff"] < 1e-4 and metrics["ranks"]["agree"]
    assert "teacher" in metrics["ndcg@10_vs_baselines"]
    card = json.loads((run / "model-card.json").read_text())
    assert card["compression"]["stages"] == ["train", "distill", "recover"]
    # model/ is the student, rebuilt from its recorded structure; teacher/ the teacher
    student, tokenizer = load_model(run / "model")
    teacher, _ = load_model(run / "teacher")
    assert student.info.extra["structure"] == compression["student"]["structure"]
    assert len(teacher.encoder.encoder.layer) == 6
    prepared = read_prepared(run / "data")
    batcher = Batcher.for_model("search-ranking", tokenizer, student.info, None)
    measured = evaluate_search(student, batcher, prepared.splits["test"], [1, 5, 10], 32)
    assert measured["ndcg@10"] == pytest.approx(metrics["model"]["ndcg@10"], abs=1e-6)


def test_bad_data_fails_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("search_term,product_title,relevance\nq,t,1\n")
    config = search_config(tmp_path, tmp_path / "run", maxSteps=2)
    doc = yaml.safe_load(config.read_text())
    doc["data"]["train"] = str(bad)
    config.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [str(BIN / "recjob-train"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    assert result.returncode == 1
    assert f"{bad}: column 'product_uid': missing" in result.stderr


def test_labelled_impressions_train_pointwise(tmp_path: Path) -> None:
    """Open Bandit click logs: every impression is a labelled example (no sampling)."""
    bandit, run = SHARED / "data" / "open-bandit", tmp_path / "run"
    doc = {
        "name": "bandit",
        "outputUri": str(run),
        "logIntervalSteps": 2,
        "data": {
            "task": "recommendation",
            "train": str(bandit / "random_all.csv"),
            "catalog": str(bandit / "random_all_item_context.csv"),
            "columns": {
                "userId": "user_feature_0,user_feature_1",
                "itemId": "item_id",
                "itemText": "item_feature_1,item_feature_2",
                "label": "click",
                "timestamp": "timestamp",
            },
            "preprocessing": {"split": {"strategy": "by-time"}, "maxRows": 3000},
        },
        "model": {"maxSequenceLength": 24, "historyLength": 3},
        "training": {
            "processesPerNode": 2,
            "precision": "fp32",
            "deepspeed": {"zeroStage": 1},
            "microBatchSize": 8,
            "maxSteps": 4,
            "evalIntervalSteps": 4,
            "checkpoint": {"intervalSteps": 4},
        },
        "evaluation": {"sampledNegatives": 20},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    train(config)
    metrics = json.loads((run / "metrics.json").read_text())
    card = json.loads((run / "model-card.json").read_text())
    assert card["objective"] == "binary" and metrics["main_metric"] == "auc"
    model = metrics["model"]
    assert model["impressions"] == 300 and 0 <= model["auc"] <= 1
    assert 0 < model["predicted_ctr"] < 1 and model["logloss"] > 0
    assert {"popularity", "zero-shot"} <= set(metrics["baselines"])


def test_recjob_file_prepare_only_and_invalid_recjob(tmp_path: Path) -> None:
    from tests.conftest import REPO

    result = subprocess.run(
        [
            str(BIN / "recjob-train"),
            "--recjob",
            str(REPO / "examples" / "recjob-search.yaml"),
            "--prepare-only",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["task"] == "search-ranking" and report["rows"]["train"] > 40_000
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "examples" / "recjob-search.yaml")
        .read_text()
        .replace("zeroStage: 2", "zeroStage: 7")
    )
    result = subprocess.run(
        [str(BIN / "recjob-train"), "--recjob", str(bad), "--prepare-only"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0 and "spec.training.deepspeed.zeroStage" in result.stderr


# extended: make test trains a recommendation model under ZeRO-3 with LoRA
# (test_zero3_lora_recommendation_consolidates_exactly[text]) and the sequential model in
# tests/trainer/test_sequential.py
@pytest.mark.extended
@pytest.mark.parametrize("method", ["lora"])
def test_sequential_recommender_zero3_trains_and_ranks_the_catalog(
    tmp_path: Path, method: str
) -> None:
    """The sequential architecture in the real DeepSpeed loop (ZeRO-3, 2 processes), its
    text side trained with LoRA (softmax over the batch's items and sampled negatives; the
    frozen / whole-catalog path runs in tests/examples): the catalog is encoded once, the
    consolidated model equals the DeepSpeed one, and the test report has full-catalog,
    sampled and cold-start metrics."""
    files, run = atomic_slice(tmp_path), tmp_path / "run"
    lora = {"lora": {"rank": 4}} if method == "lora" else {}
    negatives = "catalog" if method == "frozen" else "sampled"
    doc = {
        "name": "seq",
        "outputUri": str(run),
        "logIntervalSteps": 2,
        "data": {
            "task": "recommendation",
            "format": "atomic",
            "train": files["train"],
            "validation": files["valid"],
            "test": files["test"],
            "catalog": files["catalog"],
        },
        "model": {
            "architecture": "sequential",
            "maxSequenceLength": 16,
            "historyLength": 4,
            "fineTuning": {"method": method, **lora},
            "sequential": {"hiddenSize": 32, "layers": 1, "heads": 2, "negatives": negatives},
        },
        "training": {
            "processesPerNode": 2,
            "deepspeed": {"zeroStage": 3},
            "precision": "fp32",
            "microBatchSize": 4,
            "maxSteps": 4,
            "learningRate": 3e-3,
            "evalIntervalSteps": 4,
            "earlyStopping": {"patience": 5},
            "checkpoint": {"intervalSteps": 4},
        },
        "evaluation": {"sampledNegatives": 20, "batchSize": 64},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    train(config)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["consolidation_max_abs_diff"] < 1e-4
    assert metrics["ranks"]["agree"]
    assert metrics["model"]["full/users"] == 30
    assert {"full/ndcg@10", "sampled/ndcg@10", "full/mrr"} <= set(metrics["model"])
    assert metrics["cold_start"]["users"] >= 0
    assert [e["metric"] for e in metrics["validation"]] == ["full/ndcg@10"]
    assert (run / "catalog-text.safetensors").exists()
    events = read_events(run)
    assert [e for e in events if e["event"] == "encode-catalog"]
    model, _ = load_model(run / "model")
    assert model.info.kind == "sequential"
    assert len(model.info.extra["item_ids"]) == model.shape.items
    assert not any("lora" in name for name in model.state_dict())  # merged
    # the text side trained: the saved catalog embeddings are the trained encoder's, not
    # the pretrained ones cached before training
    cached = load_file(str(run / "catalog-text.safetensors"))["text"]
    assert not torch.allclose(model.item_text[1:], cached, atol=1e-4)
    assert torch.equal(model.seen[1:], load_file(str(run / "catalog-text.safetensors"))["seen"])


# extended: test_distillation_and_pruning_resume_in_their_own_stage runs the same stages and
# resume with the search model in make test
@pytest.mark.extended
def test_sequential_distillation_and_pruning_resume_in_their_own_stage(tmp_path: Path) -> None:
    """The sequential recommender compressed in the real loop (2 processes, ZeRO-2, the
    frozen text side and a whole-catalog softmax): a 2-layer teacher of width 64 -> a
    1-layer student of width 32 (listwise KL over the catalog, the unseen items masked in
    both) -> half its FFN channels pruned -> recovery, killed mid-distillation: the rerun
    reloads the teacher, resumes the distillation at its checkpoint on the same batches
    and finishes; model/ reloads as the narrow pruned student and ranks as reported."""
    files, run = atomic_slice(tmp_path), tmp_path / "run"
    doc = {
        "name": "seq-compressed",
        "outputUri": str(run),
        "logIntervalSteps": 2,
        "data": {
            "task": "recommendation",
            "format": "atomic",
            "train": files["train"],
            "validation": files["valid"],
            "test": files["test"],
            "catalog": files["catalog"],
        },
        "model": {
            "architecture": "sequential",
            "maxSequenceLength": 16,
            "historyLength": 4,
            "fineTuning": {"method": "frozen"},
            "sequential": {"hiddenSize": 64, "layers": 2, "heads": 2},
        },
        "training": {
            "processesPerNode": 2,
            "deepspeed": {"zeroStage": 2},
            "precision": "fp32",
            "microBatchSize": 4,
            "maxSteps": 4,
            "learningRate": 3e-3,
            "evalIntervalSteps": 100,
            "checkpoint": {"intervalSteps": 2, "keep": 3},
        },
        "compression": {
            "distillation": {
                "student": {"numLayers": 1, "hiddenSize": 32},
                "loss": "listwise-kl",
                "temperature": 0.5,  # below 1: the masked entries once gave NaN here
                "maxSteps": 16,
            },
            "pruning": {"method": "ffn-channels", "amount": 0.5, "recoverySteps": 2},
        },
        "evaluation": {"sampledNegatives": 20, "batchSize": 64, "baselines": False},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    process = launch(config)
    deadline = time.time() + 480
    while time.time() < deadline and process.poll() is None:
        saved = [
            e["step"]
            for e in read_events(run)
            if e["event"] == "checkpoint" and e.get("stage") == "distill"
        ]
        if saved and saved[-1] >= 2:
            break
        time.sleep(0.05)
    kill_tree(process.pid)
    out, _ = process.communicate()
    assert not (run / "metrics.json").exists(), f"not killed mid-run: {out[-3000:]}"
    before = read_events(run)
    first = {
        e["step"]: e["digest"]
        for e in before
        if e.get("stage") == "distill" and e["event"] == "batch"
    }

    train(config)
    events = read_events(run)[len(before) :]
    resumed = {e.get("stage", "train"): e["step"] for e in events if e["event"] == "resumed"}
    assert resumed["train"] == 4  # the teacher finished: reloaded, not trained again
    start = resumed["distill"]
    assert start >= 2 and start % 2 == 0
    again = [e for e in events if e.get("stage") == "distill" and e["event"] == "batch"]
    assert [e["step"] for e in again] == list(range(start + 1, 17))
    assert all(first[e["step"]] == e["digest"] for e in again if e["step"] in first)
    distill_losses = [e["loss"] for e in events if e.get("stage") == "distill" and "loss" in e]
    assert distill_losses and all(math.isfinite(x) for x in distill_losses)

    metrics = json.loads((run / "metrics.json").read_text())
    compression = metrics["compression"]
    assert [s["name"] for s in compression["stages"]] == ["train", "distill", "recover"]
    assert compression["main_metric"] == "full/ndcg@10"
    assert compression["teacher_value"] == compression["teacher"]["metrics"]["full/ndcg@10"]
    assert compression["student_value"] == metrics["model"]["full/ndcg@10"]
    assert compression["distillation"]["teacher_layers"] == [1]
    teacher_shape = {k: compression["teacher"][k] for k in ("layers", "hidden_size")}
    assert teacher_shape == {"layers": 2, "hidden_size": 64}
    student = compression["student"]
    assert (student["layers"], student["hidden_size"]) == (1, 32)
    assert student["structure"] == {"heads": [2], "ffn": [64]}  # 128 channels -> 64
    assert student["item_table_bytes"] * 2 == compression["teacher"]["item_table_bytes"]
    assert student["parameters"] < compression["teacher"]["parameters"]
    own = "parameters_without_text_encoder"  # the text encoder is the teacher's, unserved
    assert student[own] < compression["teacher"][own] / 3
    assert compression["pruning"]["parameters_after"] < compression["pruning"]["parameters_before"]
    assert metrics["consolidation_max_abs_diff"] < 1e-4 and metrics["ranks"]["agree"]
    assert "teacher" in metrics["ndcg@10_vs_baselines"]
    # model/ is the student, rebuilt from its recorded shape; teacher/ the teacher
    model, tokenizer = load_model(run / "model")
    teacher, _ = load_model(run / "teacher")
    assert model.info.extra["sequential"]["ffn"] == [64]
    assert (len(model.transformer.layers), model.shape.hidden) == (1, 32)
    assert (len(teacher.transformer.layers), teacher.shape.hidden) == (2, 64)
    prepared = read_prepared(run / "data")
    batcher = Batcher.for_model("recommendation", tokenizer, model.info, prepared.catalog)
    measured = evaluate_recommendation(model, batcher, prepared.splits["test"], [10], 64, 20)
    assert measured["full/ndcg@10"] == pytest.approx(metrics["model"]["full/ndcg@10"], abs=1e-6)
