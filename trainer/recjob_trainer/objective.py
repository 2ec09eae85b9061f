"""What a run trains: the architecture and objective for the task, LoRA adapters (added
for training, merged afterwards) and the objective's loss."""

from __future__ import annotations

from dataclasses import asdict

import torch

from .config import TrainerConfig
from .data.prepared import PreparedData
from .models import ModelInfo, RankingModel
from .sequential import SequenceShape


def model_info(config: TrainerConfig, prepared: PreparedData) -> ModelInfo:
    """Architecture and objective for the task."""
    head, task = config.model.head, config.data.task
    train = prepared.train_summary  # every rank has it; only rank 0 reads the train split
    search = task == "search-ranking"
    objective = head.objective
    if objective == "auto":
        graded = search and train.get("label_distinct", 0) > 2
        objective = (
            ("regression" if graded else "binary")
            if search
            else ("binary" if train["labelled"] else "listwise")
        )
    if config.model.architecture == "sequential":
        return sequential_info(config, prepared)
    return ModelInfo(
        kind="cross-encoder" if task == "search-ranking" else "bi-encoder",
        objective=objective,
        head_type=head.type,
        head_hidden=head.hidden_size,
        dropout=head.dropout,
        max_length=config.model.max_sequence_length,
        label_min=train["label_min"] if search else 0.0,
        label_max=train["label_max"] if search else 1.0,
        base_model=config.model.base_model,
        history_encoding=config.model.history_encoding if task == "recommendation" else "text",
    )


def sequential_info(config: TrainerConfig, prepared: PreparedData) -> ModelInfo:
    """The sequential recommender's info: its sizes from ``model.sequential``."""
    if prepared.train_summary.get("labelled"):
        raise ValueError(
            "model.architecture sequential learns from interaction sequences, but the "
            "training data are labelled impressions (data.columns.label is set); drop the "
            "label column or use architecture auto"
        )
    if prepared.catalog is None or prepared.catalog.height == 0:
        raise ValueError("model.architecture sequential needs data.catalog (item texts)")
    seq = config.model.sequential
    shape = SequenceShape(
        items=prepared.catalog.height,
        hidden=seq.hidden_size,
        layers=seq.layers,
        heads=seq.heads,
        dropout=seq.dropout,
        max_history=config.model.history_length,
        item_ids=seq.item_ids,
        text_frozen=config.model.fine_tuning.method == "frozen",
        negatives=seq.negatives,
        temperature=seq.temperature,
    )
    return ModelInfo(
        kind="sequential",
        objective="listwise",
        max_length=config.model.max_sequence_length,
        base_model=config.model.base_model,
        history_encoding="sequence",
        # the catalog in index order (index n + 1 is item_ids[n]): what serving ranks
        extra={"sequential": asdict(shape), "item_ids": prepared.catalog["item_id"].to_list()},
    )


def apply_lora(model: RankingModel, config: TrainerConfig) -> RankingModel:
    """Wrap the encoder with LoRA adapters (peft) when the spec asks for it; freeze it
    when the method is frozen."""
    tuning = config.model.fine_tuning
    if tuning.method == "frozen":
        model.encoder.requires_grad_(False)
        return model
    if tuning.method != "lora" or tuning.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = tuning.lora
    model.encoder = get_peft_model(
        model.encoder,
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
        ),
    )
    return model


def merge_lora(model: RankingModel) -> RankingModel:
    """Fold LoRA adapters into the encoder weights (a plain model again)."""
    if hasattr(model.encoder, "merge_and_unload"):
        model.encoder = model.encoder.merge_and_unload()
    return model


def loss_fn(info: ModelInfo, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The objective's loss, in fp32."""
    if info.kind == "sequential":  # softmax over the candidates; labels: true positions
        return torch.nn.functional.cross_entropy(logits.float(), labels.long())
    logits, labels = logits.float(), labels.float()
    if info.objective == "regression":
        return torch.nn.functional.mse_loss(torch.sigmoid(logits), labels)
    if info.kind == "bi-encoder":
        users, per_user = labels.shape  # labels: (B, 1 + negatives), true item first
        if info.objective == "listwise":  # softmax over all candidates of the batch
            target = torch.arange(users, device=logits.device) * per_user
            return torch.nn.functional.cross_entropy(logits, target)
        own = logits.view(users, users, per_user)[torch.arange(users), torch.arange(users)]
        return torch.nn.functional.binary_cross_entropy_with_logits(own, labels)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
