"""Triton model repository writer: versioned directories and a ``config.pbtxt`` derived
from the model itself, each config parsed with Triton's own ModelConfig protobuf and
cross-checked against the ONNX graph. A version is published atomically: it is built under
a temporary name and renamed into place, so a reader never sees half of it.

Layout::

    <repository>/<model>/config.pbtxt
    <repository>/<model>/<version>/model.onnx      (or model.plan for TensorRT)
    <repository>/<model>/<version>/recjob.json     (kind, max length, scale, gate result)
    <repository>/<model>-tokenizer/config.pbtxt    (Python backend: raw text -> token ids)
    <repository>/<model>-tokenizer/<version>/{model.py,tokenizer/}
    <repository>/<model>-text/config.pbtxt         (ensemble: tokenizer, then model)
    <repository>/<model>-text/<version>/           (empty, as Triton wants)

A sequential recommender instead has its user tower as ``<model>`` (``history`` item
indices -> ``user_vector``), its item vectors and ids beside it in the version folder
(``item_vectors.npy``, ``item_ids.json``), and ``<model>-topk`` (Python backend: item ids
in, the top-k of the catalog or of given candidates out; see ``backends/topk_model.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from types import ModuleType

import onnx

_ONNX_TO_TRITON = {
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
}


def model_config_module() -> ModuleType:
    """tritonclient's ``model_config_pb2``, loaded by file path: importing the
    ``tritonclient.grpc`` package beside kserve duplicates protobuf symbols."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("recjob_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's ModelConfig protobuf (ParseError if invalid)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_module().ModelConfig())


def _tensor_lines(name: str, dtype: str, dims: list[int], reshape: bool) -> str:
    reshape_text = "\n    reshape: { shape: [ ] }" if reshape else ""
    return (
        f'  {{\n    name: "{name}"\n    data_type: {dtype}\n'
        f"    dims: [ {', '.join(map(str, dims))} ]{reshape_text}\n  }}"
    )


def onnx_config(
    name: str,
    model_path: Path,
    max_batch_size: int,
    instances: int = 1,
    platform: str = "onnxruntime_onnx",
) -> str:
    """config.pbtxt for an ONNX (or TensorRT plan) model, its tensors read from the graph:
    the batch axis is Triton's, the other axes keep their size (-1 when dynamic)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def tensors(values) -> list[str]:
        out = []
        for value in values:
            if value.name in initializers:
                continue
            shape = value.type.tensor_type.shape.dim
            dims = [d.dim_value if d.dim_value > 0 else -1 for d in shape[1:]]
            dtype = _ONNX_TO_TRITON[value.type.tensor_type.elem_type]
            out.append(_tensor_lines(value.name, dtype, dims or [1], reshape=not dims))
        return out

    inputs, outputs = ",\n".join(tensors(graph.input)), ",\n".join(tensors(graph.output))
    return (
        f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n"
    )


def check_config(text: str, model_path: Path) -> None:
    """Parse ``text`` and check its tensors name the ONNX graph's inputs and outputs with
    the same types (ValueError naming the mismatch)."""
    config = parse_config(text)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    for side, declared, actual in (
        ("input", config.input, graph.input),
        ("output", config.output, graph.output),
    ):
        real = {
            v.name: _ONNX_TO_TRITON[v.type.tensor_type.elem_type]
            for v in actual
            if v.name not in initializers
        }
        types = model_config_module().DataType
        named = {t.name: types.Name(t.data_type) for t in declared}
        if named != real:
            raise ValueError(f"config.pbtxt {side}s {named} do not match the model's {real}")


def next_version(model_root: Path) -> int:
    """One more than the newest published version (1 for a new model)."""
    versions = [int(p.name) for p in model_root.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def published_versions(model_root: Path) -> list[int]:
    """The complete versions of a model, oldest first (staging folders are not versions)."""
    return sorted(int(p.name) for p in model_root.glob("*") if p.is_dir() and p.name.isdigit())


def _publish_version(model_root: Path, version: int, files: dict[str, Path], config: str) -> None:
    """Stage ``files`` (name in the version folder -> source file or folder) and the config
    under temporary names, then rename them into place."""
    model_root.mkdir(parents=True, exist_ok=True)
    final = model_root / str(version)
    if final.exists():
        raise FileExistsError(f"{final} is already published")
    staging = model_root / f".{version}.{uuid.uuid4().hex}.partial"
    config_tmp = model_root / f".config.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for name, source in files.items():
            if source.is_dir():
                shutil.copytree(source, staging / name)
            else:
                shutil.copyfile(source, staging / name)
        config_tmp.write_text(config)
        os.replace(staging, final)
        os.replace(config_tmp, model_root / "config.pbtxt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        config_tmp.unlink(missing_ok=True)


def publish(
    repository: Path,
    name: str,
    model_path: Path,
    metadata: dict,
    max_batch_size: int,
    version: int | None = None,
    files: dict[str, Path] | None = None,
) -> int:
    """Publish ``model_path`` as a new version of model ``name`` (with ``files``, name in
    the version folder -> file, beside it); returns the version."""
    model_root = repository / name
    version = version or next_version(model_root)
    suffix = ".plan" if model_path.suffix == ".plan" else ".onnx"
    config = onnx_config(
        name,
        model_path,
        max_batch_size,
        platform="tensorrt_plan" if suffix == ".plan" else "onnxruntime_onnx",
    )
    if suffix == ".onnx":
        check_config(config, model_path)
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / "recjob.json"
        card.write_text(json.dumps(metadata, indent=2, default=float))
        contents = {f"model{suffix}": model_path, "recjob.json": card, **(files or {})}
        _publish_version(model_root, version, contents, config)
    return version


#: The Python-backend tokenizer model copied into repositories.
TOKENIZER_BACKEND = Path(__file__).parent / "backends" / "tokenizer_model.py"
#: Raw-text inputs of the tokenizer and ensemble models, by model kind.
TEXT_INPUTS = {"cross-encoder": ["query", "item"], "bi-encoder": ["text"]}
#: Token-id tensors each model kind takes.
TOKEN_TENSORS = {
    "cross-encoder": ["input_ids", "attention_mask", "token_type_ids"],
    "bi-encoder": ["input_ids", "attention_mask"],
}


def tokenizer_config(name: str, kind: str, max_length: int, max_batch_size: int) -> str:
    """config.pbtxt of the Python-backend tokenizer model (raw text -> token ids)."""
    inputs = ",\n".join(_tensor_lines(t, "TYPE_STRING", [1], False) for t in TEXT_INPUTS[kind])
    outputs = ",\n".join(_tensor_lines(t, "TYPE_INT64", [-1], False) for t in TOKEN_TENSORS[kind])
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f'parameters: {{\n  key: "kind"\n  value: {{ string_value: "{kind}" }}\n}}\n'
        f'parameters: {{\n  key: "max_length"\n  value: {{ string_value: "{max_length}" }}\n}}\n'
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    )


def ensemble_config(
    name: str, tokenizer: str, model: str, kind: str, model_config: str, max_batch_size: int
) -> str:
    """config.pbtxt of the ensemble that clients send raw text to: tokenizer, then model.
    Its outputs are the model's (read from ``model_config``)."""
    parsed = parse_config(model_config)
    types = model_config_module().DataType
    inputs = ",\n".join(_tensor_lines(t, "TYPE_STRING", [1], False) for t in TEXT_INPUTS[kind])
    outputs = ",\n".join(
        _tensor_lines(o.name, types.Name(o.data_type), list(o.dims), False) for o in parsed.output
    )

    def mapping(kind_of_map: str, names: list[str]) -> str:
        return "".join(f'      {kind_of_map} {{ key: "{n}" value: "{n}" }}\n' for n in names)

    steps = (
        f'    {{\n      model_name: "{tokenizer}"\n      model_version: -1\n'
        + mapping("input_map", TEXT_INPUTS[kind])
        + mapping("output_map", TOKEN_TENSORS[kind])
        + f'    }},\n    {{\n      model_name: "{model}"\n      model_version: -1\n'
        + mapping("input_map", TOKEN_TENSORS[kind])
        + mapping("output_map", [o.name for o in parsed.output])
        + "    }"
    )
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"ensemble_scheduling {{\n  step [\n{steps}\n  ]\n}}\n"
    )


def text_model_names(name: str) -> tuple[str, str]:
    """(tokenizer model, raw-text ensemble) names for model ``name``."""
    return f"{name}-tokenizer", f"{name}-text"


#: The top-k model copied into repositories beside a sequential recommender's user tower.
TOPK_BACKEND = Path(__file__).parent / "backends" / "topk_model.py"


def topk_model_name(name: str) -> str:
    """The top-k model's name for the user tower ``name``."""
    return f"{name}-topk"


def companion_model_names(name: str, kind: str) -> list[str]:
    """The models published with model ``name`` of ``kind`` (each version has them all)."""
    return [topk_model_name(name)] if kind == "sequential" else list(text_model_names(name))


def topk_config(name: str, user_tower: str, max_batch_size: int, parameters: dict) -> str:
    """config.pbtxt of the top-k model (Python backend; inputs and outputs in
    ``backends/topk_model.py``'s docstring)."""
    inputs = ",\n".join(
        [
            _tensor_lines("history", "TYPE_STRING", [-1], False),
            *(
                _tensor_lines(n, t, d, False).replace("\n  }", "\n    optional: true\n  }")
                for n, t, d in (
                    ("k", "TYPE_INT32", [1]),
                    ("exclude_history", "TYPE_BOOL", [1]),
                    ("candidates", "TYPE_STRING", [-1]),
                )
            ),
        ]
    )
    outputs = ",\n".join(
        _tensor_lines(n, t, [-1], False)
        for n, t in (
            ("item_ids", "TYPE_STRING"),
            ("scores", "TYPE_FP32"),
            ("unknown_items", "TYPE_STRING"),
        )
    )
    values = {"user_tower": user_tower, **{k: str(v) for k, v in parameters.items()}}
    params = "".join(
        f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n'
        for k, v in values.items()
    )
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n{params}"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    )


def publish_topk_model(
    repository: Path,
    name: str,
    max_batch_size: int,
    version: int,
    parameters: dict | None = None,
) -> None:
    """Publish version ``version`` of the top-k model of the user tower ``name`` (which
    must have that version, its item vectors and ids beside it). ``parameters``: the
    search and limit settings of ``backends/topk_model.py`` (its defaults otherwise;
    ``max_k`` and ``max_history`` are always written, so a server can lower them)."""
    from .limits import DEFAULT_MAX_HISTORY, DEFAULT_MAX_K

    settings = {"max_k": DEFAULT_MAX_K, "max_history": DEFAULT_MAX_HISTORY, **(parameters or {})}
    topk = topk_model_name(name)
    config = topk_config(topk, name, max_batch_size, settings)
    parse_config(config)
    _publish_version(repository / topk, version, {"model.py": TOPK_BACKEND}, config)


def publish_text_models(
    repository: Path,
    name: str,
    tokenizer_dir: Path,
    kind: str,
    max_length: int,
    max_batch_size: int,
    version: int,
) -> None:
    """Publish the tokenizer model and the raw-text ensemble for version ``version`` of
    model ``name`` (published first, so the ensemble never points at a missing step)."""
    tokenizer_name, ensemble_name = text_model_names(name)
    _publish_version(
        repository / tokenizer_name,
        version,
        {"model.py": TOKENIZER_BACKEND, "tokenizer": tokenizer_dir},
        tokenizer_config(tokenizer_name, kind, max_length, max_batch_size),
    )
    model_config = (repository / name / "config.pbtxt").read_text()
    config = ensemble_config(
        ensemble_name, tokenizer_name, name, kind, model_config, max_batch_size
    )
    parse_config(config)
    (repository / ensemble_name / str(version)).mkdir(parents=True, exist_ok=True)
    tmp = repository / ensemble_name / f".config.{uuid.uuid4().hex}.tmp"
    tmp.write_text(config)
    os.replace(tmp, repository / ensemble_name / "config.pbtxt")


def snapshot_path(repository: Path, version: int) -> Path:
    """Where the single-version snapshot of ``version`` goes: ``<repository>-snapshots/vN``."""
    return repository.parent / f"{repository.name}-snapshots" / f"v{version}"


def write_snapshot(repository: Path, names: list[str], version: int) -> Path:
    """A self-contained repository with only ``version`` of the models ``names`` (what one
    InferenceService revision serves). Written atomically; returns its path."""
    target = snapshot_path(repository, version)
    if target.exists():
        return target
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir(parents=True)
    try:
        for name in names:
            (staging / name).mkdir()
            shutil.copyfile(repository / name / "config.pbtxt", staging / name / "config.pbtxt")
            shutil.copytree(repository / name / str(version), staging / name / str(version))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
