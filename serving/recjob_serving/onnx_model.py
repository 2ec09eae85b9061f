"""ONNX Runtime models with the interface of the trainer's models, so the trainer's
evaluation code measures a converted model exactly as it measured the source model:
:class:`OnnxRankingModel` (cross- / bi-encoder, the trainer's RankingModel) and
:class:`OnnxSequentialModel` (a sequential recommender's user tower and item vectors)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from recjob_trainer.models import ModelInfo, predictions
from recjob_trainer.sequential import SequenceShape

from .export import session


class OnnxRankingModel:
    """Scores with an exported ONNX graph (fp32, int8 or QDQ) on CPU."""

    def __init__(self, path: Path, info: ModelInfo, scale: float | None = None):
        self.path, self.info = path, info
        self._session = session(path)
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._scale = scale

    def parameters(self) -> Iterator[torch.Tensor]:
        """A CPU tensor, so callers that look up the model's device find the CPU."""
        yield torch.zeros(0)

    def eval(self) -> OnnxRankingModel:
        """No-op (inference only), for interface parity."""
        return self

    def train(self) -> OnnxRankingModel:
        """No-op (inference only), for interface parity."""
        return self

    def _run(self, **inputs: torch.Tensor) -> list[np.ndarray]:
        feed = {
            k: v.numpy().astype(np.int64)
            for k, v in inputs.items()
            if v is not None and k in self._inputs
        }
        return self._session.run(None, feed)

    def score_pairs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-encoder logits."""
        _, logit = self._run(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        return torch.from_numpy(logit)

    def item_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Bi-encoder unit embeddings."""
        (embedding,) = self._run(input_ids=input_ids, attention_mask=attention_mask)
        return torch.from_numpy(embedding)

    def scale(self) -> torch.Tensor:
        """Bi-encoder cosine-to-logit multiplier."""
        return torch.tensor([self._scale or 1.0])

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> predictions on the label's scale (as the source model)."""
        return predictions(self.info, logits)


class OnnxSequentialModel:
    """A sequential recommender as served: the exported user tower (ONNX Runtime) and the
    exported item vectors, with the interface the trainer's ``sequence_scores`` uses
    (``catalog_vectors``, ``user_vectors_from``), so the quality gate ranks the whole
    catalog with exactly what a server ranks with."""

    def __init__(self, path: Path, info: ModelInfo, item_vectors: np.ndarray):
        self.path, self.info = path, info
        # the item side is the exported vectors, never re-encoded from text
        self.shape = replace(SequenceShape.from_dict(info.extra["sequential"]), text_frozen=True)
        self.training = False
        self._session = session(path)
        padding = np.zeros((1, item_vectors.shape[1]), dtype=np.float32)
        self._table = torch.from_numpy(np.concatenate([padding, item_vectors.astype(np.float32)]))

    def parameters(self) -> Iterator[torch.Tensor]:
        """A CPU tensor, so callers that look up the model's device find the CPU."""
        yield torch.zeros(0)

    def eval(self) -> OnnxSequentialModel:
        """No-op (inference only), for interface parity."""
        return self

    def train(self, mode: bool = True) -> OnnxSequentialModel:
        """No-op (inference only), for interface parity."""
        return self

    def catalog_vectors(self) -> torch.Tensor:
        """(items + 1, hidden) item table, row 0 (padding) zero: the exported vectors."""
        return self._table

    def user_vectors_from(self, history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, hidden) user vectors from the ONNX user tower (its own table: the graph
        gathers from the initializer it was exported with; ``table`` is not used)."""
        (vectors,) = self._session.run(None, {"history": history.numpy().astype(np.int64)})
        return torch.from_numpy(vectors)

    def scale(self) -> torch.Tensor:
        """Scores are dot products already on the logit scale."""
        return torch.ones(1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores as probabilities of being chosen next (softmax over the candidates)."""
        return torch.softmax(logits.float(), dim=-1)
