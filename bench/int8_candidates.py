"""Int8 graphs for the served cross-encoder on this CPU: which one `recjob-serve convert`
should build (issue 17, item 3).

    .venv/bin/python bench/int8_candidates.py [--model-run runs/bench/serving-model]

From the trainer run ``bench/serving.py`` leaves (its ``model/`` and prepared ``data/``),
one run builds each candidate from the same fp32 ONNX export and measures it in process,
the fp32 graph and PyTorch eager beside them:

- ``dynamic-all`` (what convert builds): BERT fusions (attention, LayerNorm, GELU), then
  ONNX Runtime dynamic int8 of every operator it can (fused Attention -> QAttention,
  MatMul, embeddings), per-channel int8 weights;
- ``dynamic-matmul``: the same, MatMul only (attention and embeddings stay fp32);
- ``dynamic-per-tensor``: dynamic-all with one scale per weight tensor;
- ``static-qdq-u8`` / ``static-qdq-s8``: calibrated static int8 of MatMul/Gemm (QDQ,
  per-channel weights, MinMax on 512 training pairs; uint8 / symmetric int8 activations);
- each with ORT's default threads (one per core) and, for the winner, one thread per run.

Timing: batch 1 and batch 32 at length 32, batch 32 of real held-out pairs (padded to each
batch's longest), 5 interleaved rounds, median. Quality: NDCG@10 on the held-out queries
through the project's quality gate (`gate.quality_gate`, same rows for all), relative
drop vs PyTorch fp32. Writes bench/results/int8_candidates.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from serving import fixed_batches, token_batches

HERE = Path(__file__).resolve().parent


def build(fp32: Path, out: Path, heads: int, hidden: int, calibration: list[dict]) -> dict:
    """Every candidate graph, from the same fp32 export."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    fused = out / "fused.onnx"
    optimize_model(
        str(fp32), model_type="bert", num_heads=heads, hidden_size=hidden,
        optimization_options=options,
    ).save_model_to_file(str(fused))  # fmt: skip
    prepared = out / "prepared.onnx"
    quant_pre_process(str(fused), str(prepared), auto_merge=True)
    floats = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    paths = {}
    for name, kwargs in (
        ("dynamic-all", {"per_channel": True}),
        ("dynamic-matmul", {"per_channel": True, "op_types_to_quantize": ["MatMul"]}),
        ("dynamic-per-tensor", {"per_channel": False}),
    ):
        paths[name] = out / f"{name}.onnx"
        quantize_dynamic(
            str(prepared), str(paths[name]), weight_type=QuantType.QInt8,
            extra_options=floats, **kwargs,
        )  # fmt: skip

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    for name, activation in (
        ("static-qdq-u8", QuantType.QUInt8),
        ("static-qdq-s8", QuantType.QInt8),
    ):
        paths[name] = out / f"{name}.onnx"
        quantize_static(
            str(prepared), str(paths[name]), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=activation, weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
            extra_options={**floats, "ActivationSymmetric": activation == QuantType.QInt8},
        )  # fmt: skip
    return paths


def timings(calls: dict, shapes: dict, rounds: int = 5) -> dict:
    """Median rows/s and per-call p50 (ms) of each call on each batch list, the calls
    interleaved round by round so machine noise hits all alike."""
    samples: dict = {n: {s: [] for s in shapes} for n in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for shape, batches in shapes.items():
                call(batches[0])  # warm-up
                times = []
                for batch in batches:
                    started = time.perf_counter()
                    call(batch)
                    times.append(time.perf_counter() - started)
                rows = sum(len(b["input_ids"]) for b in batches)
                samples[name][shape].append((rows / sum(times), np.median(times) * 1000))
    return {
        name: {
            shape: {
                "rows_per_s": float(np.median([r for r, _ in values])),
                "p50_ms": float(np.median([p for _, p in values])),
            }
            for shape, values in by_shape.items()
        }
        for name, by_shape in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-run", type=Path, default=HERE.parent / "runs/bench/serving-model")
    parser.add_argument("--groups", type=int, default=400)
    args = parser.parse_args()
    import torch

    from recjob_operator.api.v1alpha1.spec_delivery import QualityBudget
    from recjob_serving.export import export_onnx, session
    from recjob_serving.gate import quality_gate
    from recjob_serving.onnx_model import OnnxRankingModel
    from recjob_trainer.batches import Batcher
    from recjob_trainer.models import load_model
    from recjob_trainer.run_data import read_prepared

    run = args.model_run.resolve()
    model, tokenizer = load_model(run / "model")
    prepared = read_prepared(run / "data")
    test = prepared.splits["test"]
    pairs = list(zip(test["query"].to_list(), test["item_text"].to_list(), strict=True))
    train = prepared.splits["train"]
    train_pairs = list(zip(train["query"].to_list(), train["item_text"].to_list(), strict=True))
    shapes = {
        "batch_1_length_32": fixed_batches(1, 48),
        "batch_32_length_32": fixed_batches(32, 6),
        "batch_32_real_text": token_batches(tokenizer, pairs, 32)[:8],
    }
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        exported = export_onnx(run / "model", out / "model.fp32.onnx")
        encoder = model.encoder.config
        paths = build(
            exported.path, out, encoder.num_attention_heads, encoder.hidden_size,
            token_batches(tokenizer, train_pairs[:512], 16),
        )  # fmt: skip

        def ort_call(path: Path, threads: int = 0):
            sess = session(path, intra_op_threads=threads)
            names = {i.name for i in sess.get_inputs()}
            return lambda batch: sess.run(None, {k: v for k, v in batch.items() if k in names})

        def eager(batch: dict) -> None:
            with torch.no_grad():
                model.score_pairs(**{k: torch.from_numpy(v) for k, v in batch.items()})

        calls = {"pytorch-eager-fp32": eager, "onnxruntime-fp32": ort_call(exported.path)}
        calls.update({name: ort_call(path) for name, path in paths.items()})
        calls["dynamic-all-1-thread"] = ort_call(paths["dynamic-all"], threads=1)
        speed = timings(calls, shapes)
        batcher = Batcher.for_model(prepared.task, tokenizer, model.info, prepared.catalog)
        budget = QualityBudget(max_relative_drop=1.0)
        quality = {}
        for name, path in {"onnxruntime-fp32": exported.path, **paths}.items():
            converted = OnnxRankingModel(path, model.info, exported.scale)
            report = quality_gate(model, converted, batcher, test, budget, max_groups=args.groups)
            quality[name] = {
                "ndcg@10": report["converted_value"],
                "relative_drop_vs_pytorch": report["relative_drop"],
                "bytes": path.stat().st_size,
            }
        quality["pytorch-eager-fp32"] = {"ndcg@10": report["source_value"]}
    eager_32 = speed["pytorch-eager-fp32"]["batch_32_length_32"]["rows_per_s"]
    results = {
        "machine": {"cpus": os.cpu_count()},
        "speed": speed,
        "quality": quality,
        "vs_eager_batch_32": {
            name: value["batch_32_length_32"]["rows_per_s"] / eager_32
            for name, value in speed.items()
        },
    }
    path = HERE / "results" / "int8_candidates.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    header = ("b1 p50 ms", "b32 rows/s", "real32 rows/s", "x eager b32", "NDCG@10", "drop")
    print(f"{'graph':22} " + " ".join(f"{h:>13}" for h in header))
    for name, value in speed.items():
        q = quality.get(name.removesuffix("-1-thread"), {})
        print(
            f"{name:22} {value['batch_1_length_32']['p50_ms']:13.2f} "
            f"{value['batch_32_length_32']['rows_per_s']:13.1f} "
            f"{value['batch_32_real_text']['rows_per_s']:13.1f} "
            f"{results['vs_eager_batch_32'][name]:13.2f} {q.get('ndcg@10', float('nan')):13.4f} "
            f"{q.get('relative_drop_vs_pytorch', float('nan')):13.4f}"
        )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
