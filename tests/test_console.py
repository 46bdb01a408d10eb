"""A quiet console: ``harness run-study`` against a real ``mlflow server`` prints its own lines only.

One small study (an MLP teacher, ``cfl``, two seeds) runs in a subprocess, so the output of its
workers is captured too: cfl's pooled-space fallback is one ``note:`` line of the plan, never a
Python ``UserWarning`` per trial, and MLflow's ``View run``/``View experiment`` lines (printed after
every run ended against a server) do not appear. The study file's text, comments kept, is logged
beside the resolved study and opens the report's appendix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.tracking import Tracker
from tests.conftest import TINY
from tests.mlflow_server import mlflow_server, wait_ready

ROOT = Path(__file__).resolve().parents[1]
NOTE = "note: cfl runs in the pooled space in split 2x5 (teacher 1 (MLP) has no conv feature map)"
COMMENT = "# Quiet console: an MLP teacher makes cfl fall back (this comment stays in the report)."


@dataclass
class Ran:
    out: str
    err: str
    base: str
    study_file: Path
    report: Path


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    tmp = tmp_path_factory.mktemp("console")
    study = {**TINY, "name": "quiet", "methods": {"cfl": {}}, "train": {"epochs": 1, "batch_size": 256},
             "teachers": [{"arch": "cnn", "width": 8, "epochs": 1}, {"arch": "mlp", "hidden": 32, "epochs": 1}],
             "devices": "cpu"}
    path = tmp / "quiet.yaml"
    path.write_text(COMMENT + "\n" + yaml.safe_dump(study, sort_keys=False, default_flow_style=None))
    uri = f"sqlite:///{tmp}/mlflow.db"
    Tracker(uri)  # the store exists before the server opens it
    env = {**os.environ, "HARNESS_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)  # the CLI itself must set it
    env.pop("MLFLOW_TRACKING_URI", None)
    with mlflow_server(uri, tmp) as (base, proc):
        wait_ready(base, proc, tmp)
        done = subprocess.run([sys.executable, "-m", "harness.cli", "run-study", str(path), "--tracking-uri", base,
                               "--workers", "2"], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        yield Ran(done.stdout, done.stderr, base, path, tmp / "results" / "quiet")


def test_the_cfl_fallback_is_one_note_of_the_plan_and_never_a_warning(ran: Ran) -> None:
    lines = ran.out.splitlines()
    assert lines.count(NOTE) == 1 and ran.out.count("pooled space") == 1
    assert lines.index(NOTE) == next(i for i, x in enumerate(lines) if x.startswith("pool: ")) + 1  # the plan
    assert "UserWarning" not in ran.out + ran.err and "methods.cfl.space" not in ran.err


def test_no_view_run_or_view_experiment_line_against_a_server(ran: Ran) -> None:
    assert "View run" not in ran.out and "View experiment" not in ran.out and "🏃" not in ran.out
    assert any(x.startswith("report written to ") for x in ran.out.splitlines())
    assert ran.out.splitlines()[-1].startswith(f"browse the trials: {ran.base}")


def test_the_study_file_as_written_is_logged_and_opens_the_appendix(ran: Ran, tmp_path: Path) -> None:
    client = MlflowClient(ran.base)
    exp = client.get_experiment_by_name("quiet")
    (run,) = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'study'")
    assert {"study.yaml", "study_source.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    got = Path(client.download_artifacts(run.info.run_id, "study_source.yaml", str(tmp_path))).read_text()
    assert got == ran.study_file.read_text()
    appendix = (ran.report / "report.md").read_text().split("## Study configuration\n")[1]
    assert COMMENT in appendix and "- - 0" not in appendix
    assert "Filled in by defaults" in appendix and "optimizer: adam" in appendix.split("Filled in by defaults")[1]
