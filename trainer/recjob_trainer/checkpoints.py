"""DeepSpeed checkpoints of a stage: written with each rank's RNG state and a completion
marker, found again on resume (only complete ones, only of the same configuration), and
consolidated into a plain fp32 model at the end of the stage."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .config import TrainerConfig
from .context import RunContext, Stage
from .distributed import barrier
from .models import RankingModel, base_model_path, build_model, model_from_config
from .objective import apply_lora, merge_lora
from .safe_load import safe_zero_to_fp32
from .storage import fsync_tree, write_json_atomic

CHECKPOINT_MARKER = "COMPLETE.json"


def checkpoint_tag(step: int) -> str:
    """The folder (DeepSpeed tag) of the checkpoint of ``step``."""
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint that was fully written, oldest first. A checkpoint
    that was being written when its pod died has no marker and is never used; one whose
    marker cannot be read (a damaged disk, a hand edit) is skipped with a warning, so it
    does not block resuming from the others."""
    found = []
    for path in root.glob("step-*"):
        marker = path / CHECKPOINT_MARKER
        if not marker.exists():
            continue
        try:
            step = json.loads(marker.read_text(encoding="utf-8"))["step"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"step {step!r} is not a step number")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            print(f"recjob-train: skipping checkpoint {path.name}: unreadable marker "
                  f"({type(error).__name__}: {error})", file=sys.stderr)  # fmt: skip
            continue
        found.append((step, path))
    return sorted(found)


def save_rng_state(path: Path) -> None:
    """This process's torch and NumPy random states as arrays (``.npz``, no pickle)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    np.savez(path, torch=torch.get_rng_state().numpy(), numpy_keys=keys,
             numpy_meta=np.array([position, has_gauss]), numpy_gauss=np.array([cached]),
             numpy_name=np.array([name]))  # fmt: skip


def load_rng_state(path: Path) -> None:
    """Restore what :func:`save_rng_state` saved (arrays only: ``allow_pickle=False``, so
    a file planted on shared storage cannot run code)."""
    with np.load(path, allow_pickle=False) as saved:
        torch.set_rng_state(torch.from_numpy(saved["torch"].copy()))
        position, has_gauss = (int(v) for v in saved["numpy_meta"])
        np.random.set_state((str(saved["numpy_name"][0]), saved["numpy_keys"], position,
                             has_gauss, float(saved["numpy_gauss"][0])))  # fmt: skip


def rng_file(checkpoint: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its random state in ``checkpoint``."""
    return checkpoint / f"rng-rank{rank}.npz"


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
    engine,
    root: Path,
    step: int,
    state: dict,
    keep: int,
    rank: int,
    world: int,
    protect: int | None = None,
) -> None:
    """DeepSpeed checkpoint + completion marker; old complete checkpoints pruned: the
    ``keep`` newest stay, and so does that of step ``protect`` (the best model validation
    saw, which early stopping keeps)."""
    tag = checkpoint_tag(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=state)
    # each rank's random state (dropout masks), so a resumed run continues bit for bit
    save_rng_state(rng_file(root / tag, rank))
    fsync_tree(root / tag)  # all on disk before the marker says the checkpoint is complete
    barrier()
    if rank == 0:
        write_json_atomic(
            root / tag / CHECKPOINT_MARKER,
            {"step": step, "world_size": world, "config": state.get("config_digest")},
        )
        for old_step, old in complete_checkpoints(root)[:-keep]:
            if old_step != protect:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def consolidated_state_dict(engine, ckpt_root: Path, step: int) -> dict[str, torch.Tensor]:
    """A plain fp32 state_dict of the trained model.

    Stage 0 keeps no ZeRO partitions: every rank's module is the whole model, taken as
    fp32 (under bf16/fp16, the low-precision weights the engine computed with: its fp32
    masters are partitioned inside the optimizer, and DeepSpeed's zero_to_fp32 cannot read
    a stage-0 checkpoint, failing on its missing param_shapes). Otherwise (ZeRO 1-3) the
    fp32 weights are gathered from the DeepSpeed checkpoint's partitions, each file read
    weights-only (``safe_load``)."""
    if engine.zero_optimization_stage() == 0:
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    with safe_zero_to_fp32() as zero_to_fp32:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_root), tag=checkpoint_tag(step)
        )


def consolidate(run: RunContext, engine, step: int, stage: Stage) -> RankingModel | None:
    """Rank 0: the stage's model at ``step`` (the kept one: ``fit``'s
    ``state["kept_step"]``, which the engine holds) as a plain fp32 module (LoRA merged);
    None on the other ranks."""
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
