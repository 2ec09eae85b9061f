"""The end of a run (rank 0 after the others are gone): parity of the consolidated model
with the DeepSpeed one, test evaluation against the baselines, and the artifacts —
``model/``, ``metrics.json``, ``model-card.json``, ``curves.png`` and the termination
message a PyTorchJob's master container leaves for the operator."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch
import torch.distributed as dist

from .batches import Batcher
from .config import TrainerConfig
from .context import RunContext
from .data.prepared import PreparedData
from .distributed import barrier
from .evaluation import (
    PER_UNIT,
    cold_start_rows,
    compare_to_baselines,
    evaluate_recommendation,
    evaluate_search,
    recommendation_baselines,
    report_evaluation,
    search_baselines,
)
from .models import ModelInfo, RankingModel, base_model_path, build_model, save_model
from .progress import plot_curves, read_events
from .sequence_data import SequenceBatcher, encode_catalog
from .storage import atomic_directory, write_json_atomic


def finish(
    run: RunContext,
    engine,
    step: int,
    state: dict,
    plain: RankingModel | None,
    compression: dict | None = None,
) -> dict:
    """Check parity with the DeepSpeed model, evaluate and write artifacts.

    ``plain`` is the consolidated model (rank 0). With compression, ``engine`` is that of
    the last training stage (None when pruning had no recovery steps) and
    ``compression`` holds the teacher model and what the stages did."""
    config, rank, world, run_dir = run.config, run.rank, run.world, run.run_dir
    prepared, info, tokenizer, batcher = run.prepared, run.info, run.tokenizer, run.batcher
    progress = run.progress
    parity, fingerprints = None, []
    if engine is not None:
        # parity: the plain model reproduces the DeepSpeed model (every rank joins)
        probe = _probe_batch(batcher, prepared)
        engine.module.eval()
        with torch.no_grad():
            ds_logits = engine.module(**probe).float()
        if rank == 0:
            with torch.no_grad():
                plain_logits = plain(**probe).float()
            parity = float((plain_logits - ds_logits).abs().max())
        fingerprints = [None] * world
        dist.all_gather_object(
            fingerprints,
            (parameter_digest(engine, config), ds_logits.tolist(), memory_use(engine)),
        )
    barrier()
    dist.destroy_process_group()
    if rank != 0:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)  # the other ranks are gone

    ev = config.evaluation
    ks = sorted({*ev.ks, 10})
    model_dir = run_dir / "model"
    if info.kind == "sequential" and not plain.shape.text_frozen:
        # the text side trained: the saved catalog embeddings are the trained encoder's
        plain.set_catalog_text(encode_catalog(plain, batcher, progress=progress), plain.seen[1:])
    with atomic_directory(model_dir) as tmp:
        save_model(plain, plain.state_dict(), tokenizer, tmp)
    zero_shot = build_model(
        ModelInfo(kind="bi-encoder", objective="listwise", max_length=info.max_length),
        base_model_path(config.model.base_model, config.base_dir),
    ).eval()
    # the baselines read item texts as the bi-encoder does, whatever the model's batcher
    text_batcher = (
        Batcher.for_model(config.data.task, tokenizer, zero_shot.info, prepared.catalog)
        if info.kind == "sequential"
        else batcher
    )

    def test_report(model: RankingModel) -> dict:
        if config.data.task == "search-ranking":
            return evaluate_search(
                model, batcher, prepared.splits["test"], ks, ev.batch_size, ev.max_groups
            )
        return evaluate_recommendation(
            model,
            batcher,
            prepared.splits["test"],
            ks,
            ev.batch_size,
            ev.sampled_negatives,
            ev.max_groups,
        )

    report_evaluation("test", progress.event)  # 'evaluate' events with an ETA per pass
    result = test_report(plain)
    if config.data.task == "search-ranking":
        baselines = (
            search_baselines(zero_shot, batcher, prepared.splits, ks, ev.batch_size, ev.max_groups)
            if ev.baselines
            else {}
        )
        main = "ndcg@10"
    else:
        baselines = (
            recommendation_baselines(
                zero_shot,
                text_batcher,
                prepared.splits,
                ks,
                ev.batch_size,
                ev.sampled_negatives,
                ev.max_groups,
            )
            if ev.baselines
            else {}
        )
        main = "auc" if "label" in prepared.splits["test"].columns else "full/ndcg@10"
    cold_start = None
    if config.data.task == "recommendation" and "label" not in prepared.splits["test"].columns:
        # test targets never seen in training: how the model ranks what it only knows by text
        cold = cold_start_rows(prepared.splits)
        cold_start = {"users": cold.height}
        if cold.height:
            cold_report = evaluate_recommendation(
                plain, batcher, cold, ks, ev.batch_size, ev.sampled_negatives
            )
            cold_report.pop(PER_UNIT, None)
            cold_start.update(cold_report)
    teacher_result = None
    if compression is not None:
        teacher_result = test_report(compression["teacher_model"])
    comparisons = compare_to_baselines(
        result, {**baselines, **({"teacher": teacher_result} if teacher_result else {})}
    )
    events = read_events(run_dir)
    selection = model_selection(state, step)
    metrics = {
        "task": config.data.task,
        "split": "test",
        "main_metric": main,
        "model": result,
        "baselines": baselines,
        "cold_start": cold_start,
        "ndcg@10_vs_baselines": comparisons,
        "validation": [e for e in events if e["event"] == "eval"],
        "consolidation_max_abs_diff": parity,
        "steps": step,
        "model_selection": selection,
        "ranks": {
            "memory": [f[2] for f in fingerprints],
            "parameter_digests": [f[0] for f in fingerprints],
            "agree": len({f[0] for f in fingerprints}) == 1
            and all(f[1] == fingerprints[0][1] for f in fingerprints),
        }
        if fingerprints
        else None,
    }
    if compression is not None:
        from .compression.pipeline import compression_summary

        metrics["compression"] = compression_summary(
            compression, teacher_result, result, main, plain, model_dir
        )
    write_json_atomic(run_dir / "metrics.json", metrics)
    weights = (model_dir / "model.safetensors").read_bytes()
    import deepspeed
    import transformers

    card = {
        "name": config.name,
        "task": config.data.task,
        "data_snapshot": prepared.digest,
        "base_model": config.model.base_model,
        "architecture": info.kind,
        "objective": info.objective,
        "checkpoint_digest": "sha256:" + hashlib.sha256(weights).hexdigest(),
        "parameters": sum(p.numel() for p in plain.parameters()),
        "hyperparameters": config.training.model_dump(
            mode="json", by_alias=True, exclude_none=True
        ),
        "fine_tuning": config.model.fine_tuning.model_dump(
            mode="json", by_alias=True, exclude_none=True
        ),
        "world_size": world,
        "zero_stage": config.training.deepspeed.zero_stage,
        "precision": config.training.precision,
        "steps": step,
        "kept_step": selection["kept_step"],
        "model_selection": selection,
        "resumed_from_step": state.get("resumed_from_step"),
        "wall_time_seconds": round(state.get("wall_time", 0.0), 2),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "main_metric": {"name": main, "value": result.get(main)},
    }
    if compression is not None:
        summary = metrics["compression"]
        teacher_weights = (Path(compression["teacher_dir"]) / "model.safetensors").read_bytes()
        card["compression"] = {
            **{k: summary[k] for k in ("teacher_value", "student_value")},
            "relative_drop_vs_teacher": summary["relative_drop_vs_teacher"],
            "teacher_parameters": summary["teacher"]["parameters"],
            "teacher_checkpoint_digest": "sha256:" + hashlib.sha256(teacher_weights).hexdigest(),
            "stages": [s["name"] for s in summary["stages"]],
        }
    write_json_atomic(run_dir / "model-card.json", card)
    write_termination_message(metrics, card)
    plot_curves(events, run_dir / "curves.png")
    progress.event(
        "done",
        step=step,
        main_metric=main,
        value=result.get(main),
        consolidation_max_abs_diff=parity,
    )
    progress.close()
    return metrics


def model_selection(state: dict, step: int) -> dict:
    """Which step's model the run exported and why (``fit``'s choice: the best validation
    step with early stopping, else the last), for metrics.json and the model card."""
    best, metric = state.get("best"), state.get("best_metric")
    if best is not None and metric in ("rmse", "logloss"):
        best = -best  # early stopping compares the negated value
    return {
        "kept_step": state.get("kept_step", step),
        "last_step": step,
        "reason": state.get("kept_reason") or "last step",
        "metric": metric,
        "best_value": None if best is None or best != best else best,  # NaN: no value
        "best_step": state.get("best_step"),
        "stopped_early": bool(state.get("stopped_early")),
    }


#: Where a PyTorchJob's master container leaves its summary for the operator.
TERMINATION_LOG_ENV = "RECJOB_TERMINATION_LOG"


def write_termination_message(metrics: dict, card: dict) -> None:
    """With $RECJOB_TERMINATION_LOG set (the PyTorchJob's container), leave the held-out
    metrics and the lineage there, within Kubernetes' 4096-byte limit."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    Path(path).write_text(termination_summary(metrics, card))


def termination_summary(metrics: dict, card: dict) -> str:
    """The held-out metrics, the lineage and (a federated run) the federation's account as
    JSON of at most 4096 bytes (metrics other than the main one dropped to fit)."""
    model = {k: v for k, v in metrics["model"].items() if isinstance(v, int | float)}
    main = metrics.get("main_metric")  # a federated run has none: the silos' weighted test
    summary: dict = {
        "main_metric": main,
        "model": model,
        "card": {
            k: card[k] for k in ("base_model", "checkpoint_digest", "data_snapshot") if k in card
        },
    }
    federated = metrics.get("federated")
    if federated:
        privacy = federated.get("privacy") or {}
        summary["federated"] = {
            "silos": federated.get("silos"),
            "rounds_completed": federated.get("rounds_completed"),
            "bytes_total": federated.get("bytes_total"),
            "epsilon": privacy.get("epsilon"),
            "delta": privacy.get("delta"),
        }
    text = json.dumps(summary, default=float)
    while len(text.encode()) > 4096 and len(summary["model"]) > 1:
        summary["model"].pop(next(k for k in summary["model"] if k != main))
        text = json.dumps(summary, default=float)
    return text


def memory_use(engine) -> dict[str, float]:
    """This rank's peak resident memory and the bytes its optimizer holds (master weights
    and Adam moments: what ZeRO partitions across ranks), in MiB."""
    import resource

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    total = 0
    for group in inner.param_groups:
        total += sum(p.numel() * p.element_size() for p in group["params"])
    for state in inner.state.values():
        total += sum(
            v.numel() * v.element_size()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_mib": total / 2**20,
    }


def parameter_digest(engine, config: TrainerConfig) -> str:
    """sha256 of this rank's view of every (full, gathered) parameter: equal on all ranks
    when data parallelism kept the replicas in sync."""
    import contextlib

    import deepspeed

    params = list(engine.module.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if config.training.deepspeed.zero_stage == 3
        else contextlib.nullcontext()
    )
    digest = hashlib.sha256()
    with gather, torch.no_grad():
        for p in params:
            digest.update(p.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _probe_batch(batcher: Batcher, prepared: PreparedData) -> dict[str, torch.Tensor]:
    # held-out rows: every rank has them (only rank 0 reads the training split)
    valid = prepared.splits["validation"]
    rows = (valid if valid.height else prepared.splits["test"]).head(4)
    if batcher.task == "search-ranking":
        batch = batcher.search_batch(rows)
    else:
        negatives = [
            [i for i in batcher.catalog_ids[:6] if i != t][:2] for t in rows["item_id"].to_list()
        ]
        if isinstance(batcher, SequenceBatcher):
            sampled = batcher.shape.negatives == "sampled"
            batch = batcher.sequence_batch(rows, negatives if sampled else None)
        else:
            batch = batcher.recommendation_batch(rows, negatives)
    batch.pop("labels")
    return batch
