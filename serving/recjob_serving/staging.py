"""Conversion with s3:// / gs:// URIs: local working copies in, published results out.

The conversion itself works on local folders. When a URI of its config is on an object
store, :func:`convert_staged`

1. pulls the inputs (``modelDir``, ``dataDir``, ``teacherDir``: folders the trainer
   published, each taken only when complete) into ``$RECJOB_WORK_DIR``;
2. builds a local skeleton of the repository: the version folders already published
   (empty, so the next version number is right) and each model's ``config.pbtxt``;
3. runs the conversion on the local copies;
4. publishes what it added: each model's new version folder (manifest last) and then its
   ``config.pbtxt``, then the snapshot ``<repository>-snapshots/v<N>``, then the output
   folder with ``quality-gate.json`` (also when the gate refused the model or the target
   was unavailable, so the verdict is always there to read).

Nothing half-written is ever visible as complete (see :mod:`recjob_trainer.remote`); a
conversion that dies before step 4 publishes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from recjob_trainer.remote import WorkingCopy, push_directory
from recjob_trainer.storage import (
    StorageError,
    filesystem,
    is_local,
    resolve,
    write_json_atomic,
)

from .repository import companion_model_names, snapshot_path

if TYPE_CHECKING:
    from .convert import ConvertConfig

REPORT = "quality-gate.json"


def needs_staging(config: ConvertConfig) -> bool:
    """True when some URI of ``config`` is not a mounted path."""
    uris = [config.model_dir, config.data_dir, config.output_dir, config.repository]
    uris += [config.teacher_dir] if config.teacher_dir else []
    return any(not is_local(resolve(uri)) for uri in uris)


def _pull_skeleton(repository: WorkingCopy, names: list[str]) -> None:
    """Local stand-ins for the published versions and configs of ``names``."""
    for name in names:
        fs, root = filesystem(repository.url(name))
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            continue
        except Exception as error:
            raise StorageError(f"{repository.url(name)}: cannot list: {error}") from error
        for entry in entries:
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base.isdigit():
                (repository.path(name) / base).mkdir(parents=True, exist_ok=True)
        local_config = repository.path(name) / "config.pbtxt"
        if not local_config.exists():
            repository.pull_file(f"{name}/config.pbtxt", required=False)


def _publish_version(repository: WorkingCopy, names: list[str], version: int) -> str:
    """Publish version ``version`` of ``names`` and its snapshot; returns the snapshot URL."""
    for name in names:
        folder = f"{name}/{version}"
        fs, path = filesystem(repository.url(folder))
        if fs.exists(path):  # two conversions raced for one version number
            raise StorageError(f"{repository.url(folder)} is already published")
        repository.publish([folder, f"{name}/config.pbtxt"])
    local_snapshot = snapshot_path(repository.local, version)
    remote_snapshot = f"{repository.url()}-snapshots/v{version}"
    if local_snapshot.is_dir():
        push_directory(local_snapshot, remote_snapshot)
    return remote_snapshot


def convert_staged(config: ConvertConfig, run: Callable[[ConvertConfig], dict]) -> dict:
    """Run ``run`` (the local conversion) on working copies of ``config``'s URIs and
    publish its results (see the module docstring)."""
    model = WorkingCopy(config.model_dir)
    data = WorkingCopy(config.data_dir)
    teacher = WorkingCopy(config.teacher_dir) if config.teacher_dir else None
    output = WorkingCopy(config.output_dir)
    repository = WorkingCopy(config.repository)
    for copy in (model, data, teacher):
        if copy is not None:
            copy.pull()
    kind = json.loads((model.local / "recjob-model.json").read_text())["kind"]
    names = [config.model_name, *companion_model_names(config.model_name, kind)]
    output.local.mkdir(parents=True, exist_ok=True)
    (output.local / REPORT).unlink(missing_ok=True)  # a report from an earlier attempt
    if repository.is_remote:
        _pull_skeleton(repository, names)
    local = config.model_copy(
        update={
            "model_dir": str(model.local),
            "data_dir": str(data.local),
            "teacher_dir": str(teacher.local) if teacher else None,
            "output_dir": str(output.local),
            "repository": str(repository.local),
        }
    )
    try:
        report = run(local)
    except Exception:
        if (output.local / REPORT).exists():  # the verdict, e.g. target unavailable
            output.publish([""])
        raise
    version = report.get("published_version")
    if version is not None and repository.is_remote:
        snapshot = _publish_version(repository, names, version)
        if config.snapshots:
            report["snapshot"] = snapshot
            write_json_atomic(output.local / REPORT, report)
    output.publish([""])
    return report
