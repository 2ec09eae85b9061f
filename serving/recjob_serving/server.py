"""``recjob-serve serve``: a KServe ``ModelServer`` for a Triton model repository on CPU.

Every model in the repository is served at one version (the newest, or the one asked
for), as Triton's default version policy does:

- ``onnxruntime_onnx`` models run in ONNX Runtime (off the event loop, in an executor);
- Python-backend models (the tokenizer, a sequential recommender's top-k model) run their
  own ``model.py`` (see ``python_backend``; their BLS requests run this server's models);
- ensembles run their steps in order, mapping tensors as their config says.

Requests speak the Open Inference Protocol v2 over HTTP and gRPC (KServe's data plane, so
the binary tensor extension and tritonclient work). Every input is checked against the
model's ``config.pbtxt`` before it reaches a model: bad input gets a 400 naming the tensor
and what was expected, an unknown model a 404, never a 500. Metrics, labelled by model,
version and serving revision (``--revision``, see ``revision.py``, which also adds the
feedback endpoint), are on ``/metrics``. Servers listen on 127.0.0.1 unless told otherwise
and stop gracefully on SIGTERM/SIGINT. Request bodies, header and body read times and
model control (load/unload, off by default) are limited as ``limits.ServerLimits`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from pathlib import Path

import kserve
import numpy as np
import onnx
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferResponse
from prometheus_client import Counter, Histogram

from .batching import BatchingPolicy, DynamicBatcher
from .export import session
from .limits import ServerLimits
from .python_backend import PythonBackendModel, TritonError
from .repository import parse_config, published_versions
from .tensors import decode_inputs, tensor_specs

log = logging.getLogger("recjob_serving.server")

#: Labels of every inference series (revision: the serving revision, "" when not set).
LABELS = ["model", "version", "revision"]
REQUESTS = Counter("recjob_inference_requests_total", "Inference requests received", LABELS)
ERRORS = Counter(
    "recjob_inference_errors_total",
    "Inference requests that failed (kind: invalid_input -> 400, internal -> 500)",
    [*LABELS, "kind"],
)
LATENCY = Histogram(
    "recjob_inference_latency_seconds",
    "Time to answer a successful inference request (validation, model, encoding)",
    LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
ROWS = Counter("recjob_inference_rows_total", "Rows (batch entries) scored", LABELS)


class RepositoryError(ValueError):
    """The model repository cannot be served (names the model and the problem)."""


class RepositoryModel(kserve.Model):
    """One version of one model of the repository, served through KServe's data plane."""

    def __init__(self, model_dir: Path, version: int, config, revision: str = "") -> None:
        super().__init__(config.name)
        self.model_dir, self.version, self.config = model_dir, version, config
        self.inputs = tensor_specs(config.input)
        self.outputs = tensor_specs(config.output)
        self.max_batch_size = max(int(config.max_batch_size), 1)
        # as Triton's instance_group: at most `count` executions of this model at once
        # (more would only oversubscribe the cores ONNX Runtime already uses)
        instances = sum(int(group.count) for group in config.instance_group) or 1
        self._slots = (
            contextlib.nullcontext()
            if config.platform == "ensemble"
            else threading.BoundedSemaphore(instances)
        )
        self._labels = {"model": config.name, "version": str(version), "revision": revision}
        policy = None if config.platform == "ensemble" else BatchingPolicy.from_config(config)
        run = self._run_shaped if policy is None or policy.merge_requests else self._run_each
        self.batcher = policy and DynamicBatcher(policy, run, self._labels)
        for kind in ("invalid_input", "internal"):  # so the series exist before a failure
            ERRORS.labels(**self._labels, kind=kind)
        REQUESTS.labels(**self._labels)
        self.ready = True

    def get_input_types(self) -> list[dict]:
        """Declared inputs (model metadata)."""
        return [{"name": s.name, "datatype": s.datatype, "shape": s.shape()} for s in self.inputs]

    def get_output_types(self) -> list[dict]:
        """Declared outputs (model metadata)."""
        return [{"name": s.name, "datatype": s.datatype, "shape": s.shape()} for s in self.outputs]

    def check(self, tensors: dict[str, np.ndarray]) -> None:
        """Model-specific checks of decoded inputs (``InvalidInput`` on failure)."""

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute every output (shapes as the model produces them)."""
        raise NotImplementedError

    def infer(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked run (on its own, never batched), outputs reshaped to the declared
        client-facing shapes (what BLS requests and ensemble steps off the loop call)."""
        self.check(tensors)
        with self._slots:
            return self._run_shaped(tensors)

    def _run_shaped(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._shaped(self.run(tensors), next(iter(tensors.values())).shape[0])

    def run_each(self, requests: list[dict[str, np.ndarray]]) -> list:
        """Compute several requests unmerged (a dynamic batch of a model that takes the list
        of requests), each answered with its outputs or its own exception."""
        results: list = []
        for tensors in requests:
            try:
                results.append(self.run(tensors))
            except Exception as error:
                results.append(error)
        return results

    def _run_each(self, requests: list[dict[str, np.ndarray]]) -> list:
        return [
            result
            if isinstance(result, Exception)
            else self._shaped(result, next(iter(tensors.values())).shape[0])
            for tensors, result in zip(requests, self.run_each(requests), strict=True)
        ]

    def _shaped(self, results: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """The declared outputs of ``results``, each in its client-facing shape."""
        shaped = {}
        for spec in self.outputs:
            value = np.asarray(results[spec.name])
            if value.ndim != 1 + len(spec.dims):  # e.g. a [batch] score declared as [1]
                value = value.reshape(batch, *spec.dims)
            shaped[spec.name] = value
        return shaped

    async def infer_async(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``infer`` off the event loop: through the model's dynamic batcher where its
        config declares one, else alone in an executor thread."""
        if self.batcher is None:
            return await asyncio.get_running_loop().run_in_executor(None, self.infer, tensors)
        self.check(tensors)
        return await self.batcher.submit(tensors)

    async def predict(self, payload, headers=None, response_headers=None) -> InferResponse:
        """Validate, run the model in an executor, count and time the request."""
        started = time.perf_counter()
        REQUESTS.labels(**self._labels).inc()
        try:
            tensors = decode_inputs(payload, self.inputs, self.outputs, self.max_batch_size)
            results = await self.infer_async(tensors)
        except InvalidInput:
            ERRORS.labels(**self._labels, kind="invalid_input").inc()
            raise
        except Exception:
            ERRORS.labels(**self._labels, kind="internal").inc()
            raise
        by_type = {s.name: s.datatype for s in self.outputs}
        outputs = []
        for name, value in results.items():
            output = InferOutput(name, list(value.shape), by_type[name])
            # data must be set this way: KServe's gRPC encoder tests list data for truth
            output.set_data_from_numpy(value, binary_data=payload.use_binary_outputs)
            outputs.append(output)
        response = InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            model_version=str(self.version),
            infer_outputs=outputs,
            from_grpc=payload.from_grpc,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )
        ROWS.labels(**self._labels).inc(next(iter(results.values())).shape[0])
        LATENCY.labels(**self._labels).observe(time.perf_counter() - started)
        return response


def _embedding_rows(graph: onnx.GraphProto, input_name: str) -> int | None:
    """Rows of the embedding table an input indexes (vocabulary size), if it has one."""
    tables = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if input_name in node.input:
            for other in node.input:
                if other in tables and len(tables[other]) == 2:
                    return int(tables[other][0])
    return None


def _int_parameter(model: str, parameters: dict[str, str], key: str) -> int:
    """A non-negative integer parameter of a model's config (0 when absent)."""
    value = parameters.get(key, "0")
    if not value.isdigit():
        raise RepositoryError(
            f"model '{model}': parameter {key} is {value!r}; expected a non-negative integer"
        )
    return int(value)


class OnnxModel(RepositoryModel):
    """An ``onnxruntime_onnx`` model version (token ids in, scores or embeddings out)."""

    def __init__(self, model_dir: Path, version: int, config, revision: str = "") -> None:
        super().__init__(model_dir, version, config, revision)
        path = model_dir / str(version) / "model.onnx"
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        # Triton's onnxruntime backend thread count; allow_spinning is RecJob's own
        self.session = session(
            path,
            intra_op_threads=_int_parameter(config.name, parameters, "intra_op_thread_count"),
            spinning=parameters.get("allow_spinning", "1") == "1",
        )
        self.output_names = [o.name for o in self.session.get_outputs()]
        card = model_dir / str(version) / "recjob.json"
        self.card = json.loads(card.read_text()) if card.exists() else {}
        graph = onnx.load(str(path), load_external_data=False).graph
        self.value_limits = {
            spec.name: _embedding_rows(graph, spec.name)
            for spec in self.inputs
            if spec.datatype in ("INT64", "INT32")
        }
        if "attention_mask" in self.value_limits:
            self.value_limits["attention_mask"] = 2

    def check(self, tensors: dict[str, np.ndarray]) -> None:
        """Token ids inside the vocabulary, masks of 0/1, one sequence length, and no
        longer than the model was trained for."""
        lengths = {name: value.shape[1] for name, value in tensors.items() if value.ndim == 2}
        if len(set(lengths.values())) > 1:
            raise InvalidInput(f"inputs disagree on the sequence length: {lengths}")
        window = self.card.get("max_history")  # a sequential recommender's user tower
        if window and lengths and max(lengths.values()) > window:
            raise InvalidInput(
                f"history length {max(lengths.values())} is over this model's history of "
                f"{window} items (send the most recent ones)"
            )
        max_length = None if window else self.card.get("max_length")
        if max_length and lengths and max(lengths.values()) > max_length:
            raise InvalidInput(
                f"sequence length {max(lengths.values())} is over this model's max length "
                f"{max_length} (truncate when tokenizing)"
            )
        for name, limit in self.value_limits.items():
            value = tensors[name]
            if limit is not None and (value.min() < 0 or value.max() >= limit):
                raise InvalidInput(
                    f"input '{name}' has values in [{value.min()}, {value.max()}]; "
                    f"expected 0 <= value < {limit}"
                )

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One ONNX Runtime call (int64 inputs passed as they are, others converted)."""
        feed = {
            k: np.asarray(v, dtype=np.int64) if v.dtype.kind == "i" else v
            for k, v in tensors.items()
        }
        return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))


#: Parameters of a Python-backend model's config that ``ServerLimits`` can lower.
LIMITED_PARAMETERS = ("max_k", "max_history")


class PythonModel(RepositoryModel):
    """A Python-backend model version (the tokenizer, the top-k model); ``models`` (name ->
    model, looked up when a request runs) serve its BLS requests. Its ``max_k`` and
    ``max_history`` parameters, where it has them, are lowered to ``limits``'."""

    def __init__(
        self,
        model_dir: Path,
        version: int,
        config,
        revision: str = "",
        models: dict | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        super().__init__(model_dir, version, config, revision)
        if limits is not None:
            config = _with_limits(config, limits)
        registry = models if models is not None else {}

        def bls(name: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if name not in registry:
                raise RepositoryError(f"no model '{name}' in the repository")
            return registry[name].infer(tensors)

        self.backend = PythonBackendModel(model_dir, version, config, bls=bls)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's own ``execute``; its per-request error becomes a 400."""
        try:
            return self.backend.execute(tensors)
        except TritonError as error:
            raise InvalidInput(f"{self.name}: {error.message()}") from None

    def run_each(self, requests: list[dict[str, np.ndarray]]) -> list:
        """One ``execute`` call for all ``requests`` (Triton's dynamic batching of a
        Python model); a request's error becomes its own 400."""
        return [
            InvalidInput(f"{self.name}: {result.message()}")
            if isinstance(result, TritonError)
            else result
            for result in self.backend.execute_many(requests)
        ]


def _with_limits(config, limits: ServerLimits):
    """A copy of ``config`` whose limit parameters are at most ``limits``' values."""
    config = type(config).FromString(config.SerializeToString())
    for name in LIMITED_PARAMETERS:
        if name in config.parameters:
            current = int(config.parameters[name].string_value)
            config.parameters[name].string_value = str(min(current, getattr(limits, name)))
    return config


class EnsembleModel(RepositoryModel):
    """An ensemble: each step's inputs taken from the tensors so far, outputs added."""

    def __init__(
        self, model_dir: Path, version: int, config, models: dict, revision: str = ""
    ) -> None:
        super().__init__(model_dir, version, config, revision)
        self.steps = []
        for step in config.ensemble_scheduling.step:
            if step.model_name not in models:
                raise RepositoryError(
                    f"ensemble '{config.name}' uses model '{step.model_name}', which is not "
                    "in the repository"
                )
            self.steps.append(
                (models[step.model_name], dict(step.input_map), dict(step.output_map))
            )

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the steps in order (each step's own checks apply)."""
        values = dict(tensors)
        for model, input_map, output_map in self.steps:
            outputs = model.infer({inner: values[outer] for inner, outer in input_map.items()})
            values.update({outer: outputs[inner] for inner, outer in output_map.items()})
        return values

    async def infer_async(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The steps in order, each through its model's own scheduler (so a step whose
        model batches dynamically is batched with other requests of that model)."""
        self.check(tensors)
        values = dict(tensors)
        for model, input_map, output_map in self.steps:
            step_inputs = {inner: values[outer] for inner, outer in input_map.items()}
            outputs = await model.infer_async(step_inputs)
            values.update({outer: outputs[inner] for inner, outer in output_map.items()})
        return self._shaped(values, next(iter(tensors.values())).shape[0])


def _version_to_serve(model_dir: Path, version: int | None) -> int:
    versions = published_versions(model_dir)
    if not versions:
        raise RepositoryError(f"model '{model_dir.name}' has no published version")
    if version is None:
        return versions[-1]
    if version not in versions:
        raise RepositoryError(
            f"model '{model_dir.name}' has no version {version} (published: {versions})"
        )
    return version


def load_repository(
    repository: Path,
    version: int | None = None,
    revision: str = "",
    limits: ServerLimits | None = None,
) -> list[RepositoryModel]:
    """Load every model of a Triton repository at ``version`` (default: each model's
    newest), its metrics labelled with ``revision``, Python models' limits at most
    ``limits``'. TensorRT plans are skipped with a warning (they need Triton on a GPU
    node)."""
    if not repository.is_dir():
        raise RepositoryError(f"model repository {repository} does not exist")
    configs = {}
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        config = parse_config(config_path.read_text())
        if config.name != config_path.parent.name:
            raise RepositoryError(
                f"{config_path}: name '{config.name}' differs from its folder "
                f"'{config_path.parent.name}'"
            )
        configs[config.name] = config
    models: dict[str, RepositoryModel] = {}
    ensembles = []
    for name, config in configs.items():
        model_dir = repository / name
        if config.platform == "ensemble":
            ensembles.append((model_dir, config))
        elif config.platform == "onnxruntime_onnx":
            served = _version_to_serve(model_dir, version)
            models[name] = OnnxModel(model_dir, served, config, revision)
        elif config.backend == "python":
            served = _version_to_serve(model_dir, version)
            models[name] = PythonModel(model_dir, served, config, revision, models, limits)
        else:
            log.warning(
                "skipping model %s: %s needs Triton (a GPU node)",
                name,
                config.platform or config.backend,
            )
    for model_dir, config in ensembles:
        ensemble_version = _version_to_serve(model_dir, version)
        models[config.name] = EnsembleModel(model_dir, ensemble_version, config, models, revision)
    if not models:
        raise RepositoryError(f"model repository {repository} has no model this server can run")
    return list(models.values())


def serve(
    repository: Path,
    host: str = "127.0.0.1",
    http_port: int = 8080,
    grpc_port: int = 8081,
    version: int | None = None,
    grace_period: int = 10,
    limits: ServerLimits | None = None,
    revision: str = "",
    log_requests: bool = False,
) -> None:
    """Serve ``repository`` within ``limits`` as serving revision ``revision`` (metric
    label, response header, feedback; "" for none) until SIGTERM/SIGINT (blocking);
    every request logged only with ``log_requests``."""
    from .loopback import LoopbackModelServer

    models = load_repository(repository, version, revision, limits)
    for model in models:
        log.info("serving %s version %s (revision %r)", model.name, model.version, revision)
    LoopbackModelServer(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        grace_period=grace_period,
        limits=limits,
        revision=revision,
        log_requests=log_requests,
    ).start(models)
