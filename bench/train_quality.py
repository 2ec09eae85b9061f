"""Real fine-tuning runs on the shared datasets: the fine-tuned model against its baselines.

    .venv/bin/python bench/train_quality.py [--shared ../shared] [--steps-scale 1.0]

Home Depot (held-out queries): cross-encoder vs BM25, the zero-shot pretrained model and
the constant grade, on NDCG@10 and RMSE. Amazon Industrial & Scientific: bi-encoder vs
popularity and zero-shot on full-ranking NDCG@10. Each run is 2 processes of DeepSpeed
ZeRO-2 bf16 on CPU (gloo). Writes bench/results/train_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import run_trainer

HERE = Path(__file__).resolve().parent


def configs(shared: Path, runs: Path, scale: float) -> dict[str, dict]:
    """The two runs (kept small enough for minutes on 2 CPU cores)."""
    amazon = shared / "data" / "amazon-scientific"
    common = {
        "processesPerNode": 2,
        "deepspeed": {"zeroStage": 2},
        "precision": "bf16",
        "microBatchSize": 16,
        "weightDecay": 0.01,
    }
    return {
        "homedepot-search": {
            "name": "homedepot-search",
            "outputUri": str(runs / "homedepot-search"),
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
                **common,
                "learningRate": 5e-5,
                "maxSteps": int(1200 * scale),
                "evalIntervalSteps": int(400 * scale),
                "checkpoint": {"intervalSteps": int(400 * scale)},
            },
            "evaluation": {"batchSize": 64},
        },
        "amazon-scientific": {
            "name": "amazon-scientific",
            "outputUri": str(runs / "amazon-scientific"),
            "logIntervalSteps": 10,
            "data": {
                "task": "recommendation",
                "format": "atomic",
                "train": str(amazon / "Scientific.train.inter"),
                "validation": str(amazon / "Scientific.valid.inter"),
                "test": str(amazon / "Scientific.test.inter"),
                "catalog": str(amazon / "Scientific.text"),
                "preprocessing": {"negativeSampling": {"strategy": "popularity", "perPositive": 1}},
            },
            "model": {"maxSequenceLength": 64, "historyLength": 5},
            "training": {
                **common,
                "learningRate": 1e-4,
                "maxSteps": int(900 * scale),
                "evalIntervalSteps": int(300 * scale),
                "checkpoint": {"intervalSteps": int(300 * scale)},
            },
            "evaluation": {"batchSize": 128, "sampledNegatives": 100},
        },
    }


def _mean_speed(events: list[dict]) -> float | None:
    speeds = [e["samples_per_second"] for e in events if e["event"] == "progress"][1:]
    return sum(speeds) / len(speeds) if speeds else None


def summary(name: str, result: dict) -> dict:
    """The headline comparison of one run."""
    m = result["metrics"]
    if m["task"] == "search-ranking":
        keys = ["ndcg@10", "rmse", "auc"]
        rows = {"fine-tuned": m["model"], **m["baselines"]}
    else:
        keys = ["full/ndcg@10", "full/hr@10", "full/mrr", "sampled/ndcg@10"]
        rows = {"fine-tuned": m["model"], **m["baselines"]}
    return {
        "dataset": name,
        "steps": m["steps"],
        "wall_seconds": result["wall_seconds"],
        "train_samples_per_second": _mean_speed(result["events"]),
        "ndcg@10_vs_baselines": m.get("ndcg@10_vs_baselines"),
        "table": {row: {k: values.get(k) for k in keys} for row, values in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared")
    parser.add_argument("--runs", type=Path, default=HERE.parent / "runs" / "bench-train")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--only", choices=["homedepot-search", "amazon-scientific"])
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    out_path = HERE / "results" / "train_quality.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name, config in configs(
        args.shared.resolve(), args.runs.resolve(), args.steps_scale
    ).items():
        if args.only and name != args.only:
            continue
        result = run_trainer(config, args.runs)
        results[name] = summary(name, result)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"\n{name} ({result['metrics']['steps']} steps, {result['wall_seconds']} s)")
        table = results[name]["table"]
        keys = list(next(iter(table.values())))
        print(f"{'model':<12}" + "".join(f"{k:>18}" for k in keys))
        for row, values in table.items():
            cells = "".join(
                f"{v:>18.4f}" if isinstance(v, float) else f"{'-':>18}" for v in values.values()
            )
            print(f"{row:<12}{cells}")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
