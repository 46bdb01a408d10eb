"""harness.files: atomic writes that leave no temporary, the sweep of dead writers' temporaries,
and one line for a file system that refuses (a real full tmpfs where one can be mounted)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import files
from harness.errors import HarnessError
from tests.small_fs import small_fs


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_write_atomic_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    files.write_atomic(target, b"first")
    files.write_atomic(target, "second")
    assert target.read_bytes() == b"second" and _leftovers(target.parent) == []


def test_a_full_file_system_is_one_line_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    with small_fs(tmp_path / "fs", 64) as fs:
        if fs is None:  # no tmpfs here: a writer that fails as a full disk does
            def full(path: Path, data: object) -> None:
                Path(path).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            monkeypatch.setattr(files, "_write", full)
        target = tmp_path / "fs" / "entry.pt"
        with pytest.raises(HarnessError) as e:
            files.save_torch(target, {"w": torch.zeros(200_000)}, "teacher cache entry")
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"teacher cache entry {target}: no space left on its file system")
        assert "free space" in line and "rerun" in line
        assert not target.exists() and _leftovers(tmp_path / "fs") == []


def test_a_read_only_folder_is_one_line(tmp_path: Path, monkeypatch) -> None:
    def read_only(path: Path, data: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(files, "_write", read_only)
    with pytest.raises(HarnessError, match=r"^report .*out\.md: its file system is read-only; point it"):
        files.write_atomic(tmp_path / "out.md", "x", "report")


def test_other_errors_pass_unchanged_and_still_clean_up(tmp_path: Path, monkeypatch) -> None:
    def broken(path: Path, data: object) -> None:
        Path(path).write_bytes(b"half")
        raise ValueError("not a file system fault")

    monkeypatch.setattr(files, "_write", broken)
    with pytest.raises(ValueError, match="not a file system fault"):
        files.write_atomic(tmp_path / "x.bin", b"data")
    assert _leftovers(tmp_path) == []


def test_sqlite_words_are_faults_too() -> None:
    e = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert files.fault_errno(e) == (errno.ENOSPC, None)
    line = str(files.storage_fault(e, "tracking store", "/data/mlflow.db"))
    assert line.startswith("tracking store /data/mlflow.db: no space left")
    assert files.storage_fault(ValueError("no such thing")) is None
    assert files.refused("MlflowException: (sqlite3.OperationalError) database or disk is full")
    assert not files.refused("RuntimeError: boom")


def test_a_trials_refusal_names_the_store_or_keeps_the_workers_line() -> None:
    line = str(files.reason_fault("trial kd · s0 · 2x5", "MlflowException: (sqlite3.OperationalError) database or "
                                  "disk is full", "/data/mlflow.db"))
    assert line.startswith("tracking store /data/mlflow.db: no space left on its file system")
    line = str(files.reason_fault("trial kd · s0 · 2x5", "HarnessError: teacher cache entry /c/o.pt: no space left "
                                  "on its file system; free space there\nmore", "/data/mlflow.db"))
    assert line == "trial kd · s0 · 2x5: teacher cache entry /c/o.pt: no space left on its file system; free space there"


def test_the_sweep_removes_only_dead_writers_temporaries(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files._host()
    names = {
        f"a.pt.tmp-{host}-{dead.pid}": True,  # this host, process gone
        f"b.pt.tmp{dead.pid}": True,  # the older form, process gone
        f"c.pt.tmp-{host}-{os.getppid()}": False,  # this host, alive
        "d.pt.tmp-elsewhere-12345": False,  # another host, recent
        "e.pt.tmp-elsewhere-12346": True,  # another host, a day old
        "f.pt": False,  # not a temporary
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - files.OTHER_HOST_AFTER - 60
    os.utime(tmp_path / "e.pt.tmp-elsewhere-12346", (old, old))
    removed = {p.name for p in files.sweep_temporaries(tmp_path)}
    assert removed == {n for n, gone in names.items() if gone}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, gone in names.items() if not gone}
    assert files.sweep_temporaries(tmp_path / "missing") == []
