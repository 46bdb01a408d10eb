"""Shared fixtures: tiny study files and an isolated MLflow store / teacher cache per test."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

TINY = {
    "name": "tiny",
    "dataset": {"name": "digits", "val_fraction": 0.1},
    "splits": [{"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}],
    "teachers": [{"arch": "cnn", "width": 8, "epochs": 3}, {"arch": "mlp", "hidden": 32, "epochs": 3}],
    "student": {"arch": "cnn", "width": 8},
    "train": {"epochs": 2, "batch_size": 128},
    "methods": {"kd": {}, "scratch": {}, "teachers": {}},
    "seeds": [0, 1],
}


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path, MLflow store and teacher cache inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path


@contextmanager
def isolated_dir(tmp: Path) -> Iterator[pytest.MonkeyPatch]:
    """The ``isolated`` set-up for module-scoped fixtures: cwd, MLflow store and cache in ``tmp``."""
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.setenv("HARNESS_CACHE", str(tmp / "cache"))
    try:
        yield mp
    finally:
        mp.undo()


def write_study(path: Path, **overrides: object) -> Path:
    """A copy of the tiny study with top-level overrides, written as YAML."""
    data = {**TINY, **overrides}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module of tiny tensors (faster than two threads fighting
    over a busy CPU); restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
