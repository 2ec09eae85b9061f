"""Batches and catalog facts for the sequential recommender (:mod:`.sequential`).

A user's history becomes a left-padded row of item indices (most recent last, at most
``max_history`` of them); a training batch holds those rows, the candidate items of the
softmax and, per row, the position of the true next item among the candidates. The
candidates are the whole catalog (``negatives: catalog``) or the batch's own items plus
sampled negatives (``negatives: sampled``; then their texts come tokenized, since the
text encoder trains).

Rows are batched by similar history length (:func:`length_bucketed_order`): histories are
short on average and a batch is padded to its longest one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .sequential import SequenceShape, SequentialRecommender

#: Rows sorted by history length inside windows of this many micro-batches.
BUCKET_WINDOW = 32


class SequenceBatcher:
    """Builds the sequential recommender's batches (the :class:`~.batches.Batcher` of that
    architecture: same ``task``, ``texts`` and ``catalog_ids``)."""

    task = "recommendation"

    def __init__(self, tokenizer, info, catalog: pl.DataFrame):
        self.tokenizer, self.max_length = tokenizer, info.max_length
        self.shape = SequenceShape.from_dict(info.extra["sequential"])
        self.catalog_ids: list[str] = catalog["item_id"].to_list()
        self.texts: dict[str, str] = dict(
            zip(self.catalog_ids, catalog["item_text"].to_list(), strict=True)
        )
        self.index = {item: n + 1 for n, item in enumerate(self.catalog_ids)}
        self.history_encoding = "sequence"

    # ------------------------------------------------------------------ histories
    def history_indices(self, history: list[str]) -> list[int]:
        """The most recent ``max_history`` known items of a history, oldest first."""
        known = [self.index[i] for i in history if i in self.index]
        return known[-self.shape.max_history :]

    def histories(self, histories: list[list[str]]) -> torch.Tensor:
        """(B, L) left-padded item indices, L the longest history of the batch (>= 1)."""
        rows = [self.history_indices(h) for h in histories]
        width = max(1, max((len(r) for r in rows), default=1))
        out = np.zeros((len(rows), width), dtype=np.int64)
        for n, row in enumerate(rows):
            if row:
                out[n, width - len(row) :] = row
        return torch.from_numpy(out)

    def item_tokens(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokenized texts of items (global indices >= 1)."""
        texts = [self.texts[self.catalog_ids[i - 1]] for i in indices.tolist()]
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    # ------------------------------------------------------------------ training
    def sequence_batch(
        self, rows: pl.DataFrame, negatives: list[list[str]] | None
    ) -> dict[str, torch.Tensor]:
        """A training batch: histories, candidates and each row's true item's position.

        Without ``negatives`` the candidates are the whole catalog; with them, the batch's
        history and true items plus the negatives (in-batch and sampled), tokenized."""
        history = self.histories(rows["history"].to_list())
        targets = torch.tensor([self.index[i] for i in rows["item_id"].to_list()])
        if negatives is None:
            return {
                "history": history,
                "candidates": torch.arange(1, len(self.catalog_ids) + 1),
                "labels": targets - 1,
            }
        sampled = torch.tensor(
            [self.index[i] for row in negatives for i in row if i in self.index], dtype=torch.long
        )
        candidates, inverse = torch.unique(
            torch.cat([targets, history[history > 0], sampled]), return_inverse=True
        )
        batch = {"history": history, "candidates": candidates, "labels": inverse[: len(targets)]}
        tokens = self.item_tokens(candidates)
        batch["candidate_input_ids"] = tokens["input_ids"]
        batch["candidate_attention_mask"] = tokens["attention_mask"]
        return batch


def length_bucketed_order(
    lengths: np.ndarray, order: np.ndarray, batch_size: int, seed: list[int]
) -> np.ndarray:
    """``order`` (an epoch's permutation) regrouped so each micro-batch holds rows of
    similar history length: rows are sorted by length inside windows of
    :data:`BUCKET_WINDOW` micro-batches, then the full micro-batches are shuffled (seeded
    by ``seed``). A pure function of its inputs, so a resumed run sees the same batches."""
    window = batch_size * BUCKET_WINDOW
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rest = [b for b in batches if len(b) != batch_size]  # at most one, last: never used
    shuffled = [full[i] for i in np.random.default_rng(seed).permutation(len(full))]
    return np.concatenate([*shuffled, *rest]) if batches else order


# ---------------------------------------------------------------------------- catalog
@torch.no_grad()
def encode_catalog(
    model: SequentialRecommender, batcher: SequenceBatcher, batch_size: int = 64, progress=None
) -> torch.Tensor:
    """(items, text_dim) mean-pooled text embeddings of the whole catalog, in catalog
    order, with progress events (``encode-catalog``) every ~10 s."""
    was_training = model.training
    model.eval()
    n, out, last = len(batcher.catalog_ids), [], time.time()
    try:
        for start in range(0, n, batch_size):
            index = torch.arange(start + 1, min(n, start + batch_size) + 1)
            tokens = batcher.item_tokens(index)
            out.append(model.encode_texts(tokens["input_ids"], tokens["attention_mask"]).float())
            if progress is not None and (time.time() - last > 10 or start + batch_size >= n):
                progress.event("encode-catalog", done=min(n, start + batch_size), total=n)
                last = time.time()
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.shape.text_dim)


def seen_items(train: pl.DataFrame, batcher: SequenceBatcher) -> torch.Tensor:
    """(items,) 1 for catalog items in the training rows (histories or targets)."""
    seen = torch.zeros(len(batcher.catalog_ids))
    items = pl.concat([train["item_id"], train["history"].explode()]).drop_nulls().unique()
    index = [batcher.index[i] - 1 for i in items.to_list() if i in batcher.index]
    if index:
        seen[torch.tensor(index)] = 1.0
    return seen


def cache_catalog(
    model: SequentialRecommender,
    batcher: SequenceBatcher,
    seen: torch.Tensor,
    cache: Path,
    progress=None,
) -> None:
    """Rank 0: encode the catalog's texts once and write them, with the seen-in-training
    mask, to ``cache`` (kept for a resumed run); every rank then :func:`load_catalog`."""
    from safetensors.torch import save_file

    if cache.exists():
        return
    text = encode_catalog(model, batcher, progress=progress)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file({"text": text.contiguous(), "seen": seen.contiguous()}, str(tmp))
    tmp.replace(cache)


def load_catalog(model: SequentialRecommender, cache: Path) -> None:
    """Install what :func:`install_catalog` cached."""
    from safetensors.torch import load_file

    saved = load_file(str(cache))
    model.set_catalog_text(saved["text"], saved["seen"])


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def catalog_table(model: SequentialRecommender, batcher: SequenceBatcher) -> torch.Tensor:
    """(items + 1, hidden) vectors of the whole catalog: from the stored text embeddings,
    or (text side trained) from the texts encoded by the model's current encoder."""
    if model.shape.text_frozen:
        return model.catalog_vectors()
    text = encode_catalog(model, batcher)
    index = torch.arange(1, len(batcher.catalog_ids) + 1)
    vectors = model.item_vectors_of(index, text.to(model.item_text.dtype))
    return torch.cat([torch.zeros_like(vectors[:1]), vectors])


@torch.no_grad()
def sequence_scores(
    model: SequentialRecommender,
    batcher: SequenceBatcher,
    frame: pl.DataFrame,
    item_ids: list[str],
    batch_size: int,
) -> np.ndarray:
    """(rows, items) scores of each row's user (its ordered history) against ``item_ids``;
    the catalog's vectors are computed once, users in batches of similar length."""
    was_training = model.training
    model.eval()
    try:
        table = catalog_table(model, batcher)
        columns = table[torch.tensor([batcher.index[i] for i in item_ids], dtype=torch.long)]
        histories = [batcher.history_indices(h) for h in frame["history"].to_list()]
        order = np.argsort([len(h) for h in histories], kind="stable")
        out = np.zeros((len(histories), len(item_ids)), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(1, max(len(histories[r]) for r in rows))
            history = torch.zeros(len(rows), width, dtype=torch.long)
            for n, r in enumerate(rows):
                if histories[r]:
                    history[n, width - len(histories[r]) :] = torch.tensor(histories[r])
            users = model.user_vectors_from(history, table)
            out[rows] = (users @ columns.T).float().numpy()
    finally:
        model.train(was_training)
    return out
