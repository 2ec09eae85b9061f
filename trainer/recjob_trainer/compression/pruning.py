"""Pruning a fine-tuned (or distilled) ranking model, chosen by importance on validation data.

Structured methods shrink the graph, so the model is really smaller and faster:

- ``attention-heads``: each head's importance is |∂loss/∂gate| for a gate multiplying the
  head's output (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"),
  accumulated over validation batches and normalised per layer; the least important
  ``amount`` of all heads go, at least one head per layer stays.
- ``ffn-channels``: the same first-order importance for every FFN channel; each layer
  loses ``amount`` of its channels (the kept width rounded to a multiple of 64).
- ``layers``: each layer is skipped in turn and the validation loss measured; the
  layers whose removal costs least go (at least one stays).

``magnitude`` zeroes the ``amount`` of encoder weights with the smallest magnitude
(global, unstructured). The shapes stay, so dense kernels run exactly as fast: the
report measures it instead of promising anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .structure import bert_layers, head_size, keep_channels, keep_heads, keep_layers

Batches = Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gate_importance(model: nn.Module, batches: Batches, loss_of: LossFn, unit: str) -> list:
    """Per layer, |∂loss/∂gate| of each attention head (``unit="heads"``) or FFN channel
    (``unit="channels"``), summed over ``batches``."""
    layers, size = bert_layers(model.encoder), head_size(model.encoder)
    gates, hooks = [], []
    for layer in layers:
        if unit == "heads":
            count = layer.attention.self.query.out_features // size
            target, repeat = layer.attention.output.dense, size
        else:
            count, target, repeat = layer.intermediate.dense.out_features, layer.output.dense, 1
        gate = torch.ones(count, requires_grad=True)
        gates.append(gate)

        def hook(_module, args, gate=gate, repeat=repeat):
            return (args[0] * gate.repeat_interleave(repeat).to(args[0].dtype),)

        hooks.append(target.register_forward_pre_hook(hook))
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


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Batches, loss_of: LossFn) -> float:
    """Mean validation loss of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    losses = [float(loss_of(model(**batch), labels)) for batch, labels in batches]
    model.train(was_training)
    return sum(losses) / max(1, len(losses))


def layer_importance(model: nn.Module, batches: Batches, loss_of: LossFn) -> list[float]:
    """Validation-loss increase when each layer is skipped."""
    return skip_each_layer(model, model.encoder.encoder, "layer", batches, loss_of)


def skip_each_layer(
    model: nn.Module, holder: nn.Module, name: str, batches: Batches, loss_of: LossFn
) -> list[float]:
    """Validation-loss increase of ``model`` when each layer of the ModuleList
    ``holder.<name>`` is skipped in turn (the list is restored afterwards)."""
    batches = list(batches)
    layers = getattr(holder, name)
    base = mean_loss(model, batches, loss_of)
    out = []
    try:
        for i in range(len(layers)):
            setattr(holder, name, nn.ModuleList([x for j, x in enumerate(layers) if j != i]))
            out.append(mean_loss(model, batches, loss_of) - base)
    finally:
        setattr(holder, name, layers)
    return out


def layers_to_keep(cost: list[float], amount: float) -> list[int]:
    """The layers kept when ``amount`` of them go, those whose removal ``cost`` least
    first (at least one dropped, at least one kept)."""
    n = len(cost)
    dropped = sorted(range(n), key=lambda i: cost[i])[: min(n - 1, max(1, round(amount * n)))]
    return [i for i in range(n) if i not in dropped]


def choose(model: nn.Module, method: str, amount: float, batches: Batches, loss_of: LossFn) -> dict:
    """Decide what to prune: the kept units per layer (a JSON-able decision that
    :func:`apply` replays on any rank or after a restart) and their importance."""
    if method == "attention-heads":
        scores = gate_importance(model, batches, loss_of, "heads")
        scores = [s / s.norm().clamp(min=1e-12) for s in scores]  # per-layer normalisation
        ranked = sorted(((float(s[h]), i, h) for i, s in enumerate(scores) for h in range(len(s))))
        remaining = [len(s) for s in scores]
        target = round(amount * sum(remaining))
        drop: set[tuple[int, int]] = set()
        for _, i, h in ranked:
            if len(drop) >= target:
                break
            if remaining[i] > 1:
                drop.add((i, h))
                remaining[i] -= 1
        keep = [[h for h in range(len(s)) if (i, h) not in drop] for i, s in enumerate(scores)]
        return {"method": method, "keep": keep, "importance": _rounded(scores)}
    if method == "ffn-channels":
        scores = gate_importance(model, batches, loss_of, "channels")
        keep = []
        for s in scores:
            n = channels_to_keep(len(s), amount)
            keep.append(sorted(torch.topk(s, n).indices.tolist()))
        return {"method": method, "keep": keep, "importance": _rounded(scores)}
    if method == "layers":
        cost = layer_importance(model, batches, loss_of)
        keep = layers_to_keep(cost, amount)
        return {"method": method, "keep": keep, "importance": [round(c, 6) for c in cost]}
    if method == "magnitude":
        return {"method": method, "amount": amount}
    raise ValueError(f"pruning method {method!r}")


#: FFN widths are kept at multiples of this (int8 / tensor-core GEMMs run best on them).
CHANNEL_MULTIPLE = 64


def channels_to_keep(channels: int, amount: float) -> int:
    """How many of ``channels`` FFN channels stay when ``amount`` is removed: rounded to
    a multiple of :data:`CHANNEL_MULTIPLE` when the layer is that wide, at least one."""
    keep = channels - amount * channels
    if channels >= CHANNEL_MULTIPLE:
        return int(max(CHANNEL_MULTIPLE, round(keep / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE))
    return max(1, round(keep))


def apply(model: nn.Module, decision: dict) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place as ``decision`` says; returns the weight masks to keep
    enforcing during recovery (magnitude pruning only, else empty)."""
    method, encoder = decision["method"], model.encoder
    layers = bert_layers(encoder)
    if method == "attention-heads":
        for layer, heads in zip(layers, decision["keep"], strict=True):
            keep_heads(layer, heads, head_size(encoder))
    elif method == "ffn-channels":
        for layer, channels in zip(layers, decision["keep"], strict=True):
            keep_channels(layer, channels)
    elif method == "layers":
        keep_layers(encoder, decision["keep"])
    elif method == "magnitude":
        masks = magnitude_masks(model, decision["amount"])
        enforce(model, masks)
        return masks
    else:
        raise ValueError(f"pruning method {method!r}")
    return {}


def magnitude_masks(model: nn.Module, amount: float) -> dict[str, torch.Tensor]:
    """Keep-masks of every encoder Linear weight: the global ``amount`` of smallest
    magnitudes is dropped."""
    weights = {
        f"encoder.{name}.weight": module.weight.detach()
        for name, module in model.encoder.named_modules()
        if isinstance(module, nn.Linear)
    }
    return masks_by_magnitude(weights, amount)


def masks_by_magnitude(weights: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    """Keep-masks of ``weights`` (by name): the global ``amount`` of smallest magnitudes
    over all of them is dropped."""
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    k = max(1, int(amount * everything.numel()))
    threshold = torch.kthvalue(everything, k).values
    return {name: w.abs() > threshold for name, w in weights.items()}


@torch.no_grad()
def enforce(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked-out weights again (after an optimizer step)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name in params and params[name].shape == mask.shape:
            params[name].mul_(mask.to(params[name].dtype))


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights in the encoder's Linear layers."""
    zeros = total = 0
    for module in model.encoder.modules():
        if isinstance(module, nn.Linear):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(1, total)


@torch.no_grad()
def forward_latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median wall time of one eval forward of ``batch`` on this process (PyTorch)."""
    return median_eval_ms(model, lambda: model(**batch), repeats)


@torch.no_grad()
def median_eval_ms(model: nn.Module, run: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``run()`` (after one warm-up) with ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    model.train(was_training)
    return sorted(times)[len(times) // 2]


def _rounded(scores: list[torch.Tensor]) -> list[list[float]]:
    return [[round(float(x), 6) for x in s] for s in scores]
