"""What the benchmarks record about the machine they ran on: cores, CPU model, the SIMD
instructions that decide int8 speed, and how busy the machine was (a run on a loaded or
throttled machine is slower across the board; its ratios still compare like with like
only when its parts were interleaved)."""

from __future__ import annotations

import os
from pathlib import Path

#: CPU flags that change what int8 and fp32 kernels can do (x86 names, /proc/cpuinfo).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_description(cpuinfo: str) -> dict:
    """Model name and the SIMD flags of interest from the text of /proc/cpuinfo."""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu_model": model, "simd": [flag for flag in SIMD_FLAGS if flag in flags]}


def machine(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """Cores, CPU model, SIMD flags and the 1-minute load average right now."""
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return {
        "cpus": os.cpu_count(),
        **cpu_description(text),
        "load_average_1m": os.getloadavg()[0],
    }
