"""bench/gemm_ceiling.py and bench/machine.py: the int8 ceiling measures real graphs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bench.scripts import BENCH, load_script


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    """The scripts import their neighbours (common, machine) by name."""
    monkeypatch.syspath_prepend(str(BENCH))


def test_the_int8_graph_is_convert_s_quantization_of_the_fp32_product(tmp_path):
    gemm = load_script(BENCH / "gemm_ceiling.py")
    from recjob_serving.export import session

    fp32 = gemm.matmul_graph(tmp_path / "m.onnx", 64, 96)
    int8 = gemm.quantized(fp32, tmp_path / "m.int8.onnx")
    ops = {node.op_type for node in __import__("onnx").load(str(int8)).graph.node}
    assert "MatMul" not in ops and ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    x = np.random.default_rng(0).normal(0, 1, (8, 64)).astype(np.float32)
    exact, approx = session(fp32).run(None, {"x": x})[0], session(int8).run(None, {"x": x})[0]
    assert exact.shape == approx.shape == (8, 96)
    assert np.abs(exact - approx).max() < 0.05 * np.abs(exact).max()  # int8, not garbage


def test_measure_reports_every_engine_for_every_product(monkeypatch):
    gemm = load_script(BENCH / "gemm_ceiling.py")
    monkeypatch.setattr(gemm, "SHAPES", {"tiny": (16, 32, 48)})
    result = gemm.measure(rounds=1)["tiny"]
    assert result["rows"] == 16
    assert set(result["gflop_per_s"]) == {
        "pytorch-fp32",
        "pytorch-int8-fbgemm",
        "onnxruntime-fp32",
        "onnxruntime-int8",
    }
    assert all(value > 0 for value in result["gflop_per_s"].values())
    g = result["gflop_per_s"]
    assert result["int8_vs_pytorch_fp32"] == g["onnxruntime-int8"] / g["pytorch-fp32"]


def test_the_fbgemm_product_is_an_int8_approximation_of_the_same_weights():
    gemm = load_script(BENCH / "gemm_ceiling.py")
    import torch

    torch.manual_seed(0)
    weight, x = torch.randn(64, 96) * 0.05, torch.randn(8, 64)
    approx, exact = gemm.int8_linear(weight, x)(), x @ weight
    assert approx.shape == (8, 96)
    error = (approx - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.05  # quantized (not bit-identical to fp32), yet the same product


def test_cpu_description_reads_the_model_and_the_int8_flags():
    machine = load_script(BENCH / "machine.py")
    cpuinfo = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma avx512f "
        "avx512_vnni\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    assert machine.cpu_description(cpuinfo) == {
        "cpu_model": "AMD EPYC 7B13",
        "simd": ["avx2", "fma", "avx512f", "avx512_vnni"],
    }
    now = machine.machine()
    assert now["cpus"] >= 1 and now["load_average_1m"] >= 0


def test_serving_summary_takes_the_median_round_and_pools_the_calls():
    serving = load_script(BENCH / "serving.py")
    rounds = [
        {"times": [0.1, 0.1], "rows": 2},  # 10 rows/s
        {"times": [0.05, 0.05], "rows": 2},  # 20 rows/s
        {"times": [0.4], "rows": 1},  # 2.5 rows/s
    ]
    result = serving.summary(rounds)
    assert result["rows_per_s"] == 10.0
    assert result["calls"] == 5 and result["rounds"] == 3
    assert result["p50_ms"] == 100.0
    assert 300 < result["p99_ms"] <= 400
