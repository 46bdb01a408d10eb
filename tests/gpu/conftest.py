"""Every test in this folder is marked ``gpu`` and skipped where CUDA is absent (quickly: no
fixture runs). One working directory for the session: a teacher cache that every study here
shares (teachers train once), a store per study."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import isolated_dir
from tests.gpu.common import CUDA, REHEARSAL, SKIP_REASON

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skipif(True, reason=SKIP_REASON)  # skipif: evaluated before any skip mark
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not CUDA and not REHEARSAL:
                item.add_marker(skip, append=False)  # this reason first, before a test's own


@pytest.fixture(scope="session")
def work() -> Iterator[Path]:
    """cwd, teacher cache and MLflow stores of the GPU checks (not under pytest's basetemp)."""
    with tempfile.TemporaryDirectory(prefix="harness-gpu-") as tmp, isolated_dir(Path(tmp)) as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield Path(tmp)
