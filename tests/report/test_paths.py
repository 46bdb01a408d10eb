"""No committed report shows a path of the machine that built it."""

from __future__ import annotations

import pytest

from harness.report.paths import redact_paths, show_path, show_uri
from harness.report.tuning import redact

CWD = "/home/me/ka"


@pytest.mark.parametrize("uri, shown", [
    ("sqlite:////home/me/ka/mlflow.db", "sqlite:///mlflow.db"),  # inside the working directory: relative
    ("sqlite:////home/me/ka/runs/store/mlflow.db", "sqlite:///runs/store/mlflow.db"),
    ("sqlite:////tmp/runs/mlflow.db", "sqlite:///<redacted>/mlflow.db"),  # outside: only its name
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),  # already relative
    ("file:///home/me/ka/mlruns", "file:mlruns"),
    ("/scratch/u123/tune.journal", "<redacted>/tune.journal"),
    ("results/digits-tune/tune.journal", "results/digits-tune/tune.journal"),
    ("postgresql://user:secret@db.example/optuna", "postgresql://db.example/optuna"),
    ("http://mlflow.example:5000", "http://mlflow.example:5000"),
])
def test_uris(uri: str, shown: str) -> None:
    assert show_uri(uri, CWD) == shown


def test_paths_in_free_text() -> None:
    assert show_path("/home/me/ka", CWD) == "." and show_path("/home/me/kab/x", CWD) == "<redacted>/x"
    text = ("root: /data/cifar10\ncache_dir: /home/me/ka/cache/\nFileNotFoundError: [Errno 2] '/home/other/x.npz'\n"
            "2x5/kd/seed0 loss/total http://host/a/b 1 / 3")
    assert redact_paths(text, CWD) == (
        "root: <redacted>/cifar10\ncache_dir: cache\nFileNotFoundError: [Errno 2] '<redacted>/x.npz'\n"
        "2x5/kd/seed0 loss/total http://host/a/b 1 / 3")


def test_tuning_storage_is_shown_the_same_way(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory is the default base
    assert redact(f"{tmp_path}/results/x/tune.journal") == "results/x/tune.journal"
    assert redact("/elsewhere/results/x/tune.journal") == "<redacted>/tune.journal"
    assert redact("postgresql://u:pw@h/db") == "postgresql://h/db"
