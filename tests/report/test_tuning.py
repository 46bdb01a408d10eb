"""The tuning section: Optuna trials of ``harness tune`` read back from MLflow, with known values.

Experiment ``tune-only`` holds only tuning runs. Optuna study ``tune-only/cka``: 12 trials whose
objective is ``0.5 + 0.4 * w_align + 0.002 * w_intra`` (``align`` has no effect), so ``w_align``
must rank first; trial 4 was KILLED once and redone, trial 9 has a stale RUNNING duplicate.
Optuna study ``tune-only/kd``: one COMPLETE default trial and one failure (too few trials for
importances).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution

from harness.errors import HarnessError
from harness.report.build import BUILT_PREFIX, build_report
from harness.report.tuning import (FEW_TRIALS, Importances, few_trials_warning, load_tuning, param_importances,
                                   summary_frame, tuning_markdown)
from tests.report import store

STUDY = "tune-only"
CKA, KD = f"{STUDY}/cka", f"{STUDY}/kd"
SPACE = {"methods.cka.w_align": FloatDistribution(0.0, 1.0), "methods.cka.w_intra": FloatDistribution(0.0, 1.0),
         "methods.cka.align": CategoricalDistribution(["cosine", "l2"])}
# number -> (w_align, w_intra, align, state); trial 0 is the default
TRIALS = {0: (0.5, 0.5, "cosine", "COMPLETE"), 1: (0.1, 0.9, "l2", "COMPLETE"), 2: (0.3, 0.2, "cosine", "COMPLETE"),
          3: (0.2, 0.7, "l2", "PRUNED"), 4: (0.7, 0.6, "l2", "COMPLETE"), 5: (0.95, 0.1, "cosine", "COMPLETE"),
          6: (0.4, 0.4, "cosine", "FAIL"), 7: (0.6, 0.3, "l2", "COMPLETE"), 8: (0.15, 0.5, "cosine", "PRUNED"),
          9: (0.85, 0.8, "l2", "COMPLETE"), 10: (0.05, 0.05, "cosine", "COMPLETE"),
          11: (0.9, 0.95, "l2", "COMPLETE")}
PRUNED_VALUES = {3: 0.55, 8: 0.52}


def objective(w_align: float, w_intra: float) -> float:
    return 0.5 + 0.4 * w_align + 0.002 * w_intra


def _params(n: int) -> dict:
    a, b, align, _ = TRIALS[n]
    return {"methods.cka.w_align": a, "methods.cka.w_intra": b, "methods.cka.align": align}


def _value(n: int) -> float | None:
    a, b, _, state = TRIALS[n]
    return {"COMPLETE": objective(a, b), "PRUNED": PRUNED_VALUES.get(n), "FAIL": None}[state]


@pytest.fixture(scope="module")
def tune_store(store_uri: str) -> dict:
    """The ``tune-only`` experiment in the session store; returns the run ids that matter."""
    client = MlflowClient(store_uri)
    exp = client.create_experiment(STUDY)
    store.search_run(client, exp, "postgresql://user:secret@db.example/optuna", [CKA, KD])
    ids = {}
    for n, (_, _, _, state) in TRIALS.items():
        if n == 4:  # first attempt interrupted (KILLED, state FAIL), ended before the redo
            ids["4-killed"] = store.tune_trial(client, exp, CKA, "cka", 4, "FAIL", 0.6, _params(4), SPACE,
                                               status="KILLED", end_offset=50)
        steps = 2 if state == "PRUNED" else 1 if state == "FAIL" else 6
        ids[n] = store.tune_trial(client, exp, CKA, "cka", n, state, _value(n) if state != "FAIL" else 0.6,
                                  _params(n), SPACE, default=n == 0, steps=steps)
    ids["9-stale"] = store.tune_trial(client, exp, CKA, "cka", 9, "RUNNING", 0.3, _params(9), SPACE)
    kd_space = {"methods.kd.T": FloatDistribution(1.0, 8.0, log=True)}
    store.tune_trial(client, exp, KD, "kd", 0, "COMPLETE", 0.6, {"methods.kd.T": 4.0}, kd_space, default=True,
                     objective="val_best")
    store.tune_trial(client, exp, KD, "kd", 1, "FAIL", None, {"methods.kd.T": 2.0}, kd_space, objective="val_best")
    return {"uri": store_uri, "exp": exp, "ids": ids}


@pytest.fixture(scope="module")
def tuning(tune_store: dict):
    return load_tuning(tune_store["uri"], tune_store["exp"])


@pytest.fixture(scope="module")
def tune_report(tune_store: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_report(STUDY, tracking_uri=tune_store["uri"], out_dir=tmp_path_factory.mktemp("tune") / STUDY)


def test_one_row_per_trial_latest_finished_run_wins(tuning, tune_store: dict) -> None:
    t = tuning.of(CKA)
    assert list(t["number"]) == list(range(12))
    ids = tune_store["ids"]
    assert t.loc[t["number"] == 4, "run_id"].item() == ids[4]  # the redo, not the KILLED attempt
    assert t.loc[t["number"] == 9, "run_id"].item() == ids[9]  # finished beats a later RUNNING run
    assert sorted(tuning.superseded["run_id"]) == sorted([ids["4-killed"], ids["9-stale"]])
    fail = t[t["number"] == 6].iloc[0]
    assert fail["state"] == "FAIL" and math.isnan(fail["value"]) and fail["status"] == "FAILED"
    assert t.loc[t["number"] == 3, "value"].item() == pytest.approx(0.55)  # pruned: the last running value
    assert t.loc[t["number"] == 5, "params"].item() == _params(5)  # typed values from the JSON tag
    c = tuning.curves
    assert c[(c["optuna_study"] == CKA) & (c["number"] == 3)]["step"].tolist() == [0, 1]  # stopped early
    assert c[(c["optuna_study"] == CKA) & (c["number"] == 5)]["value"].iloc[-1] == pytest.approx(0.8802)


def test_summary_counts_default_best_and_delta(tuning) -> None:
    s = summary_frame(tuning).set_index("optuna_study")
    cka = s.loc[CKA]
    assert (cka["trials"], cka["COMPLETE"], cka["PRUNED"], cka["FAIL"], cka["RUNNING"]) == (12, 9, 2, 1, 0)
    # by hand: default 0.5 + 0.4 x 0.5 + 0.002 x 0.5 = 0.701; best (#5) 0.5 + 0.38 + 0.0002 = 0.8802
    assert cka["default_number"] == 0 and cka["default_value"] == pytest.approx(0.701)
    assert cka["best_number"] == 5 and cka["best_value"] == pytest.approx(0.8802)
    assert cka["delta"] == pytest.approx(0.1792)
    kd = s.loc[KD]
    assert (kd["trials"], kd["COMPLETE"], kd["FAIL"], kd["best_number"], kd["delta"]) == (2, 1, 1, 0, 0.0)
    assert (cka["objective"], kd["objective"]) == ("val_last", "val_best")


def test_importances_rank_the_parameter_that_matters_first(tuning) -> None:
    imp = param_importances(tuning, CKA)
    assert imp.n_trials == 9 and imp.note == ""
    assert set(imp.values) == set(SPACE)
    assert sum(imp.values.values()) == pytest.approx(1.0)
    assert list(imp.values)[0] == "methods.cka.w_align" and imp.values["methods.cka.w_align"] > 0.5
    assert param_importances(tuning, CKA) == imp  # seeded: the same numbers every time
    few = param_importances(tuning, KD)
    assert few.values == {} and few.note == "fewer than 2 complete trials (1)"


def test_section_markdown(tune_report: Path) -> None:
    md = (tune_report / "report.md").read_text()
    assert "## Tuning" in md and "## Comparison" not in md and "## Ablations" not in md
    assert ("Hyper-parameter searches only: 14 trials of `harness tune` in 2 Optuna studies; no trial run of "
            "`harness run-study`, so no comparison or ablation tables.") in md
    assert "## Study configuration" not in md  # no study file logged, and no trial params to show
    assert ("| Optuna study | Method | Objective | Trials | Complete | Pruned | Failed | Default (%) | Best (%) "
            "| Best trial | Δ best − default (pp) |") in md
    assert "| `tune-only/cka` | `cka` | `val_last` | 12 | 9 | 2 | 1 | 70.1 (#0) | 88.0 | #5 | +17.9 |" in md
    assert "| `tune-only/kd` | `kd` | `val_best` | 2 | 1 | 0 | 1 | 60.0 (#0) | 60.0 | #0 | +0.0 |" in md
    assert "2 run(s) of a trial already logged by another run were replaced" in md
    assert "### `tune-only/cka` (method `cka`)" in md
    assert "12 trials (9 complete, 2 pruned, 1 failed); Optuna storage `postgresql://db.example/optuna`." in md
    assert "The searches read validation labels (the objective is a validation accuracy)" in md
    assert "| Parameter | Search space | Best (#5) | Default (#0) |" in md
    assert "| `methods.cka.w_align` | [0, 1] | 0.95 | 0.5 |" in md
    assert "| `methods.cka.align` | {cosine, l2} | cosine | cosine |" in md
    assert "| `methods.kd.T` | [1, 8] log | 4 | 4 |" in md
    assert ("Parameter importances (fANOVA, seed 0, over 9 complete trials):\n\n"
            "**Too few trials to rank parameters:** these importances rest on 9 complete trials (fewer than 20), so "
            "they are mostly noise; optuna-dashboard's importances (PED-ANOVA, so they may rank differently) rest on "
            "this study's 9 complete trials and are no more reliable.\n\n| Parameter | Importance |") in md
    imp_rows = md.split("| Parameter | Importance |")[1].split("\n\n")[0].splitlines()[2:]
    assert imp_rows[0].startswith("| `methods.cka.w_align` | 0.")
    assert "Parameter importances: not computed (fewer than 2 complete trials (1))." in md
    assert "Failed trials: #6 (FAILED: RuntimeError: trial failed on purpose)." in md
    assert "secret" not in md
    assert "Trials run with harness 0.1.0, Python 3.11.7 (tags of the tuning trial runs)." in md
    assert "Traceback" not in md


def test_tuning_csv(tune_report: Path) -> None:
    df = pd.read_csv(tune_report / "tuning.csv")
    assert list(df.columns) == ["optuna_study", "method", "number", "state", "default", "value", "duration",
                                "run_id", "methods.cka.align", "methods.cka.w_align", "methods.cka.w_intra",
                                "methods.kd.T"]
    assert list(zip(df["optuna_study"], df["number"])) == [(CKA, n) for n in range(12)] + [(KD, 0), (KD, 1)]
    best = df[(df["optuna_study"] == CKA) & (df["number"] == 5)].iloc[0]
    assert (best["state"], bool(best["default"]), best["methods.cka.w_align"], best["methods.cka.align"]) == (
        "COMPLETE", False, 0.95, "cosine")
    assert best["value"] == pytest.approx(0.8802) and best["duration"] == 10.0
    assert df.groupby("optuna_study")["state"].value_counts().to_dict() == {
        (CKA, "COMPLETE"): 9, (CKA, "PRUNED"): 2, (CKA, "FAIL"): 1, (KD, "COMPLETE"): 1, (KD, "FAIL"): 1}
    assert df["default"].sum() == 2 and df["value"].isna().sum() == 2


def test_figures_exist_are_shown_and_builds_are_identical(tune_report: Path, tune_store: dict,
                                                          tmp_path: Path) -> None:
    pngs = ("tuning_history.png", "tuning_curves.png", "tuning_importance.png")
    md = (tune_report / "report.md").read_text()
    for name in pngs:
        assert (tune_report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    assert not any((tune_report / f).exists() for f in ("comparison.csv", "accuracy.png", "ablation.tex"))
    again = build_report(STUDY, tracking_uri=tune_store["uri"], out_dir=tmp_path / "again")
    for name in pngs + ("tuning.csv",):
        assert (again / name).read_bytes() == (tune_report / name).read_bytes(), name

    def body(p: Path) -> list[str]:
        return [line for line in p.read_text().splitlines() if not line.startswith(BUILT_PREFIX)]

    assert body(again / "report.md") == body(tune_report / "report.md")


def test_tuning_next_to_run_study_trials(store_uri: str, tmp_path: Path) -> None:
    """An experiment with both: the usual report plus the tuning section after the ablations; a
    default outside the logged search space is left out of the importances, and said so."""
    client = MlflowClient(store_uri)
    exp = client.create_experiment("tune-mixed")
    store.log_run(client, exp, store.trial_tags("s", "kd", "full", 0, False), {"test/union_acc": 0.8})
    space = {"train.lr": FloatDistribution(0.001, 0.1, log=True)}
    store.tune_trial(client, exp, "tune-mixed/kd", "kd", 0, "COMPLETE", 0.70, {"train.lr": 0.5}, space, default=True)
    store.tune_trial(client, exp, "tune-mixed/kd", "kd", 1, "COMPLETE", 0.75, {"train.lr": 0.01}, space)
    store.tune_trial(client, exp, "tune-mixed/kd", "kd", 2, "COMPLETE", 0.72, {"train.lr": 0.002}, space)
    md = (build_report("tune-mixed", tracking_uri=store_uri, out_dir=tmp_path / "out") / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:4] == ["## Comparison", "## Ablations", "## Tuning", "## Failed, missing and duplicate runs"]
    assert "splits: `s`; 3 trials of `harness tune` in 1 Optuna study.\n" in md
    assert "| `tune-mixed/kd` | `kd` | 3 | 3 | 0 | 0 | 70.0 (#0) | 75.0 | #1 | +5.0 |" in md
    assert ("Parameter importances (fANOVA, seed 0, over 2 complete trials; 1 complete trial(s) left out: a value "
            "outside the logged search space (e.g. the default trial)):") in md
    assert ("these importances rest on 2 complete trials (fewer than 20), so they are mostly noise; "
            "optuna-dashboard's importances (PED-ANOVA, so they may rank differently) rest on this study's 3 "
            "complete trials and are no more reliable.") in md
    assert "| `train.lr` | 1.000 |" in md


def test_no_tuning_runs_no_section(store_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(store_uri)
    exp = client.create_experiment("tune-none")
    store.log_run(client, exp, store.trial_tags("s", "kd", "full", 0, False), {"test/union_acc": 0.8})
    out = build_report("tune-none", tracking_uri=store_uri, out_dir=tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "Tuning" not in md and "tuning" not in md and "Optuna" not in md
    assert "splits: `s`.\n" in md
    assert not list(out.glob("tuning*"))
    client.create_experiment("tune-empty")
    with pytest.raises(HarnessError, match="^report: experiment 'tune-empty' has no finished trial runs in"):
        build_report("tune-empty", tracking_uri=store_uri, out_dir=tmp_path / "empty")


def test_tuning_with_only_failed_study_trials(store_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(store_uri)
    exp = client.create_experiment("tune-failed")
    store.log_run(client, exp, store.trial_tags("s", "kd", "full", 0, False), {}, status="FAILED")
    space = {"train.lr": FloatDistribution(0.001, 0.1, log=True)}
    store.tune_trial(client, exp, "tune-failed/kd", "kd", 0, "COMPLETE", 0.70, {"train.lr": 0.01}, space, default=True)
    md = (build_report("tune-failed", tracking_uri=store_uri, out_dir=tmp_path / "out") / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## Tuning", "## Failed, missing and duplicate runs", "## Software"]
    assert "no finished trial run of `harness run-study` (1 failed, killed or still running)" in md
    assert "| `s/kd/seed0` | FAILED (exception) | RuntimeError: failed on purpose | no: not in the tables |" in md
    assert "| `tune-failed/kd` | `kd` | 1 | 1 | 0 | 0 | 70.0 (#0) | 70.0 | #0 | +0.0 |" in md
    assert "Parameter importances: not computed (fewer than 2 complete trials (1))." in md


def test_importances_of_20_complete_trials_carry_no_warning(store_uri: str) -> None:
    """The other side of the threshold: 20 COMPLETE trials (and a pruned one) rank without a caveat."""
    assert FEW_TRIALS == 20
    client = MlflowClient(store_uri)
    exp = client.create_experiment("tune-many")
    space = {"methods.kd.T": FloatDistribution(1.0, 8.0), "train.lr": FloatDistribution(0.001, 0.1, log=True)}
    for n in range(21):
        T, lr = 1.0 + 7 * n / 20, 0.001 * 100 ** ((n * 7 % 20) / 20)
        state = "PRUNED" if n == 20 else "COMPLETE"
        store.tune_trial(client, exp, "tune-many/kd", "kd", n, state, 0.5 + 0.02 * T, {"methods.kd.T": T,
                         "train.lr": lr}, space, default=n == 0, steps=1)
    td = load_tuning(store_uri, exp, curves=False)
    imp = param_importances(td, "tune-many/kd")
    assert imp.n_trials == 20 and list(imp.values)[0] == "methods.kd.T"
    md = "\n".join(tuning_markdown(td, {"tune-many/kd": imp}, []))
    assert "Parameter importances (fANOVA, seed 0, over 20 complete trials):\n\n| Parameter | Importance |" in md
    assert "Too few trials" not in md and "optuna-dashboard" not in md


@pytest.mark.parametrize(("used", "complete", "expected"), [
    (19, 19, "rest on 19 complete trials (fewer than 20), so they are mostly noise; optuna-dashboard's importances "
             "(PED-ANOVA, so they may rank differently) rest on this study's 19 complete trials and are no more "
             "reliable.\n"),
    (19, 20, "rest on 19 complete trials (fewer than 20), so they are mostly noise.\n"),  # the dashboard has 20
    (20, 20, None),
    (2, 0, None),  # not computed: nothing to warn about
])
def test_few_trials_warning_threshold(used: int, complete: int, expected: str | None) -> None:
    imp = Importances({"a": 0.7, "b": 0.3} if complete else {}, used, "")
    text = few_trials_warning(imp, complete)
    if expected is None:
        assert text == ""
    else:
        assert text.startswith("**Too few trials to rank parameters:** these importances ") and text.endswith(expected)
