"""Runs a Triton Python-backend ``model.py`` outside Triton.

Triton's Python backend gives a model the module ``triton_python_backend_utils``
(``pb_utils``). This is the part of that interface the repository's models use — tensors,
requests, responses, errors, and BLS (``pb_utils.InferenceRequest(model_name=...,
inputs=..., requested_output_names=...).exec()``, a call to another model of the
repository: the top-k model asks the user tower) — so ``recjob-serve serve`` executes the
very file Triton would, and tests exercise it.
"""

from __future__ import annotations

import contextvars
import importlib.util
import json
import sys
import types
from collections.abc import Callable
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


#: How a BLS request runs a model: (model name, input tensors) -> output tensors. Set
#: by :meth:`PythonBackendModel.execute` for the duration of a model's ``execute``.
_BLS: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("recjob_bls", default=None)


class InferenceRequest:
    """One request's input tensors: what ``execute`` gets, or (with ``model_name``) a BLS
    request to another model of the repository, run by :meth:`exec`."""

    def __init__(
        self,
        inputs: dict[str, np.ndarray] | list[Tensor] | None = None,
        model_name: str | None = None,
        requested_output_names: list[str] | None = None,
        model_version: int = -1,
        **_: object,
    ):
        if isinstance(inputs, dict):
            self._inputs = [Tensor(name, value) for name, value in inputs.items()]
        else:
            self._inputs = list(inputs or [])
        self._model_name, self._requested = model_name, requested_output_names

    def inputs(self) -> list[Tensor]:
        """All input tensors."""
        return self._inputs

    def exec(self) -> InferenceResponse:
        """Run the named model on these inputs (Triton's BLS); failures come back as the
        response's error, as in Triton."""
        run = _BLS.get()
        if run is None or self._model_name is None:
            return InferenceResponse([], TritonError("BLS: no model server to run the request"))
        try:
            outputs = run(self._model_name, {t.name(): t.as_numpy() for t in self._inputs})
        except Exception as error:  # the other model's 400 / 404 / 500, as its message
            return InferenceResponse([], TritonError(f"{type(error).__name__}: {error}"))
        names = self._requested or list(outputs)
        return InferenceResponse([Tensor(name, np.asarray(outputs[name])) for name in names])


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


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    """The response's output called ``name`` (None when absent)."""
    return next((t for t in response.output_tensors() if t.name() == name), None)


def _utils_module() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    for value in (
        TritonError,
        Tensor,
        InferenceRequest,
        InferenceResponse,
        get_input_tensor_by_name,
        get_output_tensor_by_name,
    ):
        setattr(module, value.__name__, value)
    return module


def install_utils() -> None:
    """Make ``import triton_python_backend_utils`` give this module's interface."""
    sys.modules.setdefault("triton_python_backend_utils", _utils_module())


class PythonBackendModel:
    """One version of a Python-backend model, loaded from its ``model.py``; ``bls`` runs
    the BLS requests it makes ((model name, inputs) -> outputs)."""

    def __init__(self, model_dir: Path, version: int, config, bls: Callable | None = None) -> None:
        path = model_dir / str(version) / "model.py"
        self.bls = bls
        install_utils()
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
        (result,) = self.execute_many([inputs])
        if isinstance(result, TritonError):
            raise result
        return result

    def execute_many(
        self, requests: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | TritonError]:
        """Run several requests in one ``execute`` call, as Triton does for a model with
        dynamic batching: each request's outputs, or its error."""
        token = _BLS.set(self.bls)
        try:
            responses = self.model.execute([InferenceRequest(inputs) for inputs in requests])
        finally:
            _BLS.reset(token)
        if len(responses) != len(requests):
            raise RuntimeError(
                f"model.py answered {len(responses)} responses to {len(requests)} requests"
            )
        return [
            response.error()
            if response.has_error()
            else {t.name(): t.as_numpy() for t in response.output_tensors()}
            for response in responses
        ]
