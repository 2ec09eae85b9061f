"""Storage URIs (file://, pvc://, s3://, gs://, plain paths) on top of fsspec.

``pvc://CLAIM/path`` is the path where the PersistentVolumeClaim CLAIM is mounted in the
pod: ``$RECJOB_PVC_ROOT/CLAIM/path`` (default root ``/mnt/pvc``). Plain relative paths
resolve against a base directory (the RecJob file's folder in local mode).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

PVC_ROOT_ENV = "RECJOB_PVC_ROOT"


class StorageError(OSError):
    """A URI that cannot be read or written, with the URI in the message."""


def resolve(uri: str, base_dir: str | Path | None = None) -> str:
    """The fsspec URL (or absolute local path) a storage URI refers to."""
    if uri.startswith("pvc://"):
        root = os.environ.get(PVC_ROOT_ENV, "/mnt/pvc")
        return str(Path(root) / uri.removeprefix("pvc://"))
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if "://" in uri:
        return uri
    path = Path(uri)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path.resolve())


def is_local(url: str) -> bool:
    """True when ``url`` (from :func:`resolve`) is on the local filesystem."""
    return "://" not in url


def local_path(uri: str, base_dir: str | Path | None = None) -> Path:
    """A local path for ``uri``; StorageError for object stores (training writes need a
    mounted volume: file:// or pvc://)."""
    url = resolve(uri, base_dir)
    if not is_local(url):
        raise StorageError(
            f"{uri}: expected a mounted path (file://, pvc:// or a path) for "
            "checkpoints and training outputs"
        )
    return Path(url)


@contextlib.contextmanager
def open_uri(uri: str, mode: str = "rb", base_dir: str | Path | None = None) -> Iterator[Any]:
    """Open a storage URI for reading or writing; errors name the URI."""
    url = resolve(uri, base_dir)
    try:
        with fsspec.open(url, mode) as handle:
            yield handle
    except FileNotFoundError as error:
        raise StorageError(f"{uri}: no such file ({url})") from error
    except (PermissionError, IsADirectoryError) as error:
        raise StorageError(f"{uri}: cannot open ({error})") from error
    except (ImportError, ValueError) as error:  # e.g. s3:// without s3fs installed
        raise StorageError(f"{uri}: no filesystem for this URI here ({error})") from error


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when the block
    succeeds; on failure the temporary directory is removed and ``target`` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
