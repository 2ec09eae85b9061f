"""Runs a Triton Python-backend ``model.py`` outside Triton.

Triton's Python backend gives a model the module ``triton_python_backend_utils``
(``pb_utils``). This is the part of that interface the repository's models use — tensors,
requests, responses, errors — so ``recjob-serve serve`` executes the very file Triton
would, and tests exercise it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
from google.protobuf import json_format


class TritonError(Exception):
    """An error a model returns for one request."""

    def message(self) -> str:
        """The error text (as Triton's ``TritonError.message()``)."""
        return str(self)


class Tensor:
    """A named numpy tensor (``pb_utils.Tensor``)."""

    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, array

    def name(self) -> str:
        """The tensor's name."""
        return self._name

    def as_numpy(self) -> np.ndarray:
        """The tensor's data."""
        return self._array


class InferenceRequest:
    """One request's input tensors."""

    def __init__(self, inputs: dict[str, np.ndarray]):
        self._inputs = [Tensor(name, value) for name, value in inputs.items()]

    def inputs(self) -> list[Tensor]:
        """All input tensors."""
        return self._inputs


class InferenceResponse:
    """Output tensors, or an error."""

    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None):
        self._outputs, self._error = output_tensors, error

    def output_tensors(self) -> list[Tensor]:
        """The response's tensors."""
        return self._outputs

    def has_error(self) -> bool:
        """Whether the model refused the request."""
        return self._error is not None

    def error(self) -> TritonError | None:
        """The model's error, if any."""
        return self._error


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    """The request's input called ``name`` (None when absent)."""
    return next((t for t in request.inputs() if t.name() == name), None)


def _utils_module() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    for value in (
        TritonError,
        Tensor,
        InferenceRequest,
        InferenceResponse,
        get_input_tensor_by_name,
    ):
        setattr(module, value.__name__, value)
    return module


class PythonBackendModel:
    """One version of a Python-backend model, loaded from its ``model.py``."""

    def __init__(self, model_dir: Path, version: int, config) -> None:
        path = model_dir / str(version) / "model.py"
        sys.modules.setdefault("triton_python_backend_utils", _utils_module())
        spec = importlib.util.spec_from_file_location(
            f"recjob_backend_{model_dir.name.replace('-', '_')}_{version}", path
        )
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        self.model = module.TritonPythonModel()
        self.model.initialize(
            {
                "model_config": json.dumps(
                    json_format.MessageToDict(config, preserving_proto_field_name=True)
                ),
                "model_repository": str(model_dir),
                "model_version": str(version),
                "model_name": model_dir.name,
                "model_instance_kind": "CPU",
            }
        )

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request; the model's error is raised as :class:`TritonError`."""
        (response,) = self.model.execute([InferenceRequest(inputs)])
        if response.has_error():
            raise response.error()
        return {t.name(): t.as_numpy() for t in response.output_tensors()}
