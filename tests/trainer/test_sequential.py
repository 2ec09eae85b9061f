"""The sequential recommender's model and batches, in process (no DeepSpeed): order
awareness, padding, unseen items, the batches' contract and that it learns."""

from __future__ import annotations

import types
from dataclasses import asdict

import numpy as np
import polars as pl
import pytest
import torch

from recjob_trainer.objective import loss_fn
from recjob_trainer.sequence_data import (
    SequenceBatcher,
    length_bucketed_order,
    seen_items,
    sequence_scores,
)
from recjob_trainer.sequential import SequenceShape, SequentialRecommender

ITEMS = 12


def model(**shape) -> SequentialRecommender:
    torch.manual_seed(0)
    values = {"items": ITEMS, "text_dim": 8, "hidden": 16, "heads": 2, "max_history": 6}
    info = types.SimpleNamespace(
        kind="sequential", extra={"sequential": asdict(SequenceShape(**{**values, **shape}))}
    )
    m = SequentialRecommender(None, info)
    m.set_catalog_text(torch.randn(ITEMS, 8), torch.ones(ITEMS))
    return m.eval()


def catalog() -> pl.DataFrame:
    ids = [f"i{n}" for n in range(ITEMS)]
    return pl.DataFrame({"item_id": ids, "item_text": [f"item {n}" for n in range(ITEMS)]})


class Tokenizer:
    """Enough of a tokenizer for the batcher: one token per word."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        width = max(len(t.split()) for t in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.long)
        for n, text in enumerate(texts):
            words = text.split()
            ids[n, : len(words)] = torch.tensor([len(w) for w in words])
            mask[n, : len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def batcher(**shape) -> SequenceBatcher:
    info = types.SimpleNamespace(
        max_length=16,
        extra={
            "sequential": asdict(SequenceShape(items=ITEMS, text_dim=8, max_history=4, **shape))
        },
    )
    return SequenceBatcher(Tokenizer(), info, catalog())


def test_the_user_vector_depends_on_the_order_of_the_history() -> None:
    m = model()
    table = m.catalog_vectors()
    forward = m.user_vectors_from(torch.tensor([[1, 2, 3]]), table)
    backward = m.user_vectors_from(torch.tensor([[3, 2, 1]]), table)
    assert not torch.allclose(forward, backward, atol=1e-4)


def test_left_padding_does_not_change_a_user() -> None:
    m = model()
    table = m.catalog_vectors()
    alone = m.user_vectors_from(torch.tensor([[4, 5]]), table)
    padded = m.user_vectors_from(torch.tensor([[0, 0, 0, 4, 5], [1, 2, 3, 4, 5]]), table)
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert not torch.isnan(m.user_vectors_from(torch.tensor([[0, 0]]), table)).any()


def test_unseen_items_rank_by_their_text_alone() -> None:
    m = model()
    with torch.no_grad():
        m.item_embedding.weight.normal_()
    seen = torch.ones(ITEMS)
    seen[3] = 0  # item index 4
    m.set_catalog_text(m.item_text[1:].clone(), seen)
    index = torch.tensor([4, 5])
    text_only = m.text_projection(m.item_text[index] - m.text_mean)
    vectors = m.item_vectors_of(index)
    assert torch.allclose(vectors[0], text_only[0], atol=1e-6)
    assert not torch.allclose(vectors[1], text_only[1], atol=1e-3)


def test_catalog_batches_are_full_softmax_over_the_catalog() -> None:
    b = batcher()
    rows = pl.DataFrame({"history": [["i1", "i2", "unknown"], []], "item_id": ["i3", "i0"]})
    batch = b.sequence_batch(rows, None)
    assert batch["history"].tolist() == [[2, 3], [0, 0]]
    assert batch["candidates"].tolist() == list(range(1, ITEMS + 1))
    assert batch["labels"].tolist() == [3, 0]


def test_sampled_batches_hold_history_targets_and_negatives() -> None:
    b = batcher(negatives="sampled", text_frozen=False)
    rows = pl.DataFrame({"history": [["i1", "i2"], ["i5"]], "item_id": ["i3", "i0"]})
    batch = b.sequence_batch(rows, [["i7"], ["i8"]])
    candidates = batch["candidates"].tolist()
    assert set(candidates) == {2, 3, 4, 1, 6, 8, 9}
    assert [candidates[n] for n in batch["labels"].tolist()] == [4, 1]
    assert batch["candidate_input_ids"].shape[0] == len(candidates)
    m = model(text_frozen=False, negatives="sampled")
    m.encode_texts = lambda ids, mask: torch.randn(ids.shape[0], 8)  # no BERT needed here
    batch.pop("labels")
    assert m(**batch).shape == (2, len(candidates))


def test_histories_keep_the_most_recent_items() -> None:
    b = batcher()
    assert b.history_indices(["i0", "i1", "i2", "i3", "i4", "i5"]) == [3, 4, 5, 6]


def test_length_bucketed_order_is_a_seeded_permutation_of_similar_lengths() -> None:
    lengths = np.random.default_rng(0).integers(1, 50, size=1000)
    order = np.random.default_rng(1).permutation(1000)
    out = length_bucketed_order(lengths, order, 10, [3, 0])
    assert sorted(out.tolist()) == list(range(1000))
    assert (out == length_bucketed_order(lengths, order, 10, [3, 0])).all()
    spread = [np.ptp(lengths[out[i : i + 10]]) for i in range(0, 1000, 10)]
    assert np.mean(spread) < 5  # random batches of 10 spread over ~40
    assert not (out == length_bucketed_order(lengths, order, 10, [3, 1])).all()


def test_seen_items_come_from_histories_and_targets() -> None:
    train = pl.DataFrame({"history": [["i1", "i2"], ["zz"]], "item_id": ["i3", "i5"]})
    assert torch.nonzero(seen_items(train, batcher())).flatten().tolist() == [1, 2, 3, 5]


def test_it_learns_what_comes_next() -> None:
    """A catalog where item n is always followed by item n + 1: a few hundred steps rank
    the next item first for most histories."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (200 s vs 12 s)
    try:
        _learn_what_comes_next()
    finally:
        torch.set_num_threads(threads)


def _learn_what_comes_next() -> None:
    torch.manual_seed(0)
    m = model(dropout=0.0).train()
    optimizer = torch.optim.Adam(m.parameters(), lr=3e-3)
    info = types.SimpleNamespace(kind="sequential")
    starts = torch.arange(1, ITEMS - 2)
    history = torch.stack([starts, starts + 1], dim=1)
    targets = starts + 2
    candidates = torch.arange(1, ITEMS + 1)
    for _ in range(200):
        loss = loss_fn(info, m(history, candidates), targets - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    m.eval()
    b = batcher()
    frame = pl.DataFrame(
        {
            "history": [[f"i{n - 1}", f"i{n}"] for n in starts.tolist()],
            "item_id": [f"i{n + 1}" for n in starts.tolist()],
        }
    )
    scores = sequence_scores(m, b, frame, b.catalog_ids, 4)
    top = scores.argmax(1)
    assert (top == (starts + 1).numpy()).mean() >= 0.8


@pytest.mark.parametrize("bad", [{"hidden": 10, "heads": 3}])
def test_heads_must_divide_the_width(bad) -> None:
    with pytest.raises((AssertionError, ValueError, RuntimeError)):
        model(**bad)


def test_training_leaves_items_never_seen_out_of_the_softmax() -> None:
    m = model()
    seen = torch.ones(ITEMS)
    seen[[2, 7]] = 0  # indices 3 and 8
    m.set_catalog_text(m.item_text[1:].clone(), seen)
    candidates = torch.arange(1, ITEMS + 1)
    m.train()
    scores = m(torch.tensor([[1, 2]]), candidates)
    assert (scores[0, [2, 7]] == torch.finfo(scores.dtype).min).all()
    assert (scores[0, [0, 1, 3]] > -1e6).all()
    m.eval()  # at evaluation and serving they rank by their text
    assert (m(torch.tensor([[1, 2]]), candidates)[0, [2, 7]] > -1e6).all()


def test_cosine_scores_are_bounded_by_the_temperature() -> None:
    m = model(temperature=0.1)
    table = m.catalog_vectors()
    assert torch.allclose(table[1:].norm(dim=-1), torch.ones(ITEMS), atol=1e-5)
    users = m.user_vectors_from(torch.tensor([[1, 2, 3], [0, 4, 5]]), table)
    assert torch.allclose(users.norm(dim=-1), torch.full((2,), 10.0), atol=1e-4)
    assert (users @ table[1:].T).abs().max() <= 10.0 + 1e-4
