"""What the end-of-run test evaluation and validation cost, before and after a change to
``recjob_trainer.evaluation``: the same calls on the same rows, timed for a reference
version of it and for the current one, alternately, with their metrics side by side (they
must agree up to float noise). ``--reference PATH`` is the package's folder from another
commit (``git archive COMMIT trainer/recjob_trainer/evaluation | tar -x -C /tmp/old``, then
``/tmp/old/trainer/recjob_trainer/evaluation``) or, for a commit from before it became a
package, its single module (``git show COMMIT:trainer/recjob_trainer/evaluation.py >
/tmp/old.py``).

- ``search`` (Home Depot, examples/recjob-search.yaml's split): the cross-encoder's test
  evaluation (MiniLM with a fresh head: the cost, not the quality, is measured) and the
  BM25 / zero-shot / constant baselines, on ``--groups`` test queries.
- ``recommendation`` (Amazon Scientific, examples/recjob-recommendation.yaml): the
  zero-shot bi-encoder's full-catalog test evaluation and the popularity / zero-shot
  baselines on ``--users`` test users; and the ranking arithmetic alone (no encoding) for
  every test user against the whole catalog.
- ``validation`` (run under ``torchrun --nproc_per_node 2``): the early-stopping metric as
  ``fit`` computes it on every rank (Amazon Scientific, 200 users, sampled protocol).

Writes ``bench/results/eval_cost-<what>.json`` (``--out`` to change) and prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load_reference(path: str):
    """The reference evaluation module or package (a folder), importable beside the
    current one: its relative imports of the trainer's other modules find the current
    ones, its imports of its own modules its own."""
    name = "recjob_trainer._reference_evaluation"
    if Path(path).is_dir():
        spec = importlib.util.spec_from_file_location(
            name, Path(path) / "__init__.py", submodule_search_locations=[path]
        )
    else:
        spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def prepared_for(example: str, cache: Path):
    from recjob_operator.api.documents import load_documents
    from recjob_operator.api.validation import parse_recjob
    from recjob_trainer.config import config_from_recjob
    from recjob_trainer.data.prepare import prepare
    from recjob_trainer.data.prepared import read_prepared, write_prepared

    recjob = EXAMPLES / example
    job = parse_recjob(load_documents(str(recjob))[0].content)
    config = config_from_recjob(job, str(cache / "run"), str(recjob.parent))
    if not (cache / "data" / "report.json").exists():
        write_prepared(prepare(config.data, config.model, config.base_dir), cache / "data")
    return config, read_prepared(cache / "data")


def models(kind: str, max_length: int):
    from transformers import AutoTokenizer

    from recjob_trainer.models import ModelInfo, base_model_path, build_model

    path = base_model_path("all-MiniLM-L6-v2")
    zero_shot = build_model(ModelInfo("bi-encoder", "listwise", max_length=max_length), path)
    torch.manual_seed(0)
    info = ModelInfo(kind, "regression" if kind == "cross-encoder" else "listwise",
                     max_length=max_length, label_min=1.0, label_max=3.0)  # fmt: skip
    return build_model(info, path).eval(), zero_shot.eval(), AutoTokenizer.from_pretrained(path)


def timed(fn):
    """(wall seconds, CPU seconds of this process, all threads: steadier than wall time
    on a machine others are using too), result"""
    started, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return round(time.perf_counter() - started, 1), round(time.process_time() - cpu, 1), result


class TokenCount:
    """Counts the (padded) tokens a batcher hands the encoder: the work, independent of
    how busy the machine is."""

    def __init__(self, batcher) -> None:
        self.tokens = 0
        for name in ("pairs", "texts_batch"):
            setattr(batcher, name, self._counted(getattr(batcher, name)))

    def _counted(self, method):
        def counted(*args, **kwargs):
            batch = method(*args, **kwargs)
            self.tokens += sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))
            return batch

        return counted

    def take(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return tokens


def numbers(report: dict) -> dict:
    return {k: v for k, v in report.items() if isinstance(v, float) and k[:1] != "_"}


def search(modules: dict, groups: int, cache: Path) -> dict:
    from recjob_trainer.batches import Batcher

    config, prepared = prepared_for("recjob-search.yaml", cache)
    model, zero_shot, tokenizer = models("cross-encoder", config.model.max_sequence_length)
    batcher = Batcher.for_model("search-ranking", tokenizer, model.info, None)
    count = TokenCount(batcher)
    test = prepared.splits["test"]
    out = {
        "test_queries": groups,
        "test_rows": modules["current"]._groups(test, "query", groups).height,
    }
    for name, ev in modules.items():
        wall, cpu, report = timed(lambda ev=ev: ev.evaluate_search(
            model, batcher, test, [1, 5, 10], 32, groups))  # fmt: skip
        tokens = count.take()
        base_wall, base_cpu, baselines = timed(lambda ev=ev: ev.search_baselines(
            zero_shot, batcher, prepared.splits, [1, 5, 10], 32, groups))  # fmt: skip
        out[name] = {
            "model": {"wall_seconds": wall, "cpu_seconds": cpu, "tokens": tokens},
            "baselines": {
                "wall_seconds": base_wall,
                "cpu_seconds": base_cpu,
                "tokens": count.take(),
            },
            "total_cpu_seconds": round(cpu + base_cpu, 1),
            "model_metrics": numbers(report),
            "zero_shot_metrics": numbers(baselines["zero-shot"]),
        }
    return out


def recommendation(modules: dict, users: int, cache: Path) -> dict:
    from recjob_trainer.batches import Batcher

    config, prepared = prepared_for("recjob-recommendation.yaml", cache)
    _, zero_shot, tokenizer = models("bi-encoder", config.model.max_sequence_length)
    batcher = Batcher.for_model("recommendation", tokenizer, zero_shot.info, prepared.catalog)
    count = TokenCount(batcher)
    test = prepared.splits["test"]
    out = {"test_users": users, "catalog": len(batcher.catalog_ids)}
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((test.height, len(batcher.catalog_ids))).astype(np.float32)
    for name, ev in modules.items():
        wall, cpu, report = timed(lambda ev=ev: ev.evaluate_recommendation(
            zero_shot, batcher, test, [1, 5, 10, 20], 64, 100, users))  # fmt: skip
        tokens = count.take()
        base_wall, base_cpu, baselines = timed(lambda ev=ev: ev.recommendation_baselines(
            zero_shot, batcher, prepared.splits, [1, 5, 10, 20], 64, 100, users))  # fmt: skip
        base_tokens = count.take()
        negatives = ev.draw_negatives(test, batcher.catalog_ids, 100)
        rank_wall, rank_cpu, _ = timed(lambda ev=ev, negatives=negatives: ev.recommendation_report(
            scores, batcher.catalog_ids, test, negatives, [1, 5, 10, 20], True))  # fmt: skip
        out[name] = {
            "model": {"wall_seconds": wall, "cpu_seconds": cpu, "tokens": tokens},
            "baselines": {
                "wall_seconds": base_wall,
                "cpu_seconds": base_cpu,
                "tokens": base_tokens,
            },
            "total_cpu_seconds": round(cpu + base_cpu, 1),
            f"ranking_all_{test.height}_users": {
                "wall_seconds": rank_wall,
                "cpu_seconds": rank_cpu,
            },
            "model_metrics": numbers(report),
            "popularity_metrics": numbers(baselines["popularity"]),
        }
    return out


def validation(modules: dict, cache: Path) -> dict:
    import torch.distributed as dist

    from recjob_trainer.batches import Batcher

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1 ranks of a local run
    if rank == 0:
        prepared_for("recjob-recommendation.yaml", cache)
    dist.barrier()
    config, prepared = prepared_for("recjob-recommendation.yaml", cache)
    _, zero_shot, tokenizer = models("bi-encoder", config.model.max_sequence_length)
    batcher = Batcher.for_model("recommendation", tokenizer, zero_shot.info, prepared.catalog)
    count = TokenCount(batcher)
    out = {"world_size": dist.get_world_size(), "validation_users": 200}
    for name, ev in modules.items():
        dist.barrier()
        spread = getattr(ev, "evaluating", None)
        context = spread("validation", spread=True) if spread else _nothing()
        with context:
            wall, cpu, (metric, value) = timed(
                lambda ev=ev: ev.validation_metric(zero_shot, batcher, prepared, config)
            )
        out[name] = {"wall_seconds": wall, "rank0_cpu_seconds": cpu,
                     "rank0_tokens": count.take(), "metric": metric, "value": value}  # fmt: skip
    dist.destroy_process_group()
    return out if rank == 0 else {}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["search", "recommendation", "validation"])
    parser.add_argument(
        "--reference", help="the evaluation package's folder (or evaluation.py) to compare with"
    )
    parser.add_argument("--groups", type=int, default=300, help="search: test queries")
    parser.add_argument("--users", type=int, default=300, help="recommendation: test users")
    parser.add_argument("--cache", default="/tmp/recjob-eval-cost", help="prepared data")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.what != "validation":
        torch.set_num_threads(os.cpu_count() or 1)  # as finish() on rank 0

    from recjob_trainer import evaluation

    modules = {"reference": load_reference(args.reference)} if args.reference else {}
    modules["current"] = evaluation
    cache = Path(args.cache) / args.what.replace("validation", "recommendation")
    if args.what == "search":
        result = search(modules, args.groups, cache)
    elif args.what == "recommendation":
        result = recommendation(modules, args.users, cache)
    else:
        result = validation(modules, cache)
    if not result:
        return
    if "reference" in result:
        key = "total_cpu_seconds" if args.what != "validation" else "rank0_cpu_seconds"
        result[f"reference/current {key}"] = round(
            result["reference"][key] / result["current"][key], 2
        )
    path = Path(args.out or ROOT / "bench" / "results" / f"eval_cost-{args.what}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
