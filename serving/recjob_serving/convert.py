"""`recjob-serve convert`: trained model -> ONNX -> export target -> quality gate ->
Triton model repository version. Nothing is published when the gate fails; the report
(``quality-gate.json``) is written either way."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from pydantic import Field

from recjob_operator.api.v1alpha1.common import ApiModel
from recjob_operator.api.v1alpha1.spec_delivery import ExportSpec
from recjob_trainer.batches import Batcher
from recjob_trainer.compression.structure import is_uniform
from recjob_trainer.data.prepared import read_prepared
from recjob_trainer.models import load_model
from recjob_trainer.storage import local_path, write_json_atomic

from .export import ITEM_VECTORS, export_onnx, quantize_int8
from .gate import quality_gate
from .onnx_model import OnnxRankingModel, OnnxSequentialModel
from .repository import (
    companion_model_names,
    publish,
    publish_text_models,
    publish_topk_model,
    write_snapshot,
)
from .staging import convert_staged, needs_staging
from .tensorrt import (
    EngineBuildUnavailable,
    build_engine,
    calibration_batches,
    quantize_qdq,
    trtexec_command,
)


class ConvertConfig(ApiModel):
    """What one conversion needs (written by the operator / local mode)."""

    model_dir: str = Field(min_length=1)
    """The trainer's ``model/`` folder."""
    data_dir: str = Field(min_length=1)
    """The trainer's prepared ``data/`` folder (its test split feeds the quality gate)."""
    output_dir: str = Field(min_length=1)
    """Where the ONNX files and quality-gate.json are written."""
    repository: str = Field(min_length=1)
    """Triton model repository root."""
    model_name: str = Field(min_length=1, pattern=r"^[a-zA-Z0-9_.-]+$")
    export: ExportSpec = Field(default_factory=ExportSpec)
    max_eval_groups: int | None = Field(default=None, ge=1)
    """Gate on at most this many test queries / users."""
    teacher_dir: str | None = None
    """With compression: the trainer's ``teacher/`` folder; the gate measures the teacher
    on the same rows and enforces ``maxRelativeDropVsTeacher``."""
    teacher_value: float | None = None
    """Or the teacher's value of the gate metric, when measured elsewhere."""
    snapshots: bool = False
    """Also write ``<repository>-snapshots/v<N>`` with only the new version (what an
    InferenceService revision serves in a cluster)."""


#: What the quality gate measures for each target (on CPU, in ONNX Runtime).
MEASURED = {
    "onnxruntime-fp32": "the served fp32 ONNX model",
    "onnxruntime-int8": "the served int8 ONNX model",
    "tensorrt-int8": "the QDQ int8 ONNX model the TensorRT engine is built from",
    "tensorrt-fp16": "the fp32 ONNX model only: the fp16 engine itself is not measured",
}


class TargetUnavailable(RuntimeError):
    """The export target cannot be built in this environment."""


def load_convert_config(path: str | Path) -> ConvertConfig:
    """Read a conversion config (YAML or JSON)."""
    return ConvertConfig.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


def convert(config: ConvertConfig) -> dict:
    """Run the conversion; returns the quality-gate report (``published_version`` set when
    the model passed and was published). s3:// / gs:// URIs go through local working
    copies and are published at the end (``staging.py``)."""
    if needs_staging(config):
        return convert_staged(config, _convert_local)
    return _convert_local(config)


def _convert_local(config: ConvertConfig) -> dict:
    """The conversion on mounted paths (file://, pvc://, local paths)."""
    started = time.time()
    out = local_path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = config.export.target
    model_dir = local_path(config.model_dir)
    source, tokenizer = load_model(model_dir)
    sequential = source.info.kind == "sequential"
    if sequential and target.startswith("tensorrt"):
        raise TargetUnavailable(
            f"export target {target}: a sequential recommender (user tower + item vectors, "
            "top-k by Python) converts to onnxruntime-fp32 or onnxruntime-int8"
        )
    exported = export_onnx(model_dir, out / "model.fp32.onnx", opset=config.export.opset)
    converted_path = exported.path
    if target == "onnxruntime-int8" and sequential:
        # the user tower: int8 MatMuls, LayerNorm / GELU fusions (its attention is not
        # BERT's: not fused). Its item table (the Gather) stays fp32: int8 rows moved the
        # top item of 1.5% of users more than int8 MatMuls did (tests/serving/test_topk.py's
        # model), and the served item vectors are fp32 anyway
        converted_path = quantize_int8(
            exported.path,
            out / "model.int8.onnx",
            source.shape.heads,
            source.shape.hidden,
            fuse_attention=False,
            op_types=["MatMul"],
        )
    elif target == "onnxruntime-int8":
        encoder = source.encoder.config
        converted_path = quantize_int8(
            exported.path,
            out / "model.int8.onnx",
            encoder.num_attention_heads,
            encoder.hidden_size,
            fuse_attention=is_uniform(source.encoder),
        )
    prepared = read_prepared(local_path(config.data_dir))
    info = source.info
    batcher = Batcher.for_model(prepared.task, tokenizer, info, prepared.catalog)
    if target == "tensorrt-int8":  # the QDQ graph TensorRT builds from, measured here in ORT
        batches = calibration_batches(
            batcher, prepared.splits["train"], config.export.calibration_samples
        )
        converted_path = quantize_qdq(exported.path, out / "model.qdq.onnx", batches)
    if sequential:
        # the source ranks from its saved catalog embeddings (the trained encoder's, as
        # finish.py saved them) rather than encoding the catalog's texts again
        source.shape = replace(source.shape, text_frozen=True)
        vectors = np.load(exported.files[ITEM_VECTORS], allow_pickle=False)
        converted = OnnxSequentialModel(converted_path, info, vectors)
    else:
        converted = OnnxRankingModel(converted_path, info, exported.scale)
    report = quality_gate(
        source,
        converted,
        batcher,
        prepared.splits["test"],
        config.export.quality_budget,
        max_groups=config.max_eval_groups,
        teacher_value=config.teacher_value,
        teacher=load_model(local_path(config.teacher_dir))[0] if config.teacher_dir else None,
    )
    report.update(
        {
            "target": target,
            "onnx_parity_max_abs_diff": exported.parity_max_abs_diff,
            "model_bytes": {
                "fp32": exported.path.stat().st_size,
                "converted": converted_path.stat().st_size,
            },
            "published_version": None,
            "measured_model": MEASURED[target],
        }
    )
    if report["passed"] and target.startswith("tensorrt"):
        plan = out / "model.plan"
        command = trtexec_command(
            converted_path,
            plan,
            target.removeprefix("tensorrt-"),
            exported.inputs,
            config.export.max_batch_size,
            info.max_length,
        )
        report["engine_build"] = {"command": command}
        try:
            converted_path = build_engine(command)
        except EngineBuildUnavailable as error:
            report["engine_build"]["status"] = "unavailable here"
            report["seconds"] = round(time.time() - started, 1)
            write_json_atomic(out / "quality-gate.json", report)
            raise TargetUnavailable(
                f"export target {target}: the quantized graph passed the quality gate in "
                f"ONNX Runtime ({report['metric']} {report['converted_value']:.4f}, "
                f"{report['relative_drop']:+.2%}), but {error}"
            ) from error
    if report["passed"]:
        metadata = {
            "kind": info.kind,
            "objective": info.objective,
            "max_length": info.max_length,
            "scale": exported.scale,
            "label_min": info.label_min,
            "label_max": info.label_max,
            "target": target,
            "quality_gate": {
                k: report[k] for k in ("metric", "source_value", "converted_value", "relative_drop")
            },
            **exported.card,
        }
        report["published_version"] = publish(
            local_path(config.repository),
            config.model_name,
            converted_path,
            metadata,
            config.export.max_batch_size,
            files=exported.files,
        )
        if sequential:
            publish_topk_model(
                local_path(config.repository),
                config.model_name,
                config.export.max_batch_size,
                report["published_version"],
            )
        else:
            publish_text_models(
                local_path(config.repository),
                config.model_name,
                model_dir / "tokenizer",
                info.kind,
                info.max_length,
                config.export.max_batch_size,
                report["published_version"],
            )
        if config.snapshots:
            snapshot = write_snapshot(
                local_path(config.repository),
                [config.model_name, *companion_model_names(config.model_name, info.kind)],
                report["published_version"],
            )
            report["snapshot"] = str(snapshot)
    report["seconds"] = round(time.time() - started, 1)
    write_json_atomic(out / "quality-gate.json", report)
    return report
