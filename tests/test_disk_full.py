"""A user's disk fills up mid-study: under the teacher cache, or under the tracking store. The
study stops with one line that names the path and what to do (exit code 2, no traceback), leaves
no temporary behind, and after space is freed a rerun finishes every trial. A real size-limited
tmpfs where one can be mounted (root, as in CI), else a fake writer that raises ENOSPC."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness import files
from harness.cli import main
from harness.tracking import Tracker
from tests.conftest import write_study
from tests.small_fs import small_fs

STUDY = {"methods": {"kd": {}, "scratch": {}}, "seeds": [0, 1],
         "teachers": [{"arch": "mlp", "hidden": 32, "epochs": 1}, {"arch": "mlp", "hidden": 16, "epochs": 1}],
         "student": {"arch": "mlp", "hidden": 32}, "train": {"epochs": 1, "batch_size": 256}, "devices": "cpu"}


def _finished(uri: str, name: str) -> list[str]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'trial'", max_results=1000)
    return sorted(r.data.tags["harness.trial_key"] for r in runs if r.info.status == "FINISHED")


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_a_full_cache_is_one_line_and_a_rerun_finishes(isolated: Path, capsys, monkeypatch) -> None:
    cache = isolated / "cache"  # $HARNESS_CACHE of the isolated fixture
    study = write_study(isolated / "full.yaml", name="full", **STUDY)
    with small_fs(cache, 64) as fs:  # the teachers fit, their outputs on the pool (~400 KiB) do not
        if fs is None:
            real = files._write

            def full(path: Path, data: object) -> None:
                if "outputs-" in Path(path).name and not (isolated / "freed").exists():
                    Path(path).write_bytes(b"partial")
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                real(path, data)

            monkeypatch.setattr(files, "_write", full)
        assert main(["run-study", str(study), "--no-report", "--workers", "1"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"harness: error: teacher cache entry {cache}/teachers/outputs-"), line
        assert "no space left on its file system; free space there" in line
        assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
        (fs.grow(16 * 1024) if fs else (isolated / "freed").touch())
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = cache / "teachers" / f"outputs-x.pt.tmp-{files._host()}-{dead.pid}"  # a writer killed mid-write
        stale.write_bytes(b"half")
        assert main(["run-study", str(study), "--no-report", "--workers", "1"]) == 0
        assert len(_finished(f"sqlite:///{isolated}/mlflow.db", "full")) == 4
        assert not [p for p in cache.rglob("*") if ".tmp" in p.name]  # the dead writer's removed too


def test_a_full_tracking_store_is_one_line_and_a_rerun_finishes(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    study = write_study(tmp_path / "store.yaml", name="store", **STUDY)
    with small_fs(tmp_path / "store", 2048) as fs:
        if fs is None:
            pytest.skip("no tmpfs can be mounted here (not root): the store's own full-disk error needs one")
        db = tmp_path / "store" / "mlflow.db"
        uri = f"sqlite:///{db}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        Tracker(uri)  # a new store, then just a little room: the study fills it
        fs.grow(db.stat().st_size // 1024 + 96)
        capsys.readouterr()
        assert main(["run-study", str(study), "--no-report", "--workers", "1"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"harness: error: tracking store {db}: no space left on its file system"), line
        fs.grow(64 * 1024)
        assert main(["run-study", str(study), "--no-report", "--workers", "1"]) == 0
        assert len(_finished(uri, "store")) == 4
