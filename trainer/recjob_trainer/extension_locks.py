"""Stale build locks of torch's JIT-compiled extensions (DeepSpeed's CPU ``shm_comm`` op).

On a machine without the op pre-built (local mode; the cluster images pre-build it),
DeepSpeed compiles it on first use with ``torch.utils.cpp_extension.load``. The process that
builds holds ``<op folder>/lock`` (torch's ``FileBaton``: a file, no owner recorded; the op
folder is ``$TORCH_EXTENSIONS_DIR/<op>`` or, without that variable,
``~/.cache/torch_extensions/py<version>_<cuda or cpu>/<op>``) while ``ninja`` runs in that
folder; every other process polls until the file is gone, with no timeout. A build killed
part-way leaves the file behind, and every later trainer on the machine then waits forever
without a word.

:func:`clear_stale_locks` removes such a lock before DeepSpeed starts, loudly, when it is
plainly abandoned: older than :data:`GRACE_SECONDS` and no process is working in its
folder (a build runs ``ninja`` and the compiler there).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

#: A lock younger than this is left alone: a process may hold it for a moment without a
#: compiler running (checking versions, writing build.ninja, loading the library).
GRACE_SECONDS = 120.0


def extensions_root() -> Path:
    """Where torch builds its extensions (``TORCH_EXTENSIONS_DIR``, else its default)."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _busy_folders() -> set[Path]:
    """The working folders of the processes this user can see."""
    return {Path(p.info["cwd"]) for p in psutil.process_iter(["cwd"]) if p.info.get("cwd")}


def clear_stale_locks(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove abandoned extension build locks under ``root``; the locks removed.

    A lock is abandoned when it is older than :data:`GRACE_SECONDS` and no process has its
    working folder in (or under) the lock's build folder. Each removal is reported on
    stderr with the folder.
    """
    root = extensions_root() if root is None else root
    locks = sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})  # see the module's note
    if not locks:
        return []
    now = time.time() if now is None else now
    busy = _busy_folders()
    removed = []
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            continue
        folder = lock.parent
        if age < GRACE_SECONDS or any(f == folder or folder in f.parents for f in busy):
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
        print(
            f"recjob-train: removed {lock}: an abandoned build lock ({age:.0f} s old, no "
            f"process building in {folder}); torch would have waited on it forever",
            file=sys.stderr,
            flush=True,
        )
    return removed
