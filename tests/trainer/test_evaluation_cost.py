"""Evaluation whose cost follows the work: each distinct text encoded once, in batches of
similar length; validation's encoding shared between ranks; progress with an ETA; the
full-catalog and sampled rankings as array arithmetic, equal to the per-user definition
(metrics.rank_of_target: ties count against the true item)."""

from __future__ import annotations

import os
import socket

import numpy as np
import polars as pl
import pytest
import torch
import torch.multiprocessing as mp

from recjob_trainer import metrics as m
from recjob_trainer.evaluation import PER_UNIT, evaluating, ranking_part, target_ranks
from recjob_trainer.evaluation.encoding import _batched


def reference_ranking_part(scores, item_ids, frame, negatives, ks, full) -> dict:
    """The per-user loops ranking_part used to run (before 2026-12), for comparison."""
    index = {item: n for n, item in enumerate(item_ids)}
    targets = [index[i] for i in frame["item_id"].to_list()]
    report = {}
    if full:
        ranks = [m.rank_of_target(scores[u], t) for u, t in enumerate(targets)]
        report.update({f"full/{k}": v for k, v in m.target_rank_report(ranks, ks).items()})
        r = np.asarray(ranks, dtype=np.float64)
        report[PER_UNIT] = np.where(r < 10, 1.0 / np.log2(r + 2), 0.0).tolist()
    sampled, pos, neg = [], [], []
    for u, (target, negs) in enumerate(zip(targets, negatives, strict=True)):
        candidate = scores[u, [target, *(index[i] for i in negs)]]
        sampled.append(m.rank_of_target(candidate, 0))
        pos.append(candidate[0])
        neg.extend(candidate[1:].tolist())
    report.update({f"sampled/{k}": v for k, v in m.target_rank_report(sampled, ks).items()})
    report["auc"] = m.auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    return report


@pytest.mark.parametrize("popularity_like", [False, True])
def test_array_ranking_equals_the_per_user_definition(popularity_like: bool) -> None:
    rng = np.random.default_rng(3)
    users, items = 2500, 300  # more users than one RANK_CHUNK
    ids = [f"i{n}" for n in range(items)]
    if popularity_like:  # one row for every user, as a read-only broadcast view
        scores = np.broadcast_to(rng.integers(0, 20, items).astype(np.float32), (users, items))
    else:  # few distinct values: many ties, which must count against the true item
        scores = rng.integers(0, 6, (users, items)).astype(np.float32)
    frame = pl.DataFrame({"item_id": [ids[t] for t in rng.integers(0, items, users)]})
    negatives = [  # ragged: some rows have fewer negatives
        [ids[j] for j in rng.choice(items, int(rng.integers(0, 12)), replace=False)]
        for _ in range(users)
    ]
    for full in (True, False):
        ours = ranking_part(scores, ids, frame, negatives, [1, 5, 10], full)
        assert ours == reference_ranking_part(scores, ids, frame, negatives, [1, 5, 10], full)
    targets = np.asarray([ids.index(i) for i in frame["item_id"]])
    expected = [m.rank_of_target(scores[u], t) for u, t in enumerate(targets)]
    assert target_ranks(scores, targets).tolist() == expected


class Encoder:
    """A stand-in model forward: records what it was asked to encode."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, chunk: list[str]) -> torch.Tensor:
        self.calls.append(list(chunk))
        return torch.tensor([[len(t), sum(map(ord, t))] for t in chunk], dtype=torch.float32)


TEXTS = [f"item {'x' * (k % 17)} {k}" for k in (n % 40 for n in range(100))]  # 40 distinct


def test_each_distinct_text_once_in_length_batches_with_progress() -> None:
    encoder, events = Encoder(), []
    with evaluating("test", lambda kind, **f: events.append((kind, f)), interval=0.0):
        out = _batched(encoder, TEXTS, 8)
    assert out.tolist() == encoder(TEXTS).tolist()  # in the caller's order, repeats too
    encoded = [t for call in encoder.calls[:-1] for t in call]
    assert sorted(encoded) == sorted(set(TEXTS))  # each distinct text once
    assert [len(t) for t in encoded] == sorted(len(t) for t in encoded)  # little padding
    assert [f["done"] for _, f in events] == [8, 16, 24, 32, 40]
    assert all(k == "evaluate" and f["total"] == 40 and f["unit"] == "texts" for k, f in events)
    assert events[0][1]["phase"] == "test, pass 1" and events[-1][1]["eta_seconds"] == 0
    assert _batched(encoder, [], 8).size == 0


def _rank(rank: int, world: int, port: int, results) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        encoder = Encoder()
        with evaluating("validation", spread=True):
            out = _batched(encoder, TEXTS[:90], 8)  # 40 distinct: 5 batches on 2 ranks
        results[rank] = (out.tolist(), encoder.calls)
    finally:
        torch.distributed.destroy_process_group()


def test_validation_shares_the_encoding_between_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_rank, args=(2, port, results), nprocs=2)
    expected = Encoder()(TEXTS[:90]).tolist()
    assert results[0][0] == results[1][0] == expected  # every rank has every vector
    calls = [results[0][1], results[1][1]]
    assert len(calls[0]) == len(calls[1]) == 3  # the same number of forwards (ZeRO-3)
    assert calls[1][-1] == [calls[1][-1][0]]  # rank 1 had 2 batches: a 1-text filler
    shared = [t for call in calls[0] + calls[1][:-1] for t in call]
    assert sorted(shared) == sorted(set(TEXTS[:90]))  # each distinct text on one rank only


class TextModel(torch.nn.Module):
    """A bi-encoder stand-in: a text's 'vector' is made from its characters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def item_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return torch.stack([input_ids.sum(1).float(), attention_mask.sum(1).float()], 1)


class TextBatcher:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def texts_batch(self, texts: list[str], prefix: str) -> dict[str, torch.Tensor]:
        self.seen += texts
        width = max(map(len, texts))
        ids = torch.tensor([[ord(c) for c in t] + [0] * (width - len(t)) for t in texts])
        return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": (ids > 0).long()}


def test_an_evaluation_encodes_each_text_once_per_model() -> None:
    from recjob_trainer.evaluation import text_vectors

    model, other, batcher = TextModel(), TextModel(), TextBatcher()
    catalog, histories = TEXTS[:30], TEXTS[20:60]
    alone = text_vectors(model, batcher, catalog, 8)
    with evaluating("test"):
        assert (text_vectors(model, batcher, catalog, 8) == alone).all()
        again = text_vectors(model, batcher, histories + catalog, 8)  # the cold-start pass
        text_vectors(other, batcher, catalog[:5], 8)  # another model: its own vectors
    assert (again == text_vectors(model, batcher, histories + catalog, 8)).all()
    encoded_within = batcher.seen[len(set(catalog)) : -len(set(histories + catalog))]
    once = [*set(catalog) | set(histories), *catalog[:5]]  # each text once per model
    assert sorted(encoded_within) == sorted(once)


def test_average_ranks_as_arrays_equal_the_tie_group_loop() -> None:
    from recjob_trainer.metrics import _average_ranks

    def loop(x: np.ndarray) -> np.ndarray:  # what metrics._average_ranks did before 2026-12
        order = np.argsort(x, kind="mergesort")
        ranks = np.empty(len(x), dtype=np.float64)
        boundaries = np.flatnonzero(np.diff(x[order])) + 1
        starts, ends = np.r_[0, boundaries], np.r_[boundaries, len(x)]
        for a, b in zip(starts, ends, strict=True):
            ranks[order[a:b]] = (a + b - 1) / 2.0
        return ranks

    rng = np.random.default_rng(5)
    for x in (
        rng.integers(0, 7, 5000).astype(float),  # many ties
        rng.standard_normal(5000),
        np.r_[rng.integers(0, 3, 50).astype(float), np.nan, np.nan],
        np.zeros(0),
        np.ones(1),
    ):
        assert np.array_equal(_average_ranks(x), loop(x), equal_nan=True)
