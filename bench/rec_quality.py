"""Recommendation quality: RecJob's sequential recommender against RecBole's SASRec (the
peer, run by its reference implementation), item popularity and the zero-shot encoder, on
one split, all scored by the project's metrics code; cold start; served top-k latency.

    make peer-recbole                     # once: the peer's own virtualenv
    .venv/bin/python bench/rec_quality.py [--data DIR --prefix NAME] [--peer-out DIR]

1. Ours: the trainer (`torchrun -m recjob_trainer`, 2 processes, DeepSpeed) trains the
   sequential architecture on the atomic split (PREFIX.train/valid/test.inter, .text),
   with early stopping on validation NDCG@10; its test evaluation is recomputed here from
   the saved model so every user's value is kept for the paired bootstrap.
2. The peer: `bench/peers/recbole_sasrec.py` in `.venv-recbole` trains RecBole's SASRec on
   the same three files and writes its score for every test row and catalog item; the
   same ranking code scores it (ties count against the true item; an item SASRec never
   saw scores -inf, so it cannot rank a cold-start target).
3. Full-catalog NDCG@10 / HR@10 / MRR, the 100-sampled-negatives protocol (the same
   negatives for every model), cold start (test targets never seen in training), paired
   bootstrap intervals of ours minus each other model.
4. Served top-k (``bench/topk_latency.py``): one user's request at catalog 5k and 1M.

Writes bench/results/rec_quality.json (``ndcg@10_vs_sasrec``: ours / SASRec, same run) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from common import run_trainer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KS = [1, 5, 10, 20]


def our_config(data: Path, prefix: str, runs: Path, epochs: int) -> dict:
    """The trainer config of our run (the RecJob sections it needs): 2 processes x 128
    rows a step, validated (and checkpointed) once an epoch."""
    rows = len((data / f"{prefix}.train.inter").read_text().splitlines()) - 1
    epoch = max(1, rows // 256)
    return {
        "name": f"sequential-{prefix.lower()}",
        "outputUri": str(runs / f"sequential-{prefix.lower()}"),
        "logIntervalSteps": 20,
        "data": {
            "task": "recommendation",
            "format": "atomic",
            "train": str(data / f"{prefix}.train.inter"),
            "validation": str(data / f"{prefix}.valid.inter"),
            "test": str(data / f"{prefix}.test.inter"),
            "catalog": str(data / f"{prefix}.text"),
        },
        "model": {
            "architecture": "sequential",
            "maxSequenceLength": 64,
            "historyLength": 50,
            "fineTuning": {"method": "frozen"},
            "sequential": {"hiddenSize": 128, "layers": 2, "heads": 2, "dropout": 0.5},
        },
        "training": {
            "processesPerNode": 2,
            "deepspeed": {"zeroStage": 2},
            "precision": "fp32",
            "microBatchSize": 128,
            "learningRate": 1e-3,
            "weightDecay": 0.01,
            "schedule": {"type": "constant", "warmupSteps": 0},
            "epochs": epochs,
            "evalIntervalSteps": epoch,
            "earlyStopping": {"metric": "ndcg@10", "patience": 3},
            "checkpoint": {"intervalSteps": epoch, "keep": 1},
        },
        "evaluation": {"batchSize": 256, "sampledNegatives": 100, "baselines": True},
    }


def _saved_config(run: Path) -> dict | None:
    """The trainer config a reused run was started with (run_trainer writes it beside)."""
    path = run.parent / f"{run.name}.yaml"
    if not path.exists():
        return None
    import yaml

    return yaml.safe_load(path.read_text())


def run_peer(data: Path, prefix: str, out: Path) -> dict:
    """RecBole SASRec in its own virtualenv; its peer.json (scores.npy beside it)."""
    python = REPO / ".venv-recbole" / "bin" / "python"
    if not python.exists():
        raise SystemExit("the peer's virtualenv is missing: run `make peer-recbole` first")
    started = time.time()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        code = subprocess.call(
            [
                str(python),
                str(HERE / "peers" / "recbole_sasrec.py"),
                *("--data", str(data), "--prefix", prefix, "--out", str(out)),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    if code:
        raise SystemExit(f"the RecBole peer failed (exit {code}); see {log}")
    peer = json.loads((out / "peer.json").read_text())
    peer.setdefault("wall_seconds", round(time.time() - started, 1))
    return peer


def peer_scores(out: Path, data: Path, prefix: str, test: pl.DataFrame, ids: list[str]):
    """The peer's (test rows x catalog) scores, rows matched to ``test`` by user and
    columns ordered as ``ids``."""
    scores = np.load(out / "scores.npy", mmap_mode="r")
    index = {}  # catalog id -> column: the item2index code, or the .inter index token itself
    for line in (data / f"{prefix}.item2index").read_text().splitlines():
        item, n = line.split("\t")
        index[item] = index[n] = int(n)
    users = [
        line.split("\t")[0] for line in (data / f"{prefix}.test.inter").read_text().splitlines()[1:]
    ]
    row_of = {u: n for n, u in enumerate(users)}
    columns = np.array([index[i] for i in ids])
    rows = np.array([row_of[str(u)] for u in test["user_id"].to_list()])
    return np.asarray(scores[rows][:, columns], dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--data", type=Path, help="atomic files (default: amazon-scientific)")
    parser.add_argument("--prefix", default="Scientific")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-rec")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--peer-out", type=Path, help="reuse a finished peer run")
    parser.add_argument("--ours", type=Path, help="reuse a finished run of ours")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "trainer"))
    sys.path.insert(0, str(REPO / "operator"))
    from recjob_trainer import metrics as m
    from recjob_trainer.batches import Batcher
    from recjob_trainer.data.prepared import read_prepared
    from recjob_trainer.evaluation import (
        PER_UNIT,
        draw_negatives,
        evaluate_recommendation,
        recommendation_report,
        user_item_scores,
    )
    from recjob_trainer.models import ModelInfo, base_model_path, build_model, load_model

    data = (args.data or args.shared / "data" / "amazon-scientific").resolve()
    runs = args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)

    # 1. ours, trained as a user's RecJob would be
    if args.ours:
        run, trained = args.ours.resolve(), None
    else:
        config = our_config(data, args.prefix, runs, args.epochs)
        trained = run_trainer(config, runs)
        run = Path(config["outputUri"])
    model, tokenizer = load_model(run / "model")
    prepared = read_prepared(run / "data")
    test, train = prepared.splits["test"], prepared.splits["train"]
    batcher = Batcher.for_model("recommendation", tokenizer, model.info, prepared.catalog)
    ids = batcher.catalog_ids
    negatives = draw_negatives(test, ids, 100)  # the same negatives for every model
    started = time.time()
    ours = evaluate_recommendation(model, batcher, test, KS, 256, 100)
    ours_eval_seconds = time.time() - started

    # 2. baselines: popularity (training interactions) and the zero-shot encoder
    counts = pl.concat([train["item_id"], train["history"].explode()]).value_counts()
    popularity = dict(counts.iter_rows())
    pop = np.array([popularity.get(i, 0) for i in ids], dtype=np.float64)
    pop_scores = np.tile(pop + np.linspace(0, 1e-6, len(ids)), (test.height, 1))
    reports = {"ours (sequential)": ours}
    zero_shot = build_model(
        ModelInfo(kind="bi-encoder", objective="listwise", max_length=64),
        base_model_path("all-MiniLM-L6-v2"),
    ).eval()
    text_batcher = Batcher.for_model("recommendation", tokenizer, zero_shot.info, prepared.catalog)
    zs_scores = user_item_scores(zero_shot, text_batcher, test, ids, 256)

    # 3. the peer
    peer_out = (args.peer_out or runs / f"recbole-sasrec-{args.prefix.lower()}").resolve()
    peer = (
        json.loads((peer_out / "peer.json").read_text())
        if args.peer_out
        else run_peer(data, args.prefix, peer_out)
    )
    sasrec = peer_scores(peer_out, data, args.prefix, test, ids)
    reports["RecBole SASRec"] = recommendation_report(sasrec, ids, test, negatives, KS, True)
    reports["popularity"] = recommendation_report(pop_scores, ids, test, negatives, KS, True)
    reports["zero-shot"] = recommendation_report(zs_scores, ids, test, negatives, KS, True)

    # 4. cold start: test targets never seen in training
    seen = set(train["item_id"].to_list()) | set(train["history"].explode().to_list())
    cold = np.array([i not in seen for i in test["item_id"].to_list()])
    per_user = {name: np.asarray(r[PER_UNIT]) for name, r in reports.items()}
    ours_units = per_user["ours (sequential)"]
    table = {}
    for name, r in reports.items():
        table[name] = {
            k: r.get(k)
            for k in ("full/ndcg@10", "full/hr@10", "full/mrr", "sampled/ndcg@10", "sampled/hr@10")
        }
        table[name]["cold/ndcg@10"] = float(per_user[name][cold].mean()) if cold.any() else None
    bootstrap = {
        name: m.paired_bootstrap(ours_units.tolist(), units.tolist())
        for name, units in per_user.items()
        if name != "ours (sequential)"
    }
    cold_bootstrap = {
        name: m.paired_bootstrap(ours_units[cold].tolist(), units[cold].tolist())
        for name, units in per_user.items()
        if name != "ours (sequential)" and cold.sum() > 1
    }
    ratio = table["ours (sequential)"]["full/ndcg@10"] / table["RecBole SASRec"]["full/ndcg@10"]
    metrics = json.loads((run / "metrics.json").read_text())
    result = {
        "data": str(data),
        "users": test.height,
        "catalog_items": len(ids),
        "cold_start_users": int(cold.sum()),
        "ndcg@10_vs_sasrec": ratio,
        "table": table,
        "ours_minus_other_ndcg@10_bootstrap": bootstrap,
        "cold_start_ours_minus_other_bootstrap": cold_bootstrap,
        "ours": {
            "config": (
                our_config(data, args.prefix, runs, args.epochs)
                if not args.ours
                else _saved_config(run)
            ),
            "train_wall_seconds": trained["wall_seconds"] if trained else None,
            "trainer_test_metrics": metrics["model"],
            "model_selection": metrics.get("model_selection"),
            "steps": metrics.get("steps"),
            "test_evaluation_seconds": round(ours_eval_seconds, 1),
        },
        "peer": peer,
    }
    if not args.skip_latency:
        from topk_latency import measure

        result["served_topk"] = measure()
    elif (HERE / "results" / "topk_latency.json").exists():  # the last separate run
        result["served_topk"] = {
            "source": "bench/results/topk_latency.json (bench/topk_latency.py, not this run)",
            **json.loads((HERE / "results" / "topk_latency.json").read_text()),
        }
    out_path = HERE / "results" / "rec_quality.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=float))

    keys = list(next(iter(table.values())))
    print(f"\n{'model':<20}" + "".join(f"{k:>16}" for k in keys))
    for name, values in table.items():
        print(
            f"{name:<20}"
            + "".join(f"{v:>16.4f}" if v is not None else f"{'-':>16}" for v in values.values())
        )
    print(f"\nNDCG@10 ours / RecBole SASRec: {ratio:.3f}  (target >= 1.15)")
    for name, b in bootstrap.items():
        low, high = b["ci95_low"], b["ci95_high"]
        print(f"ours - {name}: {b['mean_difference']:+.4f} [{low:+.4f}, {high:+.4f}]")
    print(f"cold-start users: {int(cold.sum())} of {test.height}")
    if trained:
        print(f"our training: {trained['wall_seconds']} s; peer: {peer.get('wall_seconds')} s")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
