"""Child processes that outlive a killed ``recjob run`` and are found again by the next one.

Each process runs in its own session (so one signal stops it and its children) under a
``bash -c`` wrapper that writes the exit status to ``<name>.rc``; ``<name>.json`` keeps its
pid, command and start time. A restarted ``recjob run`` re-adopts a process whose pid is
alive and still ours (same session leader start time), or sees how it ended from its
``.rc``. Also where the environment's executables are (``BIN``) and free ports for the
processes to listen on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Where this environment's executables are (torchrun, recjob-serve).
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@dataclass
class ManagedProcess:
    """One named child process, its files under ``directory``."""

    directory: Path
    name: str

    @property
    def record(self) -> Path:
        return self.directory / f"{self.name}.json"

    @property
    def rc_file(self) -> Path:
        return self.directory / f"{self.name}.rc"

    @property
    def log(self) -> Path:
        return self.directory / f"{self.name}.log"

    def info(self) -> dict | None:
        """What was recorded when the process started (None if never started)."""
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None

    def start(
        self, command: list[str], env: dict[str, str] | None = None, meta: dict | None = None
    ) -> None:
        """Start ``command`` (its output appended to ``<name>.log``); ``meta`` (ports, ...)
        is kept in the record for whoever finds the process later."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rc_file.unlink(missing_ok=True)
        script = f'{shlex.join(command)}; rc=$?; echo $rc > "$0.tmp"; mv "$0.tmp" "$0"'
        with self.log.open("a") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                ["bash", "-c", script, str(self.rc_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "pid": process.pid,
                    "start_time": _start_time(process.pid),
                    "command": command,
                    "started_at": time.time(),
                    "meta": meta or {},
                }
            )
        )
        os.replace(tmp, self.record)

    def alive(self) -> bool:
        """Whether the recorded process is still running (and is the one we started)."""
        info = self.info()
        if info is None or self.rc_file.exists():
            return False
        started = _start_time(info["pid"])
        if started is None or started != info.get("start_time"):
            return False
        try:  # a zombie of ours is not alive
            pid, _ = os.waitpid(info["pid"], os.WNOHANG)
            if pid == info["pid"]:
                return False
        except ChildProcessError:
            pass
        return True

    def exit_code(self) -> int | None:
        """The exit status once finished; None while running or never started. A process
        that vanished without writing one (killed with its wrapper) reads as -9."""
        try:
            return int(self.rc_file.read_text().strip())
        except (OSError, ValueError):
            pass
        if self.info() is None or self.alive():
            return None
        return -9

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout``, and
        return once no process of the group is running."""
        info = self.info()
        if info is None:
            return
        pid = info["pid"]
        if info.get("start_time") is None or not (self.alive() or group_members(pid)):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline and group_members(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.time() + 5
        while time.time() < deadline and group_members(pid):
            time.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's log (for failure messages)."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])
