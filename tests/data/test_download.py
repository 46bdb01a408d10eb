"""``harness data download`` / ``dataset.download``: against a real HTTP server on 127.0.0.1
serving tiny archives in the real CIFAR layout (the pickles of tests/data/test_datasets.py)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from harness import cli
from harness.config import parse_study
from harness.data.datasets import load_dataset
from harness.data.download import (
    ARCHIVES, URL_ENV, archive_url, download_dataset, ensure_downloaded, find_extracted,
)  # fmt: skip
from harness.errors import HarnessError
from tests.data.test_datasets import _check_cifar10, _write_cifar10, _write_cifar100

C10, C100 = ARCHIVES.get("cifar10"), ARCHIVES.get("cifar100")
C10_PATH = "/cifar-10-python.tar.gz"


def _tar_gz(folder: Path, arcname: str, extra: dict[str, bytes] | None = None) -> bytes:
    """``folder`` packed as ``arcname/`` in a .tar.gz, like the official archives (plus the
    members in ``extra``, name -> bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def cifar10_tgz(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    src = tmp_path_factory.mktemp("src10")
    folder = _write_cifar10(src)
    (folder / "readme.html").write_bytes(b"<html>not needed by the reader</html>")
    return _tar_gz(folder, C10.folder)


@pytest.fixture(scope="module")
def cifar100_tgz(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _tar_gz(_write_cifar100(tmp_path_factory.mktemp("src100")), C100.folder)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Server:
    """A file server on 127.0.0.1 that honours ``Range: bytes=N-`` (unless ``ranges`` is False),
    can cut the connection after ``cut_after`` bytes of its next answer, and records every
    request and the body bytes it sent."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.cut_after: int | None = None
        self.range_from_zero = False  # misbehave: answer a Range with 206 but bytes from 0
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.statuses: list[int] = []
        self.sent = 0
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rng = self.headers.get("Range")
                state.requests.append((self.path, rng))
                data = state.files.get(self.path)
                if data is None:
                    state.statuses.append(404)
                    self.send_error(404)
                    return
                start, status = 0, 200
                if rng and state.ranges:
                    start, status = int(rng.removeprefix("bytes=").split("-")[0]), 206
                    start = 0 if state.range_from_zero else start
                    if start >= len(data):
                        state.statuses.append(416)
                        self.send_error(416)
                        return
                body = data[start:]
                state.statuses.append(status)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if state.cut_after is not None:  # send K bytes, then close the connection
                    body, state.cut_after = body[: state.cut_after], None
                    self.close_connection = True
                # counted before the write: the client can read the last byte and the test assert
                # on ``sent`` before this thread runs again (a flake beside two busy processes)
                state.sent += len(body)
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02})
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    s = Server()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "data"
    r.mkdir()
    return r


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, list[str]]:
    """(exit code, stdout, the ``harness: error`` lines of stderr)."""
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.startswith("harness: error")]


# --------------------------------------------------------------------------- downloads


def test_fresh_download_verifies_extracts_and_the_reader_reads_it(server, root, cifar10_tgz):
    server.files[C10_PATH] = cifar10_tgz
    out = io.StringIO()
    result = download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=out)
    assert result.folder == root / C10.folder and not result.already_present
    assert result.received == len(cifar10_tgz) == server.sent
    assert server.requests == [(C10_PATH, None)]
    assert sorted(os.listdir(root)) == [C10.folder]  # no .part, no temporary folder
    assert sorted(os.listdir(root / C10.folder)) == sorted([*C10.files, "readme.html"])
    _check_cifar10(load_dataset("cifar10", root=str(root)))  # exact images, labels, class names
    lines = out.getvalue().splitlines()
    assert lines == [
        f"cifar10: downloading {server.base}{C10_PATH} ({len(cifar10_tgz)} bytes) into {root}/{C10.filename}.part",
        f"cifar10: extracting {C10.filename}.part into {root / C10.folder}",
    ]


def test_cifar100_from_a_full_url_in_the_environment(server, root, cifar100_tgz, monkeypatch):
    server.files["/mirror/c100.tgz"] = cifar100_tgz
    monkeypatch.setenv(URL_ENV, f"{server.base}/mirror/c100.tgz")
    download_dataset("cifar100", root, md5=_md5(cifar100_tgz), out=io.StringIO())
    assert server.requests == [("/mirror/c100.tgz", None)]
    ds = load_dataset("cifar100", root=str(root))
    assert ds.y_train.tolist() == [99, 0, 42] and ds.y_test.tolist() == [7]
    assert ds.classes[0] == "apple" and ds.classes[99] == "worm"
    assert float(ds.x_train[0, 2, 31, 31]) == pytest.approx(128 / 255)
    assert float(ds.x_test.sum()) == 1.0


def test_resume_after_a_cut_connection_sends_range_and_appends(server, root, cifar10_tgz):
    size, k = len(cifar10_tgz), len(cifar10_tgz) // 3
    server.files[C10_PATH] = cifar10_tgz
    server.cut_after = k
    part = root / f"{C10.filename}.part"
    with pytest.raises(HarnessError) as ei:
        download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    msg = str(ei.value)
    assert "\n" not in msg and f"{server.base}{C10_PATH}" in msg and f"rerun to resume from {part}" in msg
    assert part.read_bytes() == cifar10_tgz[:k] and sorted(os.listdir(root)) == [part.name]

    result = download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert server.requests == [(C10_PATH, None), (C10_PATH, f"bytes={k}-")]
    assert server.statuses == [200, 206]
    assert result.received == size - k
    assert server.sent == size < 2 * size  # nothing fetched twice
    assert sorted(os.listdir(root)) == [C10.folder]
    _check_cifar10(load_dataset("cifar10", root=str(root)))


def test_a_server_without_ranges_restarts_from_zero(server, root, cifar10_tgz):
    server.files[C10_PATH] = cifar10_tgz
    server.ranges = False
    (root / f"{C10.filename}.part").write_bytes(b"x" * 100)  # not even a prefix of the archive
    result = download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert server.requests == [(C10_PATH, "bytes=100-")] and server.statuses == [200]
    assert result.received == len(cifar10_tgz)
    _check_cifar10(load_dataset("cifar10", root=str(root)))


def test_a_part_longer_than_the_archive_is_fetched_again_after_416(server, root, cifar10_tgz):
    server.files[C10_PATH] = cifar10_tgz
    n = len(cifar10_tgz) + 5
    (root / f"{C10.filename}.part").write_bytes(b"y" * n)
    download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert server.requests == [(C10_PATH, f"bytes={n}-"), (C10_PATH, None)]
    assert server.statuses == [416, 200]
    assert sorted(os.listdir(root)) == [C10.folder]


def test_a_206_from_the_wrong_offset_is_refused_and_the_part_deleted(server, root, cifar10_tgz):
    server.files[C10_PATH] = cifar10_tgz
    server.range_from_zero = True
    part = root / f"{C10.filename}.part"
    part.write_bytes(cifar10_tgz[:10])
    with pytest.raises(HarnessError) as ei:
        download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert str(ei.value) == (
        f"cifar10: {server.base}{C10_PATH} answered bytes from 0 when asked from 10; "
        f"deleted {part}, rerun to download it whole"
    )
    assert os.listdir(root) == []


def test_a_complete_part_is_extracted_without_a_request(server, root, cifar10_tgz):
    (root / f"{C10.filename}.part").write_bytes(cifar10_tgz)
    result = download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert server.requests == [] and result.received == 0 and not result.already_present
    _check_cifar10(load_dataset("cifar10", root=str(root)))


def test_an_incomplete_folder_is_replaced(server, root, cifar10_tgz):
    server.files[C10_PATH] = cifar10_tgz
    (root / C10.folder).mkdir()
    (root / C10.folder / "data_batch_1").write_bytes(b"half")
    download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert sorted(os.listdir(root)) == [C10.folder]
    _check_cifar10(load_dataset("cifar10", root=str(root)))


# --------------------------------------------------------------------------- already present


@pytest.mark.parametrize("inside", [True, False], ids=["data-root", "the-folder-itself"])
def test_already_present_makes_no_request(server, root, inside, capsys):
    folder = _write_cifar10(root)
    given = root if inside else folder
    result = download_dataset("cifar10", given, url=server.base)
    assert result.already_present and result.folder == folder and result.received == 0
    rc, out, errors = _run_cli(["data", "download", "cifar10", "--root", str(given), "--url", server.base], capsys)
    assert rc == 0 and errors == []
    assert out == f"cifar10: already present in {folder}; nothing downloaded\n"
    assert server.requests == []


# --------------------------------------------------------------------------- failures


def test_bad_checksum_is_one_error_line_and_leaves_nothing(server, root, cifar10_tgz, capsys):
    server.files[C10_PATH] = cifar10_tgz  # the published MD5 is of the real archive
    rc, out, errors = _run_cli(["data", "download", "cifar10", "--root", str(root), "--url", server.base], capsys)
    assert rc == 2 and out == ""
    assert errors == [
        f"harness: error: cifar10: {server.base}{C10_PATH} gave an archive with MD5 {_md5(cifar10_tgz)}, "
        f"expected {C10.md5}; deleted {root}/{C10.filename}.part (check the URL or mirror, then rerun)"
    ]
    assert os.listdir(root) == []  # no extracted folder, no .part


def test_connection_refused_is_one_error_line(root, capsys, monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)
    url = f"http://127.0.0.1:{_closed_port()}/"
    rc, out, errors = _run_cli(["data", "download", "cifar100", "--root", str(root), "--url", url], capsys)
    assert rc == 2 and out == ""
    assert len(errors) == 1
    assert errors[0].startswith(f"harness: error: cifar100: cannot download {url}{C100.filename} (")
    assert "refused" in errors[0]
    assert os.listdir(root) == []


def test_a_silent_server_times_out(root):
    with socket.socket() as listener:  # accepts connections (backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.tar.gz"
        with pytest.raises(HarnessError, match=r"^cifar10: cannot download http://127\.0\.0\.1:\d+/x\.tar\.gz \(timed out\)$"):
            download_dataset("cifar10", root, url=url, timeout=0.2, out=io.StringIO())
    assert os.listdir(root) == []


def test_http_error_names_the_url(server, root):
    with pytest.raises(HarnessError) as ei:
        download_dataset("cifar10", root, url=f"{server.base}/nothing/", out=io.StringIO())
    assert str(ei.value) == f"cifar10: {server.base}/nothing/{C10.filename} answered HTTP 404 Not Found"


def test_a_url_that_is_not_http_is_refused(root, monkeypatch):
    monkeypatch.setenv(URL_ENV, "/mnt/mirror")
    with pytest.raises(HarnessError) as ei:
        download_dataset("cifar10", root, out=io.StringIO())
    assert str(ei.value) == f"cifar10: /mnt/mirror/{C10.filename} is not an http(s) URL (from --url or ${URL_ENV})"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_progress_bar(server, root, tmp_path):
    noise = bytes(range(256)) * 4 + os.urandom(4000)  # incompressible: some kB
    data = _tar_gz(_write_cifar10(tmp_path / "s"), C10.folder, {"cifar-10-batches-py/noise": noise})
    server.files[C10_PATH] = data
    out = _Terminal()
    download_dataset("cifar10", root, url=server.base, md5=_md5(data), out=out)
    kb = f"{len(data) / 1000:.1f}/{len(data) / 1000:.1f} kB"  # rich's DownloadColumn, finished
    assert "cifar10 \x1b[" in out.getvalue() and "━━━━" in out.getvalue() and kb in out.getvalue()
    _check_cifar10(load_dataset("cifar10", root=str(root)))


def _traversal(tmp_path: Path) -> bytes:
    return _tar_gz(_write_cifar10(tmp_path / "s"), C10.folder, {"../escaped.txt": b"boo"})


def _symlink(tmp_path: Path) -> bytes:
    folder = _write_cifar10(tmp_path / "s")
    (folder / "link").symlink_to("/etc/passwd")
    return _tar_gz(folder, C10.folder)


def _missing_file(tmp_path: Path) -> bytes:
    folder = _write_cifar10(tmp_path / "s")
    (folder / "test_batch").unlink()
    return _tar_gz(folder, C10.folder)


@pytest.mark.parametrize("make,why", [
    (lambda tmp: b"\x1f\x8b\x08\x00 definitely not gzip data" * 20, "not a gzip file|invalid"),
    (lambda tmp: _tar_gz(_write_cifar10(tmp / "s"), C10.folder)[:-200], "Compressed file ended before the end-of-stream marker"),
    (_traversal, "'../escaped.txt' points outside the folder"),
    (_symlink, "'cifar-10-batches-py/link' is a link or a special file"),
    (_missing_file, "it has no cifar-10-batches-py/test_batch"),
], ids=["garbage", "truncated", "dotdot", "symlink", "missing-file"])
def test_an_extraction_failure_leaves_no_folder_and_no_temp(server, root, tmp_path, make, why):
    data = make(tmp_path)
    server.files[C10_PATH] = data
    with pytest.raises(HarnessError, match=why) as ei:
        download_dataset("cifar10", root, url=server.base, md5=_md5(data), out=io.StringIO())
    part = root / f"{C10.filename}.part"
    assert str(ei.value).startswith(f"cifar10: {part} is not a valid CIFAR archive (")
    assert str(ei.value).endswith("; deleted it") and "\n" not in str(ei.value)
    assert os.listdir(root) == []  # no folder, no .extract temp dir, no .part
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("make_root,expected", [
    (lambda p: (p / "f").write_text("x") and p / "f" / "sub", "does not exist and cannot be created ("),
    (lambda p: (p / "f").write_text("x") and p / "f", "is not a folder"),
], ids=["uncreatable", "a-file"])
def test_a_bad_root_is_one_error_line_naming_it(tmp_path, make_root, expected, capsys):
    where = make_root(tmp_path)
    rc, out, errors = _run_cli(["data", "download", "cifar10", "--root", str(where)], capsys)
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(f"harness: error: --root: {where} {expected}")


# --------------------------------------------------------------------------- URL and study


def test_archive_url_forms(monkeypatch):
    monkeypatch.delenv(URL_ENV, raising=False)
    assert archive_url(C10) == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert archive_url(C100, "http://m/x") == archive_url(C100, "http://m/x/") == "http://m/x/cifar-100-python.tar.gz"
    assert archive_url(C100, "http://m/a.tgz?t=1") == "http://m/a.tgz?t=1"
    monkeypatch.setenv(URL_ENV, "http://env/")
    assert archive_url(C10) == "http://env/cifar-10-python.tar.gz"
    assert archive_url(C10, "http://arg/f.tar.gz") == "http://arg/f.tar.gz"  # --url beats the variable


def test_cli_choices_are_the_downloadable_sets():
    parser = cli.build_parser()
    data = next(a for a in parser._subparsers._group_actions[0].choices["data"]._actions if a.dest == "data_command")
    choices = next(a for a in data.choices["download"]._actions if a.dest == "dataset").choices
    assert list(choices) == ARCHIVES.names() == ["cifar10", "cifar100"]


STUDY = {
    "name": "c", "splits": [{"name": "a", "tasks": [[0, 1], [2, 3]]}],
    "teachers": [{"arch": "cnn"}], "student": {"arch": "cnn"}, "methods": {"kd": {}},
}


@pytest.mark.parametrize("dataset,message", [
    ({"name": "digits", "download": True},
     "s.yaml: dataset.download: only cifar10 and cifar100 can be downloaded, not 'digits'; remove download: true"),
    ({"name": "cifar10", "download": True},
     "s.yaml: dataset.download: needs dataset.root, the existing folder to download into"),
])
def test_study_download_is_checked(dataset, message):
    with pytest.raises(HarnessError) as ei:
        parse_study({**STUDY, "dataset": dataset}, "s.yaml")
    assert str(ei.value) == message


def test_study_download_fetches_before_loading(server, root, cifar10_tgz):
    server.files[C10_PATH] = cifar10_tgz
    off = parse_study({**STUDY, "dataset": {"name": "cifar10", "root": str(root)}})
    assert off.dataset.download is False and ensure_downloaded(off.dataset, url=server.base) is None
    assert server.requests == [] and find_extracted(C10, root) is None
    on = parse_study({**STUDY, "dataset": {"name": "cifar10", "root": str(root), "download": True}})
    result = ensure_downloaded(on.dataset, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert result is not None and result.folder == root / C10.folder
    _check_cifar10(load_dataset(on.dataset.name, root=on.dataset.root))
    (root / "file").write_text("x")  # a root that cannot be created: one line naming the field
    with pytest.raises(HarnessError, match=r"^dataset\.root: .* does not exist and cannot be created"):
        ensure_downloaded(on.dataset.model_copy(update={"root": str(root / "file" / "gone")}))


def test_a_missing_root_is_created_with_its_parents(server, tmp_path, cifar10_tgz):
    server.files[C10_PATH] = cifar10_tgz
    root = tmp_path / "data" / "cifar"
    result = download_dataset("cifar10", root, url=server.base, md5=_md5(cifar10_tgz), out=io.StringIO())
    assert root.is_dir() and result.folder == root / C10.folder
    _check_cifar10(load_dataset("cifar10", root=str(root)))
