"""Serving speed and quality: PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

    .venv/bin/python bench/serving.py [--shared ../shared] [--steps 200]
                                      [--model-run runs/bench/serving-model]

One run, one machine. A Home Depot cross-encoder is fine-tuned briefly (2 processes,
``--steps``; or an existing trainer run is reused with ``--model-run``), then converted
twice with ``recjob-serve convert`` (onnxruntime-fp32 and onnxruntime-int8, each gated on
the same held-out queries). Then:

- in-process: every backend scores the same token batches (batch 1 and 32, real
  held-out query/title pairs, and fixed-shape ids of length 32): rows/s (median of 4
  rounds that interleave the backends), p50/p99 per call;
- served: ``recjob-serve serve`` on 127.0.0.1 answers ``recjob-serve bench`` (gRPC,
  tritonclient) for the fp32 and int8 token models and the int8 raw-text ensemble;
- quality: NDCG@10 / RMSE of the PyTorch model, the fp32 and the int8 ONNX models on the
  held-out queries (from the two quality gates), model sizes.

Targets (issue 4): served int8 rows/s >= 3x in-process PyTorch eager fp32 at batch 32
(eager is measured in-process, without any server overhead, so the ratio is conservative),
int8 NDCG@10 within 1% relative of fp32, served p50 at batch 1 <= 1.3x the in-process
int8 call. Writes bench/results/serving.json (with the CPU model, its SIMD flags and the
load average, `machine.py`) and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
from common import convert, load_test, model_server, run_trainer
from machine import machine

HERE = Path(__file__).resolve().parent
SEQUENCE_LENGTH = 32


def train_config(shared: Path, run: Path, steps: int) -> dict:
    """A short Home Depot fine-tune (what the served model is)."""
    return {
        "name": "serving-model",
        "outputUri": str(run),
        "logIntervalSteps": 20,
        "data": {
            "task": "search-ranking",
            "train": str(shared / "data" / "homedepot-search" / "queries-dev.csv"),
            "columns": {
                "query": "search_term",
                "itemId": "product_uid",
                "itemText": "product_title",
                "label": "relevance",
            },
            "preprocessing": {"split": {"strategy": "by-query", "seed": 7}},
        },
        "model": {"maxSequenceLength": 48, "head": {"objective": "regression"}},
        "training": {
            "processesPerNode": 2,
            "deepspeed": {"zeroStage": 2},
            # fp32: CPU training; bf16 is ~10x slower on CPUs without bf16 arithmetic
            # (AVX2), and what is measured here is the served model, not its training
            "precision": "fp32",
            "microBatchSize": 16,
            "learningRate": 5e-5,
            "maxSteps": steps,
            "evalIntervalSteps": steps,
            "checkpoint": {"intervalSteps": steps},
        },
        "evaluation": {"batchSize": 64, "maxGroups": 300, "baselines": False},
    }


def timed_calls(call, batches: list, repeats: int) -> dict:
    """Per-call seconds and rows of ``call`` over ``batches`` x ``repeats`` (after a
    warm-up); `summary` turns one or more of these into rows/s and p50/p99."""
    for batch in batches[:3]:  # warm-up
        call(batch)
    times, rows = [], 0
    for _ in range(repeats):
        for batch in batches:
            started = time.perf_counter()
            call(batch)
            times.append(time.perf_counter() - started)
            rows += len(batch["input_ids"])
    return {"times": times, "rows": rows}


def summary(samples: list[dict]) -> dict:
    """rows/s (median over the rounds) and per-call p50/p99 in ms (all rounds' calls)
    of `timed_calls` results."""
    ms = np.concatenate([np.asarray(s["times"]) for s in samples]) * 1000
    return {
        "rows_per_s": float(np.median([s["rows"] / float(np.sum(s["times"])) for s in samples])),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "calls": len(ms),
        "rounds": len(samples),
    }


def token_batches(tokenizer, pairs: list[tuple[str, str]], batch_size: int) -> list[dict]:
    """Real pairs, tokenized as the trainer does (padded to each batch's longest)."""
    out = []
    for start in range(0, len(pairs) - batch_size + 1, batch_size):
        queries, items = zip(*pairs[start : start + batch_size], strict=True)
        tokens = tokenizer(
            list(queries), list(items), padding=True, truncation=True, max_length=48,
            return_tensors="np",
        )  # fmt: skip
        out.append({k: tokens[k].astype(np.int64) for k in tokens})
    return out


def fixed_batches(batch_size: int, count: int) -> list[dict]:
    """Token ids of length 32, as `recjob-serve bench` sends to token models."""
    rng = np.random.default_rng(0)
    return [
        {
            "input_ids": rng.integers(1000, 5000, (batch_size, SEQUENCE_LENGTH), dtype=np.int64),
            "attention_mask": np.ones((batch_size, SEQUENCE_LENGTH), dtype=np.int64),
            "token_type_ids": np.zeros((batch_size, SEQUENCE_LENGTH), dtype=np.int64),
        }
        for _ in range(count)
    ]


def in_process(run: Path, repository: Path, pairs: list[tuple[str, str]], rounds: int = 4) -> dict:
    """Each backend on the same batches, in this process, ``rounds`` interleaved rounds."""
    import torch

    from recjob_serving.export import session
    from recjob_trainer.models import load_model

    model, tokenizer = load_model(run / "model")

    def eager(batch: dict) -> None:
        with torch.no_grad():
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            model.predict(model.score_pairs(**tensors))

    def ort_call(path: Path):
        sess = session(path)
        return lambda batch: sess.run(["score"], batch)

    backends = {
        "pytorch-eager-fp32": eager,
        "onnxruntime-fp32": ort_call(repository / "search-fp32" / "1" / "model.onnx"),
        "onnxruntime-int8": ort_call(repository / "search-int8" / "1" / "model.onnx"),
    }
    workloads = {}
    for batch_size in (1, 32):
        workloads[f"real_text_batch_{batch_size}"] = (
            token_batches(tokenizer, pairs, batch_size)[:64], 3 if batch_size == 1 else 2
        )  # fmt: skip
        workloads[f"length_32_batch_{batch_size}"] = (
            fixed_batches(batch_size, 16), 4 if batch_size == 1 else 2
        )  # fmt: skip
    # rounds interleave the backends, so a machine that slows down or speeds up during the
    # run (other tenants, clock changes) shifts every backend alike and the ratios hold
    samples: dict = {name: {key: [] for key in workloads} for name in backends}
    for round_ in range(rounds):  # each round a different share of the batches
        for name, call in backends.items():
            for key, (batches, repeats) in workloads.items():
                share = batches[round_::rounds]
                samples[name][key].append(timed_calls(call, share, repeats))
    results = {
        name: {key: summary(values) for key, values in keyed.items()}
        for name, keyed in samples.items()
    }
    for name, value in results.items():
        print(name, json.dumps(value, indent=None)[:300])
    return results


def served(repository: Path, work: Path, pairs: list[tuple[str, str]]) -> dict:
    """`recjob-serve bench` (gRPC) against `recjob-serve serve`."""
    texts = work / "texts.jsonl"
    texts.write_text("".join(json.dumps({"query": q, "item": i}) + "\n" for q, i in pairs))
    runs = {
        "int8_batch_1": ("search-int8", 1, 1, 300),
        "fp32_batch_1": ("search-fp32", 1, 1, 300),
        "int8_batch_32": ("search-int8", 32, 2, 60),
        "fp32_batch_32": ("search-fp32", 32, 2, 30),
        "int8_text_batch_32": ("search-int8-text", 32, 2, 60),
        "int8_text_batch_1": ("search-int8-text", 1, 1, 300),
    }
    results = {}
    with model_server(repository, work) as grpc:
        for key, (model, batch, concurrency, requests) in runs.items():
            results[key] = load_test(
                grpc, model, batch, concurrency, requests, work, SEQUENCE_LENGTH, texts
            )
            print("served", key, results[key])
    return results


#: Concurrent batch-1 clients of the sweep.
SWEEP = (1, 8, 32, 64)


def without_dynamic_batching(repository: Path, target: Path) -> Path:
    """A copy of ``repository`` whose configs declare no ``dynamic_batching`` (the model
    versions are symlinks): the same server and models, each request run on its own."""
    from google.protobuf import text_format

    from recjob_serving.repository import parse_config

    target.mkdir(parents=True)
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        (target / model.name).mkdir()
        for entry in model.iterdir():
            if entry.name == "config.pbtxt":
                config = parse_config(entry.read_text())
                config.ClearField("dynamic_batching")
                (target / model.name / entry.name).write_text(text_format.MessageToString(config))
            else:
                (target / model.name / entry.name).symlink_to(entry.resolve())
    return target


def concurrency_sweep(repository: Path, work: Path, texts: Path) -> dict:
    """Batch-1 raw-text requests (real query/title pairs, their real lengths) from 1, 8, 32
    and 64 concurrent gRPC clients to the int8 text ensemble, with the repository's
    dynamic batching and without it."""
    plain = without_dynamic_batching(repository, work / "repository-no-batching")
    results: dict = {}
    for mode, served_repository in (("dynamic_batching", repository), ("no_batching", plain)):
        results[mode] = {}
        with model_server(served_repository, work) as grpc:
            for clients in SWEEP:
                results[mode][f"concurrency_{clients}"] = load_test(
                    grpc, "search-int8-text", 1, clients, max(400, 60 * clients), work,
                    SEQUENCE_LENGTH, texts,
                )  # fmt: skip
                print("sweep", mode, clients, results[mode][f"concurrency_{clients}"])
    return results


def print_table(local: dict, remote: dict, sweep: dict, ratios: dict) -> None:
    """The measurements as one table (rows/s, p50, p99) and the ratios with targets."""
    print(f"{'measurement':44} {'rows/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    rows = [(f"in-process {b} {k}", v) for b, ks in local.items() for k, v in ks.items()]
    rows += [(f"served {k}", v) for k, v in remote.items()]
    rows += [(f"sweep {m} {k}", v) for m, ks in sweep.items() for k, v in ks.items()]
    for name, value in rows:
        print(f"{name:44} {value['rows_per_s']:9.1f} {value['p50_ms']:8.2f} {value['p99_ms']:8.2f}")
    for name, value in ratios.items():
        print(f"{name:44} {value:9.3f}  target {TARGETS.get(name, '')}")


#: What the ratios must reach (issues 4 and 17).
TARGETS = {
    "served_int8_vs_inprocess_eager_batch_32": ">= 3",
    "int8_ndcg_relative_drop_vs_fp32": "<= 0.01",
    "served_p50_vs_inprocess_int8_batch_1": "<= 1.3",
    "dynamic_batching_vs_none_at_64": ">= 3",
    "p99_ms_at_64_dynamic": "<= 50",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    parser.add_argument("--runs", type=Path, default=HERE.parent / "runs" / "bench")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model-run", type=Path, default=None, help="reuse a trainer run")
    parser.add_argument("--gate-groups", type=int, default=400)
    args = parser.parse_args()
    work = (args.runs / "serving").resolve()
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    run = args.model_run
    training = None
    if run is None:
        run = args.runs.resolve() / "serving-model"
        result = run_trainer(train_config(args.shared.resolve(), run, args.steps), work)
        training = {"steps": args.steps, "wall_seconds": result["wall_seconds"]}
    gates = {
        target: convert(
            run / "model",
            run,
            work,
            target,
            f"search-{target.split('-')[1]}",
            max_relative_drop=0.05,
            groups=args.gate_groups,
        )
        for target in ("onnxruntime-fp32", "onnxruntime-int8")
    }
    import polars as pl

    test = pl.read_parquet(run / "data" / "test.parquet")
    pairs = list(zip(test["query"].to_list(), test["item_text"].to_list(), strict=True))[:2048]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    started_on = machine()
    local = in_process(run, work / "repository", pairs)
    remote = served(work / "repository", work, pairs)
    sweep = concurrency_sweep(work / "repository", work, work / "texts.jsonl")
    fp32_gate, int8_gate = gates["onnxruntime-fp32"], gates["onnxruntime-int8"]
    quality = {
        "metric": int8_gate["metric"],
        "pytorch_fp32": int8_gate["source_value"],
        "onnxruntime_fp32": fp32_gate["converted_value"],
        "onnxruntime_int8": int8_gate["converted_value"],
        "int8_vs_fp32_relative_drop": (fp32_gate["converted_value"] - int8_gate["converted_value"])
        / fp32_gate["converted_value"],
        "int8_rank_correlation": int8_gate["rank_correlation"],
        "rmse": {
            "pytorch_fp32": int8_gate["source"].get("rmse"),
            "onnxruntime_fp32": fp32_gate["converted"].get("rmse"),
            "onnxruntime_int8": int8_gate["converted"].get("rmse"),
        },
        "rows": int8_gate["rows"],
        "gate_reports": gates,
    }
    eager_32 = local["pytorch-eager-fp32"]["length_32_batch_32"]["rows_per_s"]
    ratios = {
        "served_int8_vs_inprocess_eager_batch_32": remote["int8_batch_32"]["rows_per_s"] / eager_32,
        "inprocess_int8_vs_eager_batch_32": local["onnxruntime-int8"]["length_32_batch_32"][
            "rows_per_s"
        ]
        / eager_32,
        "served_p50_vs_inprocess_int8_batch_1": remote["int8_batch_1"]["p50_ms"]
        / local["onnxruntime-int8"]["length_32_batch_1"]["p50_ms"],
        "int8_ndcg_relative_drop_vs_fp32": quality["int8_vs_fp32_relative_drop"],
        "dynamic_batching_vs_none_at_64": sweep["dynamic_batching"]["concurrency_64"]["rows_per_s"]
        / sweep["no_batching"]["concurrency_64"]["rows_per_s"],
        "p99_ms_at_64_dynamic": sweep["dynamic_batching"]["concurrency_64"]["p99_ms"],
    }
    sizes = {
        "pytorch_safetensors": (run / "model" / "model.safetensors").stat().st_size,
        "onnx_fp32": (work / "repository" / "search-fp32" / "1" / "model.onnx").stat().st_size,
        "onnx_int8": (work / "repository" / "search-int8" / "1" / "model.onnx").stat().st_size,
    }
    results = {
        "machine": {**started_on, "load_average_1m_at_end": machine()["load_average_1m"]},
        "training": training,
        "quality": quality,
        "in_process": local,
        "served": remote,
        "concurrency_sweep": sweep,
        "model_bytes": sizes,
        "ratios": ratios,
        "targets": TARGETS,
    }
    out = HERE / "results" / "serving.json"
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(json.dumps({"quality": {k: v for k, v in quality.items() if k != "gate_reports"},
                      "model_bytes": sizes}, indent=2))  # fmt: skip
    print_table(local, remote, sweep, ratios)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
