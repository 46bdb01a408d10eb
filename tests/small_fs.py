"""A small file system for tests of a full disk: a size-limited tmpfs mounted in a temporary
folder where this process may mount one (root, as in CI), else None and the test falls back to
a fake writer that raises ``ENOSPC``."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator


def _mount(where: Path, size_kib: int, remount: bool = False) -> bool:
    opts = f"{'remount,' if remount else ''}size={size_kib}k"
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class SmallFs:
    """A mounted tmpfs of ``size_kib``; :meth:`grow` frees space (a user deleting files)."""

    def __init__(self, where: Path) -> None:
        self.path = where

    def grow(self, size_kib: int) -> None:
        assert _mount(self.path, size_kib, remount=True), "remount failed"


@contextlib.contextmanager
def small_fs(where: Path, size_kib: int) -> Iterator[SmallFs | None]:
    """``where`` (created) as a tmpfs of ``size_kib`` KiB, unmounted on exit; None where no tmpfs
    can be mounted here."""
    where.mkdir(parents=True, exist_ok=True)
    if not _mount(where, size_kib):
        yield None
        return
    try:
        yield SmallFs(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)
