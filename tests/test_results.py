"""``harness.results`` and ``harness export``: a real small study (mlp teachers and student, 2
epochs, 2 seeds) in a real MLflow SQLite store, checked against the report built from the same
store, against MLflow itself, and across the CSV/Parquet round trip.

The store also holds one hand-logged trial run of a trial key that is not the study's (an edited
study file), logged last, so that it is the latest run of ``2x5/kd/seed0``: only scoping by key keeps
it out. It is written in the older vocabulary (``test/union_acc_best``, a param ``None``) so that the
name translation shows too."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.errors import HarnessError
from harness.results import CURVE_COLUMNS, INFO_COLUMNS, PARAM_PREFIX, curves, trials
from harness.tracking import resolve_uri, store_path
from tests.conftest import isolated_dir, write_study

REPO = Path(__file__).resolve().parents[1]
NAME = "results-tiny"
MLP = {"arch": "mlp", "hidden": 32, "epochs": 2}
STUDY = {"name": NAME, "teachers": [MLP, MLP], "student": {"arch": "mlp", "hidden": 32},
         "train": {"epochs": 2, "batch_size": 128}, "methods": {"kd": {}, "scratch": {}, "teachers": {}},
         "seeds": [0, 1]}
OTHER_KEY = "edited-elsewhere"
#: the out-of-scope run's numbers (old names: the store translates them)
OTHER_FINAL = {"test/union_acc": 0.123, "test/union_acc_best": 0.456, "val/union_acc_best": 0.3, "best_epoch": 2.0}
OTHER_VAL = [0.2, 0.3]
UNION = ("test/union_acc", "test/union_acc_bestval")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("results")
    with isolated_dir(tmp):
        from harness.runner import run_study

        study = write_study(tmp / "study.yaml", **STUDY)
        assert run_study(study, report=False, workers=1) == 0
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(NAME).experiment_id
        in_scope = client.search_runs([exp], "tags.`harness.kind` = 'trial'", max_results=1000)
        other = _log_other_run(client, exp, in_scope)
        assert main(["report", NAME, "--tracking-uri", uri, "--out", str(tmp / "report")]) == 0
        yield {"tmp": tmp, "uri": uri, "study": study, "client": client, "runs": in_scope, "other": other,
               "report": tmp / "report"}


def _log_other_run(client: MlflowClient, exp: str, runs: list) -> str:
    """A FINISHED run of 2x5/kd/seed0 under another trial key, started after every run of the study."""
    src = next(r for r in runs if r.data.tags["harness.method"] == "kd" and r.data.tags["harness.seed"] == "0")
    tags = {k: v for k, v in src.data.tags.items() if k.startswith("harness.")}
    tags["harness.trial_key"] = OTHER_KEY
    run = client.create_run(exp, tags=tags, run_name="kd · s0 · 2x5 (edited)")
    params = {**src.data.params, "params.T": "8.0", "dataset.image_size": "None"}  # older runs: Python's None
    t = run.info.start_time
    metrics = [Metric("val/union_acc", v, t + e, e) for e, v in enumerate(OTHER_VAL, 1)]
    metrics += [Metric(k, v, t + 10, 2) for k, v in OTHER_FINAL.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# ----------------------------------------------------------------------------- trials
def test_one_row_per_trial_with_the_numbers_mlflow_holds(ran: dict[str, Any]) -> None:
    df = trials(NAME, ran["uri"])
    assert sorted(zip(df["method"], df["seed"])) == [("kd", 0), ("kd", 1), ("scratch", 0), ("scratch", 1),
                                                     ("teachers", 0)]  # the reference rows: one seed
    assert list(df.columns[:len(INFO_COLUMNS)]) == INFO_COLUMNS
    assert set(df["study"]) == {NAME} and set(df["split"]) == {"2x5"} and set(df["variant"]) == {"full"}
    assert df["in_report"].all() and OTHER_KEY not in set(df["trial_key"])
    assert set(df["run_id"]) == {r.info.run_id for r in ran["runs"]}
    for r in ran["runs"]:
        row = df[df["run_id"] == r.info.run_id].iloc[0]
        assert row["trial_key"] == r.data.tags["harness.trial_key"]
        for k, v in r.data.metrics.items():
            if k in df.columns:  # every final metric, as MLflow holds it
                assert row[k] == v, k
        assert row[PARAM_PREFIX + "train.epochs"] == "2" and row[PARAM_PREFIX + "student.arch"] == "mlp"
        assert row[PARAM_PREFIX + "method"] == row["method"] and row[PARAM_PREFIX + "seed"] == str(row["seed"])
    for col in ("test/union_acc", "test/union_acc_bestval", "test/task_acc/0", "test/task_acc/1",
                "val/union_acc_best", "best_epoch", "trial_seconds", "diag/probe_acc"):
        assert col in df.columns, col
    assert "test/union_acc_best" not in df.columns  # today's name only
    kd = df[df["method"] == "kd"]
    assert kd["best_epoch"].isin([1.0, 2.0]).all() and (kd[PARAM_PREFIX + "params.T"] != "8.0").all()


def test_grouped_over_seeds_equals_the_report_comparison(ran: dict[str, Any]) -> None:
    df = trials(NAME, ran["uri"])
    comp = pd.read_csv(ran["report"] / "comparison.csv", dtype={"seeds": str})
    rows = comp[comp["kind"].isin(["method", "reference"])]
    grouped = df.groupby(["split", "method", "variant"])
    assert sorted(zip(rows["split"], rows["method"], rows["variant"])) == sorted(grouped.groups)
    for r in rows.to_dict("records"):
        g = grouped.get_group((r["split"], r["method"], r["variant"]))
        assert (r["n"], r["seeds"]) == (len(g), ",".join(map(str, sorted(g["seed"]))))
        for m in UNION:
            assert r[f"{m}.n"] == g[m].count() == len(g)
            assert r[f"{m}.mean"] == pytest.approx(g[m].mean(), rel=1e-12, abs=1e-15)
            if len(g) > 1:
                assert r[f"{m}.std"] == pytest.approx(g[m].std(ddof=1), rel=1e-12, abs=1e-15)
            else:
                assert math.isnan(r[f"{m}.std"])
    # the scope matters: with every run of the experiment, kd's mean would be another number
    every = trials(NAME, ran["uri"], scope="all")
    kd = rows.loc[rows["method"] == "kd", "test/union_acc.mean"].item()
    assert every.loc[every["method"] == "kd", "test/union_acc"].mean() != pytest.approx(kd, rel=1e-9)


def test_scope_study_leaves_out_other_keys_and_all_keeps_them(ran: dict[str, Any]) -> None:
    study, every = trials(NAME, ran["uri"]), trials(NAME, ran["uri"], scope="all")
    other = ran["other"]
    assert other not in set(study["run_id"]) and len(every) == len(study) + 1
    row = every[every["run_id"] == other].iloc[0]
    assert (row["method"], row["seed"], row["trial_key"], row["in_report"]) == ("kd", 0, OTHER_KEY, False)
    # the latest run of its (split, method, variant, seed): only the key keeps it out of the study scope
    kd0 = study[(study["method"] == "kd") & (study["seed"] == 0)].iloc[0]
    assert row["start_time"] > kd0["start_time"]
    assert row["test/union_acc"] == 0.123
    assert row["test/union_acc_bestval"] == 0.456  # logged as test/union_acc_best
    assert row[PARAM_PREFIX + "dataset.image_size"] == "null"  # logged as Python's None
    assert row[PARAM_PREFIX + "params.T"] == "8.0"
    inside = every[every["in_report"]].reset_index(drop=True)[list(study.columns)]
    pd.testing.assert_frame_equal(inside, study)
    assert other in set(curves(NAME, ran["uri"], scope="all")["run_id"])
    assert other not in set(curves(NAME, ran["uri"])["run_id"])


def test_a_study_file_is_scoped_by_its_own_keys(ran: dict[str, Any], tmp_path: Path) -> None:
    """The report's expander: the study file gives the same frame as the name; a file with seed 0
    only (an edit) gives seed 0's rows, the same runs."""
    by_name = trials(NAME, ran["uri"])
    pd.testing.assert_frame_equal(trials(str(ran["study"]), ran["uri"]), by_name)
    edited = trials(str(write_study(tmp_path / "seed0.yaml", **{**STUDY, "seeds": [0]})), ran["uri"])
    assert sorted(edited["run_id"]) == sorted(by_name.loc[by_name["seed"] == 0, "run_id"])
    assert len(edited) == 3


# ----------------------------------------------------------------------------- curves
def test_curves_one_row_per_run_metric_epoch_and_the_best_epoch(ran: dict[str, Any]) -> None:
    t, c = trials(NAME, ran["uri"]), curves(NAME, ran["uri"])
    assert list(c.columns) == CURVE_COLUMNS
    assert not c.duplicated(["run_id", "metric", "epoch"]).any()
    trained = t[t["method"] != "teachers"]
    assert set(c["run_id"]) == set(trained["run_id"])  # the reference rows do not train
    assert set(c["epoch"]) == {1, 2}
    client = ran["client"]
    n = 0
    for r in trained.itertuples(index=False):
        hist = {k for k in client.get_run(r.run_id).data.metrics if k not in t.columns}
        assert set(c.loc[c["run_id"] == r.run_id, "metric"]) == hist
        for k in hist:
            logged = {m.step: m.value for m in client.get_metric_history(r.run_id, k)}
            mine = c[(c["run_id"] == r.run_id) & (c["metric"] == k)]
            assert dict(zip(mine["epoch"], mine["value"])) == logged
            n += len(logged)
        ids = c.loc[c["run_id"] == r.run_id, ["split", "method", "variant", "label", "seed", "trial_key"]]
        assert ids.drop_duplicates().values.tolist() == [[r.split, r.method, r.variant, r.label, r.seed, r.trial_key]]
    assert len(c) == n
    val = c[c["metric"] == "val/union_acc"].set_index(["run_id", "epoch"])["value"]
    for r in trained.to_dict("records"):
        assert val[(r["run_id"], int(r["best_epoch"]))] == r["val/union_acc_best"]
        assert val[(r["run_id"], int(r["best_epoch"]))] == max(val[r["run_id"]])  # the best (ties: the earliest)
    every = curves(NAME, ran["uri"], scope="all")
    mine = every[every["run_id"] == ran["other"]]
    assert mine[["metric", "epoch", "value", "in_report"]].values.tolist() == [
        ["val/union_acc", 1, 0.2, False], ["val/union_acc", 2, 0.3, False]]


# ----------------------------------------------------------------------------- export
def _string_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]


def _read_csv(path: Path, like: pd.DataFrame) -> pd.DataFrame:
    """Text columns as text (``null`` is a param's value, not a missing one); only an empty cell is NaN."""
    return pd.read_csv(path, dtype={c: str for c in _string_columns(like)}, keep_default_na=False, na_values=[""])


def test_export_csv_round_trips(ran: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "trials.csv"
    assert main(["export", NAME, "--format", "csv", "--out", str(out), "--tracking-uri", ran["uri"]]) == 0
    assert capsys.readouterr().out.strip() == f"5 trials of study '{NAME}' (scope study) written to {out} (csv)"
    df = trials(NAME, ran["uri"])
    back = _read_csv(out, df)
    want = df.copy()
    for c in _string_columns(df):
        want[c] = want[c].replace("", np.nan)  # CSV has no empty string
    pd.testing.assert_frame_equal(back, want, check_dtype=False, check_exact=True)

    out = tmp_path / "curves.csv"  # the suffix picks the format; all runs
    assert main(["export", NAME, "--curves", "--scope", "all", "--out", str(out), "--tracking-uri", ran["uri"]]) == 0
    c = curves(NAME, ran["uri"], scope="all")
    assert capsys.readouterr().out.strip() == (
        f"{len(c)} curve rows (run, metric, epoch) of study '{NAME}' (scope all) written to {out} (csv)")
    back = _read_csv(out, c)
    pd.testing.assert_frame_equal(back, c, check_dtype=False, check_exact=True)


def test_export_parquet_round_trips_or_says_what_to_install(ran: dict[str, Any], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trials.parquet"
    cmd = ["export", NAME, "--out", str(out), "--tracking-uri", ran["uri"]]  # .parquet: the format
    if importlib.util.find_spec("pyarrow") is not None:
        assert main(cmd) == 0
        assert capsys.readouterr().out.strip() == f"5 trials of study '{NAME}' (scope study) written to {out} (parquet)"
        pd.testing.assert_frame_equal(pd.read_parquet(out), trials(NAME, ran["uri"]), check_dtype=False,
                                      check_exact=True)
        out.unlink()
    with pytest.MonkeyPatch.context() as mp:  # neither engine importable
        mp.setitem(sys.modules, "pyarrow", None)
        mp.setitem(sys.modules, "fastparquet", None)
        assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err == ("harness: error: export: --format parquet needs pyarrow or fastparquet: pip install pyarrow "
                   "(or use --format csv)\n")
    assert not out.exists()


# ----------------------------------------------------------------------------- no torch, errors
def test_reading_a_study_by_name_never_imports_torch(ran: dict[str, Any], tmp_path: Path) -> None:
    """By name, and by the study file its run ran as written: the scope is the keys that run
    recorded, so neither the grid nor torch is imported (an edited file is expanded instead:
    test_a_study_file_is_scoped_by_its_own_keys)."""
    path = str(ran["study"])
    code = ("import sys\nimport harness.results\n"
            f"t = harness.results.trials({NAME!r}, {ran['uri']!r})\n"
            f"c = harness.results.curves({NAME!r}, {ran['uri']!r}, scope='all')\n"
            f"f = harness.results.trials({path!r}, {ran['uri']!r})\n"
            "from harness.cli import main\n"
            f"assert main(['export', {NAME!r}, '--out', 't.csv', '--tracking-uri', {ran['uri']!r}]) == 0\n"
            f"assert main(['report', {path!r}, '--out', 'r', '--tracking-uri', {ran['uri']!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'harness.results imported torch'\n"
            "assert list(f['run_id']) == list(t['run_id'])\n"
            "print(len(t), len(c))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines()[-1] == f"5 {len(curves(NAME, ran['uri'], scope='all'))}"
    assert len(pd.read_csv(tmp_path / "t.csv")) == 5


def test_an_unknown_study_is_one_line_and_creates_no_store(ran: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's default: ./mlflow.db
    uri = resolve_uri(None)
    assert Path(store_path(uri)).resolve() == tmp_path / "mlflow.db"
    assert main(["export", NAME, "--out", "t.csv"]) == 2
    assert capsys.readouterr().err == (f"harness: error: export: no experiment '{NAME}' in {uri} (no tracking "
                                       "store there)\n")
    assert not Path("mlflow.db").exists() and list(tmp_path.iterdir()) == []  # no store, no t.csv
    missing = f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(HarnessError) as e:
        trials("nope", missing)
    assert str(e.value) == f"no experiment 'nope' in {missing} (no tracking store there)"
    assert list(tmp_path.iterdir()) == []
    # an existing store without that experiment
    assert main(["export", "nope", "--out", "t.csv", "--tracking-uri", ran["uri"]]) == 2
    assert capsys.readouterr().err == f"harness: error: export: no experiment 'nope' in {ran['uri']}\n"
    assert main(["export", "missing.yaml", "--out", "t.csv", "--tracking-uri", ran["uri"]]) == 2
    assert capsys.readouterr().err == "harness: error: export: no study file 'missing.yaml'\n"
    with pytest.raises(HarnessError, match=r"^scope: expected one of study, all, got 'every'$"):
        trials(NAME, ran["uri"], scope="every")
    assert list(tmp_path.iterdir()) == []
