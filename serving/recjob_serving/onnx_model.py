"""An ONNX Runtime model with the interface of the trainer's RankingModel, so the trainer's
evaluation code measures a converted model exactly as it measured the source model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from recjob_trainer.models import ModelInfo, predictions

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
