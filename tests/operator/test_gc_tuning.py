"""The operator's garbage-collector settings (kube/gc_tuning.py), each checked in a fresh
interpreter so this test process's collector is left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OPERATOR = Path(__file__).resolve().parents[2] / "operator"

PROBE = """
import gc
import recjob_operator.kube.handlers  # importing the handlers applies the thresholds
from recjob_operator.kube import gc_tuning
before = gc.get_freeze_count()
gc_tuning.freeze_startup_objects()
print(*gc.get_threshold(), before, gc.get_freeze_count())
"""


def _probe(**env: str) -> list[int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RECJOB_GC_")}
    environ |= {"PYTHONPATH": str(OPERATOR), **env}
    out = subprocess.run([sys.executable, "-c", PROBE], env=environ, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return [int(x) for x in out.split()]


def test_the_handlers_raise_the_young_threshold_and_startup_freezes() -> None:
    young, middle, old, frozen_before, frozen_after = _probe()
    assert (young, middle, old) == (50000, 10, 10)  # CPython's other two kept
    assert frozen_before == 0
    assert frozen_after > 10000  # modules, classes and clients no longer walked


def test_the_environment_restores_cpython_behaviour() -> None:
    young, _, _, _, frozen_after = _probe(RECJOB_GC_THRESHOLD="700", RECJOB_GC_FREEZE="0")
    assert young == 700
    assert frozen_after == 0
