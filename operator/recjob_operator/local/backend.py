"""Local mode's backend: observes and acts for the reconcile core with local processes.

What a cluster's controllers do, done on one machine:

- training (Kubeflow's PyTorchJob controller): ``nodes`` torchrun launchers of
  ``processesPerNode`` trainer processes each, rendezvous on 127.0.0.1; a failed run is
  restarted (the trainer resumes from its last checkpoint) up to ``maxRestarts``;
- federated training (``spec.training.federated``): one ``python -m
  recjob_trainer.federated`` launcher (a SuperLink and a SuperNode per silo on loopback,
  TLS), restarted like a training run; it resumes from the last completed round;
- conversion (a batch Job): ``recjob-serve convert``;
- serving (KServe): :class:`~.serving.LocalServing` (model servers, router, replay
  driver, private Prometheus).

Files and processes live in the work directory (:mod:`.workdir`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import yaml

from ..api.text import one_line
from ..api.v1alpha1.common import APPROVE_ANNOTATION, parse_generation
from ..api.v1alpha1.recjob import RecJob
from ..api.v1alpha1.trainer import trainer_config
from ..controller.analysis import Reading
from ..controller.identity import conversion_part
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
    SetCanary,
    analysis_query_values,
    conversion_name,
    training_name,
)
from ..prometheus import PrometheusSource
from .options import LocalOptions, local_namespace
from .processes import BIN, ManagedProcess, free_port
from .serving import LocalServing
from .workdir import WorkDir, write_atomic


class LocalBackend(WorkDir):
    """Observes and acts for one RecJob file in one work directory."""

    def __init__(self, workdir: Path, source_file: Path, options: LocalOptions | None = None):
        super().__init__(workdir)
        self.source_file = source_file.resolve()
        self.options = options or LocalOptions()
        self.events: list[EmitEvent] = []
        self.serving = LocalServing(self.workdir, self.options)

    # ------------------------------------------------------------------ processes
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
            serving=self.serving.observe(recjob),
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

    # ------------------------------------------------------------------ metrics
    def metric_source(self, recjob: RecJob) -> PrometheusSource:
        return self.serving.metric_source(recjob)

    def read_metrics(self, recjob: RecJob) -> list[Reading]:
        """Every canary check, read for the current canary and stable revisions."""
        values = analysis_query_values(recjob, namespace=local_namespace(recjob))
        try:
            source = self.metric_source(recjob)
        except LookupError as error:
            return [Reading(m.name, error=str(error)) for m in recjob.spec.rollout.metrics]
        return source.read(recjob.spec.rollout.metrics, values)

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
                self.serving.deploy_stable(recjob, action.model_version)
            elif isinstance(action, SetCanary):
                self.serving.set_canary(recjob, action.model_version, action.weight)
            elif isinstance(action, Promote):
                self.serving.promote(recjob, action.model_version)
            elif isinstance(action, RollBack):
                self.serving.roll_back(recjob, action.canary_version)
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
        if training.federated is not None:  # one launcher: SuperLink, SuperNodes, the run
            self._training_processes(recjob)[0].start(
                [sys.executable, "-m", "recjob_trainer.federated", "--config", str(path),
                 "--work", str(directory / "federation")],
                env={"OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            return
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
    def router_url(self, recjob: RecJob) -> str:
        """Where the service's live traffic goes."""
        return self.serving.router_url(recjob)

    # ------------------------------------------------------------------ shutdown
    def live_metrics(self, recjob: RecJob) -> str:
        """The router's /metrics text (empty when it is not running)."""
        return self.serving.live_metrics(recjob)

    def stop_serving(self, recjob: RecJob) -> None:
        """Stop the replay driver, router, Prometheus and every model server."""
        self.serving.stop(recjob)

    def stop_jobs(self, recjob: RecJob) -> None:
        """Stop training and conversion of the current generation."""
        for process in self._training_processes(recjob):
            process.stop()
        self._conversion_process(recjob).stop()


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
    lines = [one_line(line) for line in log.splitlines()]
    lines = [line for line in lines if _CLEAN_ERROR.match(line)]
    return lines[-1][:500] if lines else None


def _last_error(log: str) -> str:
    """The most telling line of a failed process's log (printable: no escape codes)."""
    clean = _permanent_error(log)
    if clean:
        return clean
    lines = [text for text in (one_line(line) for line in log.splitlines()) if text]
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error:", "Exception", "FAILED", "refused")):
            return line[:500]
    return lines[-1][:500] if lines else ""
