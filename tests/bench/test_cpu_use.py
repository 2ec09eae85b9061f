"""bench/cpu_use.py: CPU seconds per named process over a span (real processes, about 1 s)."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.bench.scripts import BENCH, load_script


def burn(seconds: float) -> None:
    """Keep this thread on the CPU for about ``seconds``."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_of_this_process_and_a_named_child_is_counted_and_an_idle_one_is_not():
    cpu_use = load_script(BENCH / "cpu_use.py")
    # the busy child burns 0.5 s of CPU once told to, then says so
    code = (
        "import sys, time\nsys.stdin.readline()\nt = time.process_time() + 0.5\n"
        "while time.process_time() < t: pass\nprint('done', flush=True)\ntime.sleep(30)"
    )
    busy = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    idle = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); "
                             "time.sleep(30)"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert idle.stdout.readline().strip() == "up"  # its start-up's CPU is behind it
        span = cpu_use.CpuUse({"busy": busy.pid, "idle": idle.pid})
        busy.stdin.write("go\n"), busy.stdin.flush()
        burn(0.3)
        assert busy.stdout.readline().strip() == "done"
        used = span.seconds()
    finally:
        busy.kill(), idle.kill()
    assert used["bench"] >= 0.25
    assert used["busy"] >= 0.45
    assert used["idle"] < 0.05
    assert list(used) == sorted(used, key=lambda name: -used[name])  # largest first


def test_a_process_gone_before_the_end_is_left_out():
    cpu_use = load_script(BENCH / "cpu_use.py")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    span = cpu_use.CpuUse({"child": child.pid})
    child.wait()
    assert "child" not in span.seconds()
