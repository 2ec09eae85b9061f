"""A real training run and two conversions whose data and artifacts are on s3:// (moto on
loopback, IAM authentication on), with the credentials given only as environment
variables, as a credentials Secret gives them to the pods."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from recjob_trainer.models import load_model
from recjob_trainer.remote import MANIFEST, WorkingCopy
from recjob_trainer.storage import exists_uri, filesystem, open_uri, write_bytes_atomic
from tests.conftest import SHARED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data not present"),
]
BIN = Path(sys.executable).parent
HOMEDEPOT = SHARED / "data" / "homedepot-search" / "queries-dev.csv"
RUN = "s3://recjob-artifacts/search-ranker/g1/train"
REPOSITORY = "s3://recjob-artifacts/product-search/repository"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _objects(prefix: str) -> list[str]:
    fs, root = filesystem(prefix)
    fs.invalidate_cache()
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def _json(uri: str) -> dict:
    with open_uri(uri) as handle:
        return json.loads(handle.read())


def _train(tmp_path: Path) -> None:
    frame = pl.read_csv(HOMEDEPOT, infer_schema=False)
    keep = frame["search_term"].unique(maintain_order=True)[:30].to_list()
    csv = frame.filter(pl.col("search_term").is_in(keep)).write_csv()
    write_bytes_atomic("s3://recjob-data/homedepot/queries.csv", csv.encode())
    config = {
        "name": "search-ranker-g1",
        "outputUri": RUN,
        "data": {
            "task": "search-ranking",
            "train": "s3://recjob-data/homedepot/queries.csv",
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
            "maxSteps": 2,
            "evalIntervalSteps": 100,
            "checkpoint": {"intervalSteps": 2},
        },
        "evaluation": {"batchSize": 32, "baselines": False},
    }
    path = tmp_path / "trainer.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RECJOB_WORK_DIR": str(tmp_path / "training-pod"),
    }
    result = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "recjob_trainer",
            "--config",
            str(path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _convert(tmp_path: Path, name: str) -> tuple[subprocess.CompletedProcess, dict]:
    config = {
        "modelDir": f"{RUN}/model",
        "dataDir": f"{RUN}/data",
        "outputDir": f"s3://recjob-artifacts/search-ranker/g1/{name}",
        "repository": REPOSITORY,
        "modelName": "product-search",
        "export": {"target": "onnxruntime-fp32", "qualityBudget": {"maxRelativeDrop": 0.05}},
        "maxEvalGroups": 20,
        "snapshots": True,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RECJOB_WORK_DIR": str(tmp_path / f"{name}-pod")}  # a fresh pod
    result = subprocess.run(
        [str(BIN / "recjob-serve"), "convert", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report_uri = f"{config['outputDir']}/quality-gate.json"
    return result, _json(report_uri) if exists_uri(report_uri) else {}


def test_train_and_convert_on_s3(s3_env, tmp_path: Path) -> None:
    _train(tmp_path)
    published = _objects(RUN)
    for name in (f"model/{MANIFEST}", f"data/{MANIFEST}", "metrics.json", "model-card.json"):
        assert name in published, published
    assert not any(p.startswith(("checkpoints/", "data/shards-")) for p in published)
    metrics = _json(f"{RUN}/metrics.json")
    assert 0 <= metrics["model"]["ndcg@10"] <= 1
    # another pod reads the model back whole
    copy = WorkingCopy(RUN)
    model, _ = load_model(copy.pull("model"))
    assert model.info.kind == "cross-encoder"

    first, report = _convert(tmp_path, "convert")
    assert first.returncode == 0, first.stderr[-3000:]
    assert report["passed"] and report["published_version"] == 1
    assert report["snapshot"] == f"{REPOSITORY}-snapshots/v1"
    repository = _objects(REPOSITORY)
    for name in (
        "product-search/config.pbtxt",
        "product-search/1/model.onnx",
        "product-search-tokenizer/1/model.py",
        f"product-search-text/1/{MANIFEST}",  # an ensemble's empty version folder
        "product-search-text/config.pbtxt",
    ):
        assert name in repository, repository
    snapshot = _objects(f"{REPOSITORY}-snapshots/v1")
    assert "product-search/1/model.onnx" in snapshot and MANIFEST in snapshot
    assert "product-search-text/1/.keep" in snapshot
    # a second conversion (a fresh pod) sees version 1 and publishes version 2
    second, report = _convert(tmp_path, "convert-2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert report["published_version"] == 2
    assert f"product-search/2/{MANIFEST}" in _objects(REPOSITORY)
    assert _objects(f"{REPOSITORY}-snapshots/v2")
