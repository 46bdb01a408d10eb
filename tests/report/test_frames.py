"""MLflow -> pandas: which runs count, histories, teachers, study names and files, errors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.errors import HarnessError
from harness.report.frames import load_study, resolve_study, row_label
from tests.report import store


def test_trials_are_the_latest_finished_run_per_key(study_data) -> None:
    t = study_data.trials
    assert set(t["status"]) == {"FINISHED"}
    assert not t.duplicated(["split", "method", "variant", "seed"]).any()
    kd = t[(t["split"] == "2x5") & (t["method"] == "kd")]
    assert sorted(kd["seed"]) == [0, 2]  # seed 1 failed; its partial metrics are not used
    scratch0 = t[(t["method"] == "scratch") & (t["seed"] == 0)]
    assert scratch0["test/union_acc"].tolist() == [0.95]  # the later of two finished runs
    assert "val/union_acc" not in t and "loss/total" not in t  # per-epoch metrics live in history
    assert {"test/task_acc/0", "test/task_acc_bestval/1", "diag/probe_acc", "best_epoch"} <= set(t.columns)
    dup = study_data.duplicates()
    keys = dup[["split", "method", "variant", "seed", "n_finished"]].values.tolist()
    assert keys == [["2x5", "scratch", "full", 0, 2]]


def test_attempts_keep_failed_killed_and_running_runs(study_data) -> None:
    a = study_data.attempts
    bad = a[a["status"] != "FINISHED"]
    assert sorted(zip(bad["method"], bad["seed"], bad["status"])) == [
        ("cfl", 2, "KILLED"), ("cka", 6, "RUNNING"), ("kd", 1, "FAILED")]
    assert bad.loc[bad["status"] == "FAILED", "failure"].tolist() == ["RuntimeError: failed on purpose"]


def test_history_is_per_epoch_for_used_runs_only(study_data) -> None:
    h = study_data.history
    assert set(h["run_id"]) <= set(study_data.trials["run_id"])
    one = h[(h["split"] == "2x5") & (h["label"] == "cka-intra") & (h["seed"] == 1) & (h["metric"] == "val/union_acc")]
    assert one["step"].tolist() == [1, 2, 3]
    assert one["value"].tolist() == pytest.approx([0.91 - 0.1 / e for e in (1, 2, 3)])
    cka_terms = {m for m in h.loc[h["method"] == "cka", "metric"] if m.startswith("loss/")}
    assert cka_terms == {"loss/task", "loss/intra", "loss/inter", "loss/align", "loss/total"}
    assert not any(m.startswith("test/") for m in h["metric"])


def test_teacher_runs_and_splits(study_data) -> None:
    tr = study_data.teachers  # the later teacher run of key tkey-old (0.50) belongs to no trial of the study
    assert tr[["split", "task", "test/own_task_acc"]].values.tolist() == [["2x5", 0, 0.99], ["2x5", 1, 0.97]]
    assert study_data.splits == ["2x5", "3x3"]
    assert study_data.study_yaml is None


def test_row_labels() -> None:
    assert [row_label("cka", v) for v in ("full", "-intra", "-intra-inter", "wide")] == [
        "cka", "cka-intra", "cka-intra-inter", "cka:wide"]


def test_study_file_gives_the_name_and_the_split_order(tmp_path: Path, store_uri: str) -> None:
    f = tmp_path / "toy.yaml"
    f.write_text("name: toy\nsplits:\n  - {name: 3x3}\n  - {name: 2x5}\nablations: [task, intra]\nseeds: [0, 1, 2]\n")
    assert resolve_study(str(f))[0] == "toy"
    data = load_study(str(f), store_uri, history=False)
    assert data.splits == ["3x3", "2x5"] and "ablations: [task, intra]" in (data.study_yaml or "")
    assert resolve_study("toy") == ("toy", None)


@pytest.mark.parametrize("text, message", [("seeds: [1]\n", "has no 'name:'"), ("name: [\n", "not valid YAML")])
def test_bad_study_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(HarnessError, match=message):
        resolve_study(str(f))
    with pytest.raises(HarnessError, match="no study file"):
        resolve_study(str(tmp_path / "missing.yaml"))


def test_unknown_experiment_and_no_finished_trials(store_uri: str) -> None:
    uri = store_uri  # another experiment in the same store (a new sqlite file costs seconds)
    client = MlflowClient(uri)
    exp = client.create_experiment("broken")
    store.log_run(client, exp, store.trial_tags("2x5", "cka", "full", 0, False), {"test/union_acc": 0.5},
                  status="FAILED")
    with pytest.raises(HarnessError, match=r"^report: no experiment 'nope' in sqlite:///"):
        load_study("nope", uri)
    with pytest.raises(HarnessError, match="^report: experiment 'broken' has no finished trial runs in"):
        load_study("broken", uri)


def test_missing_store_is_one_line_and_is_not_created(tmp_path: Path) -> None:
    """A report only reads: a store that does not exist is not created by looking into it."""
    with pytest.raises(HarnessError, match=r"^report: no experiment 'nope' in sqlite:///.*\(no tracking store there"):
        load_study("nope", f"sqlite:///{tmp_path}/mlflow.db")
    assert list(tmp_path.iterdir()) == []


def test_older_and_todays_config_tags_fill_one_row(store_uri: str) -> None:
    """``harness.config`` read ``cka:-intra`` before ablations were named as in their runs
    (``cka-intra``); the report groups by ``harness.method``/``harness.variant``, so a store with
    both forms still gives one row of two seeds."""
    client = MlflowClient(store_uri)
    exp = client.create_experiment("config-tags")
    for seed, tag in ((0, "cka:-intra"), (1, "cka-intra")):
        tags = {**store.trial_tags("2x5", "cka", "-intra", seed, False), "harness.config": tag}
        store.log_run(client, exp, tags, {"test/union_acc": 0.8 + seed / 10})
    data = load_study("config-tags", store_uri, history=False)
    labels = [row_label(m, v) for m, v in zip(data.trials["method"], data.trials["variant"])]
    assert labels == ["cka-intra", "cka-intra"] and sorted(data.trials["seed"]) == [0, 1]
    assert data.trials["test/union_acc"].mean() == pytest.approx(0.85)


def test_old_and_new_metric_names_give_the_same_report_numbers(store_uri: str, study_data, tmp_path) -> None:
    """The toy store logs the older names (teachers' ``test/acc``, trials' ``test/union_acc_best``);
    a copy with every metric renamed to today's (``test/own_task_acc``, ``test/union_acc_bestval``)
    gives the same comparison and ablation numbers, and both read under today's names."""
    import shutil
    import sqlite3

    import pandas as pd

    from harness.report.tables import ablation_frame, comparison_frame

    shutil.copy(store_uri[len("sqlite:///"):], tmp_path / "mlflow.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db, db:
        keys = {k for (k,) in db.execute("SELECT DISTINCT key FROM metrics")}
        renamed = {k: store.today(k) for k in keys if store.today(k) != k}
        assert set(renamed) == {"test/acc", "test/acc_last", "val/acc_best", "test/union_acc_best",
                                "test/task_acc_best/0", "test/task_acc_best/1", "test/task_acc_best/2"}
        for table in ("metrics", "latest_metrics"):
            db.executemany(f"UPDATE {table} SET key = ? WHERE key = ?", [(new, old) for old, new in renamed.items()])
    new = load_study(store.STUDY, f"sqlite:///{tmp_path}/mlflow.db", history=False)
    assert "test/union_acc_best" not in study_data.trials and "test/acc" not in study_data.teachers
    assert "test/union_acc_bestval" in new.trials and "test/own_task_acc" in new.teachers
    for frame in (comparison_frame, ablation_frame):
        pd.testing.assert_frame_equal(frame(study_data), frame(new))
    comp = comparison_frame(new).set_index(["split", "row"])
    assert comp.loc[("2x5", "kd"), "test/union_acc_bestval.mean"] == pytest.approx(0.93)
    assert comp.loc[("2x5", "teacher1"), "test/task_acc_bestval/1.mean"] == pytest.approx(0.97)


def test_params_in_older_python_form_read_as_todays_yaml_form() -> None:
    from harness.report.frames import canonical_params
    from harness.tracking import flatten

    cfg = {"teachers": [{"arch": "cnn", "seed": 0, "hidden": None, "augment": []}], "dataset": {"root": None},
           "train": {"amp": False, "lr": 0.001}, "split": {"tasks": [[0, 1], [2]], "transfer": {}}}
    old = {"teachers": "[{'arch': 'cnn', 'seed': 0, 'hidden': None, 'augment': []}]", "dataset.root": "None",
           "train.amp": "False", "train.lr": "0.001", "split.tasks": "[[0, 1], [2]]", "split.transfer": "{}"}
    today = flatten(cfg)
    assert today == {"teachers.0.arch": "cnn", "teachers.0.seed": "0", "teachers.0.hidden": "null",
                     "teachers.0.augment": "[]", "dataset.root": "null", "train.amp": "false", "train.lr": "0.001",
                     "split.tasks": "[[0, 1], [2]]", "split.transfer": "{}"}
    assert canonical_params(old) == today and canonical_params(today) == today


def test_a_store_moved_with_its_mlruns_folder_still_scopes_its_report(store_uri: str, study_data, tmp_path) -> None:
    """MLflow records absolute artifact paths: after moving ``mlflow.db`` and ``mlruns/`` elsewhere the
    recorded folders are gone, and the report reads the study run's ``trial_keys.json`` beside the
    database (``mlruns/<experiment>/<run>/artifacts``) instead."""
    import shutil
    import sqlite3

    old = Path(store_uri[len("sqlite:///"):])
    shutil.copy(old, tmp_path / "mlflow.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db, db:
        rows = db.execute("SELECT run_uuid, experiment_id, artifact_uri FROM runs").fetchall()
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(old.parent), "/gone"))
    moved_uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert load_study(store.STUDY, moved_uri, history=False).keys is None  # nothing where MLflow looks
    for run_id, exp_id, uri in rows:
        src = Path(uri.removeprefix("file://"))
        if (src / "trial_keys.json").is_file():
            dst = tmp_path / "mlruns" / str(exp_id) / run_id / "artifacts"
            shutil.copytree(src, dst)
    moved = load_study(store.STUDY, moved_uri, history=False)
    assert moved.keys == study_data.keys and moved.keys is not None and "trial_keys.json" in moved.scope
