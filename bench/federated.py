"""Federated LoRA fine-tuning (issue 16) against centralized LoRA fine-tuning, same total
training steps, Amazon Scientific split into silos.

    .venv/bin/python bench/federated.py [--rounds 6 --local-steps 8 --silos 4]

Every run fine-tunes the bundled MiniLM bi-encoder (LoRA rank 8) for next-item
recommendation with the same micro-batch, learning rate and number of optimizer steps:

1. centralized: the trainer (``python -m recjob_trainer``) on all training rows,
   ``rounds x localSteps x silos`` steps;
2. federated IID: ``partition: {by: hash}`` (users hashed into the silos), Flower's
   deployment engine on loopback (SuperLink + one SuperNode per silo, TLS), each silo
   ``localSteps`` steps per round; strategy ``--strategy`` (default FedAvg; FedAvgM's
   server learning rate defaults to the number of silos, i.e. the server applies the sum
   of the silos' updates instead of their mean, so that a round moves the model about as
   far as ``silos x localSteps`` centralized steps rather than ``localSteps``; measured
   in bench/results/federated-fedavgm.json, it did not beat FedAvg here);
3. federated non-IID: silos by item category: each user goes to the silo of the category
   most frequent in their training history (categories from the catalog's text, grouped
   into silos of about equal user counts, so each silo holds other categories);
4. federated IID with central differential privacy: FedAvg (a server optimizer would
   step from the private release: not measured here), the noise multiplier that
   spends epsilon about 8 (delta 1e-5) over the rounds by Opacus's RDP accountant, the
   clipping norm the median update norm of run 2 (so clipping bites about half of the
   updates).

Each final model/ is scored here by the trainer's own evaluation code on the same test users
(all 8,442 unless ``--eval-users`` takes the first N) over the full catalog (4,385 items),
with the zero-shot encoder for reference, and on as many validation users (a learning rate is
chosen on those by federated_tuned.py, across runs at several ``--learning-rate``; each test
user's NDCG@10 is kept for its paired comparisons). Writes bench/results/federated.json (or
``--out``) (``iid_ratio``, ``non_iid_ratio``, ``dp_ratio``: federated / centralized
full-catalog NDCG@10) and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import yaml
from common import run_trainer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PREFIX = "Scientific"
KS = [1, 5, 10, 20]
ROLES = (("train", "train"), ("validation", "valid"), ("test", "test"))


def base_config(name: str, data: Path, output: Path, args: argparse.Namespace) -> dict:
    """The trainer config every run shares (the sections of a RecJob it needs)."""
    return {
        "name": name,
        "outputUri": str(output),
        "logIntervalSteps": 8,
        "data": {
            "task": "recommendation",
            "format": "atomic",
            "train": str(data / f"{PREFIX}.train.inter"),
            "validation": str(data / f"{PREFIX}.valid.inter"),
            "test": str(data / f"{PREFIX}.test.inter"),
            "catalog": str(data / f"{PREFIX}.text"),
            "preprocessing": {"split": {"strategy": "predefined"}},
        },
        "model": {
            "maxSequenceLength": args.max_length,
            "historyLength": args.history,
            "fineTuning": {"method": "lora", "lora": {"rank": 8, "alpha": 16.0}},
        },
        "training": {
            "microBatchSize": args.micro_batch,
            "learningRate": args.learning_rate,
            "schedule": {"type": "constant", "warmupSteps": 0},
            "precision": args.precision,
        },
        # the trainer's / silos' own final evaluation, kept cheap: the bench scores every
        # model itself on the same users
        "evaluation": {"maxGroups": 50, "batchSize": 128, "baselines": False},
    }


def centralized_config(data: Path, runs: Path, args: argparse.Namespace, steps: int) -> dict:
    """The centralized run's trainer config: ``steps`` optimizer steps, no evaluation on
    the way."""
    config = base_config("centralized", data, runs / "centralized", args)
    config["training"].update({"maxSteps": steps, "evalIntervalSteps": steps * 10})
    return config


def centralized(data: Path, runs: Path, args: argparse.Namespace, steps: int) -> dict:
    """The centralized run (one process, every core); a finished run of the same config is
    reused (``--reuse``)."""
    config = centralized_config(data, runs, args, steps)
    saved, run = runs / "centralized.yaml", runs / "centralized"
    reusable = args.reuse and saved.exists() and (run / "metrics.json").exists()
    if reusable and yaml.safe_load(saved.read_text()) == config:
        events = [json.loads(x) for x in (run / "progress.jsonl").read_text().splitlines()]
        return {
            "metrics": json.loads((run / "metrics.json").read_text()),
            "wall_seconds": round(events[-1]["time"] - events[0]["time"], 1),
            "reused": True,
        }
    return run_trainer(config, runs, processes=1, threads=os.cpu_count() or 1)


def federated_config(
    name: str, data: Path, runs: Path, args: argparse.Namespace, federated: dict
) -> dict:
    config = base_config(name, data, runs / name, args)
    config["training"]["federated"] = {
        "rounds": args.rounds,
        "localSteps": args.local_steps,
        "participation": {"fraction": 1.0, "minSilos": args.silos, "roundDeadlineSeconds": 1800},
        "strategy": strategy(args),
        "exchange": "lora",
        **federated,
    }
    return config


def strategy(args: argparse.Namespace) -> dict:
    """The spec's strategy for the runs without DP (``--strategy``, and for FedAdam /
    FedAvgM ``--server-learning-rate``, default the number of silos for FedAvgM)."""
    if args.strategy == "FedAvg":
        return {"type": "FedAvg"}
    default = float(args.silos) if args.strategy == "FedAvgM" else 0.01
    return {"type": args.strategy, "serverLearningRate": args.server_learning_rate or default}


def run_federated(config: dict, runs: Path, reuse: bool = False) -> dict:
    """The federation on loopback (what ``recjob run`` launches); metrics and wall time.
    With ``reuse``, a finished run of the same config is taken as it is."""
    from recjob_trainer.config import TrainerConfig
    from recjob_trainer.federated.local import run_federation

    output, work = Path(config["outputUri"]), runs / f"{config['name']}-federation"
    saved, result = runs / f"{config['name']}.yaml", runs / f"{config['name']}-result.json"
    if reuse and result.exists() and yaml.safe_load(saved.read_text()) == config:
        return {**json.loads(result.read_text()), "reused": True}
    for path in (output, work):
        if path.exists():
            shutil.rmtree(path)
    (runs / f"{config['name']}.yaml").write_text(yaml.safe_dump(config))
    started = time.time()
    metrics = run_federation(TrainerConfig.model_validate(config), work, timeout=7200)
    out = {"metrics": metrics, "wall_seconds": round(time.time() - started, 1)}
    result.write_text(json.dumps(out))
    return out


def category_silos(data: Path, out: Path, silos: int) -> dict:
    """Non-IID silos: each user's category is the most frequent one in their training
    history (the catalog text's first word after 'Industrial & Scientific'); categories go
    to silos largest first, each to the silo with the fewest users. Writes each silo's
    train / valid / test files (every row of a user in one silo) with the catalog and item
    index beside them; returns the silos' spec and how the categories were split."""
    texts = (data / f"{PREFIX}.text").read_text().splitlines()[1:]
    index = dict(
        line.split("\t") for line in (data / f"{PREFIX}.item2index").read_text().splitlines()
    )
    category_of = {}
    for line in texts:
        item, text = line.split("\t", 1)
        found = re.search(r"Industrial & Scientific ([A-Za-z]+)", text)
        category_of[index.get(item, item)] = found.group(1) if found else "other"
    lines = (data / f"{PREFIX}.train.inter").read_text().splitlines()
    histories: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in lines[1:]:
        user, history, target = line.split("\t")
        histories[user].update(category_of.get(i, "other") for i in [*history.split(), target])
    user_category = {u: c.most_common(1)[0][0] for u, c in histories.items()}
    users_per_category = collections.Counter(user_category.values())
    loads, members = [0] * silos, [[] for _ in range(silos)]
    for category, count in users_per_category.most_common():
        smallest = loads.index(min(loads))
        loads[smallest] += count
        members[smallest].append(category)
    silo_of_category = {c: i for i, cs in enumerate(members) for c in cs}
    spec = []
    for i in range(silos):
        folder = out / f"silo-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in (f"{PREFIX}.text", f"{PREFIX}.item2index"):
            shutil.copy(data / name, folder / name)
        spec.append(
            {
                "name": f"category-{i}",
                "data": {
                    **{role: str(folder / f"{PREFIX}.{suffix}.inter") for role, suffix in ROLES},
                    "catalog": str(folder / f"{PREFIX}.text"),  # a silo reads only its own
                },
            }
        )
    for suffix in ("train", "valid", "test"):
        rows = (data / f"{PREFIX}.{suffix}.inter").read_text().splitlines()
        parts = [[rows[0]] for _ in range(silos)]
        for line in rows[1:]:
            user = line.split("\t", 1)[0]
            parts[silo_of_category[user_category.get(user, "other")]].append(line)
        for i, part in enumerate(parts):
            (out / f"silo-{i}" / f"{PREFIX}.{suffix}.inter").write_text("\n".join(part) + "\n")
    return {
        "silos": spec,
        "categories": members,
        "users": loads,
    }


def dp_noise(epsilon: float, delta: float, rounds: int) -> float:
    """The noise multiplier spending ``epsilon`` over ``rounds`` full-participation rounds
    (Opacus's RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=rounds,
            accountant="rdp",
        )
    )  # fmt: skip


def update_norms(run: Path) -> list[float]:
    """The L2 norm of the global model's change each round (its round checkpoints)."""
    from safetensors.torch import load_file

    rounds = sorted((run / "federated" / "checkpoints").glob("round-*"))
    states = [load_file(str(r / "global.safetensors")) for r in rounds]
    norms = []
    for before, after in itertools.pairwise(states):
        total = sum(float((after[k].float() - before[k].float()).pow(2).sum()) for k in after)
        norms.append(total**0.5)
    return norms


def score(run: Path, prepared, users: int, split: str = "test") -> dict:
    """Full-catalog metrics of ``run``'s model/ on the first ``users`` users of ``split``
    (``test``, or ``validation`` for choosing a learning rate: federated_tuned.py)."""
    from recjob_trainer.batches import Batcher
    from recjob_trainer.evaluation import evaluate_recommendation
    from recjob_trainer.models import load_model

    model, tokenizer = load_model(run / "model")
    batcher = Batcher.for_model("recommendation", tokenizer, model.info, prepared.catalog)
    return evaluate_recommendation(model, batcher, prepared.splits[split], KS, 128, 100, users)


def zero_shot(prepared, users: int, max_length: int, split: str = "test") -> dict:
    from recjob_trainer.batches import Batcher
    from recjob_trainer.evaluation import evaluate_recommendation
    from recjob_trainer.models import ModelInfo, base_model_path, build_model

    model = build_model(
        ModelInfo(kind="bi-encoder", objective="listwise", max_length=max_length),
        base_model_path("all-MiniLM-L6-v2"),
    ).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path("all-MiniLM-L6-v2"))
    batcher = Batcher.for_model("recommendation", tokenizer, model.info, prepared.catalog)
    return evaluate_recommendation(model, batcher, prepared.splits[split], KS, 128, 100, users)


def ci(interval: dict | None) -> str:
    if interval is None:
        return ""
    return (
        f"{interval['mean_difference']:+.4f} [{interval['ci95_low']:+.4f}, "
        f"{interval['ci95_high']:+.4f}]"
    )


KEYS = ("full/ndcg@10", "full/hr@10", "full/mrr", "sampled/ndcg@10")


def arguments() -> argparse.ArgumentParser:
    """The command line (every setting of a run)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/amazon-scientific")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-federated")
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--strategy", choices=("FedAvg", "FedAvgM", "FedAdam"), default="FedAvg")
    parser.add_argument("--server-learning-rate", type=float, default=None)
    parser.add_argument(
        "--eval-users", type=int, default=0,
        help="score the first N users of test and validation (default: all of them; at "
        "192 steps the models differ by less than the first 1,000 users resolve)",
    )  # fmt: skip
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="every run's; bf16 only where the CPU has bf16 arithmetic "
                        "(elsewhere torch emulates it, about 10x slower per step)")  # fmt: skip
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--reuse", action="store_true", help="reuse a finished centralized run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "federated.json")
    return parser


def main() -> None:
    args = arguments().parse_args()
    sys.path.insert(0, str(REPO / "trainer"))
    sys.path.insert(0, str(REPO / "operator"))
    from recjob_trainer.data.prepared import read_prepared
    from recjob_trainer.evaluation import PER_UNIT
    from recjob_trainer.metrics import paired_bootstrap

    data, runs = args.data.resolve(), args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    steps = args.rounds * args.local_steps * args.silos
    started = time.time()

    central = centralized(data, runs, args, steps)
    prepared = read_prepared(runs / "centralized" / "data", ("validation", "test"))
    args.eval_users = args.eval_users or prepared.splits["test"].height

    iid = run_federated(
        federated_config("federated-iid", data, runs, args,
                         {"partition": {"by": "hash", "count": args.silos}}),
        runs, args.reuse,
    )  # fmt: skip
    split = category_silos(data, runs / "category-silos", args.silos)
    non_iid = run_federated(
        federated_config("federated-non-iid", data, runs, args, {"silos": split["silos"]}),
        runs,
        args.reuse,
    )
    norms = update_norms(runs / "federated-iid")
    clip = sorted(norms)[len(norms) // 2]
    noise = dp_noise(args.epsilon, args.delta, args.rounds)
    private = run_federated(
        federated_config(
            "federated-iid-dp", data, runs, args,
            {"partition": {"by": "hash", "count": args.silos}, "strategy": {"type": "FedAvg"},
             "differentialPrivacy": {"clippingNorm": clip, "noiseMultiplier": noise,
                                     "delta": args.delta}},
        ),
        runs, args.reuse,
    )  # fmt: skip

    models = {
        "centralized": "centralized",
        "federated IID": "federated-iid",
        "federated non-IID": "federated-non-iid",
        "federated IID + DP": "federated-iid-dp",
    }
    reports, validation = {}, {}
    for part, out in (("test", reports), ("validation", validation)):
        out["zero-shot"] = zero_shot(prepared, args.eval_users, args.max_length, part)
        for name, folder in models.items():
            out[name] = score(runs / folder, prepared, args.eval_users, part)
    table = {name: {k: r.get(k) for k in KEYS} for name, r in reports.items()}
    # paired over the same users: each model minus centralized, 95% bootstrap interval
    central_units = reports["centralized"][PER_UNIT]
    intervals = {
        name: paired_bootstrap(r[PER_UNIT], central_units)
        for name, r in reports.items()
        if name != "centralized"
    }
    base = table["centralized"]["full/ndcg@10"]
    runs_info = {"centralized": central, "federated IID": iid, "federated non-IID": non_iid,
                 "federated IID + DP": private}  # fmt: skip
    summary = {}
    for name, run in runs_info.items():
        fed = run["metrics"].get("federated") if name != "centralized" else None
        summary[name] = {
            "wall_seconds": run["wall_seconds"],
            "optimizer_steps": steps,
            "bytes_per_round": fed["bytes_per_round"][0] if fed else None,
            "bytes_total": fed["bytes_total"] if fed else None,
            "silo_rows": fed["silo_rows"] if fed else None,
            "privacy": fed["privacy"] if fed else None,
        }
    result = {
        "data": str(data),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_optimizer_steps": steps,
        "strategy": {"without DP": strategy(args), "with DP": {"type": "FedAvg"}},
        "eval_users": args.eval_users,
        "metrics": table,
        "ndcg@10_minus_centralized": intervals,
        # the same models on the first --eval-users validation users (a learning rate is
        # chosen on these, never on test: federated_tuned.py)
        "validation": {name: {k: r.get(k) for k in KEYS} for name, r in validation.items()},
        # each test user's NDCG@10, in the same user order for every model (paired
        # comparisons across runs at other settings: federated_tuned.py)
        "test_ndcg@10_per_user": {
            name: [round(float(v), 6) for v in r[PER_UNIT]] for name, r in reports.items()
        },
        "runs": summary,
        "non_iid_split": {"categories_per_silo": split["categories"], "users": split["users"]},
        "dp": {"clipping_norm": clip, "noise_multiplier": noise, "iid_update_norms": norms},
        "iid_ratio": table["federated IID"]["full/ndcg@10"] / base,
        "non_iid_ratio": table["federated non-IID"]["full/ndcg@10"] / base,
        "dp_ratio": table["federated IID + DP"]["full/ndcg@10"] / base,
        "targets": {"iid_ratio": 0.95, "non_iid_ratio": 0.90},
        "machine": {"cpus": os.cpu_count()},
        "wall_seconds": round(time.time() - started, 1),
    }
    out = args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{steps} optimizer steps each; {args.eval_users} test users, full catalog; "
          f"strategy {strategy(args)} (with DP: FedAvg)\n")  # fmt: skip
    print(f"{'run':<20} {'NDCG@10':>8} {'HR@10':>7} {'x central':>9} {'- central [95% CI]':>26} "
          f"{'bytes/round':>12} {'wall s':>7} {'epsilon':>8}")  # fmt: skip
    for name, row in table.items():
        info = summary.get(name, {})
        eps = (info.get("privacy") or {}).get("epsilon")
        print(
            f"{name:<20} {row['full/ndcg@10']:>8.4f} {row['full/hr@10']:>7.4f} "
            f"{row['full/ndcg@10'] / base:>9.3f} {ci(intervals.get(name)):>26} "
            f"{info.get('bytes_per_round') or '':>12} "
            f"{info.get('wall_seconds') or '':>7} {'' if eps is None else f'{eps:.2f}':>8}"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
