"""``recjob-serve bench``: an Open Inference Protocol load generator on tritonclient.

``concurrency`` asyncio workers each send one request at a time (HTTP with the binary
tensor extension, or gRPC) until the request count or the duration is reached, and the
latency of every request is kept. Inputs are built from the model's own metadata: BYTES
inputs take texts (a JSON-lines file, or built-in product-search pairs), integer inputs
take token ids. Failed requests are counted by message, never fatal.

Never import this beside kserve: ``tritonclient.grpc`` and kserve register the same
protobuf symbols.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Query/item pairs used when no texts are given (real Home Depot-style product text).
DEFAULT_TEXTS = [
    {"query": "cordless drill", "item": "dewalt 20v max cordless drill driver kit",
     "text": "dewalt 20v max cordless drill driver kit"},
    {"query": "1/2 in. pvc elbow", "item": "charlotte pipe 1/2 in. pvc sch. 40 90-degree elbow",
     "text": "charlotte pipe 1/2 in. pvc sch. 40 90-degree elbow"},
    {"query": "led light bulbs", "item": "philips 60w equivalent soft white a19 led bulb",
     "text": "philips 60w equivalent soft white a19 led bulb"},
    {"query": "deck screws", "item": "grip-rite #8 x 2-1/2 in. star drive exterior deck screws",
     "text": "grip-rite #8 x 2-1/2 in. star drive exterior deck screws"},
]  # fmt: skip


@dataclass
class LoadSpec:
    """What to send and for how long."""

    url: str
    model: str
    protocol: str = "grpc"
    concurrency: int = 1
    batch_size: int = 1
    requests: int | None = None
    duration_s: float = 10.0
    warmup_requests: int = 5
    sequence_length: int = 32
    texts: list[dict] = field(default_factory=lambda: list(DEFAULT_TEXTS))


def load_texts(path: Path) -> list[dict]:
    """Texts from a JSON-lines file (one object per line, keys = BYTES input names)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no texts")
    return rows


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max in milliseconds (NaN when nothing succeeded)."""
    if not latencies_s:
        return {k: float("nan") for k in ("p50", "p90", "p99", "mean", "max")}
    ms = np.asarray(latencies_s) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


def _client_module(protocol: str):
    if protocol == "http":
        import tritonclient.http.aio as module
    elif protocol == "grpc":
        import tritonclient.grpc.aio as module
    else:
        raise ValueError(f"protocol must be http or grpc, not {protocol!r}")
    return module


def _metadata_inputs(metadata) -> list[dict]:
    if isinstance(metadata, dict):
        return metadata["inputs"]
    return [
        {"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in metadata.inputs
    ]


def build_batches(
    inputs: list[dict], spec: LoadSpec, count: int = 8
) -> list[dict[str, np.ndarray]]:
    """``count`` different request batches matching the model's declared inputs."""
    rows = itertools.cycle(spec.texts)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        chosen = [next(rows) for _ in range(spec.batch_size)]
        batch = {}
        for tensor in inputs:
            name, datatype = tensor["name"], tensor["datatype"]
            if datatype == "BYTES":
                if name not in chosen[0]:
                    raise ValueError(f"the texts have no field '{name}' for input '{name}'")
                batch[name] = np.array([[r[name].encode()] for r in chosen], dtype=np.object_)
            elif name == "attention_mask":
                batch[name] = np.ones((spec.batch_size, spec.sequence_length), dtype=np.int64)
            elif name == "token_type_ids":
                batch[name] = np.zeros((spec.batch_size, spec.sequence_length), dtype=np.int64)
            else:  # token ids, well inside any BERT vocabulary
                batch[name] = rng.integers(
                    1000, 5000, size=(spec.batch_size, spec.sequence_length), dtype=np.int64
                )
        batches.append(batch)
    return batches


async def _run(spec: LoadSpec) -> dict:
    module = _client_module(spec.protocol)
    client = module.InferenceServerClient(url=spec.url)
    try:
        metadata = await client.get_model_metadata(spec.model)
        batches = build_batches(_metadata_inputs(metadata), spec)

        def request_inputs(batch: dict[str, np.ndarray]) -> list:
            out = []
            for name, value in batch.items():
                datatype = "BYTES" if value.dtype == np.object_ else "INT64"
                tensor = module.InferInput(name, list(value.shape), datatype)
                if spec.protocol == "http":
                    tensor.set_data_from_numpy(value, binary_data=True)
                else:
                    tensor.set_data_from_numpy(value)
                out.append(tensor)
            return out

        prepared = [request_inputs(b) for b in batches]
        for i in range(spec.warmup_requests):
            await client.infer(spec.model, prepared[i % len(prepared)])
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        sent = itertools.count()
        started = time.perf_counter()
        deadline = started + spec.duration_s

        async def worker() -> None:
            while True:
                index = next(sent)
                if spec.requests is not None and index >= spec.requests:
                    return
                if spec.requests is None and time.perf_counter() >= deadline:
                    return
                begin = time.perf_counter()
                try:
                    await client.infer(spec.model, prepared[index % len(prepared)])
                except Exception as error:
                    errors[str(error)[:200]] += 1
                    continue
                latencies.append(time.perf_counter() - begin)

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return {
        "url": spec.url,
        "protocol": spec.protocol,
        "model": spec.model,
        "concurrency": spec.concurrency,
        "batch_size": spec.batch_size,
        "requests": len(latencies) + sum(errors.values()),
        "succeeded": len(latencies),
        "errors": dict(errors),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "rows_per_s": len(latencies) * spec.batch_size / elapsed if elapsed else 0.0,
        "latency_ms": percentiles(latencies),
    }


def run_load(spec: LoadSpec) -> dict:
    """Run the load and return the report (throughput, latency percentiles, errors)."""
    if spec.concurrency < 1 or spec.batch_size < 1:
        raise ValueError("concurrency and batch size must be at least 1")
    if spec.requests is not None and spec.requests < 1:
        raise ValueError("requests must be at least 1")
    return asyncio.run(_run(spec))
