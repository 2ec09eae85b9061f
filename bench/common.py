"""Shared by the benchmarks: launching the trainer as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on loopback for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(config: dict, workdir: Path, processes: int = 2, threads: int = 1) -> dict:
    """Train ``config`` with ``torchrun --nproc_per_node processes`` (``threads`` each); returns its
    metrics.json, model-card.json, progress events and wall time. Exits on failure."""
    run = Path(config["outputUri"])
    if run.exists():  # a fresh run: the trainer would otherwise resume the old one
        shutil.rmtree(run)
    path = workdir / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / f"{config['name']}.log"
    started = time.time()
    with log.open("w") as handle:
        code = subprocess.call(
            [
                str(BIN / "torchrun"),
                "--nproc_per_node",
                str(processes),
                "--master_port",
                str(free_port()),
                "-m",
                "recjob_trainer",
                "--config",
                str(path),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    if code:
        raise SystemExit(f"{config['name']} failed (exit {code}); see {log}")
    return {
        "metrics": json.loads((run / "metrics.json").read_text()),
        "card": json.loads((run / "model-card.json").read_text()),
        "events": [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()],
        "wall_seconds": round(time.time() - started, 1),
    }


@contextlib.contextmanager
def served(
    repository: Path, work: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """`recjob-serve serve REPOSITORY [EXTRA...]` on 127.0.0.1 until the block ends; yields
    (process, HTTP port, gRPC port) once it reports ready."""
    http, grpc = free_port(), free_port()
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "recjob-serve"), "serve", str(repository), "--http-port", str(http),
         "--grpc-port", str(grpc), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{http}/v2/health/ready"], capture_output=True
        ).returncode:
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start; see {work / 'server.log'}")
            time.sleep(0.5)
        yield server, http, grpc
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


@contextlib.contextmanager
def model_server(repository: Path, work: Path) -> Iterator[int]:
    """`recjob-serve serve REPOSITORY` on 127.0.0.1 until the block ends; yields its gRPC
    port once it reports ready."""
    with served(repository, work) as (_, _, grpc):
        yield grpc


def small_repository(work: Path, name: str = "search") -> Path:
    """A model repository without training (seconds): all-MiniLM-L6-v2 with a fresh
    regression head (seed 0) exported to ONNX fp32 as ``name``, with its tokenizer model
    and raw-text ensemble (``<name>-text``), max_length 32: what tests/serving serve."""
    import torch
    from transformers import AutoTokenizer

    from recjob_serving.export import export_onnx
    from recjob_serving.repository import publish, publish_text_models
    from recjob_trainer.models import ModelInfo, base_model_path, build_model, save_model

    repository, model_dir = work / "repository", work / "model"
    shutil.rmtree(repository, ignore_errors=True)
    path = base_model_path("all-MiniLM-L6-v2")
    info = ModelInfo("cross-encoder", "regression", max_length=32, label_min=1.0, label_max=3.0)
    torch.manual_seed(0)
    model = build_model(info, path).eval()
    save_model(model, model.state_dict(), AutoTokenizer.from_pretrained(path), model_dir)
    exported = export_onnx(model_dir, work / "model.onnx")
    card = {"kind": "cross-encoder", "max_length": 32}
    version = publish(repository, name, exported.path, card, max_batch_size=16)
    publish_text_models(repository, name, model_dir / "tokenizer", "cross-encoder", 32, 16, version)
    return repository


def load_test(
    grpc: int, model: str, batch: int, concurrency: int, requests: int, work: Path,
    sequence_length: int = 32, texts: Path | None = None,
) -> dict:  # fmt: skip
    """`recjob-serve bench` (gRPC, tritonclient) against one served model."""
    out = work / f"load-{model}-b{batch}-c{concurrency}.json"
    subprocess.run(
        [str(BIN / "recjob-serve"), "bench", f"127.0.0.1:{grpc}", "--protocol", "grpc",
         "--model", model, "--batch-size", str(batch), "--concurrency", str(concurrency),
         "--requests", str(requests), "--sequence-length", str(sequence_length),
         *(["--texts", str(texts)] if texts else []), "-o", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    return {
        "rows_per_s": report["rows_per_s"],
        "p50_ms": report["latency_ms"]["p50"],
        "p99_ms": report["latency_ms"]["p99"],
        "mean_ms": report["latency_ms"]["mean"],
        "requests": report["succeeded"],
        "concurrency": concurrency,
    }


def convert(
    model_dir: Path, run: Path, work: Path, target: str, name: str, *,
    max_relative_drop: float, groups: int, teacher: bool = False,
) -> dict:  # fmt: skip
    """`recjob-serve convert` of ``model_dir`` (gated on the trainer run's held-out data,
    against its ``teacher/`` too when ``teacher``) into work/repository; returns
    quality-gate.json. Benchmarks pass a loose budget so they always get a model to time;
    the drop is reported."""
    config = {
        "modelDir": str(model_dir),
        "dataDir": str(run / "data"),
        "outputDir": str(work / name),
        "repository": str(work / "repository"),
        "modelName": name,
        "export": {"target": target, "qualityBudget": {"maxRelativeDrop": max_relative_drop}},
        "maxEvalGroups": groups,
        **({"teacherDir": str(run / "teacher")} if teacher else {}),
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([str(BIN / "recjob-serve"), "convert", "--config", str(path)], check=True)
    return json.loads((work / name / "quality-gate.json").read_text())
