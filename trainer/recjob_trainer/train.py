"""The training run: prepare data, fine-tune with DeepSpeed ZeRO, checkpoint, resume,
consolidate, evaluate, write the artifacts. Read top to bottom, like nanoGPT's train.py.

Launched once per process by torchrun (also in each PyTorchJob pod) or the deepspeed
launcher; the rendezvous comes from the environment (MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK, LOCAL_RANK). Rank 0 alone writes shared files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from .batches import Batcher, Shard, micro_batches, shard_rows
from .config import TrainerConfig
from .data.prepare import SPLITS, PreparedData, prepare, read_prepared, write_prepared
from .evaluation import (
    compare_to_baselines,
    evaluate_recommendation,
    evaluate_search,
    recommendation_baselines,
    search_baselines,
)
from .models import (
    ModelInfo,
    RankingModel,
    base_model_path,
    build_model,
    model_from_config,
    save_model,
)
from .outputs import check_shared, publish_run, run_directory
from .progress import Progress, plot_curves, read_events
from .storage import atomic_directory, write_json_atomic

CHECKPOINT_MARKER = "COMPLETE.json"


@dataclass
class RunContext:
    """What the end of a run needs to know about it."""

    config: TrainerConfig
    rank: int
    world: int
    run_dir: Path
    prepared: PreparedData
    info: ModelInfo
    tokenizer: Any
    batcher: Batcher
    progress: Progress
    shard: Shard
    steps_per_epoch: int
    started: float


# --------------------------------------------------------------------------- distributed
def setup_distributed() -> tuple[int, int, int]:
    """Initialise the process group from the environment; (rank, world size, local rank).

    torchrun (what a PyTorchJob pod runs too) sets every variable per process; a process
    started some other way without LOCAL_RANK (DeepSpeed then fails) gets 0, and a lone
    process a world of one. On a machine without CUDA, DeepSpeed runs on its CPU
    accelerator over gloo.
    """
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False
    )
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- data
def prepared_data(config: TrainerConfig, run_dir: Path, rank: int) -> PreparedData:
    """Rank 0 prepares (or reuses) the data; every rank then reads it."""
    data_dir = run_dir / "data"
    error = None
    if rank == 0 and not (data_dir / "report.json").exists():
        try:
            write_prepared(prepare(config.data, config.model, config.base_dir), data_dir)
        except Exception as exc:  # reported on every rank, raised below
            error = f"{type(exc).__name__}: {exc}"
    error = broadcast(error)
    if error:
        raise RuntimeError(f"data preparation failed: {error}")
    # only rank 0 reads the whole training split (to write the shards, and for baselines)
    return read_prepared(data_dir, SPLITS if rank == 0 else ("validation", "test"))


def rank_shard(prepared: PreparedData, run_dir: Path, rank: int, world: int) -> Shard:
    """This rank's training rows, from a shard file written once per world size."""
    shard_dir = run_dir / "data" / f"shards-{world}"
    if rank == 0 and not shard_dir.exists():
        with atomic_directory(shard_dir) as tmp:
            train = prepared.splits["train"]
            for r in range(world):
                shard_rows(train, r, world).write_parquet(tmp / f"train-{r}.parquet")
    barrier()
    return Shard(pl.read_parquet(shard_dir / f"train-{rank}.parquet"), rank, world)


# --------------------------------------------------------------------------- model
def model_info(config: TrainerConfig, prepared: PreparedData) -> ModelInfo:
    """Architecture and objective for the task."""
    head, task = config.model.head, config.data.task
    train = prepared.train_summary  # every rank has it; only rank 0 reads the train split
    search = task == "search-ranking"
    objective = head.objective
    if objective == "auto":
        graded = search and train.get("label_distinct", 0) > 2
        objective = (
            ("regression" if graded else "binary")
            if search
            else ("binary" if train["labelled"] else "listwise")
        )
    return ModelInfo(
        kind="cross-encoder" if task == "search-ranking" else "bi-encoder",
        objective=objective,
        head_type=head.type,
        head_hidden=head.hidden_size,
        dropout=head.dropout,
        max_length=config.model.max_sequence_length,
        label_min=train["label_min"] if search else 0.0,
        label_max=train["label_max"] if search else 1.0,
        base_model=config.model.base_model,
        history_encoding=config.model.history_encoding if task == "recommendation" else "text",
    )


def apply_lora(model: RankingModel, config: TrainerConfig) -> RankingModel:
    """Wrap the encoder with LoRA adapters (peft) when the spec asks for it."""
    tuning = config.model.fine_tuning
    if tuning.method != "lora" or tuning.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = tuning.lora
    model.encoder = get_peft_model(
        model.encoder,
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        ),
    )
    return model


def merge_lora(model: RankingModel) -> RankingModel:
    """Fold LoRA adapters into the encoder weights (a plain model again)."""
    if hasattr(model.encoder, "merge_and_unload"):
        model.encoder = model.encoder.merge_and_unload()
    return model


def loss_fn(info: ModelInfo, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The objective's loss, in fp32."""
    logits, labels = logits.float(), labels.float()
    if info.objective == "regression":
        return torch.nn.functional.mse_loss(torch.sigmoid(logits), labels)
    if info.kind == "bi-encoder":
        users, per_user = labels.shape  # labels: (B, 1 + negatives), true item first
        if info.objective == "listwise":  # softmax over all candidates of the batch
            target = torch.arange(users, device=logits.device) * per_user
            return torch.nn.functional.cross_entropy(logits, target)
        own = logits.view(users, users, per_user)[torch.arange(users), torch.arange(users)]
        return torch.nn.functional.binary_cross_entropy_with_logits(own, labels)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


# --------------------------------------------------------------------------- optimisation
def deepspeed_config(config: TrainerConfig, world: int) -> dict:
    """The DeepSpeed config the spec describes (configOverrides merged last)."""
    t = config.training
    ds = t.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    for part, target in (
        ("offload_optimizer", ds.offload_optimizer),
        ("offload_param", ds.offload_parameters),
    ):
        if target != "none":
            zero[part] = {
                "device": target,
                **({"nvme_path": ds.nvme_path} if target == "nvme" else {}),
            }
    out = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world,
        "gradient_clipping": t.gradient_clipping or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(out, ds.config_overrides or {})


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def lr_lambda(config: TrainerConfig, total_steps: int):
    """Warm-up then linear / cosine decay (or constant), as a multiplier of the LR."""
    sched = config.training.schedule
    warmup = (
        sched.warmup_steps
        if sched.warmup_steps is not None
        else int((sched.warmup_ratio if sched.warmup_ratio is not None else 0.1) * total_steps)
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if sched.type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if sched.type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


# --------------------------------------------------------------------------- checkpoints
def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint that was fully written, oldest first. A checkpoint
    that was being written when its pod died has no marker and is never used."""
    found = []
    for path in root.glob("step-*"):
        if (path / CHECKPOINT_MARKER).exists():
            found.append((json.loads((path / CHECKPOINT_MARKER).read_text())["step"], path))
    return sorted(found)


def training_digest(config: TrainerConfig, stage: str = "train") -> str:
    """Digest of what determines a stage's trajectory: a checkpoint is resumed only by the
    configuration that wrote it. The teacher (``train``) depends on data, model and
    training; ``distill`` also on the distillation settings; ``recover`` (and the pruning
    decision) on all of compression. So a changed distillation keeps the trained teacher."""
    parts = {k: getattr(config, k) for k in ("data", "model", "training")}
    wire = {k: v.to_wire() for k, v in parts.items()}
    compression = config.compression
    if stage == "distill" and compression is not None and compression.distillation:
        wire["distillation"] = compression.distillation.to_wire()
    elif stage != "train" and compression is not None:
        wire["compression"] = compression.to_wire()
    text = json.dumps(wire, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return digest if stage == "train" else f"{digest}/{stage}"


def save_checkpoint(
    engine, root: Path, step: int, state: dict, keep: int, rank: int, world: int
) -> None:
    """DeepSpeed checkpoint + completion marker; old complete checkpoints pruned."""
    tag = f"step-{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=state)
    # each rank's random state (dropout masks), so a resumed run continues bit for bit
    torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        root / tag / f"rng-rank{rank}.pt",
    )
    barrier()
    if rank == 0:
        write_json_atomic(
            root / tag / CHECKPOINT_MARKER,
            {"step": step, "world_size": world, "config": state.get("config_digest")},
        )
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


# --------------------------------------------------------------------------- evaluation
def validation_metric(
    model: RankingModel, batcher: Batcher, prepared: PreparedData, config: TrainerConfig
) -> tuple[str, float]:
    """(name, value) of the early-stopping metric on (a capped part of) the validation split.

    Every rank computes it on the same rows (ZeRO-3 forwards are collective)."""
    ev = config.evaluation
    metric = "ndcg@10"
    if config.training.early_stopping and config.training.early_stopping.metric != "auto":
        metric = config.training.early_stopping.metric
    valid = prepared.splits["validation"]
    if valid.height == 0:
        return metric, float("nan")
    groups = ev.max_groups or 200
    model.eval()
    try:
        if config.data.task == "search-ranking":
            report = evaluate_search(
                model, batcher, valid, sorted({*ev.ks, 10}), ev.batch_size, groups
            )
            value = report.get(metric, report.get("ndcg@10", float("nan")))
            if metric in ("rmse", "logloss"):
                value = -value  # higher is better for early stopping
        else:
            report = evaluate_recommendation(
                model,
                batcher,
                valid,
                sorted({*ev.ks, 10}),
                ev.batch_size,
                ev.sampled_negatives,
                groups,
                full=False,
            )
            if "label" in valid.columns:  # labelled impressions: pointwise AUC
                metric = "auc"
            elif f"sampled/{metric}" in report:
                metric = f"sampled/{metric}"
            else:
                metric = "sampled/ndcg@10"
            value = report[metric]
    finally:
        model.train()
    return metric, float(value)


# --------------------------------------------------------------------------- the run
@dataclass
class Stage:
    """One DeepSpeed training stage of a run: fine-tuning (``train``), or with compression
    distillation (``distill``) and recovery after pruning (``recover``)."""

    name: str
    model: RankingModel
    total_steps: int
    checkpoints: Path
    step_loss: Callable[[Any, dict, torch.Tensor, list[int]], torch.Tensor]
    """(engine, batch without labels, labels, shard row indices) -> loss."""
    after_step: Callable[[Any], None] | None = None
    """Called after every optimizer step (e.g. to keep pruned weights at zero)."""

    def tag(self) -> dict[str, str]:
        """What progress events of this stage carry (nothing for plain fine-tuning)."""
        return {} if self.name == "train" else {"stage": self.name}


def train(config: TrainerConfig) -> dict:
    """Run training on this process (one rank); returns the metrics (rank 0) or {}."""
    started = time.time()
    rank, world, _ = setup_distributed()
    # s3:// / gs://: a local working copy, published at the end (outputs.py)
    outputs = run_directory(config.output_uri, config.base_dir)
    run_dir = outputs.local
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # derived here, not by the operator: it depends on the world size found at start
        write_json_atomic(run_dir / "deepspeed.json", deepspeed_config(config, world))
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
        metrics = finish(run, engine, step, state, consolidate(run, engine, step, stage))
    if rank == 0:
        publish_run(outputs)
    return metrics


def fit(run: RunContext, stage: Stage) -> tuple[Any, int, dict]:
    """Train ``stage.model`` with DeepSpeed for the stage's steps, resuming from the
    stage's newest complete checkpoint; returns (engine, step reached, state)."""
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

    ckpt_root = stage.checkpoints
    state = {
        "config_digest": training_digest(config, stage.name),
        "step": 0,
        "best": None,
        "evals_without_improvement": 0,
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
        rng_file = path / f"rng-rank{rank}.pt"
        if same_world and rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
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
    stop = False
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
            if step % t.eval_interval_steps == 0 or step == total_steps:
                metric, value = validation_metric(engine.module, batcher, prepared, config)
                progress.event("eval", step=step, metric=metric, value=value, **tag)
                stop = _early_stop(config, state, value)
            state["step"] = step
            if step % t.checkpoint.interval_steps == 0 or step == total_steps or stop:
                state["wall_time"] = state.get("wall_time", 0.0) + (time.time() - started)
                started = time.time()
                save_checkpoint(
                    engine, ckpt_root, step, dict(state), t.checkpoint.keep, rank, world
                )
                last_saved = step
                progress.event("checkpoint", step=step, **tag)
            if step >= total_steps or stop:
                break
    if last_saved != step:
        save_checkpoint(engine, ckpt_root, step, dict(state), t.checkpoint.keep, rank, world)
    state["wall_time"] = state.get("wall_time", 0.0) + (time.time() - started)
    return engine, step, state


def _early_stop(config: TrainerConfig, state: dict, value: float) -> bool:
    """Track the best validation value; True when patience has run out (same on all ranks)."""
    rule = config.training.early_stopping
    best = state.get("best")
    if best is None or value > best + (rule.min_delta if rule else 0.0):
        state["best"], state["evals_without_improvement"] = value, 0
    else:
        state["evals_without_improvement"] += 1
    decision = bool(rule and state["evals_without_improvement"] >= rule.patience)
    return bool(broadcast(decision))


def consolidated_state_dict(engine, ckpt_root: Path, step: int) -> dict[str, torch.Tensor]:
    """A plain fp32 state_dict of the trained model.

    Stage 0 in fp32 keeps no ZeRO partitions: every rank's module is the whole fp32 model.
    Otherwise (ZeRO 1-3, or bf16/fp16 master weights) the fp32 weights are gathered from
    the DeepSpeed checkpoint's partitions."""
    if engine.zero_optimization_stage() == 0 and not (
        engine.bfloat16_enabled() or engine.fp16_enabled()
    ):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=f"step-{step:08d}")


def consolidate(run: RunContext, engine, step: int, stage: Stage) -> RankingModel | None:
    """Rank 0: the stage's trained model as a plain fp32 module (LoRA merged); None on
    the other ranks."""
    if run.rank != 0:
        barrier()
        return None
    state_dict = consolidated_state_dict(engine, stage.checkpoints, step)
    if stage.name == "train":
        config = run.config
        plain = apply_lora(
            build_model(
                run.info,
                base_model_path(config.model.base_model, config.base_dir),
                pretrained=False,
            ),
            config,
        )
    else:  # a student: its own (smaller) architecture
        plain = model_from_config(stage.model.info, stage.model.encoder.config)
    plain.load_state_dict(state_dict, strict=True)
    plain = merge_lora(plain).eval()
    barrier()
    return plain


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
    with atomic_directory(model_dir) as tmp:
        save_model(plain, plain.state_dict(), tokenizer, tmp)
    zero_shot = build_model(
        ModelInfo(kind="bi-encoder", objective="listwise", max_length=info.max_length),
        base_model_path(config.model.base_model, config.base_dir),
    ).eval()

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
                batcher,
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
    teacher_result = None
    if compression is not None:
        teacher_result = test_report(compression["teacher_model"])
    comparisons = compare_to_baselines(
        result, {**baselines, **({"teacher": teacher_result} if teacher_result else {})}
    )
    events = read_events(run_dir)
    metrics = {
        "task": config.data.task,
        "split": "test",
        "main_metric": main,
        "model": result,
        "baselines": baselines,
        "ndcg@10_vs_baselines": comparisons,
        "validation": [e for e in events if e["event"] == "eval"],
        "consolidation_max_abs_diff": parity,
        "steps": step,
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


#: Where a PyTorchJob's master container leaves its summary for the operator.
TERMINATION_LOG_ENV = "RECJOB_TERMINATION_LOG"


def write_termination_message(metrics: dict, card: dict) -> None:
    """With $RECJOB_TERMINATION_LOG set (the PyTorchJob's container), leave the held-out
    metrics and the lineage there, within Kubernetes' 4096-byte limit."""
    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    model = {k: v for k, v in metrics["model"].items() if isinstance(v, int | float)}
    summary = {
        "main_metric": metrics["main_metric"],
        "model": model,
        "card": {k: card[k] for k in ("base_model", "checkpoint_digest", "data_snapshot")},
    }
    text = json.dumps(summary, default=float)
    while len(text.encode()) > 4096 and len(summary["model"]) > 1:
        summary["model"].pop(next(k for k in summary["model"] if k != metrics["main_metric"]))
        text = json.dumps(summary, default=float)
    Path(path).write_text(text)


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
        batch = batcher.recommendation_batch(rows, negatives)
    batch.pop("labels")
    return batch


def exit_cleanly(code: int) -> None:
    """Leave without gloo's exit-time abort (seen 2-3 runs in 20 on these machines)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
