"""Local mode's backend: observes and acts for the reconcile core with local processes.

What a cluster's controllers do, done on one machine:

- training (Kubeflow's PyTorchJob controller): ``nodes`` torchrun launchers of
  ``processesPerNode`` trainer processes each, rendezvous on 127.0.0.1; a failed run is
  restarted (the trainer resumes from its last checkpoint) up to ``maxRestarts``;
- conversion (a batch Job): ``recjob-serve convert``;
- serving (KServe): one ``recjob-serve serve`` per model version of the service, a
  weighted router in front (canaryTrafficPercent), live traffic from the replay driver,
  and a private Prometheus scraping the router for the canary analysis.

Work directory::

    <workdir>/<recjob>/status.yaml            the RecJob with its status (kubectl get -o yaml)
    <workdir>/<recjob>/events.jsonl           events, as kubectl describe would list them
    <workdir>/<recjob>/g<N>/train/            trainer run of model generation N (data/,
                                              checkpoints/, model/, ...)
    <workdir>/<recjob>/g<N>/convert[-<R>]/    ONNX files and quality-gate.json (conversion R)
    <workdir>/services/<service>/repository/  the Triton model repository
    <workdir>/services/<service>/state.json   which model version is stable
    <workdir>/services/<service>/run/         servers, router, replay, Prometheus
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from ..api.v1alpha1.common import APPROVE_ANNOTATION, parse_generation
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.trainer import trainer_config
from ..controller.analysis import Reading
from ..controller.identity import conversion_part, identity
from ..controller.reconcile import (
    ChildObservation,
    CleanupGeneration,
    CreateConversion,
    CreateTraining,
    DeployStable,
    EmitEvent,
    Observed,
    Promote,
    RollBack,
    ServingObservation,
    SetCanary,
    analysis_query_values,
    conversion_name,
    revision_name,
    training_name,
)
from ..prometheus import PrometheusSource, prometheus_command, prometheus_config, wait_ready
from .processes import ManagedProcess

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class LocalOptions:
    """Knobs of local mode that a cluster sets elsewhere."""

    eval_groups: int | None = 500
    """Cap on held-out queries / users the trainer and the quality gate evaluate."""
    baselines: bool = True
    """Also evaluate the baselines (BM25 / popularity, zero-shot) beside the model."""
    replay_rate: float = 8.0
    """Impressions per second the replay driver sends."""
    replay_k: int = 5
    prometheus_url: str | None = None
    """Use this Prometheus (it must scrape the router) instead of a private one."""
    scrape_seconds: float = 1.0
    server_start_timeout: float = 180.0


class LocalBackend:
    """Observes and acts for one RecJob file in one work directory."""

    def __init__(self, workdir: Path, source_file: Path, options: LocalOptions | None = None):
        self.workdir = workdir.resolve()
        self.source_file = source_file.resolve()
        self.options = options or LocalOptions()
        self.events: list[EmitEvent] = []

    # ------------------------------------------------------------------ paths
    def job_dir(self, recjob: RecJob) -> Path:
        return self.workdir / recjob.metadata.name

    def generation_dir(self, recjob: RecJob, generation: int | None = None) -> Path:
        """The folder of a model generation (default: the spec's; see ``identity``)."""
        return self.job_dir(recjob) / f"g{generation or identity(recjob).model_generation}"

    def conversion_part(self, recjob: RecJob) -> str:
        """``convert`` (``convert-<revision>`` after the first): the spec's conversion's
        folder, config and process names in its generation folder."""
        return conversion_part(identity(recjob).conversion_revision)

    def service_dir(self, recjob: RecJob) -> Path:
        return self.workdir / "services" / recjob.service_name

    def repository(self, recjob: RecJob) -> Path:
        return self.service_dir(recjob) / "repository"

    def run_dir(self, recjob: RecJob) -> Path:
        return self.service_dir(recjob) / "run"

    def service_state(self, recjob: RecJob) -> dict:
        try:
            return json.loads((self.service_dir(recjob) / "state.json").read_text())
        except (OSError, ValueError):
            return {"stable_version": None}

    def _save_service_state(self, recjob: RecJob, state: dict) -> None:
        write_atomic(self.service_dir(recjob) / "state.json", json.dumps(state, indent=2))

    def _training_processes(self, recjob: RecJob, generation: int | None = None) -> list:
        directory = self.generation_dir(recjob, generation)
        if generation is not None:  # another model generation: its nodes may differ
            return [ManagedProcess(directory, r.stem) for r in directory.glob("train-node*.json")]
        return [
            ManagedProcess(directory, f"train-node{i}") for i in range(recjob.spec.training.nodes)
        ]

    def _conversion_process(
        self, recjob: RecJob, generation: int | None = None, revision: int | None = None
    ) -> ManagedProcess:
        part = conversion_part(revision) if revision else self.conversion_part(recjob)
        return ManagedProcess(self.generation_dir(recjob, generation), part)

    # ------------------------------------------------------------------ observe
    def observe(self, recjob: RecJob) -> Observed:
        """What exists for the RecJob's current generation."""
        annotations = recjob.metadata.annotations or {}
        approved = annotations.get(APPROVE_ANNOTATION)
        return Observed(
            training=self._observe_training(recjob),
            conversion=self._observe_conversion(recjob),
            serving=self._observe_serving(recjob),
            approved_generation=parse_generation(approved),
        )

    def _restarts_file(self, recjob: RecJob) -> Path:
        return self.generation_dir(recjob) / "train-restarts.json"

    def _observe_training(self, recjob: RecJob) -> ChildObservation | None:
        processes = self._training_processes(recjob)
        if processes[0].info() is None:
            return None
        name = training_name(recjob)
        run = self.generation_dir(recjob) / "train"
        try:
            restarts = int(self._restarts_file(recjob).read_text())
        except (OSError, ValueError):
            restarts = 0
        codes = [p.exit_code() for p in processes]
        progress = _training_progress(run)
        if all(code == 0 for code in codes) and (run / "metrics.json").exists():
            result = json.loads((run / "metrics.json").read_text())
            card = run / "model-card.json"
            result["card"] = json.loads(card.read_text()) if card.exists() else {}
            return ChildObservation(name, "Succeeded", restarts=restarts, progress=progress,
                                    result=result)  # fmt: skip
        failed = [(p, c) for p, c in zip(processes, codes, strict=True) if c not in (None, 0)]
        if not failed and any(c == 0 for c in codes) and not all(c == 0 for c in codes):
            return ChildObservation(name, "Running", restarts=restarts, progress=progress)
        if not failed and all(c == 0 for c in codes):  # exit 0 without metrics.json
            failed = [(processes[0], 0)]
        if failed:
            for process in processes:
                process.stop()
            process, code = failed[0]
            log = process.log_tail(200)
            reason = _last_error(log) or f"exit status {code}"
            if restarts < recjob.spec.training.max_restarts and not _permanent_error(log):
                write_atomic(self._restarts_file(recjob), str(restarts + 1))
                self._launch_training(recjob)
                return ChildObservation(
                    name, "Restarting", message=reason, restarts=restarts + 1, progress=progress
                )
            return ChildObservation(
                name, "Failed", message=f"{process.name}: {reason}", restarts=restarts,
                progress=progress,
            )  # fmt: skip
        return ChildObservation(name, "Running", restarts=restarts, progress=progress)

    def _observe_conversion(self, recjob: RecJob) -> ChildObservation | None:
        process = self._conversion_process(recjob)
        if process.info() is None:
            return None
        name = conversion_name(recjob)
        code = process.exit_code()
        if code is None:
            return ChildObservation(name, "Running")
        gate_path = self.generation_dir(recjob) / self.conversion_part(recjob) / "quality-gate.json"
        gate = json.loads(gate_path.read_text()) if gate_path.exists() else None
        if gate is not None:
            gate["report_uri"] = str(gate_path)
        if code == 0 and gate is not None:
            return ChildObservation(name, "Succeeded", result=gate)
        reason = _last_error(process.log_tail(30)) or f"exit status {code}"
        return ChildObservation(name, "Failed", message=reason, result=gate)

    def _routes(self, recjob: RecJob) -> dict:
        try:
            return json.loads((self.run_dir(recjob) / "routes.json").read_text())
        except (OSError, ValueError):
            return {"stable": None, "canary": None, "weight": 0}

    def _observe_serving(self, recjob: RecJob) -> ServingObservation | None:
        state = self.service_state(recjob)
        stable = state.get("stable_version")
        routes = self._routes(recjob)
        canary = routes.get("canary") or {}
        running = stable is not None and self._server(recjob, stable).alive()
        ready = running and _ready(self._server_url(recjob, stable))
        canary_version = canary.get("version")
        canary_alive = canary_version is not None and self._server(recjob, canary_version).alive()
        return ServingObservation(
            stable_version=stable,
            canary_version=canary_version if canary_alive else None,
            canary_weight=int(routes.get("weight") or 0) if canary_alive else 0,
            ready=bool(ready and self._router(recjob).alive()),
            stable_revision=revision_name(recjob.service_name, stable) if stable else None,
            canary_revision=canary.get("revision") if canary_alive else None,
        )

    # ------------------------------------------------------------------ metrics
    def metric_source(self, recjob: RecJob) -> PrometheusSource:
        url = self.options.prometheus_url or recjob.spec.rollout.prometheus_url
        if url:
            return PrometheusSource(url)
        record = ManagedProcess(self.run_dir(recjob), "prometheus").info() or {}
        return PrometheusSource(f"http://127.0.0.1:{record.get('meta', {}).get('port', 9)}")

    def read_metrics(self, recjob: RecJob) -> list[Reading]:
        """Every canary check, read for the current canary and stable revisions."""
        values = analysis_query_values(recjob, namespace="local")
        return self.metric_source(recjob).read(recjob.spec.rollout.metrics, values)

    # ------------------------------------------------------------------ act
    def apply(self, recjob: RecJob, actions: list) -> None:
        """Carry out the core's actions (each idempotent)."""
        for action in actions:
            if isinstance(action, EmitEvent):
                self.events.append(action)
                with (self.job_dir(recjob) / "events.jsonl").open("a") as handle:
                    handle.write(
                        json.dumps({"time": time.time(), "type": action.type,
                                    "reason": action.reason, "message": action.message}) + "\n"
                    )  # fmt: skip
            elif isinstance(action, CreateTraining):
                if self._training_processes(recjob)[0].info() is None:
                    self._launch_training(recjob)
            elif isinstance(action, CreateConversion):
                if self._conversion_process(recjob).info() is None:
                    self._launch_conversion(recjob)
            elif isinstance(action, DeployStable):
                self._deploy_stable(recjob, action.model_version)
            elif isinstance(action, SetCanary):
                self._set_canary(recjob, action.model_version, action.weight)
            elif isinstance(action, Promote):
                self._promote(recjob, action.model_version)
            elif isinstance(action, RollBack):
                self._roll_back(recjob, action.canary_version)
            elif isinstance(action, CleanupGeneration):
                if action.training:
                    for process in self._training_processes(recjob, action.generation):
                        process.stop()
                if action.conversion is not None:
                    self._conversion_process(recjob, action.generation, action.conversion).stop()

    def _launch_training(self, recjob: RecJob) -> None:
        directory = self.generation_dir(recjob)
        config = trainer_config(recjob, str(directory / "train"), str(self.source_file.parent))
        if self.options.eval_groups:
            config.evaluation.max_groups = self.options.eval_groups
        config.evaluation.baselines = self.options.baselines
        path = directory / "trainer.yaml"
        write_atomic(
            path, yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True))
        )
        training = recjob.spec.training
        port = free_port()
        for rank, process in enumerate(self._training_processes(recjob)):
            process.start(
                [
                    str(BIN / "torchrun"),
                    "--nnodes",
                    str(training.nodes),
                    "--node_rank",
                    str(rank),
                    "--nproc_per_node",
                    str(training.processes_per_node),
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(port),
                    "-m",
                    "recjob_trainer",
                    "--config",
                    str(path),
                ],
                env={"OMP_NUM_THREADS": "1"},
            )

    def _launch_conversion(self, recjob: RecJob) -> None:
        directory = self.generation_dir(recjob)
        train = directory / "train"
        config = {
            "modelDir": str(train / "model"),
            "dataDir": str(train / "data"),
            "outputDir": str(directory / self.conversion_part(recjob)),
            "repository": str(self.repository(recjob)),
            "modelName": recjob.service_name,
            "export": recjob.spec.export.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        if recjob.spec.compression is not None:  # the gate compares against the teacher
            config["teacherDir"] = str(train / "teacher")
        if self.options.eval_groups:
            config["maxEvalGroups"] = self.options.eval_groups
        path = directory / f"{self.conversion_part(recjob)}.yaml"
        write_atomic(path, yaml.safe_dump(config))
        self._conversion_process(recjob).start(
            [str(BIN / "recjob-serve"), "convert", "--config", str(path)]
        )

    # ------------------------------------------------------------------ serving
    def _server(self, recjob: RecJob, version: int) -> ManagedProcess:
        return ManagedProcess(self.run_dir(recjob), f"server-v{version}")

    def _server_url(self, recjob: RecJob, version: int) -> str:
        info = self._server(recjob, version).info() or {}
        return f"http://127.0.0.1:{info.get('meta', {}).get('http_port', 9)}"

    def _ensure_server(self, recjob: RecJob, version: int) -> str:
        server = self._server(recjob, version)
        if not server.alive():
            http, grpc = free_port(), free_port()
            server.start(
                [
                    str(BIN / "recjob-serve"),
                    "serve",
                    str(self.repository(recjob)),
                    "--model-version",
                    str(version),
                    "--http-port",
                    str(http),
                    "--grpc-port",
                    str(grpc),
                    "--grace-period",
                    "2",
                ],
                meta={"http_port": http, "grpc_port": grpc},
            )
        url = self._server_url(recjob, version)
        deadline = time.time() + self.options.server_start_timeout
        while not _ready(url):
            if not server.alive():
                raise RuntimeError(
                    f"model server for version {version} exited:\n{server.log_tail(20)}"
                )
            if time.time() > deadline:
                raise TimeoutError(f"model server for version {version} not ready at {url}")
            time.sleep(0.3)
        return url

    def _router(self, recjob: RecJob) -> ManagedProcess:
        return ManagedProcess(self.run_dir(recjob), "router")

    def router_url(self, recjob: RecJob) -> str:
        """Where the service's live traffic goes."""
        info = self._router(recjob).info() or {}
        return f"http://127.0.0.1:{info.get('meta', {}).get('port', 9)}"

    def _ensure_infrastructure(self, recjob: RecJob) -> None:
        """Router, private Prometheus scraping it, and the replay driver."""
        run = self.run_dir(recjob)
        router = self._router(recjob)
        routes = run / "routes.json"
        if not routes.exists():
            write_atomic(routes, json.dumps({"stable": None, "canary": None, "weight": 0}))
        if not router.alive():
            port = free_port()
            router.start(
                [sys.executable, "-m", "recjob_operator.local.router", str(routes),
                 "--port", str(port)],
                meta={"port": port},
            )  # fmt: skip
            _wait_http(f"http://127.0.0.1:{port}/routes", router)
        if not (self.options.prometheus_url or recjob.spec.rollout.prometheus_url):
            prometheus = ManagedProcess(run, "prometheus")
            if not prometheus.alive():
                port = free_port()
                router_port = (router.info() or {})["meta"]["port"]
                config = run / "prometheus.yml"
                write_atomic(
                    config,
                    prometheus_config([f"127.0.0.1:{router_port}"], self.options.scrape_seconds),
                )
                prometheus.start(
                    prometheus_command(config, run / "prometheus-data", port), meta={"port": port}
                )
                wait_ready(f"http://127.0.0.1:{port}")

    def _ensure_replay(self, recjob: RecJob) -> None:
        replay = ManagedProcess(self.run_dir(recjob), "replay")
        if replay.alive():
            return
        data = self.generation_dir(recjob) / "train" / "data"
        replay.start(
            [
                sys.executable,
                "-m",
                "recjob_operator.local.replay",
                "--router",
                self.router_url(recjob),
                "--model",
                f"{recjob.service_name}-text",
                "--data",
                str(data),
                "--task",
                recjob.spec.data.task
                if recjob.spec.data.task == "recommendation"
                else "search-ranking",
                "--rate",
                str(self.options.replay_rate),
                "--k",
                str(self.options.replay_k),
            ]
        )

    def _write_routes(
        self, recjob: RecJob, stable: int | None, canary: int | None, weight: int
    ) -> None:
        def entry(version: int | None) -> dict | None:
            if version is None:
                return None
            return {
                "url": self._server_url(recjob, version),
                "revision": revision_name(recjob.service_name, version),
                "version": version,
            }

        write_atomic(
            self.run_dir(recjob) / "routes.json",
            json.dumps({"stable": entry(stable), "canary": entry(canary), "weight": weight}),
        )

    def _deploy_stable(self, recjob: RecJob, version: int) -> None:
        self._ensure_infrastructure(recjob)
        self._ensure_server(recjob, version)
        self._write_routes(recjob, version, None, 0)
        self._save_service_state(recjob, {"stable_version": version})
        self._ensure_replay(recjob)

    def _set_canary(self, recjob: RecJob, version: int, weight: int) -> None:
        self._ensure_infrastructure(recjob)
        stable = self.service_state(recjob).get("stable_version")
        if stable is not None:
            self._ensure_server(recjob, stable)
        self._ensure_server(recjob, version)
        self._write_routes(recjob, stable, version, weight)
        self._ensure_replay(recjob)

    def _promote(self, recjob: RecJob, version: int) -> None:
        previous = self.service_state(recjob).get("stable_version")
        self._ensure_server(recjob, version)
        self._write_routes(recjob, version, None, 0)
        self._save_service_state(recjob, {"stable_version": version, "previous": previous})
        if previous is not None and previous != version:
            self._server(recjob, previous).stop()

    def _roll_back(self, recjob: RecJob, canary: int) -> None:
        stable = self.service_state(recjob).get("stable_version")
        self._write_routes(recjob, stable, None, 0)
        if canary != stable:
            self._server(recjob, canary).stop()

    # ------------------------------------------------------------------ shutdown
    def live_metrics(self, recjob: RecJob) -> str:
        """The router's /metrics text (empty when it is not running)."""
        try:
            return httpx.get(f"{self.router_url(recjob)}/metrics", timeout=2).text
        except httpx.HTTPError:
            return ""

    def stop_serving(self, recjob: RecJob) -> None:
        """Stop the replay driver, router, Prometheus and every model server."""
        run = self.run_dir(recjob)
        for name in ("replay", "router", "prometheus"):
            ManagedProcess(run, name).stop()
        for record in run.glob("server-v*.json"):
            ManagedProcess(run, record.stem).stop()

    def stop_jobs(self, recjob: RecJob) -> None:
        """Stop training and conversion of the current generation."""
        for process in self._training_processes(recjob):
            process.stop()
        self._conversion_process(recjob).stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_http(url: str, process: ManagedProcess, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not process.alive():
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail(20)}")
        time.sleep(0.2)
    raise TimeoutError(f"{process.name} did not answer {url}")


def _training_progress(run: Path) -> dict | None:
    """The trainer's latest step, loss and speed (progress.jsonl). With compression each
    stage (train, distill, recover) counts its steps from 0: the newest stage wins."""
    path = run / "progress.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    progress: dict = {}
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind, stage = event.get("event"), event.get("stage", "train")
        if kind not in ("progress", "start", "resumed"):
            continue
        if progress.get("stage") != stage:  # a new stage starts from scratch
            progress = {"stage": stage, "step": 0}
        if kind == "resumed":
            progress["resumed_from_step"] = progress["step"] = event.get("step")
        elif kind == "start":
            progress["total_steps"] = event.get("total_steps")
        else:
            progress.update(
                {k: event.get(k) for k in
                 ("step", "total_steps", "epoch", "loss", "samples_per_second")}
            )  # fmt: skip
    return {k: v for k, v in progress.items() if v is not None} or None


#: How RecJob's own CLIs report an error they refuse to retry (bad data or config).
_CLEAN_ERROR = re.compile(r"^recjob-(train|serve)[a-z ]*: ")


def _permanent_error(log: str) -> str | None:
    """The trainer's / converter's own error line, if it wrote one: such errors (bad data,
    bad config) fail the same way again, so they are not restarted."""
    lines = [line.strip() for line in log.splitlines() if _CLEAN_ERROR.match(line.strip())]
    return lines[-1][:500] if lines else None


def _last_error(log: str) -> str:
    """The most telling line of a failed process's log."""
    clean = _permanent_error(log)
    if clean:
        return clean
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error:", "Exception", "FAILED", "refused")):
            return line[:500]
    return lines[-1][:500] if lines else ""
