"""Fixtures: one known MLflow store (real runs in a temp sqlite file) and one report built from it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.report import store


def _store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RAM-backed folder when there is one: sqlite syncs every MLflow write, and on a slow disk
    creating and filling the store takes ~20 s instead of ~3 s."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="harness-report-", dir=shm))
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    folder = _store_dir(tmp_path_factory)
    uri = f"sqlite:///{folder}/mlflow.db"
    store.build(uri, folder / "artifacts")
    yield uri
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def report_dir(store_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.report.build import build_report

    out = tmp_path_factory.mktemp("report") / "toy"
    assert build_report(store.STUDY, tracking_uri=store_uri, out_dir=out) == out
    return out


@pytest.fixture(scope="session")
def study_data(store_uri: str):
    from harness.report.frames import load_study

    return load_study(store.STUDY, store_uri)
