"""Triton model repository writer: versioned directories and a ``config.pbtxt`` derived
from the model itself, each config parsed with Triton's own ModelConfig protobuf and
cross-checked against the ONNX graph. A version is published atomically: it is built under
a temporary name and renamed into place, so a reader never sees half of it.

Layout::

    <repository>/<model>/config.pbtxt
    <repository>/<model>/<version>/model.onnx      (or model.plan for TensorRT)
    <repository>/<model>/<version>/recjob.json     (kind, max length, scale, gate result)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
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
        "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
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


def publish(
    repository: Path,
    name: str,
    model_path: Path,
    metadata: dict,
    max_batch_size: int,
    version: int | None = None,
) -> int:
    """Publish ``model_path`` as a new version of model ``name``; returns the version."""
    model_root = repository / name
    model_root.mkdir(parents=True, exist_ok=True)
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
    staging = model_root / f".{version}.{uuid.uuid4().hex}.partial"
    config_tmp = model_root / f".config.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        shutil.copyfile(model_path, staging / f"model{suffix}")
        (staging / "recjob.json").write_text(json.dumps(metadata, indent=2, default=float))
        config_tmp.write_text(config)
        if (model_root / str(version)).exists():
            raise FileExistsError(f"{model_root / str(version)} is already published")
        os.replace(staging, model_root / str(version))
        os.replace(config_tmp, model_root / "config.pbtxt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        config_tmp.unlink(missing_ok=True)
    return version
