"""A small study as a researcher browses it: a real ``mlflow server`` over the store it wrote,
checked through the REST API the UI uses (run tree, names, tags, dataset inputs, the report on the
study run, the printed link), and once in headless Chromium when one can be started."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness.cli import main
from harness.tracking import VIEW_KEY, Tracker, headline
from tests.conftest import isolated_dir, write_study
from tests.mlflow_server import http_get as _get
from tests.mlflow_server import mlflow_server as _server
from tests.mlflow_server import wait_ready as _wait_ready

STUDY = "browse"
#: the student trials: kd's default (named by its rule, the study has a routing axis) and one rule, two seeds
CONFIGS = {"kd:confidence/none/concat (default)": "kd · confidence/none/concat (default)",
           "kd:confidence/none/routed": "kd · confidence/none/routed"}


@dataclass
class Served:
    """The study's store behind a running server, and what the CLI printed."""

    base: str
    uri: str
    printed: str
    report: Path
    runs: list[dict[str, Any]]


def _api(base: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The study runs (the server starts meanwhile, over the store created first), then ``harness
    report`` logs the report with the study run."""
    tmp = tmp_path_factory.mktemp("browse")
    with isolated_dir(tmp):
        study = write_study(
            tmp / "browse.yaml", name=STUDY, methods={"kd": {}}, routing=["confidence/none/routed"],
            teachers=[{"arch": "mlp", "hidden": 32, "epochs": 1}, {"arch": "mlp", "hidden": 16, "epochs": 1}],
            student={"arch": "mlp", "hidden": 32}, devices="cpu")
        uri = f"sqlite:///{tmp}/mlflow.db"
        Tracker(uri)  # the store exists before the server opens it
        with _server(uri, tmp) as (base, proc):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["run-study", str(study), "--no-report", "--workers", "1"]) == 0
                assert main(["report", str(study), "--out", str(tmp / "report")]) == 0
            _wait_ready(base, proc, tmp)
            exp = _api(base, "experiments/get-by-name", experiment_name=STUDY)["experiment"]["experiment_id"]
            runs = _api(base, "runs/search", {"experiment_ids": [exp], "max_results": 1000})["runs"]
            yield Served(base, uri, out.getvalue(), tmp / "report", runs)


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _kind(served: Served, kind: str) -> list[dict[str, Any]]:
    return [r for r in served.runs if _tags(r).get("harness.kind") == kind]


def test_run_tree_study_teacher_stage_teachers_and_trials(served: Served) -> None:
    (study,) = _kind(served, "study")
    (stage,) = _kind(served, "teacher_stage")
    sid = study["info"]["run_id"]
    assert _tags(stage)["mlflow.parentRunId"] == sid and stage["info"]["run_name"] == "teacher training"
    teachers = _kind(served, "teacher")
    assert sorted(r["info"]["run_name"] for r in teachers) == ["teacher 0 · 2x5", "teacher 1 · 2x5"]
    assert {_tags(r)["mlflow.parentRunId"] for r in teachers} == {stage["info"]["run_id"]}
    trials = _kind(served, "trial")
    assert len(trials) == 4 and {_tags(r)["mlflow.parentRunId"] for r in trials} == {sid}
    assert {r["info"]["status"] for r in served.runs} == {"FINISHED"}
    assert study["info"]["run_name"].startswith("study · ")


def test_trial_names_put_what_differs_first_and_config_groups_the_seeds(served: Served) -> None:
    trials = _kind(served, "trial")
    names = sorted(r["info"]["run_name"] for r in trials)
    assert names == sorted(f"{label} · s{seed} · 2x5" for label in CONFIGS.values() for seed in (0, 1))
    by_config: dict[str, set[str]] = {}
    for r in trials:
        t = _tags(r)
        by_config.setdefault(t["harness.config"], set()).add(t["harness.seed"])
        assert t["harness.run"] == f"2x5/{'kd' if t['harness.variant'] == 'full' else 'kd:' + t['harness.variant']}" \
                                   f"/seed{t['harness.seed']}"  # the older full name
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t["harness.end"])
    assert by_config == {c: {"0", "1"} for c in CONFIGS}
    default = [r for r in trials if _tags(r)["harness.variant"] == "full"]
    assert len(default) == 2  # named by its rule, still the ``full`` variant the report reads


def test_one_metric_vocabulary_and_readable_params(served: Served) -> None:
    for r in _kind(served, "teacher"):
        keys = {m["key"] for m in r["data"]["metrics"]}
        assert {"test/own_task_acc", "val/own_task_acc", "val/own_task_acc_best"} <= keys
        assert not any("union" in k for k in keys)
    for r in _kind(served, "trial"):
        keys = {m["key"] for m in r["data"]["metrics"]}
        assert {"test/union_acc", "test/union_acc_bestval", "test/task_acc_bestval/1"} <= keys
        assert not {"test/union_acc_best", "test/acc"} & keys
        params = {p["key"]: p["value"] for p in r["data"]["params"]}
        assert params["teachers.1.hidden"] == "16" and params["dataset.root"] == "null"
        assert params["train.deterministic"] == "false" and "teachers" not in params
    (study,) = _kind(served, "study")
    params = {p["key"]: p["value"] for p in study["data"]["params"]}
    assert params["name"] == STUDY and params["teachers.0.arch"] == "mlp"
    assert params["routing"] == "[confidence/none/routed]"


def test_every_trial_has_the_split_as_its_dataset_input(served: Served) -> None:
    digests = set()
    for r in _kind(served, "trial") + _kind(served, "study"):
        (inp,) = r["inputs"]["dataset_inputs"]
        ds = inp["dataset"]
        assert ds["name"] == "digits:2x5" and ds["source_type"] == "local"
        assert json.loads(ds["source"])["uri"].endswith("browse.yaml")
        assert json.loads(ds["profile"])["split"]["tasks"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
        assert {t["key"]: t["value"] for t in inp["tags"]}["mlflow.data.context"] == "study"
        digests.add(ds["digest"])
    assert len(digests) == 1


def test_experiment_opens_as_model_training_with_the_trials_view(served: Served) -> None:
    exp = _api(served.base, "experiments/get-by-name", experiment_name=STUDY)["experiment"]
    tags = {t["key"]: t["value"] for t in exp["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Study `browse`: data set `digits`, splits 2x5; methods kd; seeds 0, 1" in tags["mlflow.note.content"]
    assert tags["harness.methods"] == "kd" and tags["harness.splits"] == "2x5"
    view = json.loads(tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert view["searchFilter"] == "tags.`harness.kind` = 'trial'"
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "harness.config"}]
    assert "metrics.`test/union_acc`" in view["selectedColumns"]


def test_the_report_is_an_artifact_of_the_study_run_and_its_description(served: Served) -> None:
    (study,) = _kind(served, "study")
    rid = study["info"]["run_id"]
    top = {f["path"] for f in _api(served.base, "artifacts/list", run_id=rid)["files"]}
    assert {"study.yaml", "study_source.yaml", "trial_keys.json", "report"} <= top
    inside = {f["path"] for f in _api(served.base, "artifacts/list", run_id=rid, path="report")["files"]}
    assert {"report/report.md", "report/comparison.csv", "report/accuracy.png"} <= inside
    status, body = _get(f"{served.base}/get-artifact?" + urllib.parse.urlencode(
        {"path": "report/report.md", "run_uuid": rid}))
    md = (served.report / "report.md").read_text()
    assert status == 200 and body.decode() == md
    assert _tags(study)["mlflow.note.content"] == headline(md)
    assert "### Split `2x5`" in headline(md) and "| kd |" in headline(md)


def _printed_path(served: Served) -> str:
    """The page path of the link ``run-study`` printed (for a SQLite store: with the ``mlflow ui``
    command that serves it on port 5000; this test's server has another port)."""
    m = re.search(r"browse the trials: mlflow ui --backend-store-uri (\S+) --host 127\.0\.0\.1 --port 5000, "
                  r"then open http://127\.0\.0\.1:5000(/\S+)", served.printed)
    assert m is not None, served.printed
    assert m.group(1) == served.uri
    return m.group(2)


def test_the_printed_link_answers(served: Served) -> None:
    path = _printed_path(served)
    assert path.startswith("/#/experiments/") and "workflowType=machine_learning" in path
    assert f"viewStateShareKey={VIEW_KEY}" in path
    status, body = _get(served.base + path)  # the same page on this server's port
    assert status == 200 and b'<div id="root"' in body
    assert "and logged with study run" in served.printed


def test_chromium_shows_a_student_trial_by_its_name(served: Served, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("skipped: no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH")
    url = served.base + _printed_path(served)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1000", "--virtual-time-budget=20000",
           "--dump-dom", url]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=90)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"skipped: chromium did not start or finish: {e}")
        pytest.skip(f"chromium did not start or finish: {e}")
    dom = done.stdout.decode(errors="replace")
    if done.returncode != 0 or "<html" not in dom:
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        print(f"skipped: chromium gave no page: {reason[0]}")
        pytest.skip(f"chromium gave no page: {reason[0]}")
    assert "kd · confidence/none/routed · s1 · 2x5" in dom
    assert "teacher 0 · 2x5" not in dom  # the view shows student trials only
