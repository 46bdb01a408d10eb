"""Tests for harness.tracking: retries on a locked store, no lost writes, provenance tags."""

from __future__ import annotations

import re
import tempfile
import time
from typing import Iterator

import pytest
from mlflow.exceptions import MlflowException

from harness import tracking
from harness.scheduler import LocalPool, WorkerContext, build_slots
from harness.store import TAG
from harness.tracking import Tracker, flatten
from tests import plugins_for_tests as plug
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def tracker() -> Iterator[Tracker]:
    """One store for the module (creating a sqlite store costs seconds); each test its experiment.
    Not under pytest's basetemp, which a concurrent pytest session may rotate away."""
    with tempfile.TemporaryDirectory(prefix="harness-test-tracking-") as where, pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)  # artifacts of a sqlite store go to ./mlruns
        yield Tracker(f"sqlite:///{where}/mlflow.db")


def test_flatten_nested_config_as_yaml_scalars_and_one_param_per_listed_field() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": None, "g": True, "h": False, "s": ["x", "y"]}) == {
        "a.b": "1", "a.c.d": "[1, 2]", "e": "{}", "f": "null", "g": "true", "h": "false", "s": "[x, y]"}
    teachers = [{"arch": "cnn", "width": 8, "seed": None}, {"arch": "mlp", "augment": []}]
    assert flatten({"teachers": teachers, "empty": []}) == {
        "teachers.0.arch": "cnn", "teachers.0.width": "8", "teachers.0.seed": "null",
        "teachers.1.arch": "mlp", "teachers.1.augment": "[]", "empty": "[]"}


def test_retry_waits_out_a_locked_store_but_not_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    @tracking._retry
    def flaky(n_locked: int) -> str:
        calls.append(1)
        if len(calls) <= n_locked:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert flaky(5) == "ok" and len(calls) == 6
    calls.clear()
    with pytest.raises(MlflowException, match="locked"):
        flaky(tracking.RETRIES)
    assert len(calls) == tracking.RETRIES

    @tracking._retry
    def broken() -> None:
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run xyz")

    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        broken()
    assert len(calls) == 1


def test_a_locked_params_batch_does_not_create_the_run_twice(tracker: Tracker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    exp = tracker.experiment("locked-params")
    real, failures = tracker.client.log_batch, [1]

    def locked_once(*a, **kw):  # type: ignore[no-untyped-def]
        if failures:
            failures.pop()
            raise MlflowException("database is locked")
        return real(*a, **kw)

    monkeypatch.setattr(tracker.client, "log_batch", locked_once)
    run_id = tracker.start(exp, "r", {f"{TAG}kind": "trial"}, {"a": {"b": 1}})
    runs = tracker.find(exp, {f"{TAG}kind": "trial"})
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].data.params == {"a.b": "1"}


def test_experiment_lookup_without_creating(tracker: Tracker) -> None:
    assert tracker.experiment("nope", create=False) is None
    exp = tracker.experiment("yes")
    assert tracker.experiment("yes", create=False) == exp == tracker.experiment("yes")


def test_finish_if_running_keeps_a_status_already_set(tracker: Tracker) -> None:
    exp = tracker.experiment("finish-if-running")
    a, b = tracker.start(exp, "a", {}), tracker.start(exp, "b", {})
    tracker.finish(b, "FINISHED")
    assert tracker.finish_if_running(a, "FAILED", {f"{TAG}failure": "worker died"})
    assert not tracker.finish_if_running(b, "FAILED", {f"{TAG}failure": "worker died"})
    assert tracker.run(a).info.status == "FAILED" and tracker.run(a).data.tags[f"{TAG}failure"] == "worker died"
    assert tracker.run(b).info.status == "FINISHED" and f"{TAG}failure" not in tracker.run(b).data.tags


def test_provenance_tags() -> None:
    git = tracking.git_tags()
    assert set(git) >= {f"{TAG}git_commit", f"{TAG}git_dirty"}
    commit = git[f"{TAG}git_commit"]
    assert commit == "" or (re.fullmatch(r"[0-9a-f]{40}", commit) and git["mlflow.source.git.commit"] == commit)
    versions = tracking.version_tags()
    assert versions[f"{TAG}torch_version"].startswith(("1.", "2.", "3."))
    assert versions[f"{TAG}mlflow_version"] and versions[f"{TAG}python_version"] and versions[f"{TAG}version"]


def test_concurrent_workers_lose_no_metric(tracker: Tracker) -> None:
    """Eight processes share one sqlite file, each logging every epoch: every point arrives."""
    exp = tracker.experiment("stress")
    n_workers, epochs, n_metrics = 8, 50, 16
    pool = LocalPool(build_slots("cpu", cores=n_workers))
    ctx = WorkerContext.capture()
    for i in range(n_workers):
        pool.submit(f"w{i}", plug.log_epochs, (tracker.uri, exp, f"w{i}", epochs, n_metrics), ctx)
    outcomes: list = []
    wait_for("every worker's outcome", lambda: outcomes.extend(pool.wait(1.0)) or len(outcomes) == n_workers, every=0)
    assert [o.error for o in outcomes if not o.ok] == []
    runs = tracker.find(exp, {f"{TAG}kind": "stress"})
    assert len(runs) == n_workers and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags[f"{TAG}pid"] for r in runs}) == n_workers
    for r in runs:
        assert len(r.data.metrics) == n_metrics
        for i in range(n_metrics):
            history = tracker.client.get_metric_history(r.info.run_id, f"m{i}")
            assert sorted((m.step, m.value) for m in history) == [(e, e * 1000 + i) for e in range(1, epochs + 1)]


def test_processes_creating_one_new_store_at_once_all_succeed() -> None:
    """MLflow migrates a new store on first open; without the file lock, three of these four
    processes fail (duplicate column, table already exists) and the store stays broken."""
    with tempfile.TemporaryDirectory(prefix="harness-test-store-") as where:
        uri = f"sqlite:///{where}/new.db"
        pool = LocalPool(build_slots("cpu", cores=4))
        ctx, at = WorkerContext.capture(), time.time() + 1.0
        for i in range(4):
            pool.submit(f"p{i}", plug.open_store, (uri, at, False), ctx)
        outcomes: list = []
        wait_for("every process's outcome", lambda: outcomes.extend(pool.wait(1.0)) or len(outcomes) == 4, every=0)
        assert [o.error for o in outcomes if not o.ok] == []
        assert len({o.result for o in outcomes}) == 1


def test_metric_buffer_sends_at_its_interval_and_on_flush(tracker: Tracker) -> None:
    exp = tracker.experiment("buffer")
    run = tracker.start(exp, "r", {TAG + "kind": "test"})
    history = lambda: [(m.step, m.value) for m in tracker.client.get_metric_history(run, "loss")]  # noqa: E731
    slow = tracker.buffered(run, every=3600)
    for epoch in range(1, 6):
        slow.log({"loss": 1.0 / epoch, "acc": epoch / 10}, step=epoch)
    assert history() == []  # nothing sent yet: one batch at the end, not one request per epoch
    slow.flush()
    assert history() == [(e, 1.0 / e) for e in range(1, 6)]
    assert len(tracker.client.get_metric_history(run, "acc")) == 5
    slow.flush()  # nothing new: no duplicates
    assert len(history()) == 5
    eager = tracker.buffered(run, every=0)
    eager.log({"loss": 0.1}, step=6)
    assert history()[-1] == (6, 0.1)  # sent at once: the interval had passed


def test_run_names_put_what_differs_first_and_config_tags_group_seeds() -> None:
    assert tracking.trial_run_name("3way", "kd", "mahalanobis/z/routed", 0) == "kd · mahalanobis/z/routed · s0 · 3way"
    assert tracking.trial_run_name("2x5", "cka", "-intra", 1) == "cka-intra · s1 · 2x5"
    assert tracking.trial_run_name("2x5", "kd", "full", 2) == "kd · s2 · 2x5"
    assert tracking.trial_run_name("2x5", "kd", "full", 0, "confidence/none/concat") == \
        "kd · confidence/none/concat (default) · s0 · 2x5"
    assert tracking.teacher_run_name("2x5", 0) == "teacher 0 · 2x5"
    assert tracking.teacher_run_name("2x5", 1, seed=3) == "teacher 1 · s3 · 2x5"
    assert [tracking.config_tag("kd", v) for v in ("full", "-intra", "wide")] == ["kd:full", "kd-intra", "kd:wide"]
    assert tracking.config_tag("kd", "full", "confidence/none/concat") == "kd:confidence/none/concat (default)"
    assert tracking.config_tag("kd", "-intra", "confidence/none/concat") == "kd-intra"  # an ablation says itself
    # an ablation reads as in its run name and the report's rows
    assert tracking.config_tag("cka", "-task") == "cka-task" == tracking.row_label("cka", "-task")
    assert tracking.trial_run_name("2x5", "cka", "-task", 0).startswith(tracking.config_tag("cka", "-task") + " · ")
    assert tracking.config_tag("cka", "-intra+inter") == "cka-intra+inter"


def test_times_are_iso_utc_and_older_unix_seconds_still_read() -> None:
    assert tracking.utc_iso(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"
    assert tracking.tag_seconds("2023-11-14T22:13:20.123Z") == pytest.approx(1_700_000_000.123)
    assert tracking.tag_seconds("1700000000.250") == 1_700_000_000.25
    assert tracking.bestval("test/union_acc_best") == "test/union_acc_bestval"
    assert tracking.bestval("test/task_acc_best/3") == "test/task_acc_bestval/3"
    assert tracking.bestval("val/union_acc_best") == "val/union_acc_best"  # the best validation accuracy itself


def test_the_link_for_a_server_and_for_a_local_store() -> None:
    url, cmd = tracking.runs_url("http://mlflow.lab:5000/", "7")
    assert cmd is None and url == ("http://mlflow.lab:5000/#/experiments/7/runs?viewStateShareKey=harness-trials"
                                   "&workflowType=machine_learning")
    url, cmd = tracking.runs_url("sqlite:///mlflow.db", "1")
    assert cmd == "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"
    assert url.startswith("http://127.0.0.1:5000/#/experiments/1/runs?")
    one, two = tracking.shared_view(), tracking.shared_view(group_by_split=True)
    assert [k["groupByData"] for k in one["groupBy"]["groupByKeys"]] == ["harness.config"]
    assert [k["groupByData"] for k in two["groupBy"]["groupByKeys"]] == ["harness.split", "harness.config"]
    assert one["searchFilter"] == "tags.`harness.kind` = 'trial'" and one["orderByKey"] == "metrics.`test/union_acc`"
    assert [c["metricKey"] for c in one["compareRunCharts"]] == ["test/union_acc", "test/union_acc_bestval",
                                                                 "val/union_acc"]


REPORT = """# Study `toy`: results

Rebuilt from ...

## Comparison

Intro.

### Split `a`

| Method | n | acc |
|:---|---:|---:|
| kd | 3 | 91.0 |

Diagnostics.

| Method | probe |
|:---|---:|
| kd | 90.0 |

### Learning curves

![curves](curves.png)

### Split `b`

| Method | n | acc |
|:---|---:|---:|
| cka | 2 | 80.0 |

## Ablation

| Method | x |
|:---|---:|
"""


def test_the_headline_is_the_title_and_each_splits_comparison_table() -> None:
    assert tracking.headline(REPORT) == (
        "# Study `toy`: results\n\n### Split `a`\n\n| Method | n | acc |\n|:---|---:|---:|\n| kd | 3 | 91.0 |\n\n"
        "### Split `b`\n\n| Method | n | acc |\n|:---|---:|---:|\n| cka | 2 | 80.0 |")
    cut = tracking.headline(REPORT, limit=120)
    assert len(cut) <= 120 and cut.endswith("(cut; the whole report is `report/report.md`)")
    assert "| kd | 3 | 91.0 |" not in cut and cut.startswith("# Study `toy`")


def test_the_report_goes_to_the_latest_study_run(tracker: Tracker, tmp_path) -> None:
    exp = tracker.experiment("with-report")
    assert tracking.attach_report(tracker, "no-such-study", tmp_path) is None
    older = tracker.start(exp, "s1", {f"{TAG}kind": "study"})
    time.sleep(0.01)
    latest = tracker.start(exp, "s2", {f"{TAG}kind": "study"})
    (tmp_path / "report.md").write_text(REPORT)
    (tmp_path / "accuracy.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "notes.txt").write_text("not part of the report")
    assert tracking.attach_report(tracker, "with-report", tmp_path) == latest
    assert sorted(a.path for a in tracker.client.list_artifacts(latest, "report")) == [
        "report/accuracy.png", "report/report.md"]
    assert tracker.client.list_artifacts(older) == []
    assert tracker.run(latest).data.tags["mlflow.note.content"] == tracking.headline(REPORT)


def test_the_split_dataset_input_names_the_split_and_hashes_its_config(tmp_path) -> None:
    study = tmp_path / "s.yaml"
    study.write_text("name: s\n")
    cfg = {"dataset": {"name": "digits"}, "split": {"name": "2x5", "tasks": [[0, 1], [2, 3]]}}
    a = tracking.split_dataset("digits", "2x5", cfg, str(study))
    b = tracking.split_dataset("digits", "2x5", {**cfg, "split": {"name": "2x5", "tasks": [[0], [1]]}})
    assert a.dataset.name == "digits:2x5" and a.dataset.source_type == "local"
    assert a.dataset.source == '{"uri": "' + str(study.resolve()) + '"}'
    assert a.dataset.digest != b.dataset.digest and len(a.dataset.digest) == 12
    assert [(t.key, t.value) for t in a.tags] == [("mlflow.data.context", "study")]
