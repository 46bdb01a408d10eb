"""optuna-dashboard over a real ``harness tune`` journal: the dashboard's own WSGI app (what the
``optuna-dashboard results/<study>/tune.journal`` command serves) on 127.0.0.1, read through its
HTTP API. It must name the objective (not "Objective 0"), show the study file as study
attributes, and give each trial MLflow run ids that exist in the MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.cli import main
from tests.conftest import TINY, isolated_dir, write_study

optuna_dashboard = pytest.importorskip("optuna_dashboard")

#: the smallest real search: 2 configurations x 1 seed x 1 epoch, teachers of 1 epoch
SEARCH = {"trials": 2, "seeds": [0], "pruner": {"type": "none"}, "sampler": {"type": "random", "seed": 0},
          "space": {"methods.kd.T": {"type": "float", "low": 0.5, "high": 4.0, "log": True}}}


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # no access log on stderr
        pass


@contextmanager
def dashboard(storage: str) -> Iterator[str]:
    """optuna-dashboard's app over ``storage`` (a journal path, guessed as the CLI does), served on
    127.0.0.1 on a free port in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(storage), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())


def _attrs(items: list[dict[str, str]]) -> dict[str, str]:
    """The dashboard's ``[{key, value}]`` attributes (non-strings as JSON text) as a mapping."""
    return {a["key"]: a["value"] for a in items}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The search (in RAM when there is a RAM disk: sqlite syncs every MLflow write), then the
    dashboard's answers to ``/api/studies`` and ``/api/studies/<id>``."""
    shm = Path("/dev/shm")
    in_ram = shm.is_dir() and os.access(shm, os.W_OK)
    tmp = Path(tempfile.mkdtemp(prefix="harness-dashboard-", dir=shm)) if in_ram else tmp_path_factory.mktemp("dash")
    try:
        yield from _serve(tmp)
    finally:
        if in_ram:
            shutil.rmtree(tmp, ignore_errors=True)


def _serve(tmp: Path) -> Iterator[dict[str, Any]]:
    with isolated_dir(tmp):
        teachers = [{**t, "epochs": 1} for t in TINY["teachers"]]
        study = write_study(tmp / "tiny.yaml", teachers=teachers, train={"epochs": 1, "batch_size": 128},
                            search=SEARCH)
        assert main(["tune", str(study), "--no-report", "--workers", "1"]) == 0
    with dashboard(str(tmp / "results/tiny/tune.journal")) as url:
        (summary,) = _get(f"{url}/api/studies")["study_summaries"]
        detail = _get(f"{url}/api/studies/{summary['study_id']}")
        yield {"tmp": tmp, "study": study, "summary": summary, "detail": detail,
               "client": MlflowClient(f"sqlite:///{tmp}/mlflow.db")}


def test_dashboard_names_the_objective_and_shows_the_study_file(served: dict[str, Any]) -> None:
    summary, detail = served["summary"], served["detail"]
    assert summary["study_name"] == "tiny/kd" and summary["directions"] == ["maximize"]
    assert detail["objective_names"] == ["val_union_acc"]
    attrs = _attrs(detail["user_attrs"])
    assert _attrs(summary["user_attrs"]) == attrs
    assert (attrs["study_file"], attrs["method"], attrs["objective"], attrs["trials"]) == (
        str(served["study"]), "kd", "val_last", "2")
    assert attrs["objective_description"].startswith(
        "mean over 1 run(s) (splits 2x5 x seeds 0) of the validation union accuracy after the last epoch")
    resolved = yaml.safe_load(attrs["study_yaml"])  # the study file as resolved, whole (a plain string attribute)
    assert (resolved["name"], resolved["search"]["trials"], resolved["train"]["epochs"]) == ("tiny", 2, 1)
    assert resolved["search"]["space"]["methods.kd.T"]["low"] == 0.5
    assert json.loads(attrs["search_space"]) == {"methods.kd.T": {"type": "float", "low": 0.5, "high": 4.0,
                                                                  "log": True}}
    exp = served["client"].get_experiment_by_name("tiny")
    assert attrs["mlflow_experiment_id"] == exp.experiment_id and attrs["mlflow_experiment"] == "tiny"


def test_each_dashboard_trial_links_to_its_mlflow_runs(served: dict[str, Any]) -> None:
    client, detail = served["client"], served["detail"]
    trials = detail["trials"]
    assert [t["number"] for t in trials] == [0, 1] and {t["state"] for t in trials} == {"Complete"}
    assert detail["has_intermediate_values"]  # the running objective, one point per epoch
    exp = client.get_experiment_by_name("tiny").experiment_id
    parents = set()
    for t in trials:
        attrs = _attrs(t["user_attrs"])
        run = client.get_run(attrs["mlflow_run_id"])  # raises when the store has no such run
        tags = run.data.tags
        assert run.info.experiment_id == attrs["mlflow_experiment_id"] == exp
        assert (tags["harness.kind"], tags["harness.optuna_study"], tags["harness.optuna_number"]) == (
            "tune_trial", "tiny/kd", str(t["number"]))
        assert run.data.metrics["objective"] == pytest.approx(t["values"][0])
        assert attrs["mlflow_run_path"] == f"#/experiments/{exp}/runs/{run.info.run_id}"
        assert tags["mlflow.parentRunId"] == attrs["mlflow_parent_run_id"]
        assert client.get_run(attrs["mlflow_parent_run_id"]).data.tags["harness.kind"] == "search"
        parents.add(attrs["mlflow_parent_run_id"])
        (seed_run,) = json.loads(attrs["mlflow_seed_run_ids"])
        seed = client.get_run(seed_run)
        assert seed.data.tags["mlflow.parentRunId"] == run.info.run_id and seed.data.tags["harness.seed"] == "0"
    assert len(parents) == 1  # one invocation
    assert len({_attrs(t["user_attrs"])["mlflow_run_id"] for t in trials}) == 2
