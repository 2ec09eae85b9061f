"""Federated vs centralized with each method's own learning rate, chosen on validation
users (issue 16).

    .venv/bin/python bench/federated_tuned.py bench/results/federated.json \\
        bench/results/federated-lr2e-3.json

Each input is a ``bench/federated.py`` result at one ``--learning-rate``, every other
setting equal (checked). For each run kind (centralized, federated IID, federated non-IID,
federated IID + DP) the learning rate whose model has the best full-catalog NDCG@10 on
the validation users is chosen; those models' test NDCG@10 are then compared, federated /
centralized, with a paired bootstrap interval over the same test users. The test split
chooses nothing. Writes ``bench/results/federated-tuned.json`` (or ``--out``) with
``iid_ratio``, ``non_iid_ratio`` and ``dp_ratio`` and prints a table.

Why: at one shared learning rate the comparison measures that rate's fit to each method as
much as the method. Averaging four silos' updates is a step with four times the batch, and
the rate that suits it is not the one that suits a single stream of small batches (tuning
each method's rate is the usual protocol of federated-learning comparisons).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer"))
sys.path.insert(0, str(HERE))  # bench/federated.py (also when loaded by tests)

from federated import ci  # noqa: E402

#: Settings that may differ between the inputs (everything else must be equal).
FREE = {"learning_rate", "runs", "out", "reuse"}
METHODS = ("centralized", "federated IID", "federated non-IID", "federated IID + DP")
RATIOS = {"iid_ratio": "federated IID", "non_iid_ratio": "federated non-IID",
          "dp_ratio": "federated IID + DP"}  # fmt: skip
NDCG = "full/ndcg@10"


def check_comparable(results: list[dict], paths: list[Path]) -> None:
    """ValueError unless the inputs differ only in their learning rate, each one once."""
    fixed = [{k: v for k, v in r["settings"].items() if k not in FREE} for r in results]
    for path, settings in zip(paths[1:], fixed[1:], strict=True):
        if settings != fixed[0]:
            diff = sorted(k for k in settings.keys() | fixed[0].keys()
                          if settings.get(k) != fixed[0].get(k))  # fmt: skip
            raise ValueError(f"{path} differs from {paths[0]} in {diff}, not only the rate")
    rates = [r["settings"]["learning_rate"] for r in results]
    if len(set(rates)) != len(rates):
        raise ValueError(f"two inputs at the same learning rate: {rates}")
    for path, result in zip(paths, results, strict=True):
        if "validation" not in result or "test_ndcg@10_per_user" not in result:
            raise ValueError(f"{path} has no validation scores (rerun bench/federated.py)")
        # the zero-shot encoder is the same model in every input: equal per-user scores
        # mean the same test users in the same order, so users pair across inputs
        zero = result["test_ndcg@10_per_user"]["zero-shot"]
        if zero != results[0]["test_ndcg@10_per_user"]["zero-shot"]:
            raise ValueError(f"{path} scored other test users than {paths[0]}")


def tune(results: list[dict]) -> dict:
    """The chosen rate per method (best validation NDCG@10) and its test scores."""
    from recjob_trainer.metrics import paired_bootstrap

    chosen = {m: max(results, key=lambda r, m=m: r["validation"][m][NDCG]) for m in METHODS}
    per_user = {m: chosen[m]["test_ndcg@10_per_user"][m] for m in METHODS}
    base = chosen["centralized"]["metrics"]["centralized"][NDCG]
    return {
        "learning_rates": [r["settings"]["learning_rate"] for r in results],
        "validation_ndcg@10": {
            m: {str(r["settings"]["learning_rate"]): r["validation"][m][NDCG] for r in results}
            for m in METHODS
        },
        "chosen_learning_rate": {m: chosen[m]["settings"]["learning_rate"] for m in METHODS},
        "test_ndcg@10": {m: chosen[m]["metrics"][m][NDCG] for m in METHODS},
        "zero_shot_test_ndcg@10": results[0]["metrics"]["zero-shot"][NDCG],
        "ndcg@10_minus_centralized": {
            m: paired_bootstrap(per_user[m], per_user["centralized"])
            for m in METHODS
            if m != "centralized"
        },
        **{k: chosen[m]["metrics"][m][NDCG] / base for k, m in RATIOS.items()},
        "targets": {"iid_ratio": 0.95, "non_iid_ratio": 0.90},
        "eval_users": results[0]["eval_users"],
        "total_optimizer_steps": results[0]["total_optimizer_steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench/federated.py outputs")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "federated-tuned.json")
    args = parser.parse_args()
    results = [json.loads(p.read_text()) for p in args.results]
    check_comparable(results, args.results)
    tuned = {"inputs": [str(p) for p in args.results], **tune(results)}
    args.out.write_text(json.dumps(tuned, indent=2) + "\n")
    base = tuned["test_ndcg@10"]["centralized"]
    rates = tuned["learning_rates"]
    print(f"\nlearning rate chosen per method on {tuned['eval_users']} validation users "
          f"from {rates}; test NDCG@10 on {tuned['eval_users']} test users\n")  # fmt: skip
    head = "".join(f"{'val @' + format(r, 'g'):>12}" for r in rates)
    print(
        f"{'run':<20}{head} {'chosen':>8} {'test':>8} {'x central':>9} {'- central [95% CI]':>26}"
    )
    for m in METHODS:
        vals = "".join(f"{v:>12.4f}" for v in tuned["validation_ndcg@10"][m].values())
        band = ci(tuned["ndcg@10_minus_centralized"].get(m))
        test = tuned["test_ndcg@10"][m]
        print(f"{m:<20}{vals} {tuned['chosen_learning_rate'][m]:>8g} {test:>8.4f} "
              f"{test / base:>9.3f} {band:>26}")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
