"""The training run: prepare data, fine-tune with DeepSpeed ZeRO, checkpoint, resume,
consolidate, evaluate, write the artifacts. Read top to bottom, like nanoGPT's train.py:
:func:`train` sets the run up and :func:`fit` is the training loop; the pieces live beside
it — ``distributed`` (process group), ``run_data`` (data and shards), ``objective``
(architecture, LoRA, loss), ``optimisation`` (DeepSpeed config, schedule),
``checkpoints`` (save, resume, consolidate), ``evaluation`` (validation metric) and
``finish`` (test evaluation and artifacts).

Launched once per process by torchrun (also in each PyTorchJob pod) or the deepspeed
launcher; the rendezvous comes from the environment (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK, LOCAL_RANK). Rank 0 alone writes shared files.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from .batches import Batcher, micro_batches
from .checkpoints import (
    CHECKPOINT_MARKER,
    checkpoint_tag,
    complete_checkpoints,
    consolidate,
    load_rng_state,
    rng_file,
    save_checkpoint,
    training_digest,
)
from .config import TrainerConfig
from .context import RunContext, Stage
from .distributed import barrier, broadcast, setup_distributed
from .evaluation import evaluating, validation_metric
from .finish import finish
from .models import base_model_path, build_model
from .objective import apply_lora, loss_fn, model_info
from .optimisation import deepspeed_config, lr_lambda, precision_warning
from .outputs import check_shared, publish_run, run_directory
from .progress import Progress
from .run_data import prepared_data, rank_shard
from .safe_load import harden_checkpoint_loading
from .sequence_data import cache_catalog, load_catalog, seen_items
from .storage import clean_leftovers, write_json_atomic


def train(config: TrainerConfig) -> dict:
    """Run training on this process (one rank); returns the metrics (rank 0) or {}."""
    started = time.time()
    rank, world, _ = setup_distributed()
    # s3:// / gs://: a local working copy, published at the end (outputs.py)
    outputs = run_directory(config.output_uri, config.base_dir)
    run_dir = outputs.local
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in clean_leftovers(run_dir):  # of a run killed mid-write
            print(f"recjob-train: removed {leftover} (left by an interrupted run)", flush=True)
        # derived here, not by the operator: it depends on the world size found at start
        write_json_atomic(run_dir / "deepspeed.json", deepspeed_config(config, world))
        if warning := precision_warning(config.training.precision):
            print(f"recjob-train: warning: {warning}", file=sys.stderr, flush=True)
    barrier()
    check_shared(run_dir, rank, world)
    torch.manual_seed(config.training.seed)
    np.random.seed(config.training.seed)

    prepared = prepared_data(config, run_dir, rank)
    shard = rank_shard(prepared, run_dir, rank, world)
    info = model_info(config, prepared)
    encoder_path = base_model_path(config.model.base_model, config.base_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    model = apply_lora(build_model(info, encoder_path), config)
    batcher = Batcher.for_model(config.data.task, tokenizer, info, prepared.catalog)

    t = config.training
    micro_per_epoch = shard.rows.height // t.micro_batch_size
    steps_per_epoch = micro_per_epoch // t.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise RuntimeError(
            f"too little training data: {shard.rows.height} row(s) per rank "
            f"for microBatchSize {t.micro_batch_size} x gradient accumulation "
            f"{t.gradient_accumulation_steps}"
        )
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    progress = Progress(run_dir, total_steps, enabled=rank == 0)
    if info.kind == "sequential":  # the catalog's texts encoded once, by rank 0
        cache = run_dir / "catalog-text.safetensors"
        if rank == 0:
            seen = seen_items(prepared.splits["train"], batcher)
            cache_catalog(model, batcher, seen, cache, progress)
        barrier()
        load_catalog(model, cache)
    run = RunContext(
        config,
        rank,
        world,
        run_dir,
        prepared,
        info,
        tokenizer,
        batcher,
        progress,
        shard,
        steps_per_epoch,
        started,
    )
    stage = Stage(
        "train",
        model,
        total_steps,
        run_dir / "checkpoints",
        lambda engine, batch, labels, _index: loss_fn(info, engine(**batch), labels),
    )
    if config.compression is not None:
        from .compression.pipeline import compress

        metrics = compress(run, stage)
    else:
        engine, step, state = fit(run, stage)
        plain = consolidate(run, engine, state["kept_step"], stage)
        metrics = finish(run, engine, step, state, plain)
    if rank == 0:
        publish_run(outputs)
    return metrics


def fit(run: RunContext, stage: Stage) -> tuple[Any, int, dict]:
    """Train ``stage.model`` with DeepSpeed for the stage's steps, resuming from the
    stage's newest complete checkpoint; returns (engine, step reached, state).

    With ``earlyStopping`` the model kept is the best one validation saw: every new best
    is checkpointed, its checkpoint is never rotated away (``state["best_step"]`` travels
    in every checkpoint, so a resumed run knows it), and at the end the engine is
    restored from it. ``state["kept_step"]`` is the step whose weights the engine holds
    (the one to consolidate) and ``state["kept_reason"]`` says why."""
    import deepspeed

    config, rank, world, run_dir = run.config, run.rank, run.world, run.run_dir
    shard, batcher, prepared, progress = run.shard, run.batcher, run.prepared, run.progress
    t, total_steps, tag = config.training, stage.total_steps, stage.tag()
    steps_per_epoch = run.steps_per_epoch
    started = run.started if stage.name == "train" else time.time()
    progress.stage(stage.name, total_steps)

    params = [p for p in stage.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=stage.model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, world),
    )
    # checkpoints are on storage other RecJobs can write: loaded weights-only (safe_load.py)
    harden_checkpoint_loading(engine)

    ckpt_root = stage.checkpoints
    state = {
        "config_digest": training_digest(config, stage.name),
        "step": 0,
        "best": None,
        "best_step": None,
        "best_metric": None,
        "evals_without_improvement": 0,
        "stopped_early": False,
        "wall_time": 0.0,
        "resumed_from_step": None,
    }
    checkpoints = complete_checkpoints(ckpt_root) if ckpt_root.exists() else []
    if checkpoints:
        step, path = checkpoints[-1]
        marker = json.loads((path / CHECKPOINT_MARKER).read_text())
        if marker.get("config") not in (None, state["config_digest"]):
            raise RuntimeError(
                f"{run_dir} holds checkpoints of a different data/model/training "
                "configuration; resuming would mix two runs. Use a new output directory "
                "(the operator uses one per RecJob generation)."
            )
        saved_world = marker["world_size"]
        same_world = saved_world == world
        _, client = engine.load_checkpoint(
            str(ckpt_root),
            tag=path.name,
            load_module_only=not same_world,
            load_optimizer_states=same_world,
            load_lr_scheduler_states=same_world,
        )
        state.update({k: v for k, v in (client or {}).items() if k in state})  # ours only
        rng = rng_file(path, rank)
        if same_world and rng.exists():
            load_rng_state(rng)
        state["resumed_from_step"] = step
        progress.event(
            "resumed",
            step=step,
            world_size=world,
            saved_world_size=saved_world,
            weights_only=not same_world,
            **tag,
        )

    progress.event(
        "start",
        total_steps=total_steps,
        world_size=world,
        zero_stage=t.deepspeed.zero_stage,
        precision=t.precision,
        steps_per_epoch=steps_per_epoch,
        train_rows=prepared.train_summary["rows"],
        **tag,
    )
    step = state["step"]
    last_saved = step if checkpoints else None
    window_loss, window_samples, window_start = 0.0, 0, time.time()
    # a run that stopped early and was killed before it finished does not train on
    stop = bool(state.get("stopped_early"))
    keep_best = t.early_stopping is not None
    uses_popularity = config.data.preprocessing.negative_sampling.strategy == "popularity"
    popularity = prepared.popularity if uses_popularity else None
    negatives = config.data.preprocessing.negative_sampling.per_positive
    engine.train()
    while step < total_steps and not stop:
        epoch = step // steps_per_epoch
        start_mb = (step % steps_per_epoch) * t.gradient_accumulation_steps
        stream = micro_batches(
            shard, batcher, t.micro_batch_size, t.seed, epoch, start_mb, negatives, popularity
        )
        batch_digest = hashlib.sha1()
        for mb, (index, batch) in enumerate(stream, start=start_mb):
            if mb >= steps_per_epoch * t.gradient_accumulation_steps:
                break
            labels = batch.pop("labels")
            loss = stage.step_loss(engine, batch, labels, index)
            engine.backward(loss)
            engine.step()
            if stage.after_step is not None:
                stage.after_step(engine)
            batch_digest.update(np.asarray(index, dtype=np.int64).tobytes())
            window_loss += float(loss.detach())
            window_samples += len(index)
            if (mb + 1) % t.gradient_accumulation_steps:
                continue
            step += 1
            if step % config.log_interval_steps == 0 or step == total_steps:
                mean_loss = window_loss / (
                    config.log_interval_steps * t.gradient_accumulation_steps
                )
                elapsed = time.time() - window_start
                progress.event(
                    "progress",
                    step=step,
                    total_steps=total_steps,
                    epoch=epoch,
                    loss=mean_loss,
                    lr=scheduler.get_last_lr()[0],
                    samples_per_second=window_samples * world / max(elapsed, 1e-9),
                    **tag,
                )
                window_loss, window_samples, window_start = 0.0, 0, time.time()
            progress.record("batch", step=step, digest=batch_digest.hexdigest(), **tag)
            batch_digest = hashlib.sha1()
            new_best = False
            if step % t.eval_interval_steps == 0 or step == total_steps:
                # every rank encodes a share of what validation needs, all-gathered
                with evaluating(f"validation at step {step}", progress.event, spread=True):
                    metric, value = validation_metric(engine.module, batcher, prepared, config)
                progress.event("eval", step=step, metric=metric, value=value, **tag)
                stop = _early_stop(config, state, value, step)
                state["best_metric"], state["stopped_early"] = metric, stop
                new_best = keep_best and state["best_step"] == step
            state["step"] = step
            due = step % t.checkpoint.interval_steps == 0 or step == total_steps
            if due or stop or new_best:  # a new best is kept on disk until a better one
                protect = state["best_step"] if keep_best else None
                state["wall_time"] = state.get("wall_time", 0.0) + (time.time() - started)
                started = time.time()
                save_checkpoint(engine, ckpt_root, step, dict(state), t.checkpoint.keep,
                                rank, world, protect)  # fmt: skip
                last_saved = step
                progress.event("checkpoint", step=step, **tag)
            if step >= total_steps or stop:
                break
    if last_saved != step:
        save_checkpoint(engine, ckpt_root, step, dict(state), t.checkpoint.keep, rank, world,
                        state["best_step"] if keep_best else None)  # fmt: skip
    state["wall_time"] = state.get("wall_time", 0.0) + (time.time() - started)
    kept = broadcast(_kept_model(state, step, keep_best, ckpt_root))  # one answer for all
    state["kept_step"], state["kept_reason"] = kept
    if state["kept_step"] != step:
        _restore(engine, ckpt_root, state["kept_step"], world)
        progress.event("kept", step=state["kept_step"], reason=state["kept_reason"], **tag)
    return engine, step, state


def _kept_model(state: dict, step: int, keep_best: bool, ckpt_root) -> tuple[int, str]:
    """(step whose model the stage keeps, why): the best validation step with early
    stopping (when its checkpoint is there), else the last step."""
    stopped = (
        f"; stopped early at step {step} after {state['evals_without_improvement']} "
        "evaluation(s) without improvement"
        if state.get("stopped_early")
        else ""
    )
    if not keep_best:
        return step, "last step (no earlyStopping: the model of the last step is kept)"
    best = state.get("best_step")
    if best is None:
        return step, f"last step (earlyStopping, but no validation value to select on){stopped}"
    if not (ckpt_root / checkpoint_tag(best) / CHECKPOINT_MARKER).exists():
        return step, f"last step: the best step {best}'s checkpoint is missing{stopped}"
    metric, value = state.get("best_metric"), state["best"]
    value = -value if metric in ("rmse", "logloss") else value  # negated for early stopping
    why = f"best validation {metric} = {value:.6g} at step {best}"
    return best, f"{why} (earlyStopping keeps the best evaluation){stopped}"


def _restore(engine, ckpt_root, step: int, world: int) -> None:
    """Load the checkpoint of ``step`` into the engine (every rank): its whole state when
    it was written with this world size, else its weights."""
    path = ckpt_root / checkpoint_tag(step)
    marker = json.loads((path / CHECKPOINT_MARKER).read_text())
    same_world = marker.get("world_size") == world
    engine.load_checkpoint(
        str(ckpt_root),
        tag=path.name,
        load_module_only=not same_world,
        load_optimizer_states=same_world,
        load_lr_scheduler_states=same_world,
    )


def _early_stop(config: TrainerConfig, state: dict, value: float, step: int | None = None) -> bool:
    """Track the best validation value (and the ``step`` it was seen at; a NaN value, no
    validation rows, is never a best); True when patience has run out. Rank 0's
    bookkeeping is every rank's, so all ranks save and stop together."""
    rule = config.training.early_stopping
    best = state.get("best")
    improved = not math.isnan(value) and (
        best is None or math.isnan(best) or value > best + (rule.min_delta if rule else 0.0)
    )
    if improved:
        state["best"], state["best_step"], state["evals_without_improvement"] = value, step, 0
    else:
        state["evals_without_improvement"] += 1
    decision = bool(rule and state["evals_without_improvement"] >= rule.patience)
    shared = broadcast(
        (decision, state["best"], state.get("best_step"), state["evals_without_improvement"])
    )
    decision, state["best"], state["best_step"], state["evals_without_improvement"] = shared
    return bool(decision)
