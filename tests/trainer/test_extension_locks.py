"""A DeepSpeed op build killed part-way must not hang every later trainer (extension_locks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from recjob_trainer import extension_locks
from recjob_trainer.extension_locks import GRACE_SECONDS, clear_stale_locks


def _lock(root: Path, op: str, age: float, *, nested: bool = True) -> Path:
    folder = root / "py311_cpu" / op if nested else root / op  # default root; the variable's
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    stamp = time.time() - age
    os.utime(lock, (stamp, stamp))
    return lock


def test_abandoned_lock_is_removed_and_reported(tmp_path: Path, capsys) -> None:
    lock = _lock(tmp_path, "deepspeed_shm_comm", GRACE_SECONDS + 60)
    assert clear_stale_locks(tmp_path) == [lock]
    assert not lock.exists()
    assert "abandoned build lock" in capsys.readouterr().err


def test_fresh_lock_is_kept(tmp_path: Path) -> None:
    lock = _lock(tmp_path, "deepspeed_shm_comm", 5)
    assert clear_stale_locks(tmp_path) == []
    assert lock.exists()


def test_old_lock_with_a_build_running_in_its_folder_is_kept(tmp_path: Path) -> None:
    lock = _lock(tmp_path, "deepspeed_shm_comm", GRACE_SECONDS + 600)
    building = lock.parent / "build"  # ninja and the compiler run in the op's folder
    building.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=building)
    try:
        deadline = time.monotonic() + 10
        while building not in extension_locks._busy_folders() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clear_stale_locks(tmp_path) == []
        assert lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clear_stale_locks(tmp_path) == [lock]


def test_root_comes_from_torch_extensions_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, "other_op", GRACE_SECONDS + 1, nested=False)
    assert extension_locks.extensions_root() == tmp_path
    assert clear_stale_locks() == [lock]
