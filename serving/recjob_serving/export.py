"""Trained model -> ONNX (dynamic batch and sequence axes) -> optionally int8, with parity
checks against PyTorch.

The exported graph takes token ids and returns what a server needs:
- cross-encoder: ``input_ids``, ``attention_mask``, ``token_type_ids`` -> ``score`` (the
  prediction on the label's scale: a grade or a click probability) and ``logit``;
- bi-encoder: ``input_ids``, ``attention_mask`` -> ``embedding`` (unit length; a user's
  history text or an item) — scores are dot products times ``scale`` (in the model info).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from recjob_trainer.models import RankingModel, load_model

PROBE_TEXTS = [
    ("cordless drill", "dewalt 20v max cordless drill driver kit"),
    ("1/2 in. pvc elbow", "charlotte pipe 1/2 in. pvc sch. 40 90-degree elbow"),
    ("led light bulbs", "philips 60w equivalent soft white a19 led light bulb (4-pack)"),
]


class _CrossEncoderGraph(nn.Module):
    def __init__(self, model: RankingModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        logit = self.model.score_pairs(input_ids, attention_mask, token_type_ids)
        return self.model.predict(logit), logit


class _BiEncoderGraph(nn.Module):
    def __init__(self, model: RankingModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.item_vectors(input_ids, attention_mask)


@dataclass
class ExportedModel:
    """An ONNX file and what a server needs to know about it."""

    path: Path
    kind: str
    inputs: list[str]
    outputs: list[str]
    max_length: int
    scale: float | None
    parity_max_abs_diff: float


def probe_batch(tokenizer, kind: str, max_length: int) -> dict[str, np.ndarray]:
    """A small tokenized batch of real-looking e-commerce text for parity checks."""
    if kind == "cross-encoder":
        queries, items = zip(*PROBE_TEXTS, strict=True)
        tokens = tokenizer(
            list(queries),
            list(items),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        names = ["input_ids", "attention_mask", "token_type_ids"]
    else:
        tokens = tokenizer(
            [t for pair in PROBE_TEXTS for t in pair],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        names = ["input_ids", "attention_mask"]
    return {name: tokens[name].astype(np.int64) for name in names}


def export_onnx(
    model_dir: Path, target: Path, opset: int = 17, tolerance: float = 1e-4
) -> ExportedModel:
    """Export the saved model at ``model_dir`` to ``target`` and check that ONNX Runtime
    reproduces PyTorch on a probe batch (ValueError beyond ``tolerance``)."""
    model, tokenizer = load_model(model_dir)
    info = model.info
    if info.kind == "cross-encoder":
        graph: nn.Module = _CrossEncoderGraph(model)
        inputs, outputs = ["input_ids", "attention_mask", "token_type_ids"], ["score", "logit"]
        dynamic = {name: {0: "batch", 1: "sequence"} for name in inputs}
        dynamic.update({"score": {0: "batch"}, "logit": {0: "batch"}})
        scale = None
    else:
        graph = _BiEncoderGraph(model)
        inputs, outputs = ["input_ids", "attention_mask"], ["embedding"]
        dynamic = {name: {0: "batch", 1: "sequence"} for name in inputs}
        dynamic["embedding"] = {0: "batch"}
        scale = float(model.scale().detach().reshape(-1)[0])
    graph.eval()
    batch = probe_batch(tokenizer, info.kind, info.max_length)
    args = tuple(torch.from_numpy(batch[name]) for name in inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            graph,
            args,
            str(target),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
        expected = graph(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    onnx.checker.check_model(str(target))
    got = run_onnx(target, batch)
    diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))
    if diff > tolerance:
        raise ValueError(
            f"ONNX export does not reproduce PyTorch: max |difference| {diff:.2e} > {tolerance:.0e}"
        )
    exported = ExportedModel(target, info.kind, inputs, outputs, info.max_length, scale, diff)
    target.with_suffix(".json").write_text(
        json.dumps(
            {
                "kind": info.kind,
                "inputs": inputs,
                "outputs": outputs,
                "max_length": info.max_length,
                "scale": scale,
                "parity_max_abs_diff": diff,
            },
            indent=2,
        )
    )
    return exported


def session(path: Path):
    """An ONNX Runtime CPU session for ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the ONNX model at ``path`` for ``batch`` (inputs the graph does not take
    are ignored)."""
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in batch.items() if k in names})


def quantize_int8(
    source: Path, target: Path, num_heads: int, hidden_size: int, fuse_attention: bool = True
) -> Path:
    """ONNX Runtime dynamic int8 with per-channel weights, after BERT fusions (attention,
    layer norm, GELU) and shape pre-processing; what measured best on these CPUs.

    ``fuse_attention=False`` for encoders whose layers have different head counts
    (pruned heads): the fused Attention operator takes one head count for the graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fused = target.with_name(target.stem + ".fused.onnx")
    prepared = target.with_name(target.stem + ".prep.onnx")
    options = FusionOptions("bert")
    options.enable_attention = fuse_attention
    optimize_model(
        str(source),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
    ).save_model_to_file(str(fused))
    quant_pre_process(str(fused), str(prepared), auto_merge=True)
    quantize_dynamic(
        str(prepared),
        str(target),
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    for tmp in (fused, prepared):
        tmp.unlink(missing_ok=True)
    return target
