"""What crosses the wire: the exchanged tensors of a model and their byte counts.

With ``exchange: lora`` the silos send only what trains (LoRA adapters and the scoring
head); the frozen base encoder is the same pretrained model everywhere. With ``full`` every
weight that trains is sent (for full fine-tuning: all of them)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord


def exchanged_names(model: torch.nn.Module, exchange: str) -> list[str]:
    """Names (state_dict keys) of the tensors a round exchanges, in a fixed order."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if exchange == "lora":
        return trainable
    if exchange == "full":
        return list(model.state_dict().keys())
    raise ValueError(f"unknown exchange {exchange!r}; expected lora or full")


def to_record(model: torch.nn.Module, names: list[str]) -> ArrayRecord:
    """The named tensors of ``model`` as a Flower ArrayRecord (fp32, CPU)."""
    state = model.state_dict()
    return ArrayRecord(
        OrderedDict((name, state[name].detach().float().cpu().contiguous()) for name in names)
    )


def load_record(model: torch.nn.Module, record: ArrayRecord, names: list[str]) -> None:
    """Copy the record's tensors into ``model``; every exchanged name must be there."""
    arrays = record_tensors(record)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"the global model lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    state = model.state_dict()
    with torch.no_grad():
        for name in names:
            state[name].copy_(arrays[name])


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor payload a record carries (what one message moves, less framing)."""
    return sum(len(array.data) for array in record.values())


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The record as named fp32 tensors."""
    return {name: tensor.float() for name, tensor in record.to_torch_state_dict().items()}
