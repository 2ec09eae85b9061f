"""Distillation losses and the teacher's scores.

``mse``: mean squared error between student and teacher logits (the teacher's scores as
regression targets). ``kl``: pointwise binary KL between temperature-softened click/
relevance probabilities. ``listwise-kl``: KL between softmax distributions over a list —
each user's candidates (bi-encoder: the user's row of the in-batch score matrix) or the
micro-batch's (query, item) pairs (cross-encoder) — so the student learns the teacher's
ordering. KL losses are scaled by T² (Hinton et al.) and are exactly zero when the
student's logits equal the teacher's.

Entries masked out of a softmax — the sequential recommender fills the scores of items
training never saw with the dtype's minimum — take no part: a logit at or below
:data:`MASKED_LOGIT` in either model's scores (or outside an explicit ``valid`` mask) adds
nothing to any loss, and neither it nor its gradient can become inf or NaN.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..batches import Batcher, Shard

LOSSES = ("mse", "kl", "listwise-kl")

#: Logits at or below this are masked entries (a dtype's minimum), never real scores.
MASKED_LOGIT = -1e30


def distillation_loss(
    kind: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of ``student`` logits against ``teacher`` logits (same shape), in fp32.

    ``valid`` (bool, broadcastable to the logits): the entries that take part; masked
    entries (see the module docstring) are left out in any case."""
    s, t = student.float(), teacher.detach().float()
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    if kind not in LOSSES:
        raise ValueError(f"distillation loss {kind!r}: expected one of {', '.join(LOSSES)}")
    keep = (s > MASKED_LOGIT) & (t > MASKED_LOGIT)
    if valid is not None:
        keep = keep & valid.to(torch.bool).expand_as(keep)
    if not bool(keep.all()):
        return _masked_loss(kind, s, t, temperature, keep)
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
    raise AssertionError(kind)


def _masked_loss(
    kind: str, s: torch.Tensor, t: torch.Tensor, temperature: float, keep: torch.Tensor
) -> torch.Tensor:
    """:func:`distillation_loss` over the ``keep`` entries only: masked values are replaced
    before any arithmetic (so no inf/NaN reaches the loss or its gradient) and the means
    are over the kept entries (``listwise-kl``: over the rows that keep any)."""
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s, t = torch.where(keep, s, zero), torch.where(keep, t, zero)
    kept = keep.sum().clamp(min=1)
    if kind == "mse":
        return ((s - t) ** 2 * keep).sum() / kept
    if kind == "kl":
        target = torch.sigmoid(t / temperature)
        terms = F.binary_cross_entropy_with_logits(
            s / temperature, target, reduction="none"
        ) - F.binary_cross_entropy_with_logits(t / temperature, target, reduction="none")
        return (terms * keep).sum() / kept * temperature**2
    s2, t2, k2 = (x.unsqueeze(0) for x in (s, t, keep)) if s.dim() == 1 else (s, t, keep)
    rows = k2.any(-1)
    s2, t2, k2 = s2[rows], t2[rows], k2[rows]
    low = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    log_s = F.log_softmax(torch.where(k2, s2 / temperature, low), dim=-1)
    log_t = F.log_softmax(torch.where(k2, t2 / temperature, low), dim=-1)
    terms = torch.where(k2, log_t.exp() * (log_t - log_s), zero)
    return terms.sum() / max(1, int(rows.sum())) * temperature**2


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
