"""Fuzz target: how ``recjob-serve serve`` decodes what clients send.

Run: ``python tests/fuzz/fuzz_serving_request.py CORPUS_DIR -max_total_time=60``.
The first byte of an input says what it is (other bytes pick one by their value mod 4):

- ``f``: a ``POST /v2/feedback`` body, through ``feedback.parse_feedback``;
- ``j``: a JSON ``POST /v2/models/<m>/infer`` body: parsed as FastAPI does (``json.loads``,
  then the route's ``InferenceRequest | bytes`` body type), decoded by the server's
  ``ClientErrorDataPlane``, then the model's ``predict`` (``decode_inputs``, the model's own
  checks, the tokenizer) and the response encoding;
- ``b``: the binary tensor extension: ``<inference-header-content-length>\\n<body>``;
- ``g``: a gRPC ``ModelInfer`` request (serialized ``ModelInferRequest``), as the servicer
  decodes it.

For ``j``, ``b`` and ``g`` the second byte picks the model (``t``: the raw-text ensemble,
``k``: its tokenizer, ``m``: the token-id model). The models are real ``server.py`` objects
built from the configs ``recjob-serve convert`` writes; the tokenizer runs its real
``model.py`` on the bundled MiniLM tokenizer; only the ONNX session is replaced by zeros
(no model file), after the model's own input checks.

Expected: a result, or the client's error: ``FeedbackError`` (400), ``InvalidInput`` (400),
a JSON or body-validation error FastAPI answers 400/422 itself, or a protobuf DecodeError
(gRPC refuses the message). Anything else would be a 500, and is a crash; so is an error
message over :data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import atheris

# Libraries first, uninstrumented; then ours, instrumented when run as the fuzzer (pytest
# imports this module for the regression cases), and KServe's decoding functions (all of
# KServe would cost seconds of instrumentation per run).
import numpy as np
import pydantic
import transformers  # noqa: F401
from google.protobuf.message import DecodeError
from kserve.errors import InvalidInput
from kserve.protocol import dataplane, infer_type
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.v2_datamodels import InferenceRequest

with (
    atheris.instrument_imports(include=["recjob_serving"])
    if __name__ == "__main__"
    else contextlib.nullcontext()
):
    from recjob_serving.feedback import Feedback, FeedbackError, parse_feedback
    from recjob_serving.limits import ControlledModelRepository
    from recjob_serving.loopback import ClientErrorDataPlane
    from recjob_serving.repository import (
        TOKENIZER_BACKEND,
        ensemble_config,
        parse_config,
        tokenizer_config,
    )
    from recjob_serving.server import EnsembleModel, OnnxModel, PythonModel, RepositoryModel


def _instrument(module: types.ModuleType) -> None:
    """Instrument the functions and methods ``module`` defines (in place)."""
    for value in vars(module).values():
        own_class = isinstance(value, type) and value.__module__ == module.__name__
        for member in vars(value).values() if own_class else [value]:
            function = getattr(member, "__func__", member)  # staticmethod, classmethod
            if isinstance(function, types.FunctionType) and function.__module__ == module.__name__:
                atheris.instrument_func(function)


#: Longest acceptable error message, in characters.
MAX_MESSAGE = 10_000
MODEL, TOKENIZER, ENSEMBLE = "search", "search-tokenizer", "search-text"
MAX_LENGTH, MAX_BATCH = 32, 16
#: The cross-encoder's config.pbtxt as ``repository.onnx_config`` writes it for the graph
#: ``export.export_onnx`` makes (token ids of any length in, a score and a logit out).
MODEL_CONFIG = f"""name: "{MODEL}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH}
input [
  {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }},
  {{ name: "logit" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }}
]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""
#: Rows of MiniLM's embedding tables the token-id inputs index (what ``OnnxModel`` reads
#: from the graph).
VALUE_LIMITS = {"input_ids": 30522, "attention_mask": 2, "token_type_ids": 2}
#: The headers FastAPI's route sees for each kind of body.
JSON_HEADERS = {"content-type": "application/json"}
BINARY_HEADER = "inference-header-content-length"


class CheckedOnnxModel(OnnxModel):
    """``OnnxModel`` with its checks, card and limits, but zeros for the session's run."""

    def __init__(self, model_dir: Path, config) -> None:
        RepositoryModel.__init__(self, model_dir, 1, config)
        self.card = {"kind": "cross-encoder", "max_length": MAX_LENGTH}
        self.value_limits = dict(VALUE_LIMITS)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the graph returns: one score and one logit per row."""
        batch = next(iter(tensors.values())).shape[0]
        return {"score": np.zeros(batch, np.float32), "logit": np.zeros(batch, np.float32)}


class BadOutcome(AssertionError):
    """The server answered, but not as it must (the fuzzer reports it as a crash)."""


class _Server:
    """The models, data plane and event loop, built once per process."""

    def __init__(self) -> None:
        from recjob_trainer.models import base_model_path

        self._dir = tempfile.TemporaryDirectory(prefix="recjob-fuzz-serving-")
        root = Path(self._dir.name)
        version = root / TOKENIZER / "1"
        version.mkdir(parents=True)
        shutil.copy(TOKENIZER_BACKEND, version / "model.py")
        (version / "tokenizer").symlink_to(base_model_path("all-MiniLM-L6-v2"))
        (root / ENSEMBLE / "1").mkdir(parents=True)
        model = CheckedOnnxModel(root / MODEL, parse_config(MODEL_CONFIG))
        tokenizer = PythonModel(
            root / TOKENIZER,
            1,
            parse_config(tokenizer_config(TOKENIZER, "cross-encoder", MAX_LENGTH, MAX_BATCH)),
        )
        ensemble_text = ensemble_config(
            ENSEMBLE, TOKENIZER, MODEL, "cross-encoder", MODEL_CONFIG, MAX_BATCH
        )
        models = {MODEL: model, TOKENIZER: tokenizer}
        ensemble = EnsembleModel(root / ENSEMBLE, 1, parse_config(ensemble_text), models)
        self.registry = ControlledModelRepository()
        for served in (model, tokenizer, ensemble):
            self.registry.update(served)
        self.dataplane = ClientErrorDataPlane(model_registry=self.registry)
        self.loop = asyncio.new_event_loop()
        self.body_type = pydantic.TypeAdapter(InferenceRequest | bytes)

    async def infer(self, body, headers: dict, model_name: str) -> None:
        """What KServe's V2 ``infer`` endpoint does with a parsed body."""
        request, _ = self.dataplane.decode(
            body, headers, protocol_version="v2", model_name=model_name
        )
        response, _ = await self.dataplane.infer(model_name, request, headers)
        self.dataplane.encode(model_name, response, headers, req_attributes={})

    async def infer_grpc(self, request) -> None:
        """What KServe's gRPC servicer does with a ``ModelInferRequest``."""
        InferenceServicer.validate_grpc_request(request)
        infer_request = InferRequest.from_grpc(request)
        response, _ = await self.dataplane.infer(request.model_name, infer_request, {})
        response.to_grpc()


_server: _Server | None = None


def server() -> _Server:
    """The process's models (built on first use: a few seconds for the tokenizer)."""
    global _server
    if _server is None:
        _server = _Server()
    return _server


def _bounded(error: Exception) -> None:
    if len(str(error)) >= MAX_MESSAGE:
        raise BadOutcome(f"{type(error).__name__} of {len(str(error))} characters")


def check_feedback(body: bytes) -> Feedback | None:
    """A feedback body: an event, or a FeedbackError saying why not."""
    try:
        event = parse_feedback(body)
    except FeedbackError as error:
        if not str(error):
            raise BadOutcome("a FeedbackError without a message") from None
        _bounded(error)
        return None
    if not (isinstance(event.revision, str) and event.revision and 0 <= event.gain <= 1e6):
        raise BadOutcome(f"accepted a bad event: {event}")
    return event


def _infer(body, headers: dict, model_name: str) -> None:
    s = server()
    try:
        s.loop.run_until_complete(s.infer(body, headers, model_name))
    except InvalidInput as error:
        _bounded(error)


def check_json(body: bytes, model_name: str) -> None:
    """A JSON infer body, as FastAPI hands it to KServe's route, then the server."""
    if not body:
        return  # FastAPI: 422, body required
    try:
        parsed = json.loads(body)  # starlette's Request.json()
    except Exception:
        return  # FastAPI: 422 for JSONDecodeError, 400 for anything else
    try:
        request = server().body_type.validate_python(parsed)
    except pydantic.ValidationError:
        return  # FastAPI: 422
    _infer(request, dict(JSON_HEADERS), model_name)


def check_binary(data: bytes, model_name: str) -> None:
    """A binary-extension infer body: ``<header value>\\n<body>``."""
    header, newline, body = data.partition(b"\n")
    headers = {"content-type": "application/octet-stream"}
    if newline:
        headers[BINARY_HEADER] = header.decode("latin-1")  # how HTTP headers decode
    else:
        body = data
    if not body:
        return  # FastAPI: 422, body required
    _infer(body, headers, model_name)


def check_grpc(data: bytes, model_name: str) -> None:
    """A serialized ModelInferRequest for ``model_name``."""
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return  # grpc: the message cannot be deserialized
    request.model_name = model_name
    s = server()
    try:
        s.loop.run_until_complete(s.infer_grpc(request))
    except InvalidInput as error:
        _bounded(error)


KINDS = {ord("f"): "feedback", ord("j"): "json", ord("b"): "binary", ord("g"): "grpc"}
MODELS = {ord("t"): ENSEMBLE, ord("k"): TOKENIZER, ord("m"): MODEL}


def TestOneInput(data: bytes) -> None:  # atheris' name
    """One fuzzer input: any exception is a crash."""
    if not data:
        return
    kind = KINDS.get(data[0]) or list(KINDS.values())[data[0] % 4]
    if kind == "feedback":
        check_feedback(data[1:])
        return
    if len(data) < 2:
        return
    model = MODELS.get(data[1]) or list(MODELS.values())[data[1] % 3]
    {"json": check_json, "binary": check_binary, "grpc": check_grpc}[kind](data[2:], model)


def main() -> None:
    """Run the fuzzer (libFuzzer flags in ``sys.argv``)."""
    _instrument(infer_type)
    _instrument(dataplane)
    server()  # before fuzzing starts: the tokenizer's load is not an input's time
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
