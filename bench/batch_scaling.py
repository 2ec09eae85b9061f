"""What batching can gain at most: rows/s of the served int8 cross-encoder in process at
batch 1, 4, 16 and 64, at one sequence length (the real pairs' median, 24 tokens).

    .venv/bin/python bench/batch_scaling.py [--model PATH] [--length 24]

Dynamic batching turns many batch-1 requests into one run; on a GPU that is most of the
gain, on a CPU a transformer's cost grows with the tokens it runs and a batch-1 request of
24 tokens is already a 24-row matrix product. This measures the ceiling: batch 64's
rows/s over batch 1's, the model alone (5 interleaved rounds, median), and the smallest
latency 64 closed-loop clients could see at that ceiling (Little's law: 64 / rows/s).
Writes bench/results/batch_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BATCHES = (1, 4, 16, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", type=Path,
        default=HERE.parent / "runs/bench/serving/repository/search-int8/1/model.onnx",
    )  # fmt: skip
    parser.add_argument("--length", type=int, default=24)
    args = parser.parse_args()
    from recjob_serving.export import session

    sess = session(args.model)
    rng = np.random.default_rng(0)
    length = args.length

    def batch(size: int) -> dict:
        return {
            "input_ids": rng.integers(1000, 5000, (size, length), dtype=np.int64),
            "attention_mask": np.ones((size, length), dtype=np.int64),
            "token_type_ids": np.zeros((size, length), dtype=np.int64),
        }

    samples: dict[int, list[float]] = {size: [] for size in BATCHES}
    for _ in range(5):
        for size in BATCHES:
            feed = batch(size)
            sess.run(None, feed)
            calls = max(1, 128 // size)
            started = time.perf_counter()
            for _ in range(calls):
                sess.run(None, feed)
            samples[size].append(calls * size / (time.perf_counter() - started))
    rows_per_s = {size: float(np.median(values)) for size, values in samples.items()}
    results = {
        "machine": {"cpus": os.cpu_count()},
        "model": str(args.model),
        "length": length,
        "rows_per_s": {str(k): v for k, v in rows_per_s.items()},
        "batch_64_vs_1": rows_per_s[64] / rows_per_s[1],
        "littles_law_min_latency_ms_at_64_clients": 64 / rows_per_s[64] * 1000,
    }
    out = HERE / "results" / "batch_scaling.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for size, value in rows_per_s.items():
        print(f"batch {size:3d}, length {length}: {value:8.1f} rows/s")
    wait = results["littles_law_min_latency_ms_at_64_clients"]
    print(f"batch 64 / batch 1: {results['batch_64_vs_1']:.2f}x; at that ceiling 64 clients")
    print(f"wait >= {wait:.0f} ms a request")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
