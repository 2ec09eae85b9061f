"""The sequential recommender: an order-aware text-and-ID model (``model.architecture:
sequential``).

Every catalog item gets a vector from its **text** — the pretrained encoder's mean-pooled
embedding, centred and projected — plus, for items seen in training, a learned **ID
embedding**. A user is the output of a **causal transformer** over their ordered history
(most recent last, positions counted back from the most recent item) at the last
position; an item's score is the dot product of the two — with a ``temperature``, both
are unit length and the user's is divided by it (cosine / temperature). Items never seen
in training still rank: their vector is their text's; training leaves them out of the
softmax (never seen is no evidence against an item), so they are not pushed down.

The text side is either computed once (``fineTuning.method: frozen``: the catalog is
encoded before training and kept as the ``item_text`` buffer) or trained with the rest
(``full`` / ``lora``: each batch encodes the texts of the items it holds).

Item indices: 0 is padding, catalog item ``n`` (0-based, catalog order) is ``n + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SequenceShape:
    """The sequence model's sizes (kept in ``ModelInfo.extra['sequential']``)."""

    items: int
    text_dim: int = 0  # the encoder's width, filled in when the model is built
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    dropout: float = 0.3
    max_history: int = 50
    item_ids: bool = True
    text_frozen: bool = True
    negatives: str = "catalog"  # catalog | sampled (see the RecJob's model.sequential)
    temperature: float = 0.0  # > 0: cosine similarity / temperature; 0: dot product
    ffn: list[int] | None = None  # FFN width of each layer (pruned); None: 4 x hidden each

    @classmethod
    def from_dict(cls, values: dict) -> SequenceShape:
        """The shape saved in a model's info."""
        return cls(**values)


class SequentialRecommender(nn.Module):
    """Causal transformer over item vectors made of text (+ ID) embeddings."""

    def __init__(self, encoder: nn.Module, info):
        super().__init__()
        self.encoder = encoder
        self.info = info
        shape = self.shape = SequenceShape.from_dict(info.extra["sequential"])
        d = shape.hidden
        # the catalog's text embeddings (frozen text side) and which items training saw
        self.register_buffer("item_text", torch.zeros(shape.items + 1, shape.text_dim))
        self.register_buffer("text_mean", torch.zeros(1, shape.text_dim))
        self.register_buffer("seen", torch.zeros(shape.items + 1))
        self.text_projection = nn.Linear(shape.text_dim, d)
        self.item_embedding = nn.Embedding(shape.items + 1, d, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        self.position = nn.Embedding(shape.max_history, d)
        self.input_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(shape.dropout)

        def layer(ffn: int) -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                d, shape.heads, ffn, shape.dropout, activation="gelu", batch_first=True,
                norm_first=True,
            )  # fmt: skip

        self.transformer = nn.TransformerEncoder(
            layer(4 * d), shape.layers, enable_nested_tensor=False
        )
        if shape.ffn is not None:  # a pruned model: each layer its own FFN width
            if len(shape.ffn) != shape.layers:
                raise ValueError(f"{len(shape.ffn)} FFN widths for {shape.layers} layers")
            self.transformer.layers = nn.ModuleList(layer(width) for width in shape.ffn)
        self.output_norm = nn.LayerNorm(d)

    # ------------------------------------------------------------------ item side
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder embeddings of item texts (the sentence-transformers pooling)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1e-6)

    def set_catalog_text(self, text: torch.Tensor, seen: torch.Tensor) -> None:
        """Install the catalog's text embeddings (items x text_dim, catalog order) and the
        0/1 mask of items seen in training (items,)."""
        with torch.no_grad():
            self.item_text[1:] = text.to(self.item_text.dtype)
            self.text_mean.copy_(text.mean(0, keepdim=True))
            self.seen[1:] = seen.to(self.seen.dtype)

    def item_vectors_of(self, index: torch.Tensor, text: torch.Tensor | None = None):
        """Vectors of the items ``index`` (global indices), from their text embeddings
        ``text`` (or the stored ones) plus their ID embeddings where training saw them."""
        if text is None:
            text = self.item_text[index]
        weight = self.text_projection.weight
        vectors = self.text_projection((text - self.text_mean).to(weight.dtype))
        if self.shape.item_ids:
            ids = self.item_embedding(index) * self.seen[index].unsqueeze(-1).to(vectors.dtype)
            vectors = vectors + ids
        if self.shape.temperature > 0:
            vectors = nn.functional.normalize(vectors, dim=-1)
        return vectors

    def catalog_vectors(self) -> torch.Tensor:
        """(items + 1, hidden) vectors of the whole catalog, row 0 (padding) zero."""
        index = torch.arange(self.shape.items + 1, device=self.item_text.device)
        vectors = self.item_vectors_of(index)
        return torch.cat([torch.zeros_like(vectors[:1]), vectors[1:]])

    # ------------------------------------------------------------------ user side
    def user_vectors_from(
        self, history: torch.Tensor, table: torch.Tensor, states: list | None = None
    ) -> torch.Tensor:
        """(B, hidden) user vectors of left-padded histories (B, L) of global indices,
        looked up in ``table`` (items + 1, hidden; :meth:`catalog_vectors`): a user's
        score for an item is the dot product with the item's row of ``table``.

        With ``states`` (a list), the transformer's input and every layer's output
        (B, L, hidden each) and the mask of real (unpadded) positions are appended to it
        (hidden-state distillation)."""
        length = history.shape[1]
        positions = torch.arange(length - 1, -1, -1, device=history.device)  # 0 = most recent
        items = table[history]
        if self.shape.temperature > 0:  # unit vectors in: scaled as token embeddings are
            items = items * self.shape.hidden**0.5
        h = items + self.position(positions.clamp(max=self.shape.max_history - 1))
        h = self.dropout(self.input_norm(h))
        # causal, and never a padded item; every position may see itself, so a padded
        # position (and a user without history) attends to something rather than nothing
        blocked = torch.triu(
            torch.ones(length, length, dtype=torch.bool, device=history.device), diagonal=1
        ).unsqueeze(0) | (history == 0).unsqueeze(1)
        blocked &= ~torch.eye(length, dtype=torch.bool, device=history.device)
        mask = blocked.repeat_interleave(self.shape.heads, dim=0)
        if states is None:
            h = self.transformer(h, mask=mask)
        else:  # layer by layer (what nn.TransformerEncoder does), keeping each output
            hidden = [h]
            for layer in self.transformer.layers:
                h = layer(h, src_mask=mask)
                hidden.append(h)
            states.append((tuple(hidden), history != 0))
        user = self.output_norm(h[:, -1])
        if self.shape.temperature > 0:
            user = nn.functional.normalize(user, dim=-1) / self.shape.temperature
        return user

    # ------------------------------------------------------------------ training
    def forward(
        self,
        history: torch.Tensor,
        candidates: torch.Tensor,
        candidate_input_ids: torch.Tensor | None = None,
        candidate_attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor:
        """Scores (B, C) of each user (history, B x L global indices, 0 = padding) against
        ``candidates`` (C global indices; every history item must be among them).

        With the text side trained, the candidates' texts come tokenized and are encoded
        here; otherwise their stored text embeddings are used. With
        ``output_hidden_states``: ``(scores, (hidden_states, real_positions))`` of the
        users' transformer (see :meth:`user_vectors_from`)."""
        states: list | None = [] if output_hidden_states else None
        text = None
        if candidate_input_ids is not None:
            text = self.encode_texts(candidate_input_ids, candidate_attention_mask)
        vectors = self.item_vectors_of(candidates, text)
        table = vectors.new_zeros(self.shape.items + 1, vectors.shape[1]).index_copy(
            0, candidates, vectors
        )
        users = self.user_vectors_from(history, table, states)
        scores = users @ vectors.T
        if self.training:  # items training never saw are not negatives either
            scores = self.mask_unseen(scores, candidates)
        return (scores, states[0]) if states is not None else scores

    def mask_unseen(self, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``scores`` (B, C) with the candidates training never saw at the dtype's minimum:
        what training's softmax leaves out (a distillation teacher's scores get the same)."""
        unseen = self.seen[candidates] == 0
        return scores.masked_fill(unseen.unsqueeze(0), torch.finfo(scores.dtype).min)

    def scale(self) -> torch.Tensor:
        """Scores are dot products already on the logit scale."""
        return torch.ones(1)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores as probabilities of being chosen next (softmax over the candidates)."""
        return torch.softmax(logits.float(), dim=-1)
