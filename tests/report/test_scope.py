"""Reports are scoped by trial key: runs of other configurations in the same experiment (an edited
and reverted study, a partial rerun after a change) never reach a table, figure or statistic.

Fast tests on hand-logged stores (real MLflow, real ``harness.grid.expand`` through the CLI's
expander); one slow end-to-end test with real ``run_study`` runs: study A, then B (other method
parameter and other teachers), then A again (every trial skipped), then a partial rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.grid import study_keys
from harness.report.build import BUILT_PREFIX, build_report
from harness.report.frames import load_study
from tests.conftest import TINY, isolated_dir, write_study
from tests.report import store


def test_toy_tables_use_only_thestudy_keys(study_data) -> None:
    """The toy store's runs of an earlier version (logged last, so the latest of their seeds)."""
    assert study_data.keys == frozenset(store.study_keys())
    assert study_data.scope == "`trial_keys.json` of the latest study run"
    t = study_data.trials
    cka0 = t[(t["split"] == "2x5") & (t["method"] == "cka") & (t["variant"] == "full") & (t["seed"] == 0)]
    assert cka0["test/union_acc"].tolist() == [0.90]  # not the later 0.10 of key old-cka0
    assert sorted(t.loc[(t["split"] == "2x5") & (t["method"] == "kd"), "seed"]) == [0, 2]  # not old-kd1 (0.99)
    assert set(study_data.attempts["trial_key"]) <= set(store.study_keys())
    o = study_data.others
    assert sorted(zip(o["trial_key"], o["status"])) == [
        ("old-cka0", "FINISHED"), ("old-kd0", "FAILED"), ("old-kd1", "FINISHED")]
    # teachers: the 2x5 trials used tkey0/tkey1; the later teacher run of key tkey-old (0.50) is not theirs
    assert study_data.teachers[["task", "teacher_key", "test/own_task_acc"]].values.tolist() == [
        [0, "tkey0", 0.99], [1, "tkey1", 0.97]]


def test_keys_given_replace_the_logged_ones(store_uri: str) -> None:
    keys = [store.key("2x5", "cka", "full", s) for s in (1, 2)] + [store.key("2x5", "kd", "full", 0)]
    data = load_study(store.STUDY, store_uri, history=False, keys=keys)
    assert data.scope == "the trial keys given"
    assert sorted(zip(data.trials["method"], data.trials["seed"])) == [("cka", 1), ("cka", 2), ("kd", 0)]
    assert data.trials["test/union_acc"].tolist() == pytest.approx([0.92, 0.94, 0.91])  # cka 1, cka 2, kd 0


def _tiny(name: str) -> dict:
    return {**TINY, "name": name, "methods": {"kd": {}}, "seeds": [0, 1]}


def _trial(client: MlflowClient, exp: str, key: str, seed: int, acc: float) -> None:
    tags = {**store.trial_tags("2x5", "kd", "full", seed, False), "harness.trial_key": key}
    store.log_run(client, exp, tags, {"test/union_acc": acc, "test/union_acc_best": acc})


def test_an_older_store_is_scoped_by_expanding_its_study_file(store_uri: str, tmp_path: Path) -> None:
    """No trial_keys.json, only study.yaml: the CLI's expander (harness.grid.expand) gives the keys."""
    client = MlflowClient(store_uri)
    exp = client.create_experiment("old-store", artifact_location=(tmp_path / "artifacts").as_uri())
    text = yaml.safe_dump(_tiny("old-store"), sort_keys=False)
    client.log_text(store.log_run(client, exp, {"harness.kind": "study"}, {}), text, "study.yaml")
    keys = study_keys(text, "test")
    assert len(keys) == 2 and len(set(keys)) == 2
    _trial(client, exp, keys[0], 0, 0.80)
    _trial(client, exp, keys[1], 1, 0.82)
    _trial(client, exp, "edited", 0, 0.10)  # later: the latest run of 2x5/kd/seed0
    scoped = load_study("old-store", store_uri, history=False, expand=lambda t: study_keys(t, "logged"))
    assert scoped.trials["test/union_acc"].tolist() == pytest.approx([0.80, 0.82])
    assert scoped.scope.startswith("`study.yaml` of the latest study run (expanded")
    unscoped = load_study("old-store", store_uri, history=False)  # nothing to expand with: today's rule
    assert unscoped.keys is None and unscoped.trials["test/union_acc"].tolist() == pytest.approx([0.10, 0.82])
    f = tmp_path / "old.yaml"  # the CLI with the study file: its own keys
    f.write_text(text)
    assert main(["report", str(f), "--tracking-uri", store_uri, "--out", str(tmp_path / "r")]) == 0
    comp = pd.read_csv(tmp_path / "r" / "comparison.csv")
    assert comp.loc[comp["row"] == "kd", "test/union_acc.mean"].item() == pytest.approx(0.81)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "one of the 2 trial keys of the study (the study file given); 2 of them have a finished run" in md
    assert "| `2x5` | `kd` | 1 | 1 | 0 | 1 |" in md  # the edited run, counted only


def test_precision_is_part_of_the_keys(store_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The old-store runs are fp32 (this machine's precision): at bf16 none of them is the study's."""
    client = MlflowClient(store_uri)
    exp = client.create_experiment("precision", artifact_location=(tmp_path / "artifacts").as_uri())
    text = yaml.safe_dump(_tiny("precision"), sort_keys=False)
    keys = study_keys(text, "test", "fp32")
    assert keys == study_keys(text, "test") and set(keys).isdisjoint(study_keys(text, "test", "bf16"))
    _trial(client, exp, keys[0], 0, 0.80)
    f = tmp_path / "p.yaml"
    f.write_text(text)
    cmd = ["report", str(f), "--tracking-uri", store_uri, "--out"]
    assert main(cmd + [str(tmp_path / "a"), "--precision", "fp32"]) == 0
    assert main(cmd + [str(tmp_path / "b"), "--precision", "bf16"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"harness: error: report: experiment 'precision' has no finished trial run of the study's 2 trial keys (the "
        f"study file given) in {store_uri}, only 1 run of other configurations (another version of the study file, "
        "or another precision: see --precision)")
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_teacher_runs_of_older_trials_are_matched_by_config(store_uri: str, tmp_path: Path) -> None:
    """Trial runs without teacher-key tags: the teacher config in their params picks the teacher run."""
    client = MlflowClient(store_uri)
    exp = client.create_experiment("teach-params", artifact_location=(tmp_path / "artifacts").as_uri())
    client.log_text(store.log_run(client, exp, {"harness.kind": "study"}, {}), json.dumps(["k0"]), "trial_keys.json")
    teachers = "[{'arch': 'cnn', 'lr': 0.001, 'augment': []}, {'arch': 'mlp', 'lr': 0.001, 'augment': []}]"
    params = {"teachers": teachers, "dataset.val_fraction": "0.1", "dataset.image_size": "None"}
    tags = {**store.trial_tags("s", "kd", "full", 0, False), "harness.trial_key": "k0"}
    store.log_run(client, exp, tags, {"test/union_acc": 0.8}, params=params)
    for lr, acc in (("0.001", 0.95), ("0.01", 0.40)):  # the second (another config) is later
        tt = {"harness.kind": "teacher", "harness.split": "s", "harness.task": "0", "harness.teacher_key": f"t{lr}"}
        tp = {"teacher.arch": "cnn", "teacher.lr": lr, "teacher.augment": "[]", "val_fraction": "0.1",
              "image_size": "None"}
        store.log_run(client, exp, tt, {"test/acc": acc}, params=tp)
    data = load_study("teach-params", store_uri, history=False)
    assert data.teachers[["task", "test/own_task_acc"]].values.tolist() == [[0, 0.95]]


# ----------------------------------------------------------------------------- end to end
def _tables(out: Path) -> dict[str, bytes | str]:
    """Every table of a report: the CSV and LaTeX files, and report.md without its build line, its
    scope line and the section that counts the runs of other configurations."""
    files: dict[str, bytes | str] = {n: (out / n).read_bytes() for n in
                                     ("comparison.csv", "ablation.csv", "comparison.tex", "ablation.tex")}
    md = (out / "report.md").read_text()
    head, rest = md.split("## Comparison", 1)
    body, tail = rest.split("## Runs of other configurations in this experiment", 1)
    files["report.md"] = "## Comparison" + body + "## Parameters" + tail.split("## Parameters", 1)[1]
    assert BUILT_PREFIX not in files["report.md"]
    return files


def _kd(out: Path) -> pd.Series:
    comp = pd.read_csv(out / "comparison.csv", dtype={"seeds": str})
    return comp[comp["row"] == "kd"].iloc[0]


@pytest.mark.slow
def test_edit_revert_and_partial_rerun(tmp_path: Path) -> None:
    with isolated_dir(tmp_path):
        from harness.runner import run_study

        base = {"methods": {"kd": {}, "teachers": {}}, "train": {"epochs": 2, "batch_size": 128}}
        a = write_study(tmp_path / "a.yaml", **base)
        b_teachers = [{**t, "lr": 0.01} for t in TINY["teachers"]]
        b = write_study(tmp_path / "b.yaml", **{**base, "methods": {"kd": {"T": 4.0}, "teachers": {}}},
                        teachers=b_teachers)
        assert run_study(a, report=False, workers=1) == 0
        r1 = build_report("tiny", out_dir=tmp_path / "r1")
        assert run_study(b, report=False, workers=1) == 0
        r2 = build_report("tiny", out_dir=tmp_path / "r2")
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        exp = client.get_experiment_by_name("tiny").experiment_id
        n_runs = len(client.search_runs([exp], "tags.`harness.kind` = 'trial'", max_results=1000))
        assert run_study(a, report=False, workers=1) == 0  # reverted: every trial is skipped
        assert len(client.search_runs([exp], "tags.`harness.kind` = 'trial'", max_results=1000)) == n_runs
        r3 = build_report("tiny", out_dir=tmp_path / "r3")  # as the runner builds it: the latest study run's keys
        assert main(["report", str(a), "--out", str(tmp_path / "r4")]) == 0  # the study file given
        # B's numbers differ from A's (students and teachers), so equal tables below are not vacuous
        t1, t2 = _tables(r1), _tables(r2)
        assert _kd(r1)["test/union_acc.mean"] != _kd(r2)["test/union_acc.mean"]
        comp1, comp2 = pd.read_csv(r1 / "comparison.csv"), pd.read_csv(r2 / "comparison.csv")
        teach = comp1["kind"] == "teacher"
        assert comp1.loc[teach, "test/task_acc/0.mean"].tolist() != comp2.loc[teach, "test/task_acc/0.mean"].tolist()
        assert t1 != t2
        assert _tables(r3) == t1  # byte for byte
        t4 = _tables(tmp_path / "r4")  # the same, but for the study file shown: the one given, not the logged one
        assert t4.pop("report.md").split("## Study configuration")[0] == t1["report.md"].split("## Study config")[0]
        assert t4 == {k: v for k, v in t1.items() if k != "report.md"}
        md3 = (r3 / "report.md").read_text()
        assert "3 trial runs of other configurations in this experiment are left out" in md3

        # a partial rerun after a change: only seed 0 of C ran; C's report has C's seed 0 alone
        c_methods = {"methods": {"kd": {"T": 2.0}, "teachers": {}}}
        c0 = write_study(tmp_path / "c0.yaml", **{**base, **c_methods}, seeds=[0])
        c = write_study(tmp_path / "c.yaml", **{**base, **c_methods})
        assert run_study(c0, report=False, workers=1) == 0
        assert main(["report", str(c), "--out", str(tmp_path / "r5")]) == 0
        kd = _kd(tmp_path / "r5")
        runs = client.search_runs([exp], "tags.`harness.kind` = 'trial' and params.`params.T` = '2.0'")
        assert len(runs) == 1
        assert (kd["n"], kd["n_expected"], kd["n_missing"], kd["seeds"]) == (1, 2, 1, "0")
        assert kd["test/union_acc.mean"] == pytest.approx(runs[0].data.metrics["test/union_acc"], abs=0)
