"""Encoding passes of an evaluation: each distinct text or pair encoded once, in batches
of similar length; within :func:`evaluating`, progress events with an ETA, vectors kept
for later passes and (``spread``) the work shared between ranks."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from ..batches import Batcher
from ..models import RankingModel


@dataclass
class _Evaluation:
    phase: str
    emit: Callable[..., None] | None
    spread: bool
    interval: float
    passes: int = 0
    vectors: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    """model -> {(batcher id, text): unit vector}: what this evaluation already encoded."""


_EVALUATION: ContextVar[_Evaluation | None] = ContextVar("recjob_evaluation", default=None)


@contextmanager
def evaluating(
    phase: str,
    emit: Callable[..., None] | None = None,
    *,
    spread: bool = False,
    interval: float = 10.0,
) -> Iterator[None]:
    """Within: every encoding pass reports ``emit("evaluate", phase=..., done=..., total=...,
    unit=..., elapsed_seconds=..., eta_seconds=...)`` every ``interval`` seconds and when
    it ends; a model's text vectors are kept, so a later pass (the cold-start rows, a
    baseline on another split) encodes only texts it has not seen; with ``spread`` (only
    where every rank of the process group evaluates the same rows, as validation does)
    the ranks share the encoding and all-gather it. The model must not change within."""
    token = _EVALUATION.set(_Evaluation(phase, emit, spread, interval))
    try:
        yield
    finally:
        _EVALUATION.reset(token)


def report_evaluation(phase: str, emit: Callable[..., None], interval: float = 10.0) -> None:
    """As :func:`evaluating` (without sharing) for the rest of this context: the end of
    a run, where rank 0 evaluates alone until the process exits."""
    _EVALUATION.set(_Evaluation(phase, emit, False, interval))


def _characters(items: list) -> list[int]:
    return [sum(map(len, i)) if isinstance(i, tuple) else len(i) for i in items]


def _token_lengths(batcher: Batcher, items: list) -> list[int]:
    """Tokens each text (or query-item pair) will take (characters where the batcher
    has no tokenizer): what orders them into batches of similar length."""
    tokenizer = getattr(batcher, "tokenizer", None)
    if tokenizer is None or not items:
        return _characters(items)
    pairs = isinstance(items[0], tuple)
    left = [i[0] for i in items] if pairs else items
    right = [i[1] for i in items] if pairs else None
    encoded = tokenizer(left, right, truncation=True, max_length=batcher.max_length)
    return [len(ids) for ids in encoded["input_ids"]]


@torch.no_grad()
def _batched(fn, items: list, batch_size: int, unit: str = "texts", lengths=None) -> np.ndarray:
    """``fn`` (a model forward over a list of items) over ``items``, as one array in the
    items' order. Each distinct item is computed once, batched with items of similar
    length (``lengths(distinct items)``, default characters); see :func:`evaluating` for
    progress and sharing the work between ranks.

    Shared, every rank runs the same number of forwards (a rank out of work runs one on
    a single item: ZeRO-3 gathers parameters collectively in each forward), then the
    ranks exchange their rows with one all_gather."""
    if not items:
        return np.zeros(0)
    unique = list(dict.fromkeys(items))
    size = (lengths or _characters)(unique)
    order = sorted(range(len(unique)), key=size.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    context = _EVALUATION.get()
    shared = context is not None and context.spread and dist.is_initialized()
    world = dist.get_world_size() if shared else 1
    rank = dist.get_rank() if shared else 0
    rounds = -(-len(batches) // world)
    started = last = time.time()
    if context is not None:
        context.passes += 1
    local, done, total = [], 0, len(unique)
    for n in range(rounds):
        if n * world + rank < len(batches):
            local.append(fn([unique[i] for i in batches[n * world + rank]]).float().cpu())
        else:  # out of work: join the collective forwards with a throwaway one
            shape = fn([unique[order[0]]]).float().cpu().shape[1:]
        done += sum(len(b) for b in batches[n * world : (n + 1) * world])  # all ranks'
        if context is not None and context.emit is not None:
            now = time.time()
            if done == total or now - last >= context.interval:
                elapsed, last = now - started, now
                eta = elapsed / done * (total - done)
                context.emit(
                    "evaluate",
                    phase=f"{context.phase}, pass {context.passes}",
                    done=done,
                    total=total,
                    unit=unit,
                    elapsed_seconds=round(elapsed, 1),
                    eta_seconds=round(eta, 1),
                )
    if local:
        shape = local[0].shape[1:]
    rows = torch.cat(local) if local else torch.zeros((0, *shape))
    if world == 1:
        values = rows.numpy()
        placed = [i for b in batches for i in b]
    else:
        counts = [sum(len(b) for b in batches[r::world]) for r in range(world)]
        padded = torch.zeros((max(counts), *shape))
        padded[: len(rows)] = rows
        if dist.get_backend() == "nccl":
            padded = padded.cuda()
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        values = torch.cat([g[:c].cpu() for g, c in zip(gathered, counts, strict=True)]).numpy()
        placed = [i for r in range(world) for b in batches[r::world] for i in b]
    out = np.empty_like(values)
    out[placed] = values
    position = {item: n for n, item in enumerate(unique)}
    return out[[position[item] for item in items]]


def cross_encoder_logits(
    model: RankingModel, batcher: Batcher, frame: pl.DataFrame, batch_size: int
) -> np.ndarray:
    """Logit of every (query, item) row."""
    pairs = list(zip(frame["query"].to_list(), frame["item_text"].to_list(), strict=True))
    device = next(model.parameters()).device

    def fn(chunk):
        batch = batcher.pairs([q for q, _ in chunk], [t for _, t in chunk])
        return model.score_pairs(**{k: v.to(device) for k, v in batch.items()})

    return _batched(fn, pairs, batch_size, "pairs", lambda p: _token_lengths(batcher, p))


def text_vectors(
    model: RankingModel, batcher: Batcher, texts: list[str], batch_size: int
) -> np.ndarray:
    """Unit embeddings of texts (bi-encoder, or the zero-shot pretrained encoder); within
    :func:`evaluating`, each text is encoded once per model for the whole evaluation."""
    device = next(model.parameters()).device

    def fn(chunk):
        batch = batcher.texts_batch(chunk, "")
        return model.item_vectors(batch["input_ids"].to(device), batch["attention_mask"].to(device))

    def lengths(chunk):
        return _token_lengths(batcher, chunk)

    context = _EVALUATION.get()
    if context is None or not texts:
        return _batched(fn, texts, batch_size, "texts", lengths)
    known = context.vectors.setdefault(model, {})
    key = id(batcher)
    missing = [t for t in dict.fromkeys(texts) if (key, t) not in known]
    if missing:
        vectors = _batched(fn, missing, batch_size, "texts", lengths)
        known.update(zip([(key, t) for t in missing], vectors, strict=True))
    return np.stack([known[key, t] for t in texts])
