"""A federation on one machine: a SuperLink and one SuperNode per silo as separate
processes on loopback, TLS between them, the run submitted with ``flwr run``.

``python -m recjob_trainer.federated --config trainer.yaml --work DIR`` (the trainer config
of a RecJob with ``training.federated``). The output directory (the config's outputUri)
receives what the ServerApp writes; ``DIR`` holds the silos' private folders, the TLS
files and every process's log. Running it again with the
same ``DIR`` and output resumes from the last completed round."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..config import TrainerConfig
from ..storage import write_json_atomic
from .bundle import write_bundle
from .certs import make_tls
from .plan import SERVER_STATUS, Silo, prepare_silos, server_settings

BIN = Path(sys.executable).parent
CONNECTION = "recjob"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Federation:
    """The processes of a local federation (all started here, all stopped by stop())."""

    work: Path
    env: dict[str, str]
    port: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(
        self, name: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = open(self.work / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process)
        env = {**self.env, **(env or {})}
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = proc
        return proc

    def stop(self, name: str | None = None) -> None:
        """Terminate a process (or all) and everything it started (ServerApp / ClientApp
        processes are its descendants)."""
        names = [name] if name else list(self.processes)
        for key in names:
            proc = self.processes.pop(key)
            try:
                family = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            if proc.poll() is None:
                proc.terminate()
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, alive = psutil.wait_procs(family, timeout=10)
            for p in alive:
                p.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        """A ``flwr`` CLI command with JSON output."""
        done = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"flwr {' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]} "
                f"{done.stderr[-2000:]}"
            ) from None


def start_superlink(fed: Federation, tls) -> None:
    """The SuperLink, its state in memory: every launch registers the silos afresh (a
    database kept across a crash would still list the dead SuperNodes as connected, and
    the next rounds would sample them); a restarted federation resumes from the
    ServerApp's own round checkpoints."""
    server = fed.work / "server"
    server.mkdir(exist_ok=True)
    fed.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            *("--ssl-ca-certfile", str(tls.ca_cert)),
            *("--ssl-certfile", str(tls.server_cert)),
            *("--ssl-keyfile", str(tls.server_key)),
            *("--host", "127.0.0.1", "--port", str(fed.port)),
            "--disable-runtime-dependency-installation",
        ],
        cwd=server,
        env={"OMP_NUM_THREADS": "1"},  # the ServerApp averages a few tensors per round
    )
    deadline = time.time() + 120
    while not _listening(fed.port):
        if fed.processes["superlink"].poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the SuperLink did not start; see {fed.work}/logs/superlink.log")
        time.sleep(0.2)


def start_supernode(fed: Federation, silo: Silo, tls, threads: int = 1) -> None:
    """The silo's SuperNode: the only process told where the silo's config (and data) are.
    Its ClientApps compute with ``threads`` threads (silos share this machine's cores)."""
    fed.start(
        f"supernode-{silo.name}",
        [
            str(BIN / "flower-supernode"),
            *("--superlink", f"127.0.0.1:{fed.port}"),
            *("--root-certificates", str(tls.ca_cert)),
            *("--node-config", f'silo-config="{silo.config_path}"'),
            *("--host", "127.0.0.1", "--port", str(free_port())),
        ],
        cwd=silo.directory,
        env={"OMP_NUM_THREADS": str(threads), "RECJOB_SILO_THREADS": str(threads)},
    )


def prepare(config: TrainerConfig, work: Path) -> tuple[Federation, list[Silo], object, Path]:
    """Silo folders, TLS files, the app, the server settings and the flwr CLI's config."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    output = Path(config.output_uri)
    output.mkdir(parents=True, exist_ok=True)
    silos = prepare_silos(config, work)
    tls = make_tls(work / "tls")
    (work / "server").mkdir(exist_ok=True)
    settings_path = work / "server" / "settings.json"
    server_settings(config, output).write(settings_path)
    write_bundle(work / "app")
    port = free_port()
    env = flwr_env(work / "flwr-home", f"127.0.0.1:{port}", tls.ca_cert)
    return Federation(work, env, port), silos, tls, settings_path


def flwr_env(home: Path, address: str, ca_cert: Path) -> dict[str, str]:
    """The environment of ``flwr`` CLI calls: a FLWR_HOME whose config.toml names the
    SuperLink at ``address`` (TLS, verified against ``ca_cert``) as connection CONNECTION."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{ca_cert}"\n'
    )
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def submit(fed: Federation, settings_path: Path) -> str:
    """``flwr run`` of the app with the server's settings; returns the run id."""
    answer = fed.flwr(
        "run", str(fed.work / "app"), CONNECTION,
        "--run-config", f'server-settings="{settings_path}"',
    )  # fmt: skip
    if not answer.get("success"):
        raise RuntimeError(f"flwr run failed: {answer}")
    return str(answer["run-id"])


def run_entry(fed: Federation, run_id: str) -> dict:
    """The SuperLink's ``flwr ls`` entry of ``run_id``; RuntimeError when it does not
    answer or does not know the run (a SuperLink restarted since keeps no runs: the run is
    submitted again, and resumes from its last checkpointed round)."""
    answer = fed.flwr("ls", CONNECTION, "--run-id", run_id)
    runs = answer.get("runs") or []
    if not answer.get("success") or not runs:
        raise RuntimeError(f"the SuperLink does not know run {run_id} (restarted?): {answer}")
    return runs[0]


def wait(fed: Federation, run_id: str, output: Path, since: float, timeout: float) -> dict:
    """Wait for the ServerApp's status file (cheap to poll; every ``flwr`` call costs a
    second of CPU), then for the SuperLink to report the run finished; returns its
    ``flwr ls`` entry with the ServerApp's error, if any, as ``server-error``."""
    deadline = time.time() + timeout
    status_file = output / "federated" / SERVER_STATUS

    def written() -> dict | None:
        if status_file.exists() and status_file.stat().st_mtime >= since:
            return json.loads(status_file.read_text())
        return None

    last_ls = time.time()
    while (status := written()) is None:
        link = fed.processes.get("superlink")  # None: a SuperLink this process did not start
        if link is not None and link.poll() is not None:
            raise RuntimeError(f"the SuperLink exited; see {fed.work}/logs/superlink.log")
        if time.time() - last_ls > 30:  # a ServerApp that never started writes nothing
            last_ls = time.time()
            run = run_entry(fed, run_id)
            # the ServerApp may have written its status and ended while `flwr ls` ran
            if str(run.get("status", "")).startswith("finished") and written() is None:
                return {**run, "server-error": "the ServerApp ended without a status"}
        if time.time() > deadline:
            raise TimeoutError(f"run {run_id} did not finish in {timeout:.0f}s")
        time.sleep(0.5)
    while True:
        run = run_entry(fed, run_id)
        if str(run.get("status", "")).startswith("finished") or time.time() > deadline:
            return {**run, "server-error": status.get("error")}
        time.sleep(2.0)


def launch(config: TrainerConfig, work: Path) -> tuple[Federation, str, float]:
    """Start the SuperLink and the SuperNodes and submit the run; returns the federation,
    the run id and when it was submitted (the caller stops the federation)."""
    fed, silos, tls, settings_path = prepare(config, work)
    try:
        start_superlink(fed, tls)
        threads = max(1, (os.cpu_count() or 1) // len(silos))
        for silo in silos:
            start_supernode(fed, silo, tls, threads)
        since = time.time()
        return fed, submit(fed, settings_path), since
    except BaseException:
        fed.stop()
        raise


def run_federation(config: TrainerConfig, work: Path, timeout: float = 3600) -> dict:
    """Start the federation, run it to the end, stop every process; returns metrics.json
    (with the SuperLink's own count of the run's network traffic added)."""
    output = Path(config.output_uri)
    fed, run_id, since = launch(config, work)
    try:
        run = wait(fed, run_id, output, since, timeout)
    finally:
        fed.stop()
    if run.get("status") != "finished:completed" or run.get("server-error"):
        raise RuntimeError(
            f"federated run {run_id} ended {run.get('status')}: "
            f"{run.get('server-error') or run.get('status-details')}; "
            f"see {work}/logs/superlink.log"
        )
    return record_run(output, run_id, run)


def record_run(output: Path, run_id: str, run: dict) -> dict:
    """metrics.json with the SuperLink's own account of the run (``flwr ls``: network
    traffic, elapsed time) added under ``federated.superlink``; returns it."""
    metrics = json.loads((output / "metrics.json").read_text())
    metrics["federated"]["superlink"] = {
        "run_id": run_id,
        "network_traffic": run.get("network-traffic"),
        "elapsed_seconds": run.get("elapsed"),
        "tls": True,
    }
    write_json_atomic(output / "metrics.json", metrics)
    return metrics
