"""Trained model -> ONNX (dynamic batch and sequence axes) -> optionally int8, with parity
checks against PyTorch.

The exported graph takes token ids and returns what a server needs:
- cross-encoder: ``input_ids``, ``attention_mask``, ``token_type_ids`` -> ``score`` (the
  prediction on the label's scale: a grade or a click probability) and ``logit``;
- bi-encoder: ``input_ids``, ``attention_mask`` -> ``embedding`` (unit length; a user's
  history text or an item) — scores are dot products times ``scale`` (in the model info);
- sequential recommender: the **user tower** ``history`` (int64, batch x history length,
  left-padded global item indices, 0 = padding, oldest first) -> ``user_vector`` (batch x
  hidden), the catalog's item table an initializer the graph gathers from; the item
  vectors themselves (``item_vectors.npy``, float32, row n = ``item_ids.json``[n], whose
  history index is n + 1) are written beside it, so a server ranks the whole catalog from
  vectors computed once. Scores are dot products.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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


class _UserTowerGraph(nn.Module):
    """The sequential recommender's user side, written for the ONNX exporter.

    The same computation as ``SequentialRecommender.user_vectors_from`` (eval mode) over
    the model's own modules, with the catalog table as a buffer (an initializer of the
    graph): PyTorch's fused transformer path and its boolean eye have no ONNX form, and
    ``nn.MultiheadAttention`` traces with fixed sizes. :func:`export_user_tower` checks it
    against the model itself on histories of several shapes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        shape = model.shape
        self.heads, self.max_history, self.hidden = shape.heads, shape.max_history, shape.hidden
        self.temperature = float(shape.temperature)
        with torch.no_grad():
            self.register_buffer("table", model.catalog_vectors().detach().float().clone())
        self.position, self.input_norm = model.position, model.input_norm
        self.layers, self.output_norm = model.transformer.layers, model.output_norm

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        length = history.shape[1]
        index = torch.arange(length, device=history.device)
        positions = (length - 1 - index).clamp(max=self.max_history - 1)  # 0 = most recent
        items = self.table[history]
        if self.temperature > 0:  # unit item vectors, scaled as the model scales them
            items = items * self.hidden**0.5
        h = self.input_norm(items + self.position(positions))
        # causal, never a padded item, always itself (as the model's mask)
        blocked = (index.unsqueeze(0) > index.unsqueeze(1)).unsqueeze(0) | (history == 0).unsqueeze(
            1
        )
        blocked = blocked & (index.unsqueeze(0) != index.unsqueeze(1)).unsqueeze(0)
        bias = torch.zeros_like(blocked, dtype=h.dtype).masked_fill(blocked, -math.inf)
        bias = bias.unsqueeze(1)  # (B, 1, L, L): the same for every head
        head_dim = self.hidden // self.heads
        for layer in self.layers:
            attention = layer.self_attn
            x = layer.norm1(h)
            q, k, v = nn.functional.linear(
                x, attention.in_proj_weight, attention.in_proj_bias
            ).chunk(3, dim=-1)
            q, k, v = (
                t.reshape(t.shape[0], length, self.heads, head_dim).transpose(1, 2)
                for t in (q, k, v)
            )
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias, -1)
            out = (weights @ v).transpose(1, 2).reshape(h.shape)
            h = h + attention.out_proj(out)
            h = h + layer.linear2(layer.activation(layer.linear1(layer.norm2(h))))
        user = self.output_norm(h[:, -1])
        if self.temperature > 0:  # cosine / temperature: a dot product with unit items
            user = nn.functional.normalize(user, dim=-1) / self.temperature
        return user


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
    files: dict[str, Path] = field(default_factory=dict)
    """More files for the model's version folder (name -> file): the sequential
    recommender's item vectors and ids."""
    card: dict = field(default_factory=dict)
    """More facts for the version's ``recjob.json``."""


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
    if info.kind == "sequential":
        return export_user_tower(model, target, opset, tolerance)
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


#: Item vectors and ids beside a sequential model's user tower (in its version folder).
ITEM_VECTORS, ITEM_IDS = "item_vectors.npy", "item_ids.json"


def probe_histories(items: int, seed: int = 0) -> list[np.ndarray]:
    """Left-padded histories of several batch sizes and lengths (empty, short, longer than
    the model's history) for parity checks."""
    rng = np.random.default_rng(seed)
    out = []
    for batch, length in ((4, 6), (1, 1), (3, 13), (2, 60)):
        history = rng.integers(1, items + 1, size=(batch, length), dtype=np.int64)
        for row in range(batch):  # row r keeps its last length - r * 2 items
            history[row, : min(length - 1, row * 2)] = 0
        out.append(history)
    out[0][-1] = 0  # a user without history
    return out


def export_user_tower(
    model: nn.Module, target: Path, opset: int = 17, tolerance: float = 1e-4
) -> ExportedModel:
    """Export a sequential recommender's user tower to ``target`` (dynamic batch and
    history axes) and write its item vectors and ids beside it; ValueError when ONNX
    Runtime does not reproduce ``model.user_vectors_from`` within ``tolerance``."""
    info, shape = model.info, model.shape
    graph = _UserTowerGraph(model).eval()
    table = graph.table
    probes = probe_histories(shape.items)
    target.parent.mkdir(parents=True, exist_ok=True)
    # with gradients on, as PyTorch's fused transformer path (no ONNX form) stays off
    torch.onnx.export(
        graph,
        (torch.from_numpy(probes[0]),),
        str(target),
        input_names=["history"],
        output_names=["user_vector"],
        dynamic_axes={"history": {0: "batch", 1: "history"}, "user_vector": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    onnx.checker.check_model(str(target))
    sess = session(target)
    diff = 0.0
    with torch.no_grad():
        for history in probes:
            expected = model.user_vectors_from(torch.from_numpy(history), table).numpy()
            (got,) = sess.run(None, {"history": history})
            diff = max(diff, float(np.abs(got - expected).max()))
    if diff > tolerance:
        raise ValueError(
            f"ONNX export does not reproduce PyTorch: max |difference| {diff:.2e} > {tolerance:.0e}"
        )
    vectors, ids = target.with_name(ITEM_VECTORS), target.with_name(ITEM_IDS)
    np.save(vectors, table[1:].numpy().astype(np.float32), allow_pickle=False)
    item_ids = [str(i) for i in info.extra["item_ids"]]
    if len(item_ids) != shape.items:
        raise ValueError(f"the model has {shape.items} items but {len(item_ids)} item ids")
    ids.write_text(json.dumps(item_ids))
    card = {
        "max_history": shape.max_history,
        "hidden": shape.hidden,
        "items": shape.items,
        "item_vectors": ITEM_VECTORS,
        "item_ids": ITEM_IDS,
    }
    exported = ExportedModel(
        target,
        "sequential",
        ["history"],
        ["user_vector"],
        info.max_length,
        None,
        diff,
        files={ITEM_VECTORS: vectors, ITEM_IDS: ids},
        card=card,
    )
    target.with_suffix(".json").write_text(
        json.dumps(
            {"kind": "sequential", "inputs": ["history"], "outputs": ["user_vector"],
             "parity_max_abs_diff": diff, **card},
            indent=2,
        )
    )  # fmt: skip
    return exported


def session(path: Path, intra_op_threads: int = 0, spinning: bool = True):
    """An ONNX Runtime CPU session for ``path``: ``intra_op_threads`` threads per run (0:
    one per core), idle threads spinning for work unless ``spinning`` is False (a server
    wants its cores back for the network and the next request's decoding)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of the ONNX model at ``path`` for ``batch`` (inputs the graph does not take
    are ignored)."""
    sess = session(path)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in batch.items() if k in names})


def quantize_int8(
    source: Path,
    target: Path,
    num_heads: int,
    hidden_size: int,
    fuse_attention: bool = True,
    op_types: list[str] | None = None,
) -> Path:
    """ONNX Runtime dynamic int8 with per-channel 7-bit weights, after BERT fusions
    (attention, layer norm, GELU) and shape pre-processing; what measured best on these CPUs.

    7-bit weights (``reduce_range``) so every x86 CPU computes the same numbers: without
    VNNI, ONNX Runtime multiplies uint8 activations by int8 weights with VPMADDUBSW, whose
    int16 pair sums saturate for full-range weights (NDCG@10 1.98% worse than fp32 on an
    AVX2 EPYC, 0.67% with 7 bits); the gate's verdict then holds on the serving node too.

    ``fuse_attention=False`` for encoders whose layers have different head counts
    (pruned heads): the fused Attention operator takes one head count for the graph.
    ``op_types``: quantize only these operators (default: every one ONNX Runtime can)."""
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
        reduce_range=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        **({"op_types_to_quantize": op_types} if op_types else {}),
    )
    for tmp in (fused, prepared):
        tmp.unlink(missing_ok=True)
    return target
