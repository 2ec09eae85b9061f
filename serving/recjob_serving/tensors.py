"""The tensors a model of the repository declares (``config.pbtxt`` inputs and outputs)
and the check of an Open Inference Protocol request against them: every input is decoded
to numpy only after its name, datatype, shape and size are what the model takes, so bad
input gets a 400 naming the tensor and what was expected."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferRequest

from .repository import model_config_module

#: Triton config data types -> Open Inference Protocol datatypes.
OIP_TYPES = {
    "TYPE_INT64": "INT64",
    "TYPE_INT32": "INT32",
    "TYPE_FP32": "FP32",
    "TYPE_FP16": "FP16",
    "TYPE_STRING": "BYTES",
    "TYPE_BOOL": "BOOL",
}
#: Refuse requests that would make the server allocate more than this many elements.
MAX_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the model's config declares it (without the batch axis)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False

    def shape(self) -> list[int]:
        """The client-facing shape, batch axis first."""
        return [-1, *self.dims]


def tensor_specs(values) -> list[TensorSpec]:
    """TensorSpecs of a config's ``input`` or ``output`` list."""
    types = model_config_module().DataType
    return [
        TensorSpec(
            v.name,
            OIP_TYPES[types.Name(v.data_type)],
            tuple(int(d) for d in v.dims),
            bool(getattr(v, "optional", False)),
        )
        for v in values
    ]


def _describe(spec: TensorSpec) -> str:
    return f"'{spec.name}' ({spec.datatype}, shape {spec.shape()})"


def decode_inputs(
    payload: object, specs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int
) -> dict[str, np.ndarray]:
    """Check a request against the model's declared tensors and decode it to numpy.

    Raises ``InvalidInput`` (HTTP 400 / gRPC INVALID_ARGUMENT) naming the tensor and what
    was expected: unknown, missing or repeated inputs, wrong datatype, wrong rank or fixed
    dimension, empty or oversized batch, inconsistent batch sizes, data that does not fill
    the shape, and requested outputs the model does not have.
    """
    if not isinstance(payload, InferRequest):
        raise InvalidInput(
            "this server speaks the Open Inference Protocol v2: "
            "POST /v2/models/<model>/infer with a JSON 'inputs' list (or use gRPC)"
        )
    by_name = {spec.name: spec for spec in specs}
    seen: dict[str, np.ndarray] = {}
    batch_sizes: dict[str, int] = {}
    for tensor in payload.inputs:
        spec = by_name.get(tensor.name)
        if spec is None:
            expected = ", ".join(_describe(s) for s in specs)
            raise InvalidInput(f"unknown input '{tensor.name}'; this model takes {expected}")
        if tensor.name in seen:
            raise InvalidInput(f"input '{tensor.name}' is given more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{tensor.name}' has datatype {tensor.datatype}; expected {spec.datatype}"
            )
        shape = list(tensor.shape)
        if len(shape) != 1 + len(spec.dims) or any(not isinstance(d, int) or d < 0 for d in shape):
            raise InvalidInput(
                f"input '{tensor.name}' has shape {shape}; expected {spec.shape()} "
                "(batch first, non-negative sizes)"
            )
        for axis, (got, want) in enumerate(zip(shape[1:], spec.dims, strict=True), start=1):
            if want >= 0 and got != want:
                raise InvalidInput(
                    f"input '{tensor.name}' has size {got} on axis {axis}; expected {want}"
                )
        if shape[0] == 0 or int(np.prod(shape)) == 0:
            raise InvalidInput(f"input '{tensor.name}' is empty (shape {shape})")
        if shape[0] > max_batch_size:
            raise InvalidInput(
                f"input '{tensor.name}' has batch size {shape[0]}, over this model's "
                f"max_batch_size {max_batch_size}"
            )
        if int(np.prod(shape)) > MAX_ELEMENTS:
            raise InvalidInput(
                f"input '{tensor.name}' has {int(np.prod(shape))} elements, over the "
                f"limit of {MAX_ELEMENTS}"
            )
        try:
            array = tensor.as_numpy()
        except Exception as error:
            raise InvalidInput(
                f"input '{tensor.name}': its data does not fill shape {shape} as "
                f"{spec.datatype} ({type(error).__name__}: {error})"
            ) from None
        seen[tensor.name] = array
        batch_sizes[tensor.name] = shape[0]
    missing = [spec for spec in specs if spec.name not in seen and not spec.optional]
    if missing:
        raise InvalidInput("missing input " + ", ".join(_describe(s) for s in missing))
    if len(set(batch_sizes.values())) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {batch_sizes}")
    known_outputs = {spec.name for spec in outputs}
    for requested in payload.request_outputs or []:
        if requested.name not in known_outputs:
            raise InvalidInput(
                f"unknown output '{requested.name}'; this model returns "
                + ", ".join(sorted(known_outputs))
            )
    return seen
