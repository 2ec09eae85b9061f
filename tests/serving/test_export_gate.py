"""ONNX export parity, int8 quantization and the quality gate on real MiniLM weights."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import polars as pl
import pytest
import torch
from onnx import numpy_helper

from recjob_operator.api.v1alpha1.spec_delivery import QualityBudget
from recjob_serving.export import export_onnx, quantize_int8, run_onnx
from recjob_serving.gate import quality_gate, relative_drop, report_key
from recjob_serving.onnx_model import OnnxRankingModel
from recjob_trainer.batches import Batcher
from recjob_trainer.models import ModelInfo, base_model_path, build_model, load_model, save_model
from tests.conftest import SHARED

HOMEDEPOT = SHARED / "data" / "homedepot-search" / "queries-dev.csv"


def saved_model(tmp: Path, kind: str) -> Path:
    """The pretrained encoder with a fresh head, saved as the trainer saves models."""
    from transformers import AutoTokenizer

    path = base_model_path("all-MiniLM-L6-v2")
    info = ModelInfo(
        kind,
        "regression" if kind == "cross-encoder" else "listwise",
        max_length=32,
        label_min=1.0,
        label_max=3.0,
    )
    torch.manual_seed(0)
    model = build_model(info, path).eval()
    directory = tmp / kind
    save_model(model, model.state_dict(), AutoTokenizer.from_pretrained(path), directory)
    return directory


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("cross")
    model_dir = saved_model(tmp, "cross-encoder")
    exported = export_onnx(model_dir, tmp / "model.onnx")
    yield model_dir, exported.path
    shutil.rmtree(tmp, ignore_errors=True)  # CI's disk


@pytest.mark.parametrize("kind", ["cross-encoder", "bi-encoder"])
def test_export_reproduces_pytorch_with_dynamic_axes(tmp_path: Path, kind: str) -> None:
    model_dir = saved_model(tmp_path, kind)
    exported = export_onnx(model_dir, tmp_path / "model.onnx")
    assert exported.parity_max_abs_diff < 1e-4
    graph = onnx.load(str(exported.path))
    dims = [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    model, tokenizer = load_model(model_dir)
    texts = ["a", "cordless drill with two batteries", "x", "safety glasses", "pipe"]
    tokens = tokenizer(texts, texts[::-1], padding=True, return_tensors="pt")
    batch = {k: v.numpy() for k, v in tokens.items()}
    got = run_onnx(exported.path, batch)[0]
    with torch.no_grad():
        if kind == "cross-encoder":
            expected = model.predict(model.score_pairs(**tokens)).numpy()
        else:
            expected = model.item_vectors(tokens["input_ids"], tokens["attention_mask"]).numpy()
    assert got.shape[0] == 5 and np.abs(got - expected).max() < 1e-4


def test_int8_is_four_times_smaller_and_still_ranks_alike(cross_encoder, tmp_path: Path) -> None:
    model_dir, fp32 = cross_encoder
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", num_heads=12, hidden_size=384)
    assert fp32.stat().st_size / int8.stat().st_size > 3.5
    # 7-bit weights: x86 without VNNI multiplies uint8 activations by int8 weights in pairs
    # summed into int16 (VPMADDUBSW), which saturates with full-range weights (a 2% NDCG
    # loss measured on AVX2 CPUs); 2 x 255 x 64 fits, so every CPU computes the same
    weights = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(int8)).graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]
    assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights)
    _, tokenizer = load_model(model_dir)
    queries = ["drill", "saw blade", "pvc pipe", "paint roller", "light bulb", "door hinge"]
    items = [
        "cordless drill",
        "circular saw blade",
        "pvc pipe 1/2 in",
        "roller cover",
        "led bulb",
        "brass hinge",
    ]
    pairs = [(q, i) for q in queries for i in items]
    tokens = tokenizer(
        [q for q, _ in pairs], [i for _, i in pairs], padding=True, return_tensors="np"
    )
    a, b = run_onnx(fp32, dict(tokens))[1], run_onnx(int8, dict(tokens))[1]
    from recjob_trainer.metrics import spearman

    assert spearman(a, b) > 0.9


def test_relative_drop_and_report_keys() -> None:
    assert relative_drop(0.80, 0.76, "ndcg@10") == pytest.approx(0.05)
    assert relative_drop(0.50, 0.55, "rmse") == pytest.approx(0.10)
    assert relative_drop(0.80, 0.84, "ndcg@10") < 0
    assert report_key("auto", "search-ranking", False) == "ndcg@10"
    assert report_key("auto", "recommendation", False) == "full/ndcg@10"
    assert report_key("recall@20", "recommendation", False) == "full/hr@20"


@pytest.mark.skipif(not HOMEDEPOT.exists(), reason="../shared/data not present")
def test_gate_passes_a_faithful_model_and_fails_a_damaged_one(
    cross_encoder, tmp_path: Path
) -> None:
    model_dir, fp32 = cross_encoder
    model, tokenizer = load_model(model_dir)
    frame = pl.read_csv(HOMEDEPOT, infer_schema=False).head(400)
    test = frame.select(
        pl.col("search_term").alias("query"),
        pl.col("product_uid").alias("item_id"),
        pl.col("product_title").alias("item_text"),
        pl.col("relevance").cast(pl.Float64).alias("label"),
    )
    batcher = Batcher("search-ranking", tokenizer, 32, None, 1.0, 3.0)
    budget = QualityBudget(maxRelativeDrop=0.01)
    good = quality_gate(model, OnnxRankingModel(fp32, model.info), batcher, test, budget)
    assert good["passed"] and good["reasons"] == []
    assert good["relative_drop"] == pytest.approx(0.0, abs=1e-6)
    assert good["rank_correlation"] > 0.999 and good["top_k_overlap"] == 1.0

    # damaged 1: every encoder weight matrix scrambled -> rankings unrelated to the source
    rng = np.random.default_rng(0)
    scrambled = edited(
        fp32,
        tmp_path / "scrambled.onnx",
        lambda name, v: rng.permutation(v) if v.ndim == 2 and v.shape[0] == 384 else v,
    )
    bad = quality_gate(
        model,
        OnnxRankingModel(scrambled, model.info),
        batcher,
        test,
        QualityBudget(maxRelativeDrop=0.01, minRankCorrelation=0.9),
    )
    assert not bad["passed"]
    assert any("rank correlation with the source model is" in r for r in bad["reasons"])
    # damaged 2: the head's bias shifted -> same order, but every predicted grade is wrong
    shifted = edited(
        fp32,
        tmp_path / "shifted.onnx",
        lambda name, v: v + 10.0 if name.endswith("head.bias") else v,
    )
    bad = quality_gate(
        model,
        OnnxRankingModel(shifted, model.info),
        batcher,
        test,
        QualityBudget(metric="rmse", maxRelativeDrop=0.01),
    )
    assert not bad["passed"] and bad["rank_correlation"] > 0.99
    assert bad["converted_value"] > bad["source_value"]
    (reason,) = bad["reasons"]
    assert reason.startswith("rmse went from") and "over the budget of 1.00%" in reason


@pytest.mark.skipif(not HOMEDEPOT.exists(), reason="../shared/data not present")
def test_gate_measures_the_teacher_and_enforces_its_budget(cross_encoder, tmp_path) -> None:
    model_dir, fp32 = cross_encoder
    model, tokenizer = load_model(model_dir)
    frame = pl.read_csv(HOMEDEPOT, infer_schema=False).head(300)
    test = frame.select(
        pl.col("search_term").alias("query"),
        pl.col("product_uid").alias("item_id"),
        pl.col("product_title").alias("item_text"),
        pl.col("relevance").cast(pl.Float64).alias("label"),
    )
    batcher = Batcher("search-ranking", tokenizer, 32, None, 1.0, 3.0)
    # a "student" whose grades are all off: within a loose budget of its own source, but
    # far below the teacher (the source model itself, measured on the same rows)
    path = edited(
        fp32, tmp_path / "shifted.onnx", lambda n, v: v + 10.0 if n.endswith("head.bias") else v
    )
    shifted = OnnxRankingModel(path, model.info)
    budget = QualityBudget(metric="rmse", maxRelativeDrop=1.0, maxRelativeDropVsTeacher=0.02)
    report = quality_gate(model, shifted, batcher, test, budget, teacher=model)
    assert report["teacher_value"] == pytest.approx(report["source_value"], abs=1e-9)
    assert report["teacher"]["rmse"] == report["teacher_value"]
    assert report["relative_drop_vs_teacher"] == pytest.approx(report["relative_drop"])
    assert not report["passed"]
    (reason,) = report["reasons"]
    assert reason.startswith("rmse is") and "below the teacher's" in reason
    assert "over the budget of 2.00%" in reason
    loose = QualityBudget(metric="rmse", maxRelativeDrop=1.0, maxRelativeDropVsTeacher=1.0)
    assert quality_gate(model, shifted, batcher, test, loose, teacher=model)["passed"]


def edited(source: Path, target: Path, change) -> Path:
    """A copy of an ONNX model with ``change(name, array)`` applied to every initializer."""
    graph = onnx.load(str(source))
    for init in graph.graph.initializer:
        values = numpy_helper.to_array(init)
        init.CopyFrom(
            numpy_helper.from_array(change(init.name, values).astype(values.dtype), init.name)
        )
    onnx.save(graph, str(target))
    return target


# --------------------------------------------------------------------------- repository
def test_config_pbtxt_round_trips_and_matches_the_graph(cross_encoder) -> None:
    from recjob_serving.repository import (
        check_config,
        model_config_module,
        onnx_config,
        parse_config,
    )

    _, fp32 = cross_encoder
    text = onnx_config("search", fp32, max_batch_size=64, instances=2)
    config = parse_config(text)
    types = model_config_module().DataType
    assert config.name == "search" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64 and config.instance_group[0].count == 2
    assert [(t.name, types.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("input_ids", "TYPE_INT64", [-1]),
        ("attention_mask", "TYPE_INT64", [-1]),
        ("token_type_ids", "TYPE_INT64", [-1]),
    ]
    assert [t.name for t in config.output] == ["score", "logit"]
    assert list(config.output[0].reshape.shape) == []
    check_config(text, fp32)
    with pytest.raises(ValueError, match="inputs"):
        check_config(text.replace('"token_type_ids"', '"segment_ids"'), fp32)
    with pytest.raises(ValueError, match="outputs"):
        check_config(text.replace("TYPE_FP32", "TYPE_INT64", 1), fp32)
    from google.protobuf.text_format import ParseError

    with pytest.raises(ParseError):
        parse_config(text.replace("max_batch_size", "max_batch"))


def test_publish_versions_atomically(cross_encoder, tmp_path: Path) -> None:
    from recjob_serving.repository import publish

    _, fp32 = cross_encoder
    repo = tmp_path / "repository"
    assert publish(repo, "search", fp32, {"kind": "cross-encoder"}, 64) == 1
    assert publish(repo, "search", fp32, {"kind": "cross-encoder"}, 64) == 2
    assert sorted(p.name for p in (repo / "search").iterdir()) == ["1", "2", "config.pbtxt"]
    assert (repo / "search" / "2" / "model.onnx").stat().st_size == fp32.stat().st_size
    with pytest.raises(FileExistsError):
        publish(repo, "search", fp32, {}, 64, version=2)
    with pytest.raises(FileNotFoundError):
        publish(repo, "search", tmp_path / "missing.onnx", {}, 64)
    # nothing half-written is left behind by the failures
    assert sorted(p.name for p in (repo / "search").iterdir()) == ["1", "2", "config.pbtxt"]


# --------------------------------------------------------------------------- convert CLI
@pytest.mark.skipif(not HOMEDEPOT.exists(), reason="../shared/data not present")
def test_convert_publishes_or_refuses(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    import yaml

    from recjob_operator.api.v1alpha1.spec_data import DataSpec
    from recjob_operator.api.v1alpha1.spec_training import ModelSpec
    from recjob_trainer.data.prepare import prepare
    from recjob_trainer.data.prepared import write_prepared

    model_dir = saved_model(tmp_path, "cross-encoder")
    frame = pl.read_csv(HOMEDEPOT, infer_schema=False).head(1500)
    frame.write_csv(tmp_path / "slice.csv")
    spec = DataSpec.model_validate(
        {
            "task": "search-ranking",
            "train": str(tmp_path / "slice.csv"),
            "columns": {
                "query": "search_term",
                "itemId": "product_uid",
                "itemText": "product_title",
                "label": "relevance",
            },
        }
    )
    write_prepared(prepare(spec, ModelSpec(), None), tmp_path / "data")
    recjob_serve = str(Path(sys.executable).parent / "recjob-serve")

    def run(name: str, export: dict) -> tuple[subprocess.CompletedProcess, dict]:
        config = {
            "snapshots": True,
            "modelDir": str(model_dir),
            "dataDir": str(tmp_path / "data"),
            "outputDir": str(tmp_path / name),
            "repository": str(tmp_path / "repo"),
            "modelName": "search",
            "export": export,
            "maxEvalGroups": 40,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [
                recjob_serve,
                "convert",
                "--config",
                str(path),
                "--termination-log",
                str(tmp_path / f"{name}.term"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        report_path = tmp_path / name / "quality-gate.json"
        return result, json.loads(report_path.read_text()) if report_path.exists() else {}

    ok, report = run("ok", {"target": "onnxruntime-int8"})
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "quality gate passed" in ok.stdout and report["published_version"] == 1
    assert (tmp_path / "repo" / "search" / "1" / "model.onnx").exists()
    assert (tmp_path / "repo" / "search-tokenizer" / "1" / "model.py").exists()
    assert (tmp_path / "repo" / "search-text" / "config.pbtxt").exists()
    snapshot = tmp_path / "repo-snapshots" / "v1"  # only version 1, every model
    assert report["snapshot"] == str(snapshot)
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "search",
        "search-text",
        "search-tokenizer",
    ]
    assert sorted(p.name for p in (snapshot / "search").iterdir()) == ["1", "config.pbtxt"]
    assert report["model_bytes"]["fp32"] / report["model_bytes"]["converted"] > 3.5

    strict, report = run(
        "strict",
        {
            "target": "onnxruntime-int8",
            "qualityBudget": {"maxRelativeDrop": 0.0, "minRankCorrelation": 1.0},
        },
    )
    assert strict.returncode == 2
    assert "quality gate FAILED, nothing published" in strict.stderr
    assert "rank correlation with the source model is" in strict.stderr
    assert report["passed"] is False and report["published_version"] is None
    summary = json.loads((tmp_path / "strict.term").read_text())  # what the operator reads
    assert summary["passed"] is False and summary["metric"] == report["metric"]
    assert summary["reasons"] == report["reasons"]
    assert len((tmp_path / "strict.term").read_bytes()) <= 4096
    assert sorted(p.name for p in (tmp_path / "repo" / "search").iterdir()) == ["1", "config.pbtxt"]
    assert [p.name for p in (tmp_path / "repo" / "search-tokenizer").iterdir() if p.is_dir()] == [
        "1"
    ]

    trt, report = run(
        "trt",
        {
            "target": "tensorrt-int8",
            "calibrationSamples": 64,
            "qualityBudget": {"maxRelativeDrop": 0.5},
        },
    )
    assert trt.returncode == 3, trt.stderr[-2000:]
    assert "passed the quality gate in ONNX Runtime" in trt.stderr and "trtexec" in trt.stderr
    assert report["measured_model"].startswith("the QDQ int8 ONNX model")
    assert report["engine_build"]["status"] == "unavailable here"
    assert "--int8" in report["engine_build"]["command"]
    assert (tmp_path / "trt" / "model.qdq.onnx").exists()
    assert sorted(p.name for p in (tmp_path / "repo" / "search").iterdir()) == [
        "1",
        "config.pbtxt",
    ]  # nothing published without an engine


def test_trtexec_command_is_exact(tmp_path: Path) -> None:
    from recjob_serving.tensorrt import EngineBuildUnavailable, build_engine, trtexec_command

    command = trtexec_command(
        tmp_path / "m.qdq.onnx",
        tmp_path / "m.plan",
        "int8",
        ["input_ids", "attention_mask"],
        max_batch=64,
        max_length=128,
    )
    assert command == [
        "trtexec",
        f"--onnx={tmp_path / 'm.qdq.onnx'}",
        f"--saveEngine={tmp_path / 'm.plan'}",
        "--minShapes=input_ids:1x1,attention_mask:1x1",
        "--optShapes=input_ids:32x128,attention_mask:32x128",
        "--maxShapes=input_ids:64x128,attention_mask:64x128",
        "--skipInference",
        "--int8",
        "--fp16",
    ]
    fp16 = trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", "fp16", ["x"], 8, 16)
    assert fp16[-1] == "--fp16" and "--int8" not in fp16
    with pytest.raises(ValueError, match="int8 or fp16"):
        trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", "int4", ["x"], 8, 16)
    with pytest.raises(EngineBuildUnavailable, match="GPU node"):
        build_engine(command)


@pytest.mark.skipif(not HOMEDEPOT.exists(), reason="../shared/data not present")
def test_qdq_calibration_batches_share_one_shape(cross_encoder) -> None:
    from recjob_serving.tensorrt import calibration_batches

    model_dir, _ = cross_encoder
    model, tokenizer = load_model(model_dir)
    frame = (
        pl.read_csv(HOMEDEPOT, infer_schema=False)
        .head(100)
        .select(pl.col("search_term").alias("query"), pl.col("product_title").alias("item_text"))
    )
    batches = calibration_batches(
        Batcher.for_model("search-ranking", tokenizer, model.info, None),
        frame,
        samples=40,
        batch_size=16,
    )
    assert len(batches) == 2  # the partial third batch is dropped
    assert {b["input_ids"].shape for b in batches} == {(16, 32)}
