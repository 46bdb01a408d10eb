"""``harness benchmark`` end to end: a tiny two-task suite through every phase on a real MLflow
store and a real Optuna journal, killed with SIGKILL once while tuning and once while evaluating,
then resumed; and the suite file's errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import tests.plugins_for_tests  # noqa: F401  (test_sleep: slow trials to stop the suite in)
from harness.benchmark import Benchmark, benchmark
from harness.cli import main
from harness.methods.base import get_method
from harness.store import TAG
from harness.tune import counted, storage_for
from tests.conftest import TINY, isolated_dir
from tests.waiting import bound, wait_for

REPO = Path(__file__).resolve().parents[1]
TRIALS = 3
TUNE_SEEDS, EVAL_SEEDS = [0], [10, 11, 12, 13, 14]
THREE = {**TINY, "name": "tiny3", "splits": [{"name": "3x", "tasks": [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]}],
         "teachers": [{"arch": "mlp", "hidden": 32, "epochs": 3}]}
SUITE = {
    "name": "mini",
    "tasks": [{"name": "two", "study": "tiny.yaml"}, {"name": "three", "study": THREE}],
    # test_sleep: each of its trials lasts 2 s, so a kill lands while one runs, however fast the machine
    "methods": {"kd": {}, "test_sleep": {"seconds": 2.0}},
    "train": {"epochs": 1},
    "budget": {"trials": TRIALS, "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
    "seeds": {"tune": TUNE_SEEDS, "evaluate": EVAL_SEEDS},
}


def _runs(uri: str, kind: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mini")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.tags.get(f"{TAG}kind") == kind]


def _killed_when(cmd: list[str], env: dict[str, str], what: str, cond: Any) -> None:
    """Start ``harness benchmark``, wait for ``cond``, SIGKILL it (its workers die with it)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(what, cond, proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(bound(60))
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The suite killed mid-tune, killed mid-evaluate, then run to the end in this process."""
    tmp = tmp_path_factory.mktemp("bench")
    with isolated_dir(tmp) as mp:
        mp.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
        (tmp / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
        path = tmp / "mini.yaml"
        path.write_text(yaml.safe_dump(SUITE, sort_keys=False))
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "PYTHONPATH": str(REPO), "GIT_PYTHON_REFRESH": "quiet"}
        cmd = [sys.executable, "-m", "harness.cli", "benchmark", str(path), "--workers", "2"]

        def midway(kind: str) -> Any:
            """One run of ``kind`` finished and a slow one running."""
            def cond() -> bool:
                runs = _runs(uri, kind)
                return (any(r.info.status == "FINISHED" for r in runs)
                        and any(r.info.status == "RUNNING" and r.data.tags[f"{TAG}method"] == "test_sleep"
                                for r in runs))
            return cond

        _killed_when(cmd, env, "a finished tuning trial and a running one", midway("tune_trial"))
        killed_tuning = [r.info.run_id for r in _runs(uri, "tune_trial") if r.info.status == "RUNNING"]
        _killed_when(cmd, env, "a finished evaluation trial and a running one", midway("trial"))
        killed_eval = [r.info.run_id for r in _runs(uri, "trial") if r.info.status == "RUNNING"]
        code = benchmark(path, workers=2)
        yield {"code": code, "tmp": tmp, "uri": uri, "path": path, "bench": Benchmark(path),
               "killed": (killed_tuning, killed_eval)}


def _studies(tmp: Path) -> dict[str, optuna.Study]:
    storage = storage_for(str(tmp / "results/mini/tune.journal"))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage)}


def test_every_phase_completes_after_two_kills(suite):
    assert suite["code"] == 0
    killed_tuning, killed_eval = suite["killed"]
    assert killed_tuning and killed_eval  # each kill landed while a trial ran
    for run_id in killed_tuning + killed_eval:  # marked by the resume, not left RUNNING
        assert MlflowClient(suite["uri"]).get_run(run_id).info.status == "KILLED"
    out = suite["tmp"] / "results/mini"
    for f in ("benchmark.md", "budget.csv", "chosen.csv", "seeds.csv", "tuned/leaderboard.md",
              "defaults/leaderboard.md"):
        assert (out / f).is_file(), f
    # the wall time of each phase, summed over the invocations that completed it: the first was
    # killed while tuning (it logged nothing), the second finished tuning and was killed evaluating
    phases = pd.read_csv(out / "phases.csv").set_index("phase")
    assert list(phases.index) == ["tune", "evaluate", "defaults"] and (phases["seconds"] > 0).all()
    assert phases.loc["tune", "invocations"] == 2 and phases.loc["evaluate", "invocations"] == 1
    benchmark_runs = _runs(suite["uri"], "benchmark")
    # the two killed invocations, marked by the next one on this host (their process was gone)
    assert sorted(r.info.status for r in benchmark_runs) == ["FINISHED", "KILLED", "KILLED"]


def test_every_method_and_task_had_the_same_number_of_counted_trials(suite):
    studies = _studies(suite["tmp"])
    names = {f"{t}/{m}" for t in ("two", "three") for m in ("kd", "test_sleep", "scratch")}
    assert set(studies) == names  # scratch, the normaliser, has a budget too
    for name, s in studies.items():
        trials = s.get_trials(deepcopy=False)
        assert len(counted(trials)) == TRIALS, name
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], name
    budget = pd.read_csv(suite["tmp"] / "results/mini/budget.csv")
    assert len(budget) == 6 and set(budget["counted"]) == {TRIALS}
    # the kill cost no budget: the killed trial failed and its configuration ran again
    assert budget["retried"].sum() >= 1
    assert "The budgets were equal" in (suite["tmp"] / "results/mini/benchmark.md").read_text()


def test_evaluation_seeds_are_fresh_read_from_the_runs(suite):
    tune_seeds = {int(r.data.tags[f"{TAG}seed"]) for r in _runs(suite["uri"], "tune_run")}
    eval_seeds = {int(r.data.tags[f"{TAG}seed"]) for r in _runs(suite["uri"], "trial")}
    assert tune_seeds == set(TUNE_SEEDS) and eval_seeds == set(EVAL_SEEDS)
    seeds = pd.read_csv(suite["tmp"] / "results/mini/seeds.csv")
    assert list(seeds["disjoint"]) == [True, True]


def test_tuning_never_sees_the_test_split(suite):
    """The objective is the validation accuracy of the seed runs, and no tuning run was ever given
    test images (a run given them logs test metrics)."""
    client = MlflowClient(suite["uri"])
    tune_runs = _runs(suite["uri"], "tune_run")
    for r in tune_runs + _runs(suite["uri"], "tune_trial"):
        assert not [k for k in r.data.metrics if k.startswith("test/")], r.info.run_name
    by_trial = {(r.data.tags[f"{TAG}optuna_study"], int(r.data.tags[f"{TAG}optuna_number"])): r
                for r in tune_runs if r.info.status == "FINISHED"}
    for name, s in _studies(suite["tmp"]).items():
        for t in s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            run = by_trial[(name, t.number)]
            last = max(client.get_metric_history(run.info.run_id, "val/union_acc"), key=lambda m: m.step).value
            assert t.value == pytest.approx(last, abs=1e-12)  # one tuning seed: the objective is its accuracy


def test_evaluation_ran_the_chosen_configurations_and_defaults_ran_the_declared_ones(suite):
    bench: Benchmark = suite["bench"]
    finished = [r for r in _runs(suite["uri"], "trial") if r.info.status == "FINISHED"]
    keys = [r.data.tags[f"{TAG}trial_key"] for r in finished]
    assert len(keys) == len(set(keys)), "a trial ran twice"
    studies = _studies(suite["tmp"])
    for task in bench.tasks:
        tuned, defaults = bench.keys(task)
        assert set(tuned) | set(defaults) <= set(keys), "an evaluation or defaults trial is missing"
        for method in task.tuned:
            best = max((t for t in studies[f"{task.name}/{method}"].get_trials(deepcopy=False)
                        if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
            runs = [r for r in finished if r.data.tags[f"{TAG}trial_key"] in tuned
                    and r.data.tags[f"{TAG}method"] == method]
            assert sorted(int(r.data.tags[f"{TAG}seed"]) for r in runs) == EVAL_SEEDS
            for r in runs:  # the run trained the chosen values
                for p, v in best.params.items():
                    name = f"params.{p.split('.', 2)[2]}" if p.startswith("methods.") else p
                    assert float(r.data.params[name]) == pytest.approx(v), (method, p)
        for r in finished:
            if r.data.tags[f"{TAG}trial_key"] not in defaults or r.data.tags[f"{TAG}method"] in ("teachers",):
                continue
            method = r.data.tags[f"{TAG}method"]
            declared = get_method(method).ParamsModel(**SUITE["methods"].get(method, {})).model_dump(mode="json")
            for p, v in declared.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert float(r.data.params[f"params.{p}"]) == pytest.approx(v), (method, p)
            assert float(r.data.params["train.lr"]) == TINY.get("train", {}).get("lr", 1e-3)
            assert float(r.data.params["train.lr_mult.head"]) == 1.0
    chosen = pd.read_csv(suite["tmp"] / "results/mini/chosen.csv")
    assert len(chosen) == 6 and chosen["trial"].notna().all()
    for row in chosen.itertuples(index=False):
        assert row.val == pytest.approx(max(t.value for t in studies[f"{row.task}/{row.method}"].get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,))))
        assert json.loads(row.params) == studies[f"{row.task}/{row.method}"].trials[int(row.trial)].params


def test_the_report_has_both_boards_with_verdicts(suite):
    md = (suite["tmp"] / "results/mini/benchmark.md").read_text()
    assert "## Tuned: verdicts" in md and "## Defaults: verdicts" in md and "## What tuning changed" in md
    for board in ("tuned", "defaults"):
        pairs = pd.read_csv(suite["tmp"] / f"results/mini/{board}/leaderboard_pairs.csv")
        assert set(pairs["verdict"]) <= {"ahead", "behind", "inconclusive"}
        assert {"kd", "test_sleep", "scratch"} <= set(pairs["x"])


def test_a_finished_suite_reruns_nothing(suite, capsys):
    capsys.readouterr()
    before = len(_runs(suite["uri"], "trial")) + len(_runs(suite["uri"], "tune_trial"))
    with isolated_dir(suite["tmp"]) as mp:
        mp.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
        assert benchmark(suite["path"], phases=["tune", "evaluate", "defaults"], workers=2) == 0
    assert len(_runs(suite["uri"], "trial")) + len(_runs(suite["uri"], "tune_trial")) == before


def test_dry_run_lists_phases_and_counts(suite, capsys):
    capsys.readouterr()
    with isolated_dir(suite["tmp"]):
        assert main(["benchmark", str(suite["path"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "suite mini: 2 tasks" in out
    assert "| two | kd, test_sleep, scratch | 9 | 9 | 15 | 16 |" in out  # 3 methods x 5 seeds; + teachers
    assert "phases: tune 18 trials" in out


@pytest.mark.parametrize("change, message", [
    ({"seeds": {"tune": [0, 1], "evaluate": [1, 2, 3, 4, 5]}},
     "seeds.evaluate: seed 1 is also a tuning seed; evaluation seeds must be fresh"),
    ({"seeds": {"tune": [0], "evaluate": [1, 2, 3]}}, "seeds.evaluate: List should have at least 5 items"),
    ({"methods": ["kd", "nope"]}, "methods.nope: unknown method 'nope'"),
    ({"tasks": [{"study": "tiny.yaml", "split": "9x9"}]}, "tasks[0].split: no split '9x9' in study 'tiny'"),
    ({"tasks": [{"study": "missing.yaml"}]}, "tasks[0].study: study file missing.yaml not found"),
    ({"tasks": [{"study": "tiny.yaml"}, {"study": "tiny.yaml"}]},
     "tasks[1].name: 'tiny-2x5' is also the name of tasks[0]"),
    ({"budget": {"trials": 0}}, "budget.trials: Input should be greater than or equal to 1"),
    ({"tasks": [{"study": "tiny.yaml"}], "colour": "red"}, "bad.yaml: colour: unknown field"),
])
def test_a_bad_suite_is_one_line_and_exit_2(tmp_path, capsys, change, message):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "methods": ["kd"], **change}, sort_keys=False))
    with isolated_dir(tmp_path):
        assert main(["benchmark", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "results").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_parameter_the_suite_fixes_is_searched_over_that_value_only(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    path = tmp_path / "fixed.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "methods": {"kd": {"T": 4.0}, "test_sleep": {"seconds": 0.5}}},
                                   sort_keys=False))
    from harness.search import SearchPlan

    task = Benchmark(path).tasks[0]
    plan = SearchPlan(task.tune)
    assert plan.distributions["methods.kd.T"] == optuna.distributions.CategoricalDistribution([4.0])
    assert plan.defaults("kd")["methods.kd.T"] == 4.0  # the default trial, and the defaults phase, use it
    assert task.defaults.methods["kd"] == {"T": 4.0}
    assert {"train.lr", "train.lr_mult.head"} <= set(plan.paths["kd"])  # the recipe is still searched
    assert "methods.test_sleep.seconds" not in plan.paths["test_sleep"]  # not declared: not searched


SUITES = sorted((REPO / "studies/suites").glob("*.yaml"))


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_every_committed_suite_is_valid_with_distinct_tasks(path: Path) -> None:
    from harness.grid import expand
    from harness.keys import stable_hash

    assert path.read_text().lstrip().startswith("#"), "a committed suite says what it is for"
    bench = Benchmark(path)
    contents = set()
    for task in bench.tasks:
        assert expand(task.defaults) and expand(task.tune)
        for m in task.tuned:
            assert expand(task.evaluation(m, {})), (task.name, m)
        d = task.defaults
        contents.add(stable_hash({"dataset": d.dataset.model_dump(mode="json"),
                                  "split": d.splits[0].model_dump(mode="json", exclude={"name"}),
                                  "teachers": [t.model_dump(mode="json") for t in d.teachers_for(d.splits[0])]}))
    assert len(contents) == len(bench.tasks), "two tasks of the suite are one task under two names"


def test_estimate_calibrates_every_task_and_writes_no_run(tmp_path, capsys):
    """``--estimate``: one row per task with the cost of each phase, a total; it trains nothing and
    opens no experiment of the suite."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    path = tmp_path / "est.yaml"
    path.write_text(yaml.safe_dump({**SUITE, "tasks": SUITE["tasks"][:1], "methods": ["kd"]}, sort_keys=False))
    with isolated_dir(tmp_path):
        assert main(["benchmark", str(path), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "| task | teachers | tune (upper bound) | evaluate | defaults |" in out
    row = next(line for line in out.splitlines() if line.startswith("| two |"))
    assert all(cell.strip() for cell in row.strip("|").split("|"))
    assert "total: about" in out and "at 3 trials x 1 seed(s) without pruning" in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_experiment_by_name("mini") is None
