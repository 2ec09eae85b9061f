"""DDP vs ZeRO-1/2/3 on the same model and data, same run: memory per rank and speed.

    .venv/bin/python bench/train_zero.py [--processes 2] [--steps 30]

Fine-tunes the all-MiniLM-L6-v2 cross-encoder on a Home Depot slice with DeepSpeed on CPU
(gloo), fp32 so that stage 0 is plain data parallelism (DDP: every rank holds everything).
Per rank it records the optimizer's bytes (fp32 master weights + Adam moments, what ZeRO-1
partitions), the peak resident memory, and the training throughput; the expected model
state bytes per rank follow the ZeRO paper (params 4Ψ, grads 4Ψ, Adam 8Ψ bytes in fp32,
divided by N for what each stage partitions). Writes bench/results/train_zero.json and
prints ratios to DDP.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import polars as pl
from common import run_trainer

HERE = Path(__file__).resolve().parent
PARAMS = 22_713_601  # all-MiniLM-L6-v2 + regression head


def expected_model_state_mib(stage: int, n: int) -> float:
    """ZeRO paper, fp32: params + grads + Adam states per rank."""
    params, grads, adam = 4 * PARAMS, 4 * PARAMS, 8 * PARAMS
    if stage >= 1:
        adam /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        params /= n
    return (params + grads + adam) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=HERE.parent / "runs" / "bench-zero")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    frame = pl.read_csv(
        args.shared / "data" / "homedepot-search" / "queries-dev.csv", infer_schema=False
    )
    data = work / "homedepot-slice.csv"
    frame.head(6000).write_csv(data)

    results = []
    for stage in (0, 1, 2, 3):
        run = work / f"zero{stage}"
        config = {
            "name": f"zero{stage}",
            "outputUri": str(run),
            "logIntervalSteps": 5,
            "data": {
                "task": "search-ranking",
                "train": str(data),
                "columns": {
                    "query": "search_term",
                    "itemId": "product_uid",
                    "itemText": "product_title",
                    "label": "relevance",
                },
            },
            "model": {"maxSequenceLength": 48},
            "training": {
                "processesPerNode": args.processes,
                "precision": "fp32",
                "deepspeed": {"zeroStage": stage},
                "microBatchSize": 16,
                "maxSteps": args.steps,
                "evalIntervalSteps": 10**6,
                "checkpoint": {"intervalSteps": args.steps},
            },
            "evaluation": {"baselines": False, "maxGroups": 20, "batchSize": 64},
        }
        result = run_trainer(config, work, args.processes)
        metrics, events = result["metrics"], result["events"]
        speeds = [e["samples_per_second"] for e in events if e["event"] == "progress"][1:]
        memory = metrics["ranks"]["memory"]
        results.append(
            {
                "stage": stage,
                "name": "DDP (ZeRO-0)" if stage == 0 else f"ZeRO-{stage}",
                "samples_per_second": sum(speeds) / len(speeds),
                "optimizer_mib_per_rank": max(m["optimizer_mib"] for m in memory),
                "peak_rss_mib_per_rank": max(m["peak_rss_mib"] for m in memory),
                "expected_model_state_mib_per_rank": expected_model_state_mib(
                    stage, args.processes
                ),
                "ranks_agree": metrics["ranks"]["agree"],
                "wall_seconds": result["wall_seconds"],
            }
        )
    base = results[0]
    for r in results:
        for key in (
            "samples_per_second",
            "optimizer_mib_per_rank",
            "peak_rss_mib_per_rank",
            "expected_model_state_mib_per_rank",
        ):
            r[f"{key}_vs_ddp"] = r[key] / base[key]
    out = {
        "processes": args.processes,
        "steps": args.steps,
        "precision": "fp32",
        "model": "all-MiniLM-L6-v2 cross-encoder",
        "parameters": PARAMS,
        "machine": f"{os.cpu_count()} CPU cores, gloo",
        "results": results,
    }
    target = HERE / "results" / "train_zero.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2))
    print(
        f"{'':<14}{'samples/s':>11}{'x DDP':>7}{'optimizer MiB':>15}{'x DDP':>7}"
        f"{'peak RSS MiB':>14}{'x DDP':>7}{'expected MiB':>14}{'x DDP':>7}"
    )
    for r in results:
        print(
            f"{r['name']:<14}{r['samples_per_second']:>11.1f}"
            f"{r['samples_per_second_vs_ddp']:>7.2f}{r['optimizer_mib_per_rank']:>15.1f}"
            f"{r['optimizer_mib_per_rank_vs_ddp']:>7.2f}{r['peak_rss_mib_per_rank']:>14.0f}"
            f"{r['peak_rss_mib_per_rank_vs_ddp']:>7.2f}"
            f"{r['expected_model_state_mib_per_rank']:>14.1f}"
            f"{r['expected_model_state_mib_per_rank_vs_ddp']:>7.2f}"
        )
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
