"""The most int8 can gain over fp32 on this CPU: the served encoder's matrix products
alone, fp32 (PyTorch, ONNX Runtime) against ONNX Runtime's dynamic int8 built the way
`recjob-serve convert` builds it (per-channel 7-bit weights).

    .venv/bin/python bench/gemm_ceiling.py [--rounds 5]

A BERT layer of all-MiniLM-L6-v2 is, in arithmetic, four products with its weights
(query/key/value and output 384x384, feed-forward 384x1536 and 1536x384); attention over
32 tokens, LayerNorm and GELU add a few percent. So int8 / fp32 of these products at the
row counts the bench serves (batch 32 x 32 tokens = 1024 rows; batch 1 = 32 rows) bounds
what a whole int8 model can reach against PyTorch eager fp32 here. Without int8
dot-product instructions (VNNI), ONNX Runtime multiplies uint8 by int8 with VPMADDUBSW and
widens the sums with VPMADDWD: about twice the fp32 FMA rate at best.

PyTorch's dynamic int8 Linear (FBGEMM) is measured beside ONNX Runtime as a second,
independent int8 implementation. Timing: each product as its own one-node graph (and
torch.matmul), rounds interleaved, median; GFLOP/s counts 2 operations per multiply-add
for all. Writes bench/results/gemm_ceiling.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine

HERE = Path(__file__).resolve().parent
#: (rows, inner, outer) of the layer's weight products; rows = batch x tokens.
SHAPES = {
    "ffn-up 1024x384x1536": (1024, 384, 1536),
    "ffn-down 1024x1536x384": (1024, 1536, 384),
    "attention-proj 1024x384x384": (1024, 384, 384),
    "ffn-up 32x384x1536": (32, 384, 1536),
}


def matmul_graph(path: Path, inner: int, outer: int, seed: int = 0) -> Path:
    """A one-node fp32 ONNX graph: X[rows, inner] @ W[inner, outer], W an initializer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).normal(0, 0.05, (inner, outer)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", inner])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", outer])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def quantized(source: Path, target: Path) -> Path:
    """``source`` through ONNX Runtime's dynamic int8 with convert's options."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source), str(target), per_channel=True, reduce_range=True,
        weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )  # fmt: skip
    return target


def int8_linear(weight, tensor):
    """PyTorch's own dynamic int8 product (``quantize_dynamic`` of a Linear: FBGEMM's
    kernels on x86), as a second implementation beside ONNX Runtime's."""
    import torch

    linear = torch.nn.Linear(*weight.shape, bias=False)
    linear.weight.data = weight.T.contiguous()
    model = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8
    )

    def call():
        with torch.inference_mode():
            return model(tensor)

    return call


def seconds_per_call(call, calls: int) -> float:
    """Mean wall seconds of ``call()`` over ``calls`` calls, after one warm-up."""
    call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def measure(rounds: int) -> dict:
    """GFLOP/s of each product under each engine, median of ``rounds`` interleaved rounds."""
    import torch

    from recjob_serving.export import session

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (rows, inner, outer) in SHAPES.items():
            fp32 = matmul_graph(Path(tmp) / f"{inner}x{outer}.onnx", inner, outer)
            int8 = quantized(fp32, Path(tmp) / f"{inner}x{outer}.int8.onnx")
            x = np.random.default_rng(1).normal(0, 1, (rows, inner)).astype(np.float32)
            weight = torch.randn(inner, outer)
            tensor = torch.from_numpy(x)
            sessions = {"onnxruntime-fp32": session(fp32), "onnxruntime-int8": session(int8)}
            engines = {
                "pytorch-fp32": lambda t=tensor, w=weight: torch.matmul(t, w),
                "pytorch-int8-fbgemm": int8_linear(weight, tensor),
                **{k: (lambda s=s, x=x: s.run(None, {"x": x})) for k, s in sessions.items()},
            }
            flop = 2.0 * rows * inner * outer
            calls = max(4, int(2e10 / flop))  # about 20 GFLOP a measurement
            samples: dict[str, list[float]] = {engine: [] for engine in engines}
            for _ in range(rounds):
                for engine, call in engines.items():
                    samples[engine].append(flop / seconds_per_call(call, calls) / 1e9)
            gflops = {engine: float(np.median(values)) for engine, values in samples.items()}
            results[name] = {
                "rows": rows,
                "gflop_per_s": gflops,
                "int8_vs_pytorch_fp32": gflops["onnxruntime-int8"] / gflops["pytorch-fp32"],
                "fbgemm_int8_vs_pytorch_fp32": gflops["pytorch-int8-fbgemm"]
                / gflops["pytorch-fp32"],
                "int8_vs_onnxruntime_fp32": gflops["onnxruntime-int8"] / gflops["onnxruntime-fp32"],
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gemm_ceiling.json")
    args = parser.parse_args()
    import torch

    before = machine()
    products = measure(args.rounds)
    results = {
        "machine": {**before, "load_average_1m_at_end": machine()["load_average_1m"]},
        "pytorch_threads": torch.get_num_threads(),
        "products": products,
        "best_int8_vs_pytorch_fp32_at_1024_rows": max(
            max(v["int8_vs_pytorch_fp32"], v["fbgemm_int8_vs_pytorch_fp32"])
            for v in products.values()
            if v["rows"] == 1024
        ),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    engines = list(next(iter(products.values()))["gflop_per_s"])
    print(f"GFLOP/s {'product':30}" + "".join(f"{e:>20}" for e in engines) + f"{'ort int8/pt':>12}")
    for name, value in products.items():
        g = value["gflop_per_s"]
        print(
            f"        {name:30}" + "".join(f"{g[e]:20.1f}" for e in engines)
            + f"{value['int8_vs_pytorch_fp32']:11.2f}x"
        )  # fmt: skip
    print(f"machine: {before}; wrote {args.out}")


if __name__ == "__main__":
    main()
