"""Serving a sequential recommender: the user tower's ONNX / int8 export, the quality gate
on full-catalog ranking, the top-k model (exact and faiss) in the repository, in process
and through ``recjob-serve serve`` over HTTP.

The model is tiny (a 1-layer BERT of width 16 as text encoder, 60 items) and learns in a
few seconds that item n is followed by item n + 1, so the gate has real quality to keep.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import torch
from kserve.errors import InvalidInput

from recjob_serving.convert import ConvertConfig, convert
from recjob_serving.onnx_model import OnnxSequentialModel
from recjob_serving.python_backend import install_utils
from recjob_serving.server import load_repository
from recjob_trainer.data.prepared import PreparedData, write_prepared
from recjob_trainer.models import ModelInfo, base_model_path, load_model, save_model
from recjob_trainer.objective import loss_fn
from recjob_trainer.sequential import SequenceShape, SequentialRecommender
from tests.serving.test_server import Server

ITEMS = 60
IDS = [f"p{n}" for n in range(ITEMS)]


def _train_successor_rule(model: SequentialRecommender, steps: int = 120) -> None:
    """Item n is followed by item n + 1 (indices: n + 1 -> n + 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    try:
        torch.manual_seed(0)
        model.train()
        optimizer = torch.optim.Adam(
            [p for n, p in model.named_parameters() if not n.startswith("encoder.")], lr=3e-3
        )
        starts = torch.arange(1, ITEMS - 1)
        history = torch.stack([starts, starts + 1], dim=1)
        candidates = torch.arange(1, ITEMS + 1)
        for _ in range(steps):
            loss = loss_fn(model.info, model(history, candidates), starts + 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _prepared(directory: Path) -> None:
    """Prepared data whose test rows follow the successor rule (longer histories)."""

    def rows(starts: range) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "user_id": [f"u{n}" for n in starts],
                "history": [[f"p{max(0, n - 3)}", f"p{n - 1}", f"p{n}"] for n in starts],
                "item_id": [f"p{n + 1}" for n in starts],
                "time": list(starts),
            }
        )

    catalog = pl.DataFrame(
        {"item_id": IDS, "item_text": [f"part number {n}" for n in range(ITEMS)]}
    )
    splits = {
        "train": rows(range(1, 40)),
        "validation": rows(range(40, 45)),
        "test": rows(range(1, ITEMS - 1)),
    }
    write_prepared(PreparedData("recommendation", splits, catalog, digest="test"), directory)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A trained tiny sequential model, saved as the trainer saves it, converted to int8
    into a repository (the gate passed)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tmp = tmp_path_factory.mktemp("sequential")
    tokenizer = AutoTokenizer.from_pretrained(base_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    shape = SequenceShape(  # cosine / temperature scores, the RecJob's default
        items=ITEMS,
        text_dim=16,
        hidden=32,
        layers=2,
        heads=2,
        dropout=0.0,
        max_history=8,
        temperature=0.07,
    )
    info = ModelInfo(
        "sequential",
        "listwise",
        max_length=16,
        history_encoding="sequence",
        extra={"sequential": asdict(shape), "item_ids": IDS},
    )
    model = SequentialRecommender(encoder, info)
    seen = torch.ones(ITEMS)
    seen[-5:] = 0  # never seen in training: ranked by their text alone
    model.set_catalog_text(torch.randn(ITEMS, 16), seen)
    _train_successor_rule(model)
    model_dir = tmp / "model"
    save_model(model, model.state_dict(), tokenizer, model_dir)
    _prepared(tmp / "data")
    config = ConvertConfig.model_validate(
        {
            "modelDir": str(model_dir),
            "dataDir": str(tmp / "data"),
            "outputDir": str(tmp / "convert"),
            "repository": str(tmp / "repo"),
            "modelName": "recs",
            "export": {"target": "onnxruntime-int8", "maxBatchSize": 8},
        }
    )
    report = convert(config)
    return {"tmp": tmp, "model_dir": model_dir, "report": report, "repo": tmp / "repo"}


def test_convert_gates_and_publishes_the_user_tower_vectors_and_topk(run) -> None:
    report = run["report"]
    assert report["passed"], report["reasons"]
    assert report["metric"] == "full/ndcg@10"
    assert report["source_value"] > 0.5  # it learned the rule; int8 keeps it
    assert report["relative_drop"] <= 0.01
    assert report["rank_correlation"] > 0.95 and report["top_k_overlap"] >= 0.8
    assert report["onnx_parity_max_abs_diff"] < 1e-4
    version = run["repo"] / "recs" / "1"
    card = json.loads((version / "recjob.json").read_text())
    assert card["kind"] == "sequential" and card["max_history"] == 8 and card["items"] == ITEMS
    assert card["target"] == "onnxruntime-int8"
    assert json.loads((version / "item_ids.json").read_text()) == IDS
    assert np.load(version / "item_vectors.npy").shape == (ITEMS, 32)
    assert (run["repo"] / "recs-topk" / "1" / "model.py").exists()
    config = (run["repo"] / "recs" / "config.pbtxt").read_text()
    assert 'name: "history"' in config and "TYPE_INT64" in config and "dims: [ -1 ]" in config


def test_int8_user_tower_ranks_as_pytorch(run) -> None:
    model, _ = load_model(run["model_dir"])
    converted = OnnxSequentialModel(
        run["tmp"] / "convert" / "model.int8.onnx",
        model.info,
        np.load(run["repo"] / "recs" / "1" / "item_vectors.npy"),
    )
    rng = np.random.default_rng(1)
    history = torch.from_numpy(rng.integers(1, ITEMS + 1, size=(16, 5)))
    history[:4, :2] = 0  # left padding
    with torch.no_grad():
        table = model.catalog_vectors()
        expected = (model.user_vectors_from(history, table) @ table[1:].T).numpy()
    got = (converted.user_vectors_from(history, None) @ converted.catalog_vectors()[1:].T).numpy()
    overlap = np.mean(
        [
            len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10
            for a, b in zip(expected, got, strict=True)
        ]
    )
    correlation = np.mean(
        [
            np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
            for a, b in zip(expected, got, strict=True)
        ]
    )
    assert overlap >= 0.8 and correlation > 0.95


def test_a_compressed_model_converts_and_is_gated_against_its_teacher(run) -> None:
    """The fixture's model as a teacher: its transformer pruned (a layer, half of the FFN
    channels), recovered by distillation, saved as the trainer saves a student (teacher/
    beside model/); the conversion rebuilds the pruned shape, exports the user tower and
    gates the int8 student on full-catalog NDCG@10 against itself and the teacher."""
    from recjob_trainer.compression import sequential as seq
    from recjob_trainer.compression.distill import distillation_loss

    teacher, tokenizer = load_model(run["model_dir"])
    student = seq.trainable(copy.deepcopy(teacher))
    starts = torch.arange(1, ITEMS - 1)
    held_out = [
        ({"history": torch.stack([starts, starts + 1], 1), "candidates": torch.arange(1, 61)},
         starts + 1)
    ]  # fmt: skip

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(student.info, logits, labels)

    for method, amount in (("layers", 0.5), ("ffn-channels", 0.5)):
        seq.apply(student, seq.choose(student, method, amount, held_out, loss))
    assert seq.structure_of(student) == {"heads": [2], "ffn": [64]}
    scores = seq.SequentialTeacherScores(teacher)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    student.train()
    batch, labels = held_out[0]
    for _ in range(60):
        logits = student(**batch)
        step = 0.5 * loss(logits, labels) + 0.5 * distillation_loss(
            "listwise-kl", logits, scores([], batch, False)[0], 2.0
        )
        optimizer.zero_grad()
        step.backward()
        optimizer.step()
    student.eval()
    tmp = run["tmp"] / "compressed"
    save_model(student, student.state_dict(), tokenizer, tmp / "model")
    config = ConvertConfig.model_validate(
        {
            "modelDir": str(tmp / "model"),
            "dataDir": str(run["tmp"] / "data"),
            "teacherDir": str(run["model_dir"]),
            "outputDir": str(tmp / "convert"),
            "repository": str(tmp / "repo"),
            "modelName": "small",
            "export": {
                "target": "onnxruntime-int8",
                "maxBatchSize": 8,
                "qualityBudget": {"maxRelativeDrop": 0.02, "maxRelativeDropVsTeacher": 0.5},
            },
        }
    )
    report = convert(config)
    assert report["passed"], report["reasons"]
    assert report["onnx_parity_max_abs_diff"] < 1e-4
    # the teacher is measured on the same rows: its value is the uncompressed conversion's
    assert report["teacher_value"] == pytest.approx(run["report"]["source_value"], abs=1e-9)
    assert report["teacher"]["full/ndcg@10"] == report["teacher_value"]
    assert report["relative_drop_vs_teacher"] <= 0.5 and report["converted_value"] > 0.3
    assert np.load(tmp / "repo" / "small" / "1" / "item_vectors.npy").shape == (ITEMS, 32)
    # a budget vs the teacher the student does not meet: refused, naming the teacher
    strict = config.model_copy(deep=True)
    strict.output_dir, strict.repository = str(tmp / "strict"), str(tmp / "strict-repo")
    strict.export.quality_budget.max_relative_drop_vs_teacher = 0.05
    refused = convert(strict)
    assert not refused["passed"] and refused["published_version"] is None
    assert any("below the teacher's" in reason for reason in refused["reasons"])


def test_dot_product_user_tower_exports_with_dynamic_axes(tmp_path: Path) -> None:
    """temperature 0 (plain dot products, as SASRec): the export reproduces the model on
    other batch sizes and history lengths than it was traced with."""
    import types

    from recjob_serving.export import export_user_tower, probe_histories, session

    torch.manual_seed(0)
    shape = SequenceShape(items=30, text_dim=8, hidden=16, heads=2, max_history=6)
    info = types.SimpleNamespace(
        kind="sequential",
        max_length=16,
        extra={"sequential": asdict(shape), "item_ids": [f"i{n}" for n in range(30)]},
    )
    model = SequentialRecommender(None, info)
    model.set_catalog_text(torch.randn(30, 8), torch.ones(30))
    model.eval()
    exported = export_user_tower(model, tmp_path / "tower.onnx")
    assert exported.parity_max_abs_diff < 1e-4
    tower = session(exported.path)
    with torch.no_grad():
        table = model.catalog_vectors()
        for history in probe_histories(30, seed=5):
            expected = model.user_vectors_from(torch.from_numpy(history), table).numpy()
            (got,) = tower.run(None, {"history": history})
            assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
    vectors = np.load(exported.files["item_vectors.npy"])
    assert np.allclose(vectors, table[1:].numpy())


def _bytes(rows: list[list[str]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [""] * (width - len(r)) for r in rows], dtype=np.object_)


def _decoded(values: np.ndarray) -> list[list[str]]:
    return [
        [v.decode() if isinstance(v, bytes) else str(v) for v in row if v not in ("", b"")]
        for row in values
    ]


@pytest.fixture(scope="module")
def topk(run):
    models = {m.name: m for m in load_repository(run["repo"])}
    assert set(models) == {"recs", "recs-topk"}
    return models["recs-topk"]


def test_topk_ranks_the_catalog_without_the_history(topk) -> None:
    out = topk.infer(
        {
            "history": _bytes([["p9", "p10"], ["p20", "p21", "p22"]]),
            "k": np.array([[5], [5]], dtype=np.int32),
        }
    )
    items = _decoded(out["item_ids"])
    assert [len(r) for r in items] == [5, 5]
    assert items[0][0] == "p11" and items[1][0] == "p23"  # the rule it learned
    assert not {"p9", "p10"} & set(items[0]) and not {"p20", "p21", "p22"} & set(items[1])
    scores = out["scores"]
    assert (np.diff(scores, axis=1) <= 0).all()
    kept = topk.infer(
        {
            "history": _bytes([["p9", "p10"]]),
            "k": np.array([[ITEMS]], dtype=np.int32),
            "exclude_history": np.array([[False]]),
        }
    )
    assert len(_decoded(kept["item_ids"])[0]) == ITEMS  # the whole catalog, history included


def test_unknown_ids_are_skipped_and_reported(topk) -> None:
    plain = topk.infer({"history": _bytes([["p9", "p10"]])})
    out = topk.infer({"history": _bytes([["nope", "p9", "gone", "p10"]])})
    assert _decoded(out["unknown_items"]) == [["nope", "gone"]]
    assert _decoded(out["item_ids"]) == _decoded(plain["item_ids"])  # default k = 10
    assert len(_decoded(plain["item_ids"])[0]) == 10 and plain["unknown_items"].shape == (1, 0)
    cold = topk.infer({"history": _bytes([["nope"]])})  # no known item: still an answer
    assert len(_decoded(cold["item_ids"])[0]) == 10


def test_candidates_are_reranked(topk) -> None:
    out = topk.infer(
        {
            "history": _bytes([["p9", "p10"]]),
            "candidates": _bytes([["p3", "p11", "p40", "zz", "p10"]]),
        }
    )
    items = _decoded(out["item_ids"])[0]
    assert items[0] == "p11" and set(items) == {"p3", "p11", "p40", "p10"}  # history kept
    assert _decoded(out["unknown_items"]) == [["zz"]]


def test_topk_limits(topk) -> None:
    for bad in ({"k": np.array([[0]], dtype=np.int32)}, {"k": np.array([[1001]], dtype=np.int32)}):
        with pytest.raises(InvalidInput, match="k must be between 1 and 1000"):
            topk.infer({"history": _bytes([["p1"]]), **bad})
    with pytest.raises(InvalidInput, match="over the limit of 1000"):
        topk.infer({"history": _bytes([[f"p{n % ITEMS}" for n in range(1001)]])})


def _topk_module():
    install_utils()
    path = Path(__file__).parents[2] / "serving" / "recjob_serving" / "backends" / "topk_model.py"
    spec = importlib.util.spec_from_file_location("recjob_topk_model_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_faiss_ivf_finds_the_exact_top_k() -> None:
    """On 5,000 clustered vectors, IVF (nlist 70, nprobe 8) finds >= 95% of the exact
    top-10 and keeps excluded items out."""
    topk_model = _topk_module()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 50, 5000)] + 0.3 * rng.normal(size=(5000, 32)).astype(
        np.float32
    )
    users = centres[rng.integers(0, 50, 40)] + 0.3 * rng.normal(size=(40, 32)).astype(np.float32)
    exact = topk_model.CatalogSearch(vectors, "exact")
    ivf = topk_model.CatalogSearch(vectors, "ivf", nlist=70, nprobe=8)
    none = [np.zeros(0, dtype=np.int64)] * len(users)
    truth = exact.top(users, 10, none)
    found = ivf.top(users, 10, none)
    recall = np.mean([len(set(a[0]) & set(b[0])) / 10 for a, b in zip(truth, found, strict=True)])
    assert recall >= 0.95, recall
    drop = [t[0][:3] for t in truth]  # each user's three best
    for (rows, scores), dropped in zip(ivf.top(users, 10, drop), drop, strict=True):
        assert len(rows) == 10 and not set(rows) & set(dropped)
        assert (np.diff(scores) <= 0).all()


def test_served_over_http(run, tmp_path: Path) -> None:
    server = Server(run["repo"], tmp_path / "server.log", "--max-k", "20")
    try:
        url = f"{server.url}/v2/models/recs-topk/infer"
        body = {
            "inputs": [
                {
                    "name": "history",
                    "datatype": "BYTES",
                    "shape": [1, 3],
                    "data": ["p9", "what", "p10"],
                },
                {"name": "k", "datatype": "INT32", "shape": [1, 1], "data": [3]},
            ]
        }
        answer = httpx.post(url, json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert outputs["item_ids"]["shape"] == [1, 3] and outputs["item_ids"]["data"][0] == "p11"
        assert outputs["unknown_items"]["data"] == ["what"]
        known = {"inputs": [{**body["inputs"][0], "shape": [1, 2], "data": ["p9", "p10"]}]}
        plain = {o["name"]: o for o in httpx.post(url, json=known, timeout=30).json()["outputs"]}
        assert plain["item_ids"]["shape"] == [1, 10] and plain["item_ids"]["data"][0] == "p11"
        assert plain["unknown_items"]["shape"] == [1, 0] and plain["unknown_items"]["data"] == []
        body["inputs"][1]["data"] = [21]  # over --max-k
        refused = httpx.post(url, json=body, timeout=30)
        assert refused.status_code == 400 and "between 1 and 20" in refused.json()["error"]
        tower = httpx.post(
            f"{server.url}/v2/models/recs/infer",
            json={
                "inputs": [
                    {"name": "history", "datatype": "INT64", "shape": [1, 2], "data": [10, 11]}
                ]
            },
            timeout=30,
        )
        assert tower.status_code == 200 and tower.json()["outputs"][0]["shape"] == [1, 32]
    finally:
        assert server.stop() == 0
