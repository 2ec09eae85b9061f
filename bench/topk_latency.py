"""Served top-k latency of a sequential recommender: one user's request, whole catalog.

    .venv/bin/python bench/topk_latency.py [--sizes 5000 1000000] [--requests 300]

For each catalog size a synthetic sequential model (text embeddings drawn around 1,024
centres, so the catalog has the cluster structure real item vectors have; hidden 64, 2
layers, history window 50, cosine / temperature 0.07 scores as the RecJob's default: unit
item vectors) is exported as ``recjob-serve convert`` exports one (the user
tower to ONNX with its item table, int8 MatMuls; ``item_vectors.npy`` and
``item_ids.json`` beside it; the ``<model>-topk`` model), published to a repository and
served by ``recjob-serve serve`` on 127.0.0.1. One client sends one user per request
(JSON over HTTP, keep-alive, sequential): a history of 1-50 random catalog ids, k = 10,
history excluded. Reported per size: p50 / p99 / mean of the HTTP round trip, the
server's load time (process start to ready: ONNX session, vectors, faiss index), the
search the top-k model chose (exact up to 200,000 items, faiss IVF above).

In process, on the same users (their vectors from the same int8 user tower): the search
alone (exact matrix product + argpartition vs faiss), and for faiss the recall@10 against
exact search at several ``nprobe`` (the trade-off the top-k model's ``ivf_nprobe`` sets).

``measure()`` returns the whole result as a dict (``bench/rec_quality.py`` calls it);
``main`` prints a table and writes bench/results/topk_latency.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
MODEL = "bench-recs"
K = 10
WINDOW = 50
NPROBES = (4, 8, 16, 32, 62, 128)


def synthetic_model(items: int, hidden: int = 64, text_dim: int = 32, seed: int = 0):
    """An untrained sequential recommender over ``items`` clustered synthetic items."""
    import types

    import torch

    from recjob_trainer.sequential import SequenceShape, SequentialRecommender

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    shape = SequenceShape(
        items=items,
        text_dim=text_dim,
        hidden=hidden,
        layers=2,
        heads=2,
        max_history=WINDOW,
        temperature=0.07,
    )
    info = types.SimpleNamespace(
        kind="sequential",
        max_length=32,
        extra={"sequential": asdict(shape), "item_ids": [f"item{n}" for n in range(items)]},
    )
    model = SequentialRecommender(None, info)
    centres = rng.normal(size=(1024, text_dim)).astype(np.float32)
    text = centres[rng.integers(0, len(centres), items)]
    text += 0.35 * rng.normal(size=text.shape).astype(np.float32)
    model.set_catalog_text(torch.from_numpy(text), torch.ones(items))
    return model.eval()


def build_repository(items: int, work: Path) -> Path:
    """Export the synthetic model as conversion does and publish it (user tower, item
    vectors, top-k model); returns the repository."""
    from recjob_serving.export import export_user_tower, quantize_int8
    from recjob_serving.repository import publish, publish_topk_model

    model = synthetic_model(items)
    exported = export_user_tower(model, work / "model.fp32.onnx")
    int8 = quantize_int8(
        exported.path, work / "model.int8.onnx", 2, 64, fuse_attention=False, op_types=["MatMul"]
    )
    del model
    repository = work / "repository"
    card = {"kind": "sequential", "target": "onnxruntime-int8", **exported.card}
    version = publish(repository, MODEL, int8, card, max_batch_size=8, files=exported.files)
    publish_topk_model(repository, MODEL, 8, version)
    return repository


def histories(items: int, count: int, seed: int = 1) -> list[list[str]]:
    """``count`` users: histories of 1-50 random catalog ids."""
    rng = np.random.default_rng(seed)
    return [
        [f"item{i}" for i in rng.integers(0, items, size=int(rng.integers(1, WINDOW + 1)))]
        for _ in range(count)
    ]


def request(history: list[str]) -> dict:
    """One user's top-k request (JSON)."""
    return {
        "inputs": [
            {"name": "history", "datatype": "BYTES", "shape": [1, len(history)], "data": history},
            {"name": "k", "datatype": "INT32", "shape": [1, 1], "data": [K]},
        ]
    }


def percentiles(seconds: list[float]) -> dict:
    """p50 / p99 / mean in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def served_latency(repository: Path, users: list[list[str]], work: Path) -> dict:
    """Start ``recjob-serve serve`` and time one-user requests over HTTP."""
    import httpx

    from recjob_operator.local.processes import free_port

    http, grpc = free_port(), free_port()
    log = work / "server.log"
    started = time.perf_counter()
    server = subprocess.Popen(
        [str(BIN / "recjob-serve"), "serve", str(repository), "--http-port", str(http),
         "--grpc-port", str(grpc), "--grace-period", "2"],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{http}"
    try:
        with httpx.Client(timeout=60) as client:
            deadline = time.time() + 900
            while True:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"server did not start: {log.read_text()[-2000:]}")
                try:
                    if client.get(f"{url}/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            load = time.perf_counter() - started
            infer = f"{url}/v2/models/{MODEL}-topk/infer"
            for history in users[:20]:  # warm-up
                client.post(infer, json=request(history)).raise_for_status()
            times, answers = [], []
            for history in users:
                body = request(history)
                t0 = time.perf_counter()
                answer = client.post(infer, json=body)
                times.append(time.perf_counter() - t0)
                answer.raise_for_status()
                answers.append(answer.json())
        search = next(
            (json.loads(line.split(": ", 1)[1]) for line in log.read_text().splitlines()
             if line.startswith(f"{MODEL}-topk: ")),
            None,
        )  # fmt: skip
        items = [next(o for o in a["outputs"] if o["name"] == "item_ids")["data"] for a in answers]
        assert all(len(i) == K for i in items), "a response without k items"
        return {
            **percentiles(times),
            "requests": len(times),
            "server_load_seconds": round(load, 1),
            "search": search,
            "served_item_ids": items,
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def _topk_module():
    from recjob_serving.python_backend import install_utils

    install_utils()
    path = REPO / "serving" / "recjob_serving" / "backends" / "topk_model.py"
    spec = importlib.util.spec_from_file_location("recjob_topk_model_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_process(repository: Path, users: list[list[str]], faiss_used: bool) -> dict:
    """The search alone on the served users' vectors: exact, and (large catalogs) faiss
    IVF at several nprobe with its recall@10 against exact."""
    from recjob_serving.export import session

    topk = _topk_module()
    folder = repository / MODEL / "1"
    vectors = np.load(folder / "item_vectors.npy")
    index = {item: n for n, item in enumerate(json.loads((folder / "item_ids.json").read_text()))}
    tower = session(folder / "model.onnx")
    user_vectors, excluded = [], []
    for history in users:
        rows = [index[i] for i in history]
        batch = np.array([[r + 1 for r in rows][-WINDOW:]], dtype=np.int64)
        user_vectors.append(tower.run(None, {"history": batch})[0][0])
        excluded.append(np.unique(np.array(rows, dtype=np.int64)))
    exact = topk.CatalogSearch(vectors, "exact")

    def timed(search) -> tuple[dict, list]:
        times, found = [], []
        for user, drop in zip(user_vectors, excluded, strict=True):
            t0 = time.perf_counter()
            found.append(search.top(user[None, :], K, [drop])[0][0])
            times.append(time.perf_counter() - t0)
        return percentiles(times), found

    out: dict = {}
    out["exact"], truth = timed(exact)
    if faiss_used:
        ivf = topk.CatalogSearch(vectors, "ivf")
        out["ivf_build_seconds"] = round(ivf.build_seconds, 1)
        out["ivf_nlist"] = ivf.nlist
        out["ivf_default_nprobe"] = ivf.nprobe
        sweep = {}
        for nprobe in sorted({*NPROBES, ivf.nprobe}):
            ivf.index.nprobe = nprobe
            latency, found = timed(ivf)
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, found, strict=True)])
            sweep[str(nprobe)] = {**latency, "recall@10_vs_exact": round(float(recall), 4)}
        out["ivf_by_nprobe"] = sweep
    return out


def measure(
    sizes: tuple[int, ...] = (5_000, 1_000_000), requests: int = 300, work: Path | None = None
) -> dict:
    """Served top-k latency (p50 / p99 of one user's request over HTTP) per catalog size,
    with the in-process search costs and faiss recall; a dict (see the module docstring)."""
    result: dict = {
        "how": "recjob-serve serve over HTTP (JSON, keep-alive), one user per request, "
        f"sequential client on the same machine; k = {K}, histories of 1-{WINDOW} items, "
        "history excluded; int8 user tower (hidden 64, 2 layers, temperature 0.07), float32 "
        "unit item vectors",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "catalogs": {},
    }
    for items in sizes:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            folder = Path(tmp)
            t0 = time.perf_counter()
            repository = build_repository(items, folder)
            export_seconds = time.perf_counter() - t0
            users = histories(items, requests)
            served = served_latency(repository, users, folder)
            served_ids = served.pop("served_item_ids")
            faiss_used = bool(served["search"]) and served["search"]["method"] != "exact"
            local = in_process(repository, users, faiss_used)
            entry = {
                "items": items,
                "export_seconds": round(export_seconds, 1),
                "served": served,
                "in_process_search": local,
                "onnx_bytes": (repository / MODEL / "1" / "model.onnx").stat().st_size,
            }
            if faiss_used:  # the served answers' recall against exact search
                entry["served_recall@10_vs_exact"] = _served_recall(repository, users, served_ids)
            result["catalogs"][str(items)] = entry
            shutil.rmtree(repository, ignore_errors=True)
    return result


def _served_recall(repository: Path, users: list[list[str]], served: list[list[str]]) -> float:
    """Share of the exact top-10 (same int8 user vectors) that the served answers hold."""
    from recjob_serving.export import session

    topk = _topk_module()
    folder = repository / MODEL / "1"
    ids = json.loads((folder / "item_ids.json").read_text())
    index = {item: n for n, item in enumerate(ids)}
    exact = topk.CatalogSearch(np.load(folder / "item_vectors.npy"), "exact")
    tower = session(folder / "model.onnx")
    hits = []
    for history, answer in zip(users, served, strict=True):
        rows = [index[i] for i in history]
        user = tower.run(None, {"history": np.array([[r + 1 for r in rows][-WINDOW:]])})[0]
        truth = exact.top(user, K, [np.unique(np.array(rows, dtype=np.int64))])[0][0]
        hits.append(len({ids[r] for r in truth} & set(answer)) / K)
    return round(float(np.mean(hits)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 1_000_000])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "topk_latency.json")
    args = parser.parse_args()
    result = measure(tuple(args.sizes), args.requests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'catalog':>10} {'search':>14} {'p50 ms':>8} {'p99 ms':>8} {'load s':>7}")
    for items, entry in result["catalogs"].items():
        served = entry["served"]
        search = served["search"] or {}
        name = search.get("method", "?")
        if name == "ivf":
            name = f"ivf/{search['nlist']}/{search['nprobe']}"
        print(
            f"{items:>10} {name:>14} {served['p50_ms']:>8.2f} {served['p99_ms']:>8.2f} "
            f"{served['server_load_seconds']:>7.1f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
