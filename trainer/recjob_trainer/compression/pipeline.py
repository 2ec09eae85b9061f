"""A run with ``compression``: fine-tune the teacher, distil a student, prune, recover.

Every stage is a DeepSpeed stage of the same loop (:func:`recjob_trainer.train.fit`), with
its own checkpoint folder (``checkpoints``, ``checkpoints-distill``,
``checkpoints-recover``), so a pod that dies in any stage resumes there; a stage that
already finished resumes at its last step and only reloads. Between stages the
consolidated models are written atomically (``teacher/``, ``distilled/``) and every rank
reloads them, and the pruning decision is made once by rank 0 (``pruning.json``) and
replayed everywhere. The last stage's model becomes ``model/``: conversion, the quality
gate and serving treat it like any other model, and ``teacher/`` stays beside it so the
gate can compare against the teacher. The sequential recommender goes through the same
stages; what differs for it (student, teacher scores, pruning) is in :mod:`.sequential`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import torch

from recjob_operator.api.v1alpha1.spec_training import DistillationSpec

from ..batches import Shard, micro_batches
from ..checkpoints import consolidate, training_digest
from ..context import Stage
from ..distributed import barrier
from ..models import ModelInfo, RankingModel, load_model, save_model
from ..objective import loss_fn
from ..storage import atomic_directory, write_json_atomic
from . import pruning as prune
from . import sequential as seq
from .distill import TeacherScores, distillation_loss, hidden_state_loss
from .structure import clone, structure_of
from .student import build_student

#: Rows of the validation split that pruning importance is measured on.
IMPORTANCE_ROWS = 256


def compress(run, teacher_stage) -> dict:
    """Run every stage the RecJob's ``compression`` asks for; returns the metrics (rank 0)."""
    from ..finish import finish  # these two import this module (lazily) themselves
    from ..train import fit

    config, rank, run_dir = run.config, run.rank, run.run_dir
    spec = config.compression
    stages: list[dict] = []

    engine, step, state = fit(run, teacher_stage)
    teacher_plain = consolidate(run, engine, state["kept_step"], teacher_stage)
    _save(run, teacher_plain, run_dir / "teacher")
    stages.append(_stage_summary("train", step, state))
    last = (engine, step, state, teacher_plain)
    teacher, _ = load_model(run_dir / "teacher")
    teacher.requires_grad_(False)
    current = teacher
    sequential = seq.is_sequential(teacher)

    d = spec.distillation
    if d is not None:
        steps = d.max_steps or teacher_stage.total_steps
        t = config.training
        if sequential:
            student, mapping = seq.build_student(teacher, d.student, t.seed)
            seq.trainable(student)
            scores = seq.SequentialTeacherScores(teacher)
        else:
            student, mapping = build_student(teacher, d.student)
            student.requires_grad_(True)
            scores = TeacherScores.for_shard(
                teacher,
                run.shard,
                run.batcher,
                steps * t.micro_batch_size * t.gradient_accumulation_steps,
                config.evaluation.batch_size,
                d.intermediate_weight > 0,
                run.progress.event,
            )
        stage = Stage(
            "distill",
            student,
            steps,
            run_dir / "checkpoints-distill",
            distillation_step_loss(run.info, d, scores, mapping),
        )
        _release(last[0])
        engine, step, state = fit(run, stage)
        plain = consolidate(run, engine, state["kept_step"], stage)
        _save(run, plain, run_dir / "distilled")
        cached = scores.cache is not None
        stages.append({**_stage_summary("distill", step, state), "teacher_scores_cached": cached})
        last = (engine, step, state, plain)
        current, _ = load_model(run_dir / "distilled")

    p = spec.pruning
    pruning_report = None
    held_out = importance_batches(run)  # pruning importance, and the latency probe
    if p is not None:
        decision_path = run_dir / "pruning.json"
        digest = training_digest(config, "recover")
        if rank == 0 and not decision_path.exists():
            choose = seq.choose if sequential else prune.choose
            decision = choose(current, p.method, p.amount, held_out, _task_loss(run.info))
            write_json_atomic(decision_path, {**decision, "config": digest})
        barrier()
        decision = json.loads(decision_path.read_text())
        if decision.get("config") != digest:
            raise RuntimeError(
                f"{decision_path} was decided for another compression configuration; "
                "use a new output directory (the operator uses one per RecJob generation)"
            )
        if sequential:  # the new shape goes to the model's info (extra["sequential"])
            pruned = seq.trainable(clone(current))
            masks = seq.apply(pruned, decision)
            structure = seq.structure_of(pruned)
        else:
            pruned = clone(current).requires_grad_(True)
            masks = prune.apply(pruned, decision)
            structure = structure_of(pruned.encoder)
            extra = {**current.info.extra, "structure": structure}
            pruned.info = replace(current.info, extra=extra)
        pruning_report = {
            "method": p.method,
            "amount": p.amount,
            "kept": decision.get("keep") if p.method != "ffn-channels" else None,
            "structure": structure,
            "parameters_before": _parameters(current),
            "parameters_after": _parameters(pruned),
            "weight_sparsity": (seq.sparsity if sequential else prune.sparsity)(pruned),
        }
        if rank == 0:  # the real speed effect, measured (PyTorch on this process)
            probe = held_out[0][0]
            pruning_report["latency_ms_before"] = _latency_ms(current, probe)
            pruning_report["latency_ms_after"] = _latency_ms(pruned, probe)
        if p.recovery_steps > 0:
            teacher_scores = (seq.SequentialTeacherScores if sequential else TeacherScores)(teacher)
            stage = Stage(
                "recover",
                pruned,
                p.recovery_steps,
                run_dir / "checkpoints-recover",
                recovery_step_loss(run.info, d, teacher_scores),
                after_step=(lambda e: prune.enforce(e.module, masks)) if masks else None,
            )
            _release(last[0])
            engine, step, state = fit(run, stage)
            plain = consolidate(run, engine, state["kept_step"], stage)
            if plain is not None and masks:  # ZeRO-3 updates shards: zero them once more
                prune.enforce(plain, masks)
            stages.append(_stage_summary("recover", step, state))
            last = (engine, step, state, plain)
        else:
            _release(last[0])
            last = (None, last[1], last[2], pruned if rank == 0 else None)

    compression = {
        "teacher_model": teacher,
        "teacher_dir": str(run_dir / "teacher"),
        "stages": stages,
        "distillation": (
            {
                **d.model_dump(mode="json", by_alias=True, exclude_none=True),
                "teacher_layers": mapping,
            }
            if d is not None
            else None
        ),
        "pruning": pruning_report,
        "probe": held_out[0][0],
    }
    return finish(run, *last, compression=compression)


def compression_summary(
    compression: dict,
    teacher_metrics: dict,
    student_metrics: dict,
    main: str,
    student: RankingModel,
    model_dir: Path,
) -> dict:
    """What ``metrics.json["compression"]`` holds: teacher vs student quality, size and
    PyTorch latency on one batch, and what each stage did."""
    teacher, teacher_dir = compression["teacher_model"], Path(compression["teacher_dir"])
    probe = compression["probe"]
    t_value, s_value = teacher_metrics.get(main), student_metrics.get(main)
    lower_is_better = main in {"rmse", "logloss"}
    drop = None
    if t_value:
        drop = (s_value - t_value) / abs(t_value) * (1 if lower_is_better else -1)
    return {
        "main_metric": main,
        "teacher_value": t_value,
        "student_value": s_value,
        "relative_drop_vs_teacher": drop,
        "teacher": {
            "metrics": teacher_metrics,
            "parameters": _parameters(teacher),
            **_shape(teacher, structure=False),
            "model_bytes": (teacher_dir / "model.safetensors").stat().st_size,
            "latency_ms": _latency_ms(teacher, probe),
        },
        "student": {
            "parameters": _parameters(student),
            **_shape(student, structure=True),
            "model_bytes": (model_dir / "model.safetensors").stat().st_size,
            "latency_ms": _latency_ms(student, probe),
        },
        "latency_batch_rows": int(next(iter(probe.values())).shape[0]),
        "latency_measures": (
            "user vectors from the histories + scores against the whole catalog table"
            if seq.is_sequential(student)
            else "one forward of the batch"
        ),
        "stages": compression["stages"],
        "distillation": compression["distillation"],
        "pruning": compression["pruning"],
    }


# --------------------------------------------------------------------------- losses
def _task_loss(info: ModelInfo):
    return lambda logits, labels: loss_fn(info, logits, labels)


def distillation_step_loss(
    info: ModelInfo, d: DistillationSpec, scores: TeacherScores, layer_map: list[int] | None
):
    """The distillation stage's loss: task loss on the labels, the chosen loss against
    the teacher's scores and (``intermediateWeight``) hidden-state matching, weighted."""
    task = _task_loss(info)
    hidden = d.intermediate_weight > 0 and layer_map is not None

    def step_loss(engine, batch: dict, labels: torch.Tensor, index: list[int]) -> torch.Tensor:
        if hidden:
            logits, (student_states, mask) = engine(output_hidden_states=True, **batch)
            teacher_logits, (teacher_states, _) = scores(index, batch, True)
        else:
            logits = engine(**batch)
            teacher_logits, _ = scores(index, batch, False)
        loss = d.task_weight * task(logits, labels) + d.distillation_weight * distillation_loss(
            d.loss, logits, teacher_logits, d.temperature
        )
        if hidden:
            loss = loss + d.intermediate_weight * hidden_state_loss(
                student_states, teacher_states, mask, layer_map
            )
        return loss

    return step_loss


def recovery_step_loss(info: ModelInfo, d: DistillationSpec | None, scores: TeacherScores):
    """Recovery after pruning learns from the labels and from the unpruned teacher:
    the distillation settings when the RecJob distils (without layer matching: pruning
    changed the layers), else half task loss and half MSE to the teacher's scores."""
    spec = (
        d.model_copy(update={"intermediate_weight": 0.0})
        if d is not None
        else DistillationSpec(task_weight=0.5, distillation_weight=0.5, loss="mse")
    )
    return distillation_step_loss(info, spec, scores, None)


# --------------------------------------------------------------------------- helpers
def importance_batches(run) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Labelled batches of (the head of) the validation split, the same on every rank."""
    config, prepared = run.config, run.prepared
    rows = prepared.splits["validation"]
    if rows.height == 0:
        rows = prepared.splits["test"]
    rows: pl.DataFrame = rows.head(IMPORTANCE_ROWS)
    ns = config.data.preprocessing.negative_sampling
    popularity = prepared.popularity if ns.strategy == "popularity" else None
    size = min(32, rows.height)
    out = []
    for _, batch in micro_batches(
        Shard(rows, 0, 1),
        run.batcher,
        size,
        config.training.seed,
        0,
        0,
        ns.per_positive,
        popularity,
    ):
        labels = batch.pop("labels")
        out.append((batch, labels))
    if not out:
        raise RuntimeError("pruning needs held-out rows to measure importance; none left")
    return out


def _save(run, plain: RankingModel | None, directory: Path) -> None:
    """Rank 0 writes a stage's model atomically; every rank waits for it."""
    if run.rank == 0:
        with atomic_directory(directory) as tmp:
            save_model(plain, plain.state_dict(), run.tokenizer, tmp)
    barrier()


def _release(engine: Any) -> None:
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()


def _stage_summary(name: str, step: int, state: dict) -> dict:
    return {
        "name": name,
        "steps": step,
        "wall_time_seconds": round(state.get("wall_time", 0.0), 2),
        "resumed_from_step": state.get("resumed_from_step"),
        "kept_step": state.get("kept_step", step),
        "kept_reason": state.get("kept_reason"),
    }


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape(model: torch.nn.Module, structure: bool) -> dict:
    """Layers, hidden size (and per-layer structure) of a teacher or student."""
    if seq.is_sequential(model):
        out = seq.describe(model)
        return out if structure else {k: v for k, v in out.items() if k != "structure"}
    config = model.encoder.config
    out = {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size}
    return {**out, "structure": structure_of(model.encoder)} if structure else out


def _latency_ms(model: torch.nn.Module, probe: dict[str, torch.Tensor]) -> float:
    """PyTorch latency on this process: the served path of a sequential recommender, one
    forward of the batch otherwise."""
    if seq.is_sequential(model):
        return seq.latency_ms(model, probe)
    return prune.forward_latency_ms(model, probe)
