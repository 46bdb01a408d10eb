"""Download CIFAR-10 / CIFAR-100 (the "python version" archives) into ``dataset.root``.

``harness data download cifar10 --root DIR`` and ``dataset.download: true`` in a study file both
call :func:`download_dataset`, which leaves ``DIR/cifar-10-batches-py`` (or
``DIR/cifar-100-python``) exactly as torchvision does, so ``dataset: {name: cifar10, root: DIR}``
reads it right away (:func:`harness.data.datasets.load_cifar10`).

Steps, each safe to interrupt:

1. Already present (every file the reader needs exists in ``DIR/<folder>`` or in ``DIR`` itself):
   nothing is requested.
2. Fetch into ``DIR/<archive>.part``. A ``.part`` left by an interrupted run is resumed: the
   request carries ``Range: bytes=N-`` (N = its size) and the answer is appended on HTTP 206,
   written from byte 0 on HTTP 200 (a server without ranges), refetched whole on HTTP 416.
   A ``.part`` whose MD5 already matches is extracted without any request.
3. Verify the published MD5 (a mismatch deletes the ``.part``: the next run starts afresh).
4. Extract into a temporary folder inside ``DIR`` (members with absolute paths, ``..``, links or
   devices are refused; ``tarfile`` ``filter="data"`` where available), check the reader's files
   are there, then ``os.replace`` the folder into place and delete the ``.part``. A failure leaves
   no extracted folder and no temporary folder behind.

The URL: ``url`` (``--url``), else ``$HARNESS_CIFAR_URL``, else :data:`DEFAULT_BASE`. A URL whose
path ends in ``.tar.gz`` or ``.tgz`` is the archive itself; any other is a base (a mirror's
folder) to which ``/<archive file name>`` is appended. The expected MD5 is the published one
(:data:`ARCHIVES`, from :mod:`harness.data.catalog`) unless ``md5`` is passed (tests, mirrors of other builds).

Every failure is a :class:`~harness.errors.HarnessError` with one line naming the URL or file.
This module does not import torch.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterator

from harness.data.catalog import ARCHIVES, CifarArchive
from harness.errors import HarnessError

__all__ = [
    "ARCHIVES", "CifarArchive", "DEFAULT_BASE", "URL_ENV", "DownloadResult",
    "archive_url", "find_extracted", "download_dataset", "ensure_downloaded",
]

#: where the official archives live (Alex Krizhevsky's CIFAR page)
DEFAULT_BASE = "https://www.cs.toronto.edu/~kriz/"
#: environment variable overriding the URL (a base or the archive's full URL)
URL_ENV = "HARNESS_CIFAR_URL"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download_dataset` did."""

    folder: Path  # the folder the reader uses (``root/<folder>``, or root itself)
    already_present: bool  # True: nothing was requested
    received: int  # bytes received over the network by this call (0 when nothing was fetched)


def archive_url(archive: CifarArchive, url: str | None = None) -> str:
    """``url`` (else ``$HARNESS_CIFAR_URL``, else :data:`DEFAULT_BASE`) as the archive's full URL:
    a URL whose path ends in ``.tar.gz``/``.tgz`` is kept, any other gets ``/<filename>`` appended."""
    given = url or os.environ.get(URL_ENV) or DEFAULT_BASE
    path = urllib.parse.urlsplit(given).path
    if path.endswith((".tar.gz", ".tgz")):
        return given
    return given.rstrip("/") + "/" + archive.filename


def find_extracted(archive: CifarArchive, root: Path) -> Path | None:
    """The folder holding every file the reader needs: ``root/<folder>`` or ``root`` itself (the
    two forms the reader accepts); None when neither is complete."""
    for folder in (root / archive.folder, root):
        if all((folder / f).is_file() for f in archive.files):
            return folder
    return None


def ensure_downloaded(
    dataset: Any, url: str | None = None, md5: str | None = None, out: IO[str] | None = None
) -> DownloadResult | None:
    """A study's ``dataset`` block (``name``, ``root``, ``download``): download it when
    ``download`` is true (errors name ``dataset.root``); None when it is false."""
    if not getattr(dataset, "download", False):
        return None
    return download_dataset(dataset.name, dataset.root, url=url, md5=md5, out=out, field="dataset.root")


def download_dataset(
    name: str,
    root: str | os.PathLike | None,
    url: str | None = None,
    md5: str | None = None,
    out: IO[str] | None = None,
    timeout: float = 60.0,
    field: str = "--root",
) -> DownloadResult:
    """Make ``root`` hold data set ``name`` as the reader expects: see the module docstring.

    Args:
        name: ``cifar10`` or ``cifar100``.
        root: a writable folder (created, with its parents, when missing).
        url: base or full URL (default ``$HARNESS_CIFAR_URL``, else the official site).
        md5: expected MD5 of the archive (default: the published one).
        out: where progress goes (default stderr); a bar when it is a terminal, else plain lines.
        timeout: seconds without an answer from the server before giving up.
        field: how error messages name ``root`` (``--root`` or ``dataset.root``).
    """
    archive = ARCHIVES.get(name)
    base = _check_root(root, field)
    out = out if out is not None else sys.stderr
    present = find_extracted(archive, base)
    if present is not None:
        return DownloadResult(present, already_present=True, received=0)
    full_url = archive_url(archive, url)
    if urllib.parse.urlsplit(full_url).scheme not in ("http", "https"):
        raise HarnessError(f"{name}: {full_url} is not an http(s) URL (from --url or ${URL_ENV})")
    expected = (md5 or archive.md5).lower()
    part = base / f"{archive.filename}.part"
    received = _fetch(archive, full_url, part, expected, out, timeout)
    folder = _extract(archive, part, base, out)
    part.unlink(missing_ok=True)
    return DownloadResult(folder, already_present=False, received=received)


# --------------------------------------------------------------------------- checks


def _one_line(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # URLError wraps the socket error (or a message)
    text = str(exc if reason is None else reason)
    return " ".join(text.split()) or type(exc).__name__


def _check_root(root: str | os.PathLike | None, field: str) -> Path:
    if root is None or str(root) == "":
        raise HarnessError(f"{field}: required (the folder to download into)")
    path = Path(root).expanduser()
    if not path.exists():  # created, with its parents (``mkdir -p``): a fresh clone has no data/ yet
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise HarnessError(f"{field}: {path} does not exist and cannot be created ({_one_line(e)})") from None
    if not path.is_dir():
        raise HarnessError(f"{field}: {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise HarnessError(f"{field}: {path} is not writable")
    return path


def _md5_of(path: Path) -> Any:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


# --------------------------------------------------------------------------- fetch


def _fetch(
    archive: CifarArchive, url: str, part: Path, md5: str, out: IO[str], timeout: float
) -> int:
    """Complete ``part`` from ``url`` and check its MD5; returns the bytes received."""
    name = archive.dataset
    try:
        have = part.stat().st_size if part.is_file() else 0
        digest = _md5_of(part) if have else hashlib.md5()
    except OSError as exc:
        raise HarnessError(f"{name}: cannot read {part} ({_one_line(exc)})") from None
    if have and digest.hexdigest() == md5:  # a complete .part (e.g. extraction failed): no request
        return 0
    received = 0
    for _ in range(2):  # a second round only after HTTP 416, then without a Range
        got, digest, restart = _request(name, url, part, have, digest, out, timeout)
        received += got
        if not restart:
            break
        print(f"{name}: {url} cannot resume {part}; downloading it again", file=out, flush=True)
        part.unlink(missing_ok=True)
        have, digest = 0, hashlib.md5()
    if digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise HarnessError(
            f"{name}: {url} gave an archive with MD5 {digest.hexdigest()}, expected {md5}; "
            f"deleted {part} (check the URL or mirror, then rerun)"
        )
    return received


def _request(
    name: str, url: str, part: Path, have: int, digest: Any, out: IO[str], timeout: float
) -> tuple[int, Any, bool]:
    """One GET of ``url`` into ``part`` (``have`` bytes long, MD5 so far ``digest``): appended on
    HTTP 206, written from 0 on HTTP 200. Returns (bytes received, MD5 of the whole ``part``,
    whether to start again from 0: HTTP 416 to a Range)."""
    req = urllib.request.Request(url, headers={"User-Agent": "ka-harness"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - the data set's URL
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:
            return 0, digest, True
        raise HarnessError(f"{name}: {url} answered HTTP {exc.code} {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        raise HarnessError(f"{name}: cannot download {url} ({_one_line(exc)})") from None

    with resp:
        if resp.status == 206:
            start = _range_start(resp.headers.get("Content-Range", ""))
            if start != have:
                part.unlink(missing_ok=True)
                raise HarnessError(
                    f"{name}: {url} answered bytes from {start} when asked from {have}; "
                    f"deleted {part}, rerun to download it whole"
                )
        elif resp.status == 200:
            have, digest = 0, hashlib.md5()
        else:
            raise HarnessError(f"{name}: {url} answered HTTP {resp.status} {resp.reason}")
        length = resp.headers.get("Content-Length", "")
        expected = int(length) if length.isdigit() else None
        total = have + expected if expected is not None else None
        verb = f"resuming at {_size(have)}" if have else "downloading"
        size = f" ({_size(total)})" if total else ""
        print(f"{name}: {verb} {url}{size} into {part}", file=out, flush=True)
        try:
            f = part.open("ab" if have else "wb")
        except OSError as exc:
            raise HarnessError(f"{name}: cannot write {part} ({_one_line(exc)})") from None
        received = 0
        with f, _bar(out, name, total, have) as advance:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise _cut(name, url, part, have + received, total, exc) from None
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as exc:
                    raise HarnessError(f"{name}: cannot write {part} ({_one_line(exc)})") from None
                digest.update(block)
                received += len(block)
                advance(len(block))
        if expected is not None and received < expected:  # http.client returns b"" on early EOF
            raise _cut(name, url, part, have + received, total, None)
    return received, digest, False


def _cut(
    name: str, url: str, part: Path, size: int, total: int | None, exc: BaseException | None
) -> HarnessError:
    why = _one_line(exc) if exc is not None else "connection closed early"
    of = f" of {_size(total)}" if total else ""
    return HarnessError(
        f"{name}: download of {url} interrupted ({why}) after {_size(size)}{of}; "
        f"rerun to resume from {part}"
    )


def _range_start(content_range: str) -> int | None:
    """``bytes START-END/TOTAL`` -> START (None if unreadable)."""
    unit, _, spec = content_range.strip().partition(" ")
    start = spec.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


@contextmanager
def _bar(out: IO[str], name: str, total: int | None, done: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on ``out`` when it is a terminal (else nothing); yields ``advance(n)``."""
    if not (hasattr(out, "isatty") and out.isatty()):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )  # fmt: skip

    columns = (TextColumn(name), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=out), transient=True) as progress:
        task = progress.add_task(name, total=total, completed=done)
        yield lambda n: progress.advance(task, n)


# --------------------------------------------------------------------------- extract


class _BadArchive(Exception):
    """The archive cannot be (safely) extracted: a broken file or a refused member."""


def _check_member(member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise _BadArchive(f"member {member.name!r} points outside the folder")
    if not (member.isfile() or member.isdir()):
        raise _BadArchive(f"member {member.name!r} is a link or a special file")


def _extract(archive: CifarArchive, part: Path, root: Path, out: IO[str]) -> Path:
    """Extract ``part`` into a temporary folder inside ``root``, check the reader's files, move
    the folder into place; no extracted or temporary folder is left on failure. A broken archive
    is deleted (it passed the MD5, so downloading it again gives the same bytes: the MD5 given is
    wrong); a write error keeps it for the next run."""
    name, target = archive.dataset, root / archive.folder
    print(f"{name}: extracting {part.name} into {target}", file=out, flush=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.folder}-", dir=root))
    except OSError as exc:
        raise HarnessError(f"{name}: cannot write in {root} ({_one_line(exc)})") from None
    try:
        with tarfile.open(part, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.12, 3.11.4, 3.10.12
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons: members were checked above
                tar.extractall(tmp, members=members)
        missing = [f for f in archive.files if not (tmp / archive.folder / f).is_file()]
        if missing:
            raise _BadArchive(f"it has no {archive.folder}/{missing[0]}")
        if target.exists():  # an incomplete earlier copy: moved aside, deleted with tmp
            os.replace(target, tmp / ".old")
        os.replace(tmp / archive.folder, target)
    except (_BadArchive, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:  # before OSError
        part.unlink(missing_ok=True)
        raise HarnessError(
            f"{name}: {part} is not a valid CIFAR archive ({_one_line(exc)}); deleted it"
        ) from None
    except OSError as exc:
        raise HarnessError(f"{name}: cannot extract {part} into {root} ({_one_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
