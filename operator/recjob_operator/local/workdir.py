"""Local mode's work directory: where everything of a RecJob lives, and how its files
are replaced (atomically, for readers in other processes).

Layout::

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
from pathlib import Path

from ..api.v1alpha1.recjob import RecJob
from ..controller.identity import conversion_part, identity


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class WorkDir:
    """The paths of one work directory (see the layout above)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir.resolve()

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
