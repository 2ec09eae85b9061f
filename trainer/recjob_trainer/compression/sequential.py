"""Compression of the sequential recommender (``model.architecture: sequential``).

The stages are the pipeline's (:mod:`.pipeline`: train -> distill -> prune -> recover,
each a DeepSpeed stage with its own checkpoints); this module holds what differs from
BERT-style encoders. What is compressed is the user side — the causal transformer over
the history — and, with a narrower ``hiddenSize``, the width of every item vector, which
is what the served top-k searches (items x hidden). The text encoder and the catalog's
text embeddings (``item_text``, ``text_mean``, ``seen``) are the teacher's.

- **Student** (:func:`build_student`): ``numLayers`` of the teacher's
  ``nn.TransformerEncoderLayer`` s per ``layerSelection``, their weights and the item side
  (text projection, ID embeddings, positions, norms) copied. A narrower ``hiddenSize`` is
  a new model of that width: every width-dependent weight starts fresh (seeded, the same
  on every rank) and learns from the teacher; the frozen text buffers are kept.
- **Teacher scores** (:class:`SequentialTeacherScores`): computed per micro-batch for the
  batch's own candidates (the whole catalog or the sampled ones), with the items training
  never saw masked as the student's training forward masks them; the distillation losses
  leave those entries out (:mod:`.distill`).
- **Pruning** (:func:`choose` / :func:`apply`): ``ffn-channels`` (first-order importance
  |d loss / d gate| of each channel of ``linear1``/``linear2``, per layer, widths kept as
  :func:`.pruning.channels_to_keep` rounds them), ``layers`` (held-out loss without each
  layer), ``magnitude`` (the smallest transformer matrix weights zeroed: attention in/out
  projections and FFN). ``attention-heads`` is refused: ``nn.MultiheadAttention`` ties the
  heads' total width to the model width, so a head cannot be removed without changing the
  module; validation refuses it before a run starts.

The pruned shape (layer count, per-layer FFN widths) is recorded in
``ModelInfo.extra["sequential"]`` (``layers``, ``ffn``), from which
:class:`~recjob_trainer.sequential.SequentialRecommender` rebuilds it for
:func:`~recjob_trainer.models.load_model`, consolidation and export.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

import torch
from torch import nn

from recjob_operator.api.v1alpha1.spec_training import StudentSpec

from ..sequential import SequentialRecommender
from .distill import TeacherScores
from .pruning import (
    Batches,
    LossFn,
    channels_to_keep,
    enforce,
    layers_to_keep,
    masks_by_magnitude,
    median_eval_ms,
    skip_each_layer,
)
from .structure import slice_linear
from .student import layer_indices

#: Pruning methods that apply to the sequential recommender.
METHODS = ("ffn-channels", "layers", "magnitude")


def is_sequential(model: nn.Module) -> bool:
    """True for the sequential recommender (the other architectures are BERT-style)."""
    return isinstance(model, SequentialRecommender)


def record_shape(model: SequentialRecommender, **changes) -> None:
    """Write the model's current layer count and FFN widths (read from its modules) and
    ``changes`` into its shape and its info's ``extra["sequential"]``."""
    layers = model.transformer.layers
    widths = [layer.linear1.out_features for layer in layers]
    shape = replace(model.shape, layers=len(layers), **changes)
    uniform = all(w == 4 * shape.hidden for w in widths)
    shape = replace(shape, ffn=None if uniform else widths)
    model.transformer.num_layers = len(layers)
    model.shape = shape
    model.info = replace(model.info, extra={**model.info.extra, "sequential": asdict(shape)})


def trainable(model: SequentialRecommender) -> SequentialRecommender:
    """Every weight trains except a frozen text encoder (``fineTuning.method: frozen``:
    the catalog's text embeddings are fixed buffers and the encoder is never run)."""
    model.requires_grad_(True)
    if model.shape.text_frozen:
        model.encoder.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- student
def build_student(
    teacher: SequentialRecommender, spec: StudentSpec, seed: int = 0
) -> tuple[SequentialRecommender, list[int]]:
    """A student of ``spec.num_layers`` teacher layers (and ``spec.hidden_size`` wide) and,
    for each student layer, the teacher layer it came from."""
    layers = teacher.transformer.layers
    mapping = layer_indices(len(layers), spec.num_layers, spec.layer_selection)
    hidden, heads = spec.hidden_size or teacher.shape.hidden, teacher.shape.heads
    if hidden == teacher.shape.hidden:
        student = copy.deepcopy(teacher)
        student.transformer.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in mapping)
        record_shape(student)
    else:
        if hidden > teacher.shape.hidden or hidden % heads:
            raise ValueError(
                f"student hiddenSize {hidden}: at most the teacher's {teacher.shape.hidden} "
                f"and a multiple of its {heads} attention heads"
            )
        shape = replace(teacher.shape, hidden=hidden, layers=len(mapping), ffn=None)
        info = replace(teacher.info, extra={**teacher.info.extra, "sequential": asdict(shape)})
        with torch.random.fork_rng():  # fresh weights, the same on every rank
            torch.manual_seed(seed)
            student = SequentialRecommender(copy.deepcopy(teacher.encoder), info)
        with torch.no_grad():
            for name in ("item_text", "text_mean", "seen"):
                getattr(student, name).copy_(getattr(teacher, name))
    student.info = replace(student.info, extra={**student.info.extra, "teacher_layers": mapping})
    return student.train(teacher.training), mapping


class SequentialTeacherScores(TeacherScores):
    """The teacher's logits for a sequential micro-batch, computed on the fly (they depend
    on the batch's candidates; the teacher is small), with the items training never saw
    masked exactly as the student's training forward masks them."""

    def __call__(self, index: list[int], batch: dict[str, torch.Tensor], hidden_states: bool):
        """Teacher logits (masked) for a micro-batch, and its hidden states when asked."""
        logits, states = super().__call__(index, batch, hidden_states)
        return self.teacher.mask_unseen(logits, batch["candidates"]), states


# --------------------------------------------------------------------------- pruning
def channel_importance(
    model: SequentialRecommender, batches: Batches, loss_of: LossFn
) -> list[torch.Tensor]:
    """Per layer, |d loss / d gate| of each FFN channel (a gate on ``linear2``'s input),
    summed over ``batches``. The hooks keep PyTorch off its fused transformer path."""
    gates, hooks = [], []
    for layer in model.transformer.layers:
        gate = torch.ones(layer.linear2.in_features, requires_grad=True)
        gates.append(gate)

        def hook(_module, args, gate=gate):
            return (args[0] * gate.to(args[0].dtype),)

        hooks.append(layer.linear2.register_forward_pre_hook(hook))
    totals = [torch.zeros(len(g)) for g in gates]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch, labels in batches:
                loss = loss_of(model(**batch), labels)
                for total, grad in zip(totals, torch.autograd.grad(loss, gates), strict=True):
                    total += grad.abs()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return totals


def layer_importance(model: SequentialRecommender, batches: Batches, loss_of: LossFn):
    """Held-out loss increase when each transformer layer is skipped."""
    return skip_each_layer(model, model.transformer, "layers", batches, loss_of)


def choose(
    model: SequentialRecommender, method: str, amount: float, batches: Batches, loss_of: LossFn
) -> dict:
    """Decide what to prune (a JSON-able decision :func:`apply` replays on any rank)."""
    if method == "ffn-channels":
        scores = channel_importance(model, batches, loss_of)
        keep = [sorted(torch.topk(s, channels_to_keep(len(s), amount)).indices.tolist())
                for s in scores]  # fmt: skip
        importance = [[round(float(x), 6) for x in s] for s in scores]
        return {"method": method, "keep": keep, "importance": importance}
    if method == "layers":
        cost = layer_importance(model, batches, loss_of)
        keep = layers_to_keep(cost, amount)
        return {"method": method, "keep": keep, "importance": [round(c, 6) for c in cost]}
    if method == "magnitude":
        return {"method": method, "amount": amount}
    raise refused(method)


def refused(method: str) -> ValueError:
    """The error for a pruning method the sequential recommender does not support."""
    return ValueError(
        f"pruning method {method!r} does not apply to the sequential architecture "
        f"(nn.MultiheadAttention ties the heads' width to the model width); use one of "
        f"{', '.join(METHODS)}"
    )


def apply(model: SequentialRecommender, decision: dict) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place as ``decision`` says and record its new shape; returns the
    weight masks recovery keeps enforcing (magnitude only, else empty)."""
    method, layers = decision["method"], model.transformer.layers
    masks: dict[str, torch.Tensor] = {}
    if method == "ffn-channels":
        for layer, channels in zip(layers, decision["keep"], strict=True):
            index = torch.tensor(sorted(channels), dtype=torch.long)
            layer.linear1 = slice_linear(layer.linear1, rows=index)
            layer.linear2 = slice_linear(layer.linear2, columns=index)
    elif method == "layers":
        if not decision["keep"]:
            raise ValueError("the transformer must keep at least one layer")
        model.transformer.layers = nn.ModuleList(layers[i] for i in decision["keep"])
    elif method == "magnitude":
        masks = magnitude_masks(model, decision["amount"])
        enforce(model, masks)
    else:
        raise refused(method)
    record_shape(model)
    return masks


def _matrices(model: SequentialRecommender) -> dict[str, torch.Tensor]:
    """The transformer's matrix weights: attention in/out projections, FFN linear1/2."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.startswith("transformer.") and p.dim() == 2
    }


def magnitude_masks(model: SequentialRecommender, amount: float) -> dict[str, torch.Tensor]:
    """Keep-masks of the transformer's matrix weights: the global ``amount`` of smallest
    magnitudes is dropped."""
    return masks_by_magnitude({name: p.detach() for name, p in _matrices(model).items()}, amount)


def sparsity(model: SequentialRecommender) -> float:
    """Fraction of exactly-zero weights in the transformer's matrices."""
    weights = list(_matrices(model).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


# --------------------------------------------------------------------------- reports
def structure_of(model: SequentialRecommender) -> dict[str, list[int]]:
    """Attention heads and FFN channels of every transformer layer."""
    layers = model.transformer.layers
    return {
        "heads": [layer.self_attn.num_heads for layer in layers],
        "ffn": [layer.linear1.out_features for layer in layers],
    }


def describe(model: SequentialRecommender) -> dict:
    """Layers, width and structure for ``metrics.json["compression"]``; ``item_table_bytes``
    is the fp32 catalog table the served top-k searches (items x hidden), and
    ``parameters_without_text_encoder`` what is compressed (the text encoder is the
    teacher's and is not served: item vectors are exported precomputed)."""
    shape = model.shape
    return {
        "layers": len(model.transformer.layers),
        "hidden_size": shape.hidden,
        "structure": structure_of(model),
        "item_table_bytes": (shape.items + 1) * shape.hidden * 4,
        "parameters_without_text_encoder": sum(
            p.numel() for name, p in model.named_parameters() if not name.startswith("encoder.")
        ),
    }


@torch.no_grad()
def latency_ms(model: SequentialRecommender, batch: dict[str, torch.Tensor], repeats: int = 5):
    """Median wall time (this process, PyTorch) of what serving computes per request
    batch: the users' vectors from their histories (``batch["history"]``) and their
    scores against the whole catalog table (computed once, as serving does)."""
    table = model.catalog_vectors()
    history = batch["history"]
    return median_eval_ms(model, lambda: model.user_vectors_from(history, table) @ table.T, repeats)
