"""Checkpoint files read without running code.

A RecJob's checkpoints live on storage every RecJob of the namespace can write, so a
checkpoint file is untrusted input. DeepSpeed 0.19.8 reads its checkpoints with
``torch.load(..., weights_only=False)`` (``TorchCheckpointEngine.load`` on resume,
``deepspeed.utils.zero_to_fp32`` when consolidating): a pickle, which runs whatever
callable the file names. Here every checkpoint file the trainer reads goes through
``torch.load(weights_only=True)`` (tensors, containers, numbers, strings and the
allow-list below), and a file naming any other global is refused before anything in it
runs.

The allow-list is what DeepSpeed really writes into the checkpoints this trainer makes
(ZeRO 0-3, fp32/bf16, optimizer/parameter offload, LoRA, the trainer's client state;
found by saving them on CPU with world sizes 1 and 2 and listing each file's globals
with ``torch.serialization.get_unsafe_globals_in_checkpoint``, kept so by
tests/trainer/test_checkpoint_safety.py): the model states files need none, the ZeRO
optimizer states files ``LossScaler`` and ``ZeroStageEnum`` (+ ``fragment_address`` for
ZeRO 1-2), and ``builtins.getattr`` only as an Enum member lookup (:func:`_enum_member`:
how Python 3.11.2 pickles ``ZeroStageEnum`` members). They are plain state holders:
unpickling one sets attributes or calls an ``Enum`` / dataclass constructor, nothing else.
``DynamicLossScaler`` is what fp16 (GPUs only; read from DeepSpeed's code, not run here)
writes instead of ``LossScaler``.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import pickletools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file names a global outside the allow-list; nothing of it was run."""


def allowed_globals() -> list[Any]:
    """The non-tensor globals DeepSpeed 0.19.8 writes into the trainer's checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,
        DynamicLossScaler,
        ZeroStageEnum,
        fragment_address,
        (_enum_member, "builtins.getattr"),
    ]


def _enum_member(cls: Any, name: Any) -> Any:
    """What the pickle's ``getattr(cls, name)`` may be: a member of an allow-listed Enum.

    Python 3.11.2 (Debian 12's) pickles an Enum member as ``getattr(ZeroStageEnum,
    "gradients")`` (3.11.7 pickles it by value): the test cluster's trainer image wrote
    that into its ZeRO optimizer states. Only that form is accepted here: ``cls`` an
    allow-listed Enum and ``name`` one of its members; any other getattr is refused."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if cls is ZeroStageEnum and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not a member of an allowed Enum")


def _pickle_globals(path: Path) -> set[str]:
    """The globals the pickles at the start of a file name (a raw pickle, or the several
    of torch's legacy format), from their opcodes: ``pickletools`` parses, it does not
    unpickle."""
    found: set[str] = set()
    strings: list[str] = []
    with path.open("rb") as file, contextlib.suppress(Exception):
        while True:  # one pickle after the other, until what follows is not one
            for opcode, arg, _ in pickletools.genops(file):
                if opcode.name in ("GLOBAL", "INST"):
                    found.add(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and opcode.name.endswith(("UNICODE", "STRING")):
                    strings.append(arg)
    return found


def _names(globals_: list[Any]) -> list[str]:
    return [g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in globals_]


def _refusal_reason(path: Path, error: Exception) -> str:
    """Which globals made the weights-only unpickler stop, read from the file's opcodes
    (``get_unsafe_globals_in_checkpoint`` for a zip checkpoint, else the pickle's own);
    torch's message when none is found. Nothing is unpickled."""
    found: set[str] = set()
    with contextlib.suppress(Exception):
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    if not found:
        with contextlib.suppress(Exception):
            found = _pickle_globals(path)
    found -= set(_names(allowed_globals()))
    with contextlib.suppress(Exception):  # what torch allows anyway (tensors, OrderedDict)
        found -= set(torch._weights_only_unpickler._get_allowed_globals())
    if not found:  # torch's message may still name it
        found = set(re.findall(r"GLOBAL ([\w.]+)", str(error)))
    if found:
        return "it names the global " + ", ".join(sorted(found))
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"the weights-only unpickler stopped: {lines[-2 if len(lines) > 2 else 0][:200]}"


def load_checkpoint_file(path: str | Path, map_location: Any = None, **kwargs: Any) -> Any:
    """``torch.load`` of one checkpoint file, weights only, with :func:`allowed_globals`.

    A file that names any other global raises :class:`UnsafeCheckpointError` saying which
    file and which global; the global is never called. (A damaged file fails as torch
    fails on it.)"""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refusing to unpickle checkpoint file {path}: "
            f"{_refusal_reason(Path(path), error)}. A checkpoint may hold only tensors, "
            "containers, numbers, strings and these DeepSpeed state classes: "
            + ", ".join(_names(allowed_globals()))
            + ". Checkpoints are on storage other RecJobs can write, and this file was not "
            "written by this trainer: delete that checkpoint folder or use a new output."
        ) from None


def __getattr__(name: str) -> Any:
    """``SafeTorchCheckpointEngine`` is built on first use (DeepSpeed is imported late)."""
    if name == "SafeTorchCheckpointEngine":
        return _engine_classes()[1]
    raise AttributeError(name)


@functools.cache
def _engine_classes() -> tuple[type, type]:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine: saves as it does, loads weights only."""

        def load(self, path: str, map_location=None):
            return load_checkpoint_file(path, map_location=map_location)

    return TorchCheckpointEngine, SafeTorchCheckpointEngine


def harden_checkpoint_loading(engine) -> None:
    """Make every checkpoint file ``engine.load_checkpoint`` reads a weights-only load.

    ``load_checkpoint`` reads the model states (through ``SDLoaderFactory``), the
    optimizer states and the ZeRO partitions with ``engine.checkpoint_engine.load``; that
    object is replaced by a subclass of DeepSpeed's ``TorchCheckpointEngine`` whose
    ``load`` is :func:`load_checkpoint_file` (its settings and saving unchanged). Another
    checkpoint engine (one ``configOverrides`` chose) is refused: its loads are unchecked."""
    stock, safe = _engine_classes()
    current = engine.checkpoint_engine
    if isinstance(current, safe):
        return
    if type(current) is not stock:
        raise RuntimeError(
            f"DeepSpeed checkpoint engine {type(current).__name__} (from configOverrides) "
            "is not supported: the trainer loads checkpoints only through DeepSpeed's "
            "torch checkpoint engine, weights only"
        )
    hardened = safe.__new__(safe)
    hardened.__dict__.update(current.__dict__)  # same settings (zip serialization, ...)
    engine.checkpoint_engine = hardened


class _TorchWithSafeLoad:
    """The ``torch`` module as ``zero_to_fp32`` sees it: everything as is, but ``load``."""

    def __getattr__(self, name: str) -> Any:
        return load_checkpoint_file if name == "load" else getattr(torch, name)


@contextlib.contextmanager
def safe_zero_to_fp32() -> Iterator[Any]:
    """``deepspeed.utils.zero_to_fp32`` with its ``torch.load`` calls weights-only.

    That module calls ``torch.load(..., weights_only=False)`` directly on the files of a
    checkpoint, so for the duration of the block its module-level name ``torch`` (and no
    one else's) is a proxy whose ``load`` is :func:`load_checkpoint_file`; restored after.
    Rank 0 consolidates in the main thread, so nothing else uses the module meanwhile."""
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = original
