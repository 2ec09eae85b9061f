"""Shared by the benchmarks: launching the trainer as a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on loopback for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_trainer(config: dict, workdir: Path, processes: int = 2) -> dict:
    """Train ``config`` with ``torchrun --nproc_per_node processes``; returns its
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
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    if code:
        raise SystemExit(f"{config['name']} failed (exit {code}); see {log}")
    return {
        "metrics": json.loads((run / "metrics.json").read_text()),
        "card": json.loads((run / "model-card.json").read_text()),
        "events": [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()],
        "wall_seconds": round(time.time() - started, 1),
    }
