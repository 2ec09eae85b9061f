"""The fuzz targets under pytest (tests/fuzz/README.md).

- Every committed input (``regressions/<target>/``: each crash a fuzzer ever found, and
  ``corpus/<target>/``: the seeds) goes through its target's ``TestOneInput`` in-process.
- Each fuzzer runs for ``RECJOB_FUZZ_SECONDS`` (default 30; 0 skips) from a copy of those
  inputs; a crash, timeout or out-of-memory fails the test with the input in base64.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import fuzz_recjob_yaml, fuzz_serving_request

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGETS = {
    "recjob_yaml": (fuzz_recjob_yaml, HERE / "fuzz_recjob_yaml.py"),
    "serving_request": (fuzz_serving_request, HERE / "fuzz_serving_request.py"),
}
SECONDS = int(os.environ.get("RECJOB_FUZZ_SECONDS", "30"))
#: What libFuzzer writes for an input that failed (crash, -timeout, -rss_limit_mb, ...).
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def _inputs(target: str) -> list[Path]:
    return sorted(
        path
        for kind in ("regressions", "corpus")
        for path in (HERE / kind / target).iterdir()
        if path.is_file()
    )


@pytest.mark.parametrize(
    ("target", "path"),
    [
        pytest.param(target, path, id=f"{path.parent.parent.name}/{target}/{path.name}")
        for target in TARGETS
        for path in _inputs(target)
    ],
)
def test_committed_input_is_handled(target: str, path: Path) -> None:
    module, _ = TARGETS[target]
    module.TestOneInput(path.read_bytes())


def _report(target: str, artifacts: list[Path], output: str) -> str:
    lines = [f"the {target} fuzzer failed ({len(artifacts)} failing input(s))"]
    for artifact in artifacts:
        encoded = base64.b64encode(artifact.read_bytes()).decode()
        lines += [
            f"--- {artifact.name} ({artifact.stat().st_size} bytes), base64:",
            encoded,
            "add it as a regression case (and fix what it finds):",
            f"  echo '{encoded}' | base64 -d > tests/fuzz/regressions/{target}/<what-it-does>",
        ]
    lines += ["--- fuzzer output (tail):", output[-6000:]]
    return "\n".join(lines)


def run_with_own_peak_rss(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` (output captured) so that its peak RSS starts from its own, not ours.

    libFuzzer's ``-rss_limit_mb`` compares the limit with ``getrusage`` 's ``ru_maxrss``, and
    Linux carries the peak RSS of the address space a process replaces at ``execve`` into
    that number: a command started straight from a pytest worker that once held 2 GB
    starts "over" a 2 GB limit (what failed CI: both fuzzers "out-of-memory" within a
    second, on ordinary inputs). A shell that forks the command first gives it a fresh
    count, from the shell's own few megabytes. The command runs in its own session so a
    timeout ends it, not only the shell.
    """
    process = subprocess.Popen(
        ["/bin/sh", "-c", '"$@"; exit $?', "sh", *command],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzzer_finds_nothing_new(target: str, tmp_path: Path) -> None:
    if SECONDS <= 0:
        pytest.skip("RECJOB_FUZZ_SECONDS=0")
    _, script = TARGETS[target]
    corpus = tmp_path / "corpus"  # a copy: libFuzzer adds what it finds to it
    corpus.mkdir()
    for path in _inputs(target):
        shutil.copy(path, corpus / f"{path.parent.parent.name}-{path.name}")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    command = [
        sys.executable,
        str(script),
        str(corpus),
        f"-max_total_time={SECONDS}",
        "-rss_limit_mb=2048",
        "-timeout=10",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    result = run_with_own_peak_rss(command, timeout=SECONDS + 300)  # + imports, seeds
    found = sorted(p for p in artifacts.iterdir() if p.name.startswith(ARTIFACT_PREFIXES))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not found, _report(target, found, output)
    stats = [line for line in output.splitlines() if line.startswith("stat::")]
    print(f"{target}: {SECONDS} s", *stats, sep="\n  ")


def test_fuzzer_rss_limit_counts_only_the_fuzzer() -> None:
    """A child started from a process that once held 256 MB starts under 128 MB peak RSS."""
    held = bytearray(256 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: resident, and our peak
    probe = [sys.executable, "-c", "import resource; print(resource.getrusage(0).ru_maxrss)"]
    inherited = int(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    own = run_with_own_peak_rss(probe, timeout=60)
    del held
    assert own.returncode == 0, own.stderr
    assert inherited >= 256 * 1024, "the kernel no longer carries the peak over exec"
    assert int(own.stdout) < 128 * 1024, f"the child's peak RSS was {own.stdout} KiB"
