"""Structural surgery on BERT-family encoders: keep a subset of layers, attention heads,
FFN channels or hidden dimensions by slicing the trained weights.

A compressed encoder no longer fits its Hugging Face config alone (pruned layers keep
different head and channel counts), so its shape is recorded as a *structure*
(``{"heads": [per layer], "ffn": [per layer]}``) in the model info, and
:func:`resize_to` rebuilds empty modules of those shapes before the weights load.

BERT's self-attention reshapes to ``(..., -1, head_size)``, so a query/key/value
projection with fewer output rows simply has fewer heads: slicing the ``nn.Linear``
modules is enough, and the result is smaller and faster in PyTorch, ONNX Runtime and
TensorRT alike.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class UnsupportedEncoder(ValueError):
    """The encoder does not have BERT's module layout."""


def bert_layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-style encoder (BERT, MiniLM, RoBERTa, ...)."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not all(_is_bert_layer(x) for x in layers):
        raise UnsupportedEncoder(
            f"compression supports BERT-style encoders (encoder.layer[i].attention.self."
            f"query/key/value, intermediate.dense, output.dense); got "
            f"{type(encoder).__name__}"
        )
    return layers


def _is_bert_layer(layer: nn.Module) -> bool:
    try:
        attention = layer.attention
        return all(
            isinstance(m, nn.Linear)
            for m in (
                attention.self.query,
                attention.self.key,
                attention.self.value,
                attention.output.dense,
                layer.intermediate.dense,
                layer.output.dense,
            )
        )
    except AttributeError:
        return False


def head_size(encoder: nn.Module) -> int:
    """Width of one attention head."""
    config = encoder.config
    return config.hidden_size // config.num_attention_heads


def structure_of(encoder: nn.Module) -> dict[str, list[int]]:
    """Attention heads and FFN channels of every layer, read from the module shapes."""
    size = head_size(encoder)
    layers = bert_layers(encoder)
    return {
        "heads": [layer.attention.self.query.out_features // size for layer in layers],
        "ffn": [layer.intermediate.dense.out_features for layer in layers],
    }


def is_uniform(encoder: nn.Module) -> bool:
    """True when every layer has the config's heads and channels (no per-layer pruning)."""
    s, c = structure_of(encoder), encoder.config
    return set(s["heads"]) == {c.num_attention_heads} and set(s["ffn"]) == {c.intermediate_size}


def slice_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None
) -> nn.Linear:
    """A new Linear keeping output ``rows`` and input ``columns`` (None: all)."""
    weight, bias = linear.weight.detach(), linear.bias
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out = out.to(dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out


def head_rows(heads: list[int], size: int) -> torch.Tensor:
    """Rows of a query/key/value projection (columns of the attention output) of ``heads``."""
    return torch.tensor([h * size + i for h in heads for i in range(size)], dtype=torch.long)


def keep_heads(layer: nn.Module, heads: list[int], size: int) -> None:
    """Keep only ``heads`` (indices into the layer's current heads) of a layer."""
    if not heads:
        raise ValueError("a layer must keep at least one attention head")
    rows = head_rows(sorted(heads), size)
    attention = layer.attention
    for name in ("query", "key", "value"):
        setattr(attention.self, name, slice_linear(getattr(attention.self, name), rows=rows))
    attention.output.dense = slice_linear(attention.output.dense, columns=rows)
    attention.self.num_attention_heads = len(heads)
    attention.self.all_head_size = len(heads) * size


def keep_channels(layer: nn.Module, channels: list[int]) -> None:
    """Keep only the FFN ``channels`` of a layer."""
    if not channels:
        raise ValueError("a layer must keep at least one FFN channel")
    index = torch.tensor(sorted(channels), dtype=torch.long)
    layer.intermediate.dense = slice_linear(layer.intermediate.dense, rows=index)
    layer.output.dense = slice_linear(layer.output.dense, columns=index)


def keep_layers(encoder: nn.Module, indices: list[int]) -> None:
    """Keep only the transformer layers ``indices`` (in order)."""
    layers = bert_layers(encoder)
    if not indices:
        raise ValueError("an encoder must keep at least one layer")
    encoder.encoder.layer = nn.ModuleList([layers[i] for i in indices])
    for position, layer in enumerate(encoder.encoder.layer):  # HF layers know their index
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    encoder.config.num_hidden_layers = len(indices)


def resize_to(encoder: nn.Module, structure: dict[str, list[int]]) -> None:
    """Give a freshly built encoder the shapes ``structure`` records (weights to be loaded)."""
    layers, size = bert_layers(encoder), head_size(encoder)
    if len(structure["heads"]) != len(layers) or len(structure["ffn"]) != len(layers):
        raise ValueError(
            f"structure describes {len(structure['heads'])} layers, the encoder config "
            f"{len(layers)}"
        )
    for layer, heads, channels in zip(layers, structure["heads"], structure["ffn"], strict=True):
        keep_heads(layer, list(range(heads)), size)
        keep_channels(layer, list(range(channels)))


def narrow_hidden(model: nn.Module, hidden: int) -> None:
    """Shrink a RankingModel's hidden size to ``hidden`` in place, keeping every head
    (each narrower) and a proportional share of each layer's FFN channels.

    Which hidden dimensions survive is chosen once for the whole residual stream, by the
    mean magnitude of the word embeddings and LayerNorm scales; inside each head the
    dimensions with the largest query·key and value·output weight norms are kept; FFN
    channels by the norm of their input and output weights."""
    encoder = model.encoder
    config = encoder.config
    heads, old = config.num_attention_heads, config.hidden_size
    if hidden % heads or hidden > old:
        raise ValueError(f"hidden size {hidden}: a multiple of {heads} heads, at most {old}")
    layers = bert_layers(encoder)
    if not is_uniform(encoder):
        raise ValueError("narrow the hidden size before pruning heads or channels")
    new_head, old_head = hidden // heads, old // heads
    norms = [m.weight.detach().abs() for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
    score = encoder.embeddings.word_embeddings.weight.detach().abs().mean(0)
    score = score / score.mean() + torch.stack(norms).mean(0) / torch.stack(norms).mean()
    keep = torch.sort(torch.topk(score, hidden).indices).values

    _narrow_embeddings(encoder.embeddings, keep)
    ffn = round(config.intermediate_size * hidden / old)
    for layer in layers:
        a = layer.attention
        q, k, v, o = a.self.query.weight, a.self.key.weight, a.self.value.weight, a.output.dense
        importance = q.norm(dim=1) * k.norm(dim=1) + v.norm(dim=1) * o.weight.norm(dim=0)
        rows = torch.cat(
            [
                h * old_head
                + torch.sort(
                    torch.topk(importance[h * old_head : (h + 1) * old_head], new_head).indices
                ).values
                for h in range(heads)
            ]
        )
        for name in ("query", "key", "value"):
            setattr(a.self, name, slice_linear(getattr(a.self, name), rows=rows, columns=keep))
        a.output.dense = slice_linear(a.output.dense, rows=keep, columns=rows)
        a.output.LayerNorm = _narrow_norm(a.output.LayerNorm, keep)
        a.self.attention_head_size, a.self.all_head_size = new_head, hidden
        a.self.scaling = new_head**-0.5
        channel = layer.intermediate.dense.weight.norm(dim=1) * layer.output.dense.weight.norm(
            dim=0
        )
        channels = torch.sort(torch.topk(channel, ffn).indices).values
        layer.intermediate.dense = slice_linear(layer.intermediate.dense, channels, keep)
        layer.output.dense = slice_linear(layer.output.dense, keep, channels)
        layer.output.LayerNorm = _narrow_norm(layer.output.LayerNorm, keep)
    pooler = getattr(encoder, "pooler", None)
    if pooler is not None and isinstance(getattr(pooler, "dense", None), nn.Linear):
        pooler.dense = slice_linear(pooler.dense, keep, keep)
    _narrow_head(model, keep)
    config.hidden_size, config.intermediate_size = hidden, ffn


def _narrow_embeddings(embeddings: nn.Module, keep: torch.Tensor) -> None:
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        table = getattr(embeddings, name, None)
        if table is None:
            continue
        new = nn.Embedding(table.num_embeddings, len(keep), padding_idx=table.padding_idx)
        with torch.no_grad():
            new.weight.copy_(table.weight.detach()[:, keep])
        setattr(embeddings, name, new)
    embeddings.LayerNorm = _narrow_norm(embeddings.LayerNorm, keep)


def _narrow_norm(norm: nn.LayerNorm, keep: torch.Tensor) -> nn.LayerNorm:
    new = nn.LayerNorm(len(keep), eps=norm.eps)
    with torch.no_grad():
        new.weight.copy_(norm.weight.detach()[keep])
        new.bias.copy_(norm.bias.detach()[keep])
    return new


def _narrow_head(model: nn.Module, keep: torch.Tensor) -> None:
    head = model.head
    if isinstance(head, nn.Linear):  # cross-encoder linear head
        model.head = slice_linear(head, columns=keep)
    elif isinstance(head, nn.Sequential):  # mlp head: hidden -> h -> (1 | hidden)
        first, last = head[0], head[-1]
        head[0] = slice_linear(first, columns=keep)
        if last.out_features == first.in_features:  # bi-encoder residual projection
            head[-1] = slice_linear(last, rows=keep)


def clone(model: nn.Module) -> nn.Module:
    """An independent copy of a model (weights and config)."""
    out = copy.deepcopy(model)
    if hasattr(out, "encoder"):
        out.encoder.config = copy.deepcopy(model.encoder.config)
    return out
