"""Distillation losses and the teacher's scores.

``mse``: mean squared error between student and teacher logits (the teacher's scores as
regression targets). ``kl``: pointwise binary KL between temperature-softened click/
relevance probabilities. ``listwise-kl``: KL between softmax distributions over a list —
each user's candidates (bi-encoder: the user's row of the in-batch score matrix) or the
micro-batch's (query, item) pairs (cross-encoder) — so the student learns the teacher's
ordering. KL losses are scaled by T² (Hinton et al.) and are exactly zero when the
student's logits equal the teacher's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..batches import Batcher, Shard

LOSSES = ("mse", "kl", "listwise-kl")


def distillation_loss(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Loss of ``student`` logits against ``teacher`` logits (same shape), in fp32."""
    s, t = student.float(), teacher.detach().float()
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "kl":  # binary KL(teacher || student) per logit, softened by T
        target = torch.sigmoid(t / temperature)
        kl = F.binary_cross_entropy_with_logits(
            s / temperature, target
        ) - F.binary_cross_entropy_with_logits(t / temperature, target)
        return kl * temperature**2
    if kind == "listwise-kl":  # over each row (bi-encoder) or the whole batch (1-d)
        s2, t2 = (s.unsqueeze(0), t.unsqueeze(0)) if s.dim() == 1 else (s, t)
        kl = F.kl_div(
            F.log_softmax(s2 / temperature, dim=-1),
            F.log_softmax(t2 / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return kl * temperature**2
    raise ValueError(f"distillation loss {kind!r}: expected one of {', '.join(LOSSES)}")


def hidden_state_loss(
    student: tuple, teacher: tuple, mask: torch.Tensor, layer_map: list[int]
) -> torch.Tensor:
    """Mean squared error between the student's hidden states and the teacher layers they
    were taken from (embeddings to embeddings, student layer m to teacher layer
    ``layer_map[m]``), over real tokens only."""
    if len(student) != len(layer_map) + 1:
        raise ValueError(f"{len(student) - 1} student layers, layer map of {len(layer_map)}")
    pairs = [(0, 0), *((m + 1, t + 1) for m, t in enumerate(layer_map))]
    weight = mask.unsqueeze(-1).float()
    tokens = weight.sum() * student[0].shape[-1]
    total = sum(
        (((student[a].float() - teacher[b].detach().float()) ** 2) * weight).sum() / tokens
        for a, b in pairs
    )
    return total / len(pairs)


class TeacherScores:
    """The teacher's logits for training micro-batches.

    Cross-encoder logits depend only on the (query, item) row, so when a stage reads at
    least as many rows as the shard holds they are computed once, for the whole shard in
    fixed chunks, and looked up by row index; otherwise (and for the bi-encoder's
    in-batch score matrix, which depends on the batch) per micro-batch. Both are
    deterministic, so a resumed run sees the same targets."""

    def __init__(self, teacher: torch.nn.Module, cache: torch.Tensor | None = None):
        self.teacher = teacher.eval()
        self.cache = cache

    @classmethod
    def for_shard(
        cls,
        teacher: torch.nn.Module,
        shard: Shard,
        batcher: Batcher,
        rows_read: int,
        batch_size: int,
        hidden_states: bool,
        event: Callable[..., None] | None = None,
    ) -> TeacherScores:
        """Teacher scores, precomputed when that is cheaper (see the class docstring)."""
        if batcher.task != "search-ranking" or hidden_states or rows_read < shard.rows.height:
            return cls(teacher)
        started, chunks = time.time(), []
        with torch.no_grad():
            for start in range(0, shard.rows.height, batch_size):
                batch = batcher.search_batch(shard.rows[start : start + batch_size])
                batch.pop("labels")
                chunks.append(teacher(**batch).float())
        cache = torch.cat(chunks)
        if event is not None:
            event("teacher-cache", rows=int(cache.numel()), seconds=time.time() - started)
        return cls(teacher, cache)

    def __call__(self, index: list[int], batch: dict[str, torch.Tensor], hidden_states: bool):
        """Teacher logits for a micro-batch of shard rows ``index`` (and its hidden states
        when asked)."""
        if self.cache is not None and not hidden_states:
            return self.cache[np.asarray(index)], None
        with torch.no_grad():
            out = self.teacher(output_hidden_states=hidden_states, **batch)
        return out if hidden_states else (out, None)
