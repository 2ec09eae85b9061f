"""Storage URIs as the API defines them: parsing and the rules every component applies.

A storage URI is one of

- ``pvc://CLAIM/path``: ``path`` inside the PersistentVolumeClaim ``CLAIM``, mounted in
  pods at ``$RECJOB_PVC_ROOT/CLAIM`` (default root ``/mnt/pvc``). The path may not leave
  the claim: ``pvc://data/../other`` is refused;
- ``file:///absolute/path``: a path on the pod's (or local machine's) filesystem. Only
  absolute ``file://`` URIs exist: ``file://data.csv`` is refused (write a relative path
  without ``file://``; it resolves against the RecJob file in local mode);
- ``s3://BUCKET/key`` and ``gs://BUCKET/key``: object stores, read and written through
  fsspec (s3fs, gcsfs) with the credentials of ``spec.storage``;
- a plain path, absolute or relative.

Pure functions only (no I/O): the operator, the trainer and the serving tools share them.
"""

from __future__ import annotations

import posixpath
import re

PVC_SCHEME = "pvc://"
FILE_SCHEME = "file://"
#: Object stores reached through fsspec; they need credentials (spec.storage) in pods.
OBJECT_STORE_SCHEMES = ("s3", "gs")
#: Where pods mount ``pvc://`` claims unless ``$RECJOB_PVC_ROOT`` says otherwise.
DEFAULT_PVC_ROOT = "/mnt/pvc"
PVC_ROOT_ENV = "RECJOB_PVC_ROOT"

#: A PersistentVolumeClaim name: a DNS-1123 subdomain.
CLAIM_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")


class UriError(ValueError):
    """A storage URI that breaks the API's rules; the message says which and why."""

    def __init__(self, uri: str, reason: str):
        self.uri, self.reason = uri, reason
        super().__init__(f"{uri}: {reason}")


def scheme(uri: str) -> str | None:
    """``pvc``, ``file``, ``s3``, ``gs`` (or another scheme) of ``uri``; None for a path."""
    match = _SCHEME.match(uri)
    return match.group(1) if match else None


def is_object_store(uri: str) -> bool:
    """True for ``s3://`` and ``gs://`` URIs."""
    return scheme(uri) in OBJECT_STORE_SCHEMES


def split_pvc(uri: str) -> tuple[str, str]:
    """(claim, path inside the claim, normalised, without a leading slash) of a
    ``pvc://`` URI; UriError for a bad claim name or a path that leaves the claim."""
    if not uri.startswith(PVC_SCHEME):
        raise UriError(uri, "not a pvc:// URI")
    claim, _, rest = uri.removeprefix(PVC_SCHEME).partition("/")
    if not claim:
        raise UriError(uri, "expected pvc://CLAIM/path (the claim name is missing)")
    if len(claim) > 253 or not CLAIM_PATTERN.match(claim):
        raise UriError(
            uri,
            f"{claim!r} is not a PersistentVolumeClaim name (lowercase letters, digits, "
            "'-' and '.')",
        )
    depth = 0
    for part in rest.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UriError(
                    uri,
                    f"the path leaves the claim {claim!r} ('..' above its root); a pvc:// "
                    "URI names a file inside its claim only",
                )
        elif part not in ("", "."):
            depth += 1
    inside = posixpath.normpath("/" + rest) if rest else "/"
    return claim, inside.lstrip("/")


def pvc_claim(uri: str) -> str | None:
    """The claim a ``pvc://`` URI names (None for any other URI)."""
    return split_pvc(uri)[0] if scheme(uri) == "pvc" else None


def pvc_local_path(uri: str, root: str = DEFAULT_PVC_ROOT) -> str:
    """Where a ``pvc://`` URI lies in a pod that mounts its claim under ``root``: always
    inside ``root/CLAIM`` (UriError otherwise)."""
    claim, inside = split_pvc(uri)
    mount = posixpath.join(root, claim)
    return posixpath.join(mount, inside) if inside else mount


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not an acceptable storage URI (None when it is).

    Checks what the schema's pattern cannot: claim names, paths that leave their claim,
    relative ``file://`` URIs, object-store URIs without a bucket.
    """
    kind = scheme(uri)
    if kind == "pvc":
        try:
            split_pvc(uri)
        except UriError as error:
            return error.reason
        return None
    if kind == "file":
        path = uri.removeprefix(FILE_SCHEME)
        if not path.startswith("/"):
            return (
                "file:// URIs must be absolute (file:///path/to/file); a relative path is "
                "written without file:// and resolves against the RecJob file in local mode"
            )
        return None
    if kind in OBJECT_STORE_SCHEMES:
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        if not bucket:
            return f"expected {kind}://BUCKET/key (the bucket name is missing)"
        return None
    return None


def join(uri: str, *parts: str) -> str:
    """``uri`` with path segments appended, keeping the scheme (``pvc://c/a`` + ``b`` ->
    ``pvc://c/a/b``)."""
    out = uri
    for part in parts:
        part = part.strip("/")
        if part:
            out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def with_suffix(uri: str, suffix: str) -> str:
    """``uri`` with the suffix of its last path segment replaced (``s3://b/x/Data.text`` +
    ``.item2index`` -> ``s3://b/x/Data.item2index``), like ``PurePath.with_suffix`` but
    leaving the scheme and the rest of the URI as they are."""
    head, _, name = uri.rpartition("/")
    if not name or name in (".", ".."):
        raise UriError(uri, "names no file")
    stem = name[: name.rfind(".")] if name.rfind(".") > 0 else name
    return f"{head}/{stem}{suffix}" if head or uri.startswith("/") else f"{stem}{suffix}"
