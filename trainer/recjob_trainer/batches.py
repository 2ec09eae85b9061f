"""Turn prepared rows into model batches, in a data order that survives restarts.

The order of training examples is a pure function of (seed, epoch, rank's shard), so a
run resumed at optimizer step ``s`` sees exactly the micro-batches an uninterrupted run
would have seen from step ``s`` on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from recjob_operator.api.model_input import history_text

from .data.splits import sample_negatives
from .sequence_data import SequenceBatcher, length_bucketed_order


@dataclass
class Shard:
    """One rank's training rows."""

    rows: pl.DataFrame
    rank: int
    world_size: int


def shard_rows(frame: pl.DataFrame, rank: int, world_size: int) -> pl.DataFrame:
    """Rows ``rank, rank + world, ...``, padded by wrapping so every rank has the same count
    (ranks must take the same number of steps, or collectives hang)."""
    per_rank = math.ceil(frame.height / world_size)
    index = [(rank + world_size * i) % frame.height for i in range(per_rank)]
    return frame[index]


class Batcher:
    """Builds tokenized batches for one task."""

    def __init__(
        self,
        task: str,
        tokenizer,
        max_length: int,
        catalog: pl.DataFrame | None = None,
        label_min: float = 0.0,
        label_max: float = 1.0,
        history_encoding: str = "text",
    ):
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        self.history_encoding = history_encoding
        self.label_min, self.label_max = label_min, label_max
        self.texts: dict[str, str] = (
            dict(zip(catalog["item_id"], catalog["item_text"], strict=True))
            if catalog is not None
            else {}
        )
        self.catalog_ids = list(self.texts)

    @classmethod
    def for_model(cls, task: str, tokenizer, info, catalog: pl.DataFrame | None):
        """The batcher a model (its ModelInfo: length, label range, history encoding) needs:
        the sequential recommender's own (:class:`.sequence_data.SequenceBatcher`) for that
        architecture."""
        if info.kind == "sequential":
            return SequenceBatcher(tokenizer, info, catalog)
        return cls(
            task,
            tokenizer,
            info.max_length,
            catalog,
            info.label_min,
            info.label_max,
            info.history_encoding,
        )

    def _tokens(self, left: list[str], right: list[str] | None = None) -> dict:
        return dict(
            self.tokenizer(
                left,
                right,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )

    def pairs(self, queries: list[str], items: list[str]) -> dict[str, torch.Tensor]:
        """Cross-encoder inputs for (query, item text) pairs."""
        return self._tokens(queries, items)

    def texts_batch(self, texts: list[str], prefix: str) -> dict[str, torch.Tensor]:
        """Bi-encoder inputs for one side (``user_`` or ``item_``)."""
        tokens = self._tokens(texts)
        return {f"{prefix}{k}": v for k, v in tokens.items() if k != "token_type_ids"}

    def search_batch(self, rows: pl.DataFrame) -> dict[str, torch.Tensor]:
        """Training batch of (query, item, grade) rows; labels scaled to [0, 1]."""
        batch = self.pairs(rows["query"].to_list(), rows["item_text"].to_list())
        span = max(self.label_max - self.label_min, 1e-9)
        labels = (rows["label"].to_numpy() - self.label_min) / span
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
        return batch

    def recommendation_batch(
        self, rows: pl.DataFrame, negatives: list[list[str]]
    ) -> dict[str, torch.Tensor]:
        """Training batch: each user's history vs [true next item, *negatives]."""
        histories = rows["history"].to_list()
        users = [history_text(h, self.texts) for h in histories]
        items = [
            self.texts[i]
            for target, negs in zip(rows["item_id"].to_list(), negatives, strict=True)
            for i in [target, *negs]
        ]
        if self.history_encoding == "item-embeddings":
            batch = {**self.history_batch(histories), **self.texts_batch(items, "item_")}
        else:
            batch = {**self.texts_batch(users, "user_"), **self.texts_batch(items, "item_")}
        if "label" in rows.columns:  # labelled impressions: the click is the label
            batch["labels"] = torch.tensor(
                rows["label"].to_numpy() > 0, dtype=torch.float32
            ).unsqueeze(1)
        else:
            labels = torch.zeros(len(users), 1 + len(negatives[0]))
            labels[:, 0] = 1.0
            batch["labels"] = labels
        return batch

    def history_batch(self, histories: list[list[str]]) -> dict[str, torch.Tensor]:
        """Each user's history items (most recent first) as a (B * L) batch of item texts
        and a (B, L) mask; a user without history gets one placeholder item."""
        lists = [
            [self.texts[i] for i in reversed(h) if i in self.texts] or ["(no history)"]
            for h in histories
        ]
        width = max(len(items) for items in lists)
        flat = [t for items in lists for t in items + [""] * (width - len(items))]
        mask = torch.tensor([[1.0] * len(items) + [0.0] * (width - len(items)) for items in lists])
        return {**self.texts_batch(flat, "history_"), "history_mask": mask}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of a shard's rows in an epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batches(
    shard: Shard,
    batcher: Batcher,
    micro_batch_size: int,
    seed: int,
    epoch: int,
    start: int,
    negatives_per_positive: int,
    popularity: dict[str, float] | None,
) -> Iterator[tuple[list[int], dict]]:
    """Micro-batches of an epoch from micro-batch index ``start`` on, with the row indices
    (in the shard) each one holds."""
    order = epoch_order(shard.rows.height, seed, epoch)
    sequential = isinstance(batcher, SequenceBatcher)
    if sequential:  # batches of similar history length: each is padded to its longest
        lengths = shard.rows["history"].list.len().to_numpy()
        order = length_bucketed_order(
            lengths.clip(max=batcher.shape.max_history), order, micro_batch_size, [seed, epoch]
        )
    count = shard.rows.height // micro_batch_size
    for b in range(start, count):
        index = order[b * micro_batch_size : (b + 1) * micro_batch_size].tolist()
        rows = shard.rows[index]
        if sequential and batcher.shape.negatives == "catalog":
            yield index, batcher.sequence_batch(rows, None)
        elif batcher.task == "search-ranking":
            yield index, batcher.search_batch(rows)
        else:
            if "label" in rows.columns:  # labelled impressions bring their own negatives
                yield index, batcher.recommendation_batch(rows, [[] for _ in range(rows.height)])
                continue
            negatives = sample_negatives(
                rows["item_id"].to_list(),
                rows["history"].to_list(),
                batcher.catalog_ids,
                popularity,
                negatives_per_positive,
                seed=int(np.random.SeedSequence([seed, epoch, shard.rank, b]).generate_state(1)[0]),
            )
            if sequential:
                yield index, batcher.sequence_batch(rows, negatives)
            else:
                yield index, batcher.recommendation_batch(rows, negatives)
