"""Files the harness writes, and what a user's file system can refuse.

- :func:`write_atomic` (and :func:`save_torch`) write ``<name>.tmp-<host>-<pid>`` beside the
  target and ``os.replace`` it into place: a reader sees the old file or the new one, never half
  of one. On any failure the temporary is removed before the error goes on.
- :func:`sweep_temporaries` removes the temporaries of writers that died before they could (a
  ``kill -9``, a machine that went down): those of this host whose process is gone, those of
  other hosts after a day, and the older ``<name>.tmp<pid>`` form by the same rules.
- :func:`storage_fault` turns what a full, read-only or unwritable file system raises (an
  ``OSError`` with its errno, SQLite's "database or disk is full") into one
  :class:`~harness.errors.HarnessError` line that names the path and what to do; the CLI
  prints it and exits with code 2. Finished work is never undone, so a rerun resumes.
"""

from __future__ import annotations

import errno
import io
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

#: what a temporary's name ends with: ``.tmp-<host>-<pid>`` (and the older ``.tmp<pid>``)
_TMP = re.compile(r"\.tmp(?:-(?P<host>.+)-)?(?P<pid>\d+)$")
#: a temporary of another host (whose processes we cannot see) is stale after this many seconds
OTHER_HOST_AFTER = 24 * 3600.0


def _host() -> str:
    return platform.node().replace("/", "_") or "localhost"


def temporary(path: Path) -> Path:
    """Where :func:`write_atomic` writes ``path`` first: ``<name>.tmp-<host>-<pid>``."""
    return path.with_name(f"{path.name}.tmp-{_host()}-{os.getpid()}")


def _write(path: Path, data: bytes | bytearray | memoryview) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def write_atomic(path: str | Path, data: bytes | bytearray | memoryview | str, what: str = "file") -> None:
    """Write ``data`` to ``path`` through a temporary and ``os.replace``; on failure remove the
    temporary and raise :func:`storage_fault`'s one line (``what`` names the file for the user)
    where the file system refused, else the original error."""
    path = Path(path)
    tmp = temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        fault = storage_fault(e, what=what, path=path)
        if fault is not None:
            raise fault from None
        raise


def save_torch(path: str | Path, obj: Any, what: str = "cache entry") -> None:
    """``torch.save`` through :func:`write_atomic`. Serialised in memory first: torch's own file
    writer reports a full disk as an opaque ``unexpected pos`` RuntimeError and leaves half a
    file, while a plain write raises ``OSError(ENOSPC)`` with the path."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getbuffer(), what)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def sweep_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writer is gone (this host: the process no longer
    exists; another host: older than :data:`OTHER_HOST_AFTER`). Returns what was removed; a
    folder that does not exist, or a file another sweeper removed first, is no error."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    host, now = _host(), time.time()
    for f in entries:
        m = _TMP.search(f.name)
        if m is None or not f.is_file():
            continue
        mine = m.group("host") in (None, host)  # the older form carried no host: it was ours
        try:
            stale = not process_alive(int(m.group("pid"))) if mine else now - f.stat().st_mtime > OTHER_HOST_AFTER
            if stale and int(m.group("pid")) != os.getpid():
                f.unlink()
                removed.append(f)
        except OSError:
            continue
    return removed


# ----------------------------------------------------------------------------- faults
_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS,)
_DENIED = (errno.EACCES, errno.EPERM)
#: what SQLite (through SQLAlchemy and MLflow) says for the same faults
_SQLITE = {"database or disk is full": _SPACE[0], "attempt to write a readonly database": _READ_ONLY[0],
           "unable to open database file": errno.ENOENT, "disk i/o error": errno.EIO}


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return out


def fault_errno(e: BaseException) -> tuple[int, str | None] | None:
    """(errno, the path it names or None) when ``e`` (or what it was raised from) is a file
    system's refusal: no space, read-only, permission denied, or SQLite's words for them."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (*_SPACE, *_READ_ONLY, *_DENIED):
            return x.errno, x.filename if isinstance(x.filename, str) else None
        text = str(x).lower()
        for words, code in _SQLITE.items():
            if words in text:
                return code, None
        if "no space left on device" in text:
            return errno.ENOSPC, None
    return None


#: words of a refusal in a failed trial's reason (the worker's error as text)
_REFUSED = ("no space left", "disk is full", "read-only file system", "readonly database", "disk quota exceeded")


def refused(reason: str) -> bool:
    """Whether a trial's failure reason is a file system's refusal: the next trials would fail the
    same way, so the runner stops the study with that line instead of retrying."""
    return any(w in reason.lower() for w in _REFUSED)


def reason_fault(where: str, reason: str, store: str) -> HarnessError:
    """The one line for a trial that failed on a refusal (:func:`refused`): SQLite's words as the
    tracking store's (``store``: its file or URI), else the worker's own line, after ``where``."""
    if any(w in reason.lower() for w in _SQLITE):
        fault = storage_fault(RuntimeError(reason), "tracking store", store)
        assert fault is not None
        return fault
    return HarnessError(f"{where}: {reason.removeprefix('HarnessError: ').splitlines()[0]}")


def storage_fault(e: BaseException, what: str = "file", path: str | Path | None = None) -> HarnessError | None:
    """The one line for a file system's refusal (None when ``e`` is something else): what could
    not be written, where, why, and what to do. ``path``: the file meant, when the error's own
    is missing or is a temporary."""
    found = fault_errno(e)
    if found is None:
        return None
    code, named = found
    where = str(path) if path is not None else (named or "?")
    if code in _SPACE:
        why = "no space left on its file system"
        todo = "free space there (or point it elsewhere), then rerun: finished work is kept and the run resumes"
    elif code in _READ_ONLY:
        why = "its file system is read-only"
        todo = "point it to a writable folder, then rerun"
    elif code in _DENIED:
        why = "permission denied"
        todo = "make it writable for this user (or point it elsewhere), then rerun"
    elif code == errno.ENOENT:
        why = "it cannot be opened (a missing folder or an unreadable file)"
        todo = "check that its folder exists and is writable, then rerun"
    else:
        why = "the file system reported an I/O error"
        todo = "check the disk, then rerun"
    return HarnessError(f"{what} {where}: {why}; {todo}")
