"""The TensorRT path: an explicitly quantized (QDQ) int8 ONNX calibrated on real training
rows, measurable in ONNX Runtime on CPU, then a TensorRT engine built by ``trtexec`` on a
GPU node (the conversion Job's image). Everything before the engine build runs and is
tested here; the build itself needs TensorRT and a GPU, which these machines lack.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from recjob_operator.api.model_input import history_text
from recjob_trainer.batches import Batcher

#: Only matrix multiplications are quantized (what TensorRT's explicit int8 accelerates);
#: Softmax, LayerNorm and GELU stay in floating point, which keeps ranking quality where a
#: fully quantized graph collapsed (Spearman ~0.2 vs fp32 in ENVIRONMENT.md).
QUANTIZED_OPS = ["MatMul", "Gemm"]


def calibration_batches(
    batcher: Batcher, train: pl.DataFrame, samples: int, batch_size: int = 16, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Tokenized batches of ``samples`` training rows (seeded) for int8 calibration, all of
    one shape (padded to the model's max length; a last partial batch is dropped), as ONNX
    Runtime's calibrator stacks the activations of every batch."""
    rows = train.sample(n=min(samples, train.height), seed=seed)
    tokenize = batcher.tokenizer
    out = []
    for start in range(0, rows.height - batch_size + 1, batch_size):
        chunk = rows[start : start + batch_size]
        if batcher.task == "search-ranking":
            tokens = tokenize(
                chunk["query"].to_list(),
                chunk["item_text"].to_list(),
                padding="max_length",
                truncation=True,
                max_length=batcher.max_length,
                return_tensors="np",
            )
        else:
            texts = [history_text(h, batcher.texts) for h in chunk["history"].to_list()]
            tokens = tokenize(
                texts,
                padding="max_length",
                truncation=True,
                max_length=batcher.max_length,
                return_tensors="np",
            )
        out.append({k: v.astype(np.int64) for k, v in tokens.items()})
    if not out:
        raise ValueError(
            f"calibration needs at least {batch_size} training rows, got {rows.height}"
        )
    return out


class _Reader:
    """ONNX Runtime CalibrationDataReader over prepared batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]], inputs: set[str]):
        self._iter: Iterator[dict[str, np.ndarray]] = iter(
            [{k: v for k, v in b.items() if k in inputs} for b in batches]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def quantize_qdq(source: Path, target: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """Static int8 in QDQ format (per-channel weights, percentile-calibrated activations)
    of the MatMul/Gemm inputs: the explicitly quantized ONNX TensorRT builds from."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    inputs = {i.name for i in onnx.load(str(source), load_external_data=False).graph.input}
    reader = _Reader(batches, inputs)
    CalibrationDataReader.register(_Reader)
    quantize_static(
        str(source),
        str(target),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "CalibPercentile": 99.99,
        },
    )
    return target


def trtexec_command(
    onnx_path: Path,
    plan_path: Path,
    precision: str,
    inputs: list[str],
    max_batch: int,
    max_length: int,
    trtexec: str = "trtexec",
) -> list[str]:
    """The exact engine build: int8 from the QDQ graph's own scales (no calibration cache),
    fp16 for tensorrt-fp16, dynamic shapes from 1 x 1 up to max_batch x max_length."""

    def shapes(batch: int, length: int) -> str:
        return ",".join(f"{name}:{batch}x{length}" for name in inputs)

    command = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={shapes(1, 1)}",
        f"--optShapes={shapes(max(1, max_batch // 2), max_length)}",
        f"--maxShapes={shapes(max_batch, max_length)}",
        "--skipInference",
    ]
    if precision == "int8":
        command += ["--int8", "--fp16"]  # QDQ layers int8, the rest may use fp16
    elif precision == "fp16":
        command += ["--fp16"]
    else:
        raise ValueError(f"unknown TensorRT precision {precision!r} (expected int8 or fp16)")
    return command


class EngineBuildUnavailable(RuntimeError):
    """trtexec (TensorRT) is not on this machine: the build belongs on a GPU node."""


def build_engine(command: list[str], timeout: float = 3600) -> Path:
    """Run the engine build; EngineBuildUnavailable where TensorRT is not installed."""
    if shutil.which(command[0]) is None:
        raise EngineBuildUnavailable(
            "the TensorRT engine build needs trtexec (TensorRT) on a GPU node; run it in the "
            "GPU conversion image: " + " ".join(command)
        )
    subprocess.run(command, check=True, timeout=timeout)
    return Path(next(a for a in command if a.startswith("--saveEngine=")).split("=", 1)[1])
