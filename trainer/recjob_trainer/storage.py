"""Storage URIs (file://, pvc://, s3://, gs://, plain paths) on top of fsspec.

The URI rules are the API's (``recjob_operator.api.v1alpha1.uris``):

- ``pvc://CLAIM/path`` is ``$RECJOB_PVC_ROOT/CLAIM/path`` (default root ``/mnt/pvc``), and
  never anything outside ``$RECJOB_PVC_ROOT/CLAIM`` (``..`` and symbolic links that
  leave the claim are refused);
- ``file:///abs/path`` is that absolute path; a relative ``file://`` URI is refused;
- ``s3://`` and ``gs://`` go through s3fs / gcsfs with the SDKs' default credential
  chains: environment variables (``AWS_ACCESS_KEY_ID``..., ``AWS_ENDPOINT_URL_S3`` for
  S3-compatible stores; ``GOOGLE_APPLICATION_CREDENTIALS``), then the pod's identity
  (IRSA, GKE Workload Identity). Nothing here reads a key itself;
- plain relative paths resolve against a base directory (the RecJob file's folder in
  local mode).

Writes are atomic everywhere: a reader sees the old object or the whole new one, never
half of it, and a write that fails leaves nothing behind (local files: a temporary name
renamed into place; object stores: the object is uploaded whole, or not at all).
Directories on object stores are published by :mod:`recjob_trainer.remote`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from recjob_operator.api.v1alpha1.uris import (
    DEFAULT_PVC_ROOT,
    FILE_SCHEME,
    OBJECT_STORE_SCHEMES,
    PVC_ROOT_ENV,
    UriError,
    pvc_local_path,
    scheme,
    split_pvc,
)

__all__ = [
    "PVC_ROOT_ENV",
    "StorageError",
    "StorageNotFound",
    "atomic_directory",
    "exists_uri",
    "filesystem",
    "is_local",
    "local_path",
    "open_uri",
    "resolve",
    "write_bytes_atomic",
    "write_json_atomic",
]


class StorageError(OSError):
    """A URI that cannot be read or written, with the URI in the message."""


class StorageNotFound(StorageError):
    """The URI names nothing (no such file or object)."""


def pvc_root() -> str:
    """Where pvc:// claims are mounted here (``$RECJOB_PVC_ROOT``, default /mnt/pvc)."""
    return os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT


def _resolve_pvc(uri: str) -> str:
    root = pvc_root()
    try:
        claim, _ = split_pvc(uri)
        path = pvc_local_path(uri, root)
    except UriError as error:
        raise StorageError(str(error)) from error
    mount = os.path.realpath(os.path.join(root, claim))
    real = os.path.realpath(path)
    if real != mount and not real.startswith(mount.rstrip("/") + "/"):
        raise StorageError(
            f"{uri}: resolves to {real}, outside the claim's mount {mount} (a symbolic link "
            "leaves the claim)"
        )
    return path


def resolve(uri: str, base_dir: str | Path | None = None) -> str:
    """The fsspec URL (or absolute local path) a storage URI refers to; StorageError for
    a URI that breaks the rules above."""
    kind = scheme(uri)
    if kind == "pvc":
        return _resolve_pvc(uri)
    if kind == "file":
        path = uri.removeprefix(FILE_SCHEME)
        if not path.startswith("/"):
            raise StorageError(
                f"{uri}: file:// URIs must be absolute (file:///path); write a relative "
                "path without file://"
            )
        return os.path.normpath(path)
    if kind is not None:
        return uri
    path = Path(uri)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path.resolve())


def is_local(url: str) -> bool:
    """True when ``url`` (from :func:`resolve`) is on the local filesystem."""
    return "://" not in url


def is_object_store(url: str) -> bool:
    """True when ``url`` (from :func:`resolve`) is on s3:// or gs://."""
    return scheme(url) in OBJECT_STORE_SCHEMES


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: only what the SDKs do not read from the environment
    themselves (botocore reads AWS_DEFAULT_REGION, not AWS_REGION)."""
    if scheme(url) == "s3":
        region = os.environ.get("AWS_REGION")
        if region and not os.environ.get("AWS_DEFAULT_REGION"):
            return {"client_kwargs": {"region_name": region}}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a resolved URL; StorageError when this machine
    has no filesystem for it (e.g. s3fs missing)."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as error:
        raise StorageError(f"{url}: no filesystem for this URI here ({error})") from error


def local_path(uri: str, base_dir: str | Path | None = None) -> Path:
    """A local path for ``uri``; StorageError for object stores (use
    :class:`recjob_trainer.remote.WorkingCopy` to work on those through a local copy)."""
    url = resolve(uri, base_dir)
    if not is_local(url):
        raise StorageError(
            f"{uri}: expected a mounted path (file://, pvc:// or a path); object stores go "
            "through a local working copy"
        )
    return Path(url)


def _storage_error(uri: str, url: str, error: BaseException) -> StorageError:
    """A StorageError naming ``uri`` for any failure of a filesystem call."""
    if isinstance(error, StorageError):
        return error
    if isinstance(error, FileNotFoundError):
        return StorageNotFound(f"{uri}: no such file ({url})")
    if isinstance(error, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return StorageError(f"{uri}: cannot open ({error})")
    if isinstance(error, (ImportError, ValueError)):  # e.g. s3:// without s3fs installed
        return StorageError(f"{uri}: no filesystem for this URI here ({error})")
    hint = ""
    if is_object_store(url):
        hint = (
            "; credentials come from the environment (spec.storage.credentialsSecret) or "
            "the pod's ServiceAccount"
        )
    return StorageError(f"{uri}: {type(error).__name__}: {error}{hint}")


def exists_uri(uri: str, base_dir: str | Path | None = None) -> bool:
    """True when ``uri`` names an existing file, object or directory."""
    url = resolve(uri, base_dir)
    if is_local(url):
        return os.path.exists(url)
    fs, path = filesystem(url)
    try:
        return bool(fs.exists(path))
    except Exception as error:  # the SDKs raise their own errors (credentials, network)
        raise _storage_error(uri, url, error) from error


@contextlib.contextmanager
def open_uri(uri: str, mode: str = "rb", base_dir: str | Path | None = None) -> Iterator[Any]:
    """Open a storage URI for reading or writing; errors name the URI. Writing is atomic:
    the data goes to a temporary file and replaces the target only when the block ends
    without an error (a failed write leaves the old content, or nothing)."""
    url = resolve(uri, base_dir)
    if any(flag in mode for flag in "wax+"):
        if "+" in mode or "a" in mode:
            raise StorageError(f"{uri}: mode {mode!r} is not supported (read, or write whole)")
        with _atomic_write(uri, url, mode) as handle:
            yield handle
        return
    try:
        handle = fsspec.open(url, mode, **storage_options(url)).open()
    except Exception as error:  # the SDKs raise their own errors (credentials, network)
        raise _storage_error(uri, url, error) from error
    try:
        yield handle
    finally:
        handle.close()


@contextlib.contextmanager
def _atomic_write(uri: str, url: str, mode: str) -> Iterator[Any]:
    local = is_local(url)
    directory = os.path.dirname(url) if local else None
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(url)}.", suffix=".tmp", dir=directory or None
    )
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would (mkstemp makes it 0600)
    try:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode.replace("x", "w"), encoding=encoding) as handle:
            yield handle
        # only a block that ended without an error gets here: commit
        if not local:
            _upload(uri, url, tmp)
        elif "x" in mode and os.path.exists(url):
            raise StorageError(f"{uri}: already exists")
        else:
            os.replace(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _upload(uri: str, url: str, source: str) -> None:
    """Upload one local file as one object (the store makes it visible whole or not)."""
    fs, path = filesystem(url)
    try:
        fs.put_file(source, path)
    except Exception as error:
        raise _storage_error(uri, url, error) from error


def write_bytes_atomic(uri: str, data: bytes, base_dir: str | Path | None = None) -> None:
    """Write ``data`` to ``uri`` (any scheme) so that readers see all of it or none."""
    with open_uri(uri, "wb", base_dir) as handle:
        handle.write(data)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never half, even
    after a power loss (the file is fsynced before the rename, the folder after it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True, default=str))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the entries of folder ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (before a marker says it is complete)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(folder))


#: Names of what an interrupted :func:`atomic_directory` or :func:`write_json_atomic`
#: leaves behind (the process was killed between creating and renaming).
LEFTOVER_SUFFIXES = (".partial", ".old", ".tmp")


def clean_leftovers(root: Path) -> list[Path]:
    """Remove the half-written folders and files an interrupted run left under ``root``
    (``.<name>.<hex>.partial|.old|.tmp``); returns what was removed. Run it before any
    process of this run writes (rank 0, before the first barrier)."""
    removed = []
    for path in sorted(root.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if path.name.startswith(".") and path.name.endswith(LEFTOVER_SUFFIXES) and path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
