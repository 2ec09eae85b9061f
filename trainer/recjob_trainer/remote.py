"""Directories on object stores (s3://, gs://): published whole, read only when complete.

An object store has no directories and no rename, so a directory is published as the
objects under a prefix plus a manifest written last: ``<prefix>/.recjob-manifest.json``
lists every file with its size and SHA-256. Publishing first deletes the old manifest,
then uploads the files (each object appears whole or not at all), deletes objects left
from an earlier publish, and writes the new manifest. A reader (:func:`pull_directory`)
takes a prefix only when its manifest is there and every file matches it, so it gets the
whole old directory, the whole new one, or "incomplete" — never a mix or half a file.
Empty folders (a Triton ensemble's version folder) travel as an empty ``.keep`` object.

:class:`WorkingCopy` is how the trainer and the conversion use this: a local folder that
stands in for an output URI (the URI's own path when it is mounted: file://, pvc://).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from recjob_operator.api.v1alpha1.storage import WORK_DIR_ENV

from .storage import (
    StorageError,
    StorageNotFound,
    filesystem,
    is_local,
    resolve,
)

MANIFEST = ".recjob-manifest.json"
KEEP = ".keep"
#: Leftovers of atomic writes (``.name.<hex>.partial`` / ``.tmp`` / ``.old``): never published.
_SCRATCH = re.compile(r"^\..*\.(partial|tmp|old)$")


class IncompleteDirectory(StorageError):
    """A prefix without a (matching) manifest: being published, or its publisher died."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_entries(local: Path, exclude: Iterable[str]) -> dict[str, Path | None]:
    """Relative posix path -> local file (None: an empty folder's ``.keep``)."""
    patterns = list(exclude)
    out: dict[str, Path | None] = {}
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local).as_posix()
        parts = rel.split("/")
        if any(_SCRATCH.match(p) for p in parts) or rel == MANIFEST:
            continue
        if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(parts[0], pat) for pat in patterns):
            continue
        if path.is_file():
            out[rel] = path
        elif path.is_dir() and not any(path.iterdir()):
            out[f"{rel}/{KEEP}"] = None
    return out


def _remote_files(fs, root: str) -> list[str]:
    """Relative paths of the objects under ``root`` (none when it does not exist)."""
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    prefix = root.rstrip("/") + "/"
    return [p[len(prefix) :] for p in found if p.startswith(prefix)]


def push_directory(local: Path, url: str, exclude: Iterable[str] = ()) -> dict:
    """Publish the folder ``local`` at ``url`` (see the module docstring); returns the
    manifest. ``exclude``: glob patterns of relative paths (or top-level names) to skip."""
    if not local.is_dir():
        raise StorageNotFound(f"{local}: no such folder to publish")
    fs, root = filesystem(url)
    root = root.rstrip("/")
    entries = _local_entries(local, exclude)
    files = {rel: path for rel, path in entries.items() if path is not None}
    manifest = {
        "files": {
            rel: {"size": path.stat().st_size, "sha256": _sha256(path)}
            for rel, path in files.items()
        },
        "empty": sorted(rel for rel, path in entries.items() if path is None),
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        if fs.exists(f"{root}/{MANIFEST}"):
            fs.rm_file(f"{root}/{MANIFEST}")  # from here on readers see "incomplete"
        if files:
            fs.put([str(p) for p in files.values()], [f"{root}/{rel}" for rel in files])
        for rel in manifest["empty"]:
            fs.pipe_file(f"{root}/{rel}", b"")
        fs.invalidate_cache(root)
        stale = [f"{root}/{rel}" for rel in _remote_files(fs, root) if rel not in entries]
        stale = [p for p in stale if not p.endswith(f"/{MANIFEST}")]
        if stale:
            fs.rm(stale)
        fs.invalidate_cache(root)
        fs.pipe_file(f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    except StorageError:
        raise
    except Exception as error:  # SDK errors: name the URL
        raise StorageError(f"{url}: publishing {local} failed: {error}") from error
    return manifest


def read_manifest(url: str) -> dict | None:
    """The manifest of a published folder; None when there is none (yet)."""
    fs, root = filesystem(url)
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except Exception as error:
        raise StorageError(f"{url}: cannot read its manifest: {error}") from error


def pull_directory(url: str, local: Path, require_manifest: bool = True) -> Path:
    """Download the folder published at ``url`` into ``local``, which appears whole (a
    rename) or not at all; when another process made ``local`` first, its copy is kept.

    With ``require_manifest`` (folders published by :func:`push_directory`) a folder with
    no manifest, or whose files do not match it, raises IncompleteDirectory. Without it
    (folders written by other tools, e.g. a base model) every object is taken."""
    fs, root = filesystem(url)
    root = root.rstrip("/")
    try:
        if require_manifest:
            manifest = read_manifest(url)
            if manifest is None:
                if _remote_files(fs, root):
                    raise IncompleteDirectory(
                        f"{url}: incomplete (no {MANIFEST}: still being published, or its "
                        "publisher died)"
                    )
                raise StorageNotFound(f"{url}: no such folder")
            names, empty = dict(manifest["files"]), list(manifest.get("empty", []))
        else:
            names = {rel: None for rel in _remote_files(fs, root) if rel != MANIFEST}
            empty = [rel for rel in names if rel.endswith(f"/{KEEP}")]
            names = {rel: v for rel, v in names.items() if rel not in empty}
            if not names and not empty:
                raise StorageNotFound(f"{url}: no such folder")
        local.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(
            prefix=f".{local.name}.", suffix=".partial", dir=local.parent
        ) as staging:
            tmp = Path(staging) / "copy"
            targets = [tmp / rel for rel in names]
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
            if names:
                fs.get([f"{root}/{rel}" for rel in names], [str(t) for t in targets])
            for rel in empty:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            for rel, expected in names.items():
                if expected is None:
                    continue
                path = tmp / rel
                if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
                    raise IncompleteDirectory(
                        f"{url}: {rel} does not match the manifest (being republished?)"
                    )
            tmp.mkdir(exist_ok=True)
            try:
                os.rename(tmp, local)  # atomic; refused if another process got there first
            except OSError:
                if not local.is_dir():
                    raise
    except StorageError:
        raise
    except FileNotFoundError as error:
        raise IncompleteDirectory(f"{url}: a file listed in it is gone ({error})") from error
    except Exception as error:
        raise StorageError(f"{url}: download failed: {error}") from error
    return local


def work_root() -> Path:
    """Where local working copies live: ``$RECJOB_WORK_DIR`` (an emptyDir in pods), else
    ``<tmp>/recjob-work``."""
    return Path(os.environ.get(WORK_DIR_ENV) or Path(tempfile.gettempdir()) / "recjob-work")


def _slug(url: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url).strip("_")[-80:]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


class WorkingCopy:
    """A local folder standing in for a storage URI.

    For a mounted URI (file://, pvc://, a path) it is the URI's own folder and pulling or
    publishing does nothing. For s3:// and gs:// it is a folder under :func:`work_root`:
    :meth:`pull` brings published parts down, :meth:`publish` sends local parts up."""

    def __init__(self, uri: str, base_dir: str | Path | None = None):
        self.uri = uri
        url = resolve(uri, base_dir)
        self.remote: str | None = None if is_local(url) else url.rstrip("/")
        self.local = Path(url) if self.remote is None else work_root() / _slug(url)

    @property
    def is_remote(self) -> bool:
        """True when the URI is an object store (the local folder is only a copy)."""
        return self.remote is not None

    def url(self, name: str = "") -> str:
        """The remote URL of part ``name`` ('' for the whole)."""
        if self.remote is None:
            raise StorageError(f"{self.uri}: not an object store")
        return f"{self.remote}/{name}" if name else self.remote

    def path(self, name: str = "") -> Path:
        """The local path of part ``name``."""
        return self.local / name if name else self.local

    def pull(self, name: str = "", required: bool = True, manifest: bool = True) -> Path | None:
        """Make part ``name`` (a folder, or with ``manifest=False`` any prefix) present
        locally; returns its path, or None when it is not published and not ``required``.
        A part already present locally is kept (it is complete: written atomically)."""
        target = self.path(name)
        if target.exists():
            return target
        if self.remote is None:
            if required:
                raise StorageNotFound(f"{self.uri}: {name or 'the folder'} does not exist")
            return None
        try:
            return pull_directory(self.url(name), target, require_manifest=manifest)
        except StorageNotFound:
            if required:
                raise
            return None

    def pull_file(self, name: str, required: bool = True) -> Path | None:
        """Make the single file ``name`` present locally (see :meth:`pull`)."""
        target = self.path(name)
        if target.exists():
            return target
        if self.remote is None:
            if required:
                raise StorageNotFound(f"{self.uri}: {name} does not exist")
            return None
        fs, path = filesystem(self.url(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.pull.tmp")
        try:
            fs.get_file(path, str(tmp))
            os.replace(tmp, target)
        except FileNotFoundError as error:
            if required:
                raise StorageNotFound(f"{self.url(name)}: no such object") from error
            return None
        except Exception as error:
            raise StorageError(f"{self.url(name)}: download failed: {error}") from error
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def publish(self, names: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
        """Publish the local parts ``names`` that exist (folders as manifests, files as
        single objects), in the order given; returns the URLs written (none when the URI
        is mounted: the files are already in place)."""
        if self.remote is None:
            return []
        written = []
        patterns = list(exclude)
        for name in names:
            local = self.path(name)
            if local.is_dir():
                push_directory(local, self.url(name), patterns)
            elif local.is_file():
                fs, path = filesystem(self.url(name))
                try:
                    fs.put_file(str(local), path)
                except Exception as error:
                    raise StorageError(f"{self.url(name)}: upload failed: {error}") from error
            else:
                continue
            written.append(self.url(name))
        return written
