"""CPU seconds per process over a span of a bench: where the machine's cores went.

The test cluster's components (hack/cluster) are found by their executable's name; other
processes (the bench itself, the operator it started) are named by the caller. A process
that exits before the span ends is left out."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

#: hack/cluster's processes, by executable name
CLUSTER_COMPONENTS = (
    "kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kube-proxy",
    "recjob-node", "recjob-dns", "recjob-netpol",
)  # fmt: skip


def _seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of ``process`` (its threads included, children not)."""
    times = process.cpu_times()
    return times.user + times.system


def cluster_processes() -> dict[int, str]:
    """PID -> component name of every running test-cluster component."""
    found = {}
    for process in psutil.process_iter(["pid", "exe", "cmdline"]):
        exe = process.info["exe"] or next(iter(process.info["cmdline"] or []), "")
        if (name := Path(exe).name) in CLUSTER_COMPONENTS:
            found[process.info["pid"]] = name
    return found


class CpuUse:
    """CPU seconds each component used from construction until :meth:`seconds` is called.

    ``named``: extra processes by name, e.g. ``{"operator": pid}``; this process is
    ``"bench"``."""

    def __init__(self, named: dict[str, int] | None = None) -> None:
        names = cluster_processes() | {os.getpid(): "bench"}
        names |= {pid: name for name, pid in (named or {}).items()}
        self.start: dict[psutil.Process, tuple[str, float]] = {}  # process: (name, CPU s)
        for pid, name in names.items():
            with contextlib.suppress(psutil.Error):  # gone before the span: used nothing in it
                process = psutil.Process(pid)
                self.start[process] = (name, _seconds(process))

    def seconds(self) -> dict[str, float]:
        """CPU seconds per component name since construction, largest first."""
        used: dict[str, float] = {}
        for process, (name, start) in self.start.items():
            with contextlib.suppress(psutil.Error):  # exited within the span: left out
                used[name] = used.get(name, 0.0) + _seconds(process) - start
        return dict(sorted(used.items(), key=lambda item: -item[1]))
