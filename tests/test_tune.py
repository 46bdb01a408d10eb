"""``harness tune`` end to end: real Optuna storages, real worker processes, a real MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import tests.plugins_for_tests  # noqa: F401  (registers the test methods here; workers use HARNESS_PLUGINS)
from harness.cli import main
from harness.config import dump_study, load_study
from harness.scheduler import Slot
from harness.store import DEFAULT, OWNER, RETRY_OF, SURPLUS
from harness.tracking import Tracker
from harness.tune import TuneJob, counted, run_tune_job, storage_for
from tests.conftest import TINY, isolated_dir, write_study
from tests.waiting import bound, wait_for

REPO = Path(__file__).resolve().parents[1]
SEARCH = {
    "trials": 5,
    "space": {"methods.kd.T": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
              "train.lr": {"type": "float", "low": 3.0e-4, "high": 1.0e-2, "log": True}},
    "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 3},
    "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
}


#: trials that last a while whatever the machine (each sleeps 1.5-2.5 s when built): for the
#: tests that stop a search while a trial runs
SLOW = {"methods": {"test_sleep": {"seconds": 2.0}}, "train": {"epochs": 2, "batch_size": 128}, "seeds": [0]}
SLOW_SEARCH = {"space": {"methods.test_sleep.seconds": {"type": "float", "low": 1.5, "high": 2.5}},
               "pruner": {"type": "none"}}


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "HARNESS_CACHE": str(tmp / "cache"),
            "PYTHONPATH": str(REPO), "HARNESS_PLUGINS": "tests.plugins_for_tests", "GIT_PYTHON_REFRESH": "quiet"}


def _trials(storage: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=storage_for(storage)).get_trials(deepcopy=False)


def _runs(tmp: Path, kind: str, experiment: str = "tiny") -> list:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=5000) if r.data.tags.get("harness.kind") == kind]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search of kd's T and the learning rate (5 trials x 2 seeds), then its tuned study."""
    tmp = tmp_path_factory.mktemp("tune")
    with isolated_dir(tmp):
        study = write_study(tmp / "tiny.yaml", train={"epochs": 3, "batch_size": 128}, search=SEARCH)
        code = main(["tune", str(study), "--no-report"])
        yield code, tmp, study


def test_search_completes_with_the_default_first(searched):
    code, tmp, _ = searched
    assert code == 0
    trials = _trials(str(tmp / "results/tiny/tune.journal"), "tiny/kd")
    assert len(trials) == 5 and [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    first = trials[0]
    assert first.user_attrs[DEFAULT] is True and first.state == TrialState.COMPLETE
    assert first.params == {"methods.kd.T": 1.0, "train.lr": 0.001}  # the study's own values
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5


def test_objective_is_the_mean_validation_accuracy_of_the_seed_runs(searched):
    _, tmp, _ = searched
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    trials = {t.number: t for t in _trials(str(tmp / "results/tiny/tune.journal"), "tiny/kd")}
    seed_runs = _runs(tmp, "tune_run")
    for number, t in trials.items():
        if t.state != TrialState.COMPLETE:
            continue
        mine = [r for r in seed_runs if r.data.tags["harness.optuna_number"] == str(number)]
        assert sorted(r.data.tags["harness.seed"] for r in mine) == ["0", "1"]
        last = [max(client.get_metric_history(r.info.run_id, "val/union_acc"), key=lambda m: m.step).value
                for r in mine]
        assert t.value == pytest.approx(float(np.mean(last)), abs=1e-12)
        for r in mine:  # a seed run trains the trial's configuration
            assert float(r.data.params["params.T"]) == pytest.approx(t.params["methods.kd.T"])
            assert float(r.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])


def test_tuning_never_evaluates_the_test_split(searched):
    _, tmp, _ = searched
    for r in _runs(tmp, "tune_run") + _runs(tmp, "tune_trial"):
        assert not [k for k in r.data.metrics if k.startswith(("test/", "diag/"))], r.info.run_name


def test_mlflow_has_a_parent_and_one_child_per_optuna_trial(searched):
    _, tmp, _ = searched
    (parent,) = _runs(tmp, "search")
    assert parent.info.status == "FINISHED" and parent.data.tags["harness.optuna_studies"] == "tiny/kd"
    children = _runs(tmp, "tune_trial")
    assert sorted(int(r.data.tags["harness.optuna_number"]) for r in children) == [0, 1, 2, 3, 4]
    trials = {t.number: t for t in _trials(str(tmp / "results/tiny/tune.journal"), "tiny/kd")}
    for r in children:
        t = trials[int(r.data.tags["harness.optuna_number"])]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["harness.optuna_state"] == t.state.name and r.info.status == "FINISHED"
        assert r.data.metrics["objective"] == pytest.approx(t.value if t.state == TrialState.COMPLETE
                                                            else t.intermediate_values[max(t.intermediate_values)])
        assert float(r.data.params["methods.kd.T"]) == pytest.approx(t.params["methods.kd.T"])
    for r in _runs(tmp, "tune_run"):
        assert r.data.tags["mlflow.parentRunId"] in {c.info.run_id for c in children}


def test_optuna_names_its_value_and_links_each_trial_to_its_mlflow_runs(searched):
    """What optuna-dashboard shows: the value's name, the study file as study attributes, and per
    trial its MLflow run, the search run above it and its seed runs in training order."""
    _, tmp, study = searched
    ostudy = optuna.load_study(study_name="tiny/kd", storage=storage_for(str(tmp / "results/tiny/tune.journal")))
    assert ostudy.metric_names == ["val_union_acc"]
    attrs = ostudy.user_attrs
    assert yaml.safe_load(attrs["study_yaml"]) == yaml.safe_load(dump_study(load_study(study)))
    assert attrs["search_space"] == {"methods.kd.T": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
                                     "train.lr": {"type": "float", "low": 3.0e-4, "high": 1.0e-2, "log": True}}
    assert (attrs["study_file"], attrs["method"], attrs["objective"], attrs["trials"]) == (str(study), "kd",
                                                                                          "val_last", 5)
    assert (attrs["splits"], attrs["seeds"], attrs["sampler"]["n_startup_trials"]) == (["2x5"], [0, 1], 3)
    assert attrs["objective_description"].startswith("mean over 2 run(s) (splits 2x5 x seeds 0, 1) of the "
                                                     "validation union accuracy after the last epoch")
    exp = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_experiment_by_name("tiny").experiment_id
    assert attrs["mlflow_experiment_id"] == exp and attrs["mlflow_tracking_uri"] == f"sqlite:///{tmp}/mlflow.db"
    runs = {int(r.data.tags["harness.optuna_number"]): r for r in _runs(tmp, "tune_trial")}
    seed_runs = _runs(tmp, "tune_run")
    (parent,) = _runs(tmp, "search")
    for t in ostudy.get_trials():
        run = runs[t.number]
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id and t.user_attrs["mlflow_experiment_id"] == exp
        assert t.user_attrs["mlflow_run_path"] == f"#/experiments/{exp}/runs/{run.info.run_id}"
        assert "mlflow_run_url" not in t.user_attrs  # a sqlite store has no server to link to
        assert t.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
        mine = sorted((r for r in seed_runs if r.data.tags["mlflow.parentRunId"] == run.info.run_id),
                      key=lambda r: r.info.start_time)
        assert t.user_attrs["mlflow_seed_run_ids"] == [r.info.run_id for r in mine] and mine
        assert [r.data.tags["harness.seed"] for r in mine] == ["0", "1"][: len(mine)]


def test_run_links_name_a_servers_url_without_credentials():
    from harness.tune import run_links

    assert run_links("https://bob:pw@mlflow.example:5000/", "7", "abc", "p1") == {
        "mlflow_run_id": "abc", "mlflow_experiment_id": "7", "mlflow_run_path": "#/experiments/7/runs/abc",
        "mlflow_run_url": "https://mlflow.example:5000/#/experiments/7/runs/abc", "mlflow_parent_run_id": "p1"}


def test_tuned_study_file_runs_through_run_study(searched):
    _, tmp, study = searched
    out = tmp / "tiny.tuned.yaml"
    text = out.read_text()
    assert text.startswith("# Tuned by `harness tune")
    tuned = load_study(out)
    trials = _trials(str(tmp / "results/tiny/tune.journal"), "tiny/kd")
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    assert tuned.name == "tiny-tuned" and tuned.search is None
    assert tuned.methods["kd"]["T"] == best.params["methods.kd.T"] and tuned.train.lr == best.params["train.lr"]
    assert main(["run-study", str(out), "--no-report"]) == 0
    runs = _runs(tmp, "trial", "tiny-tuned")
    kd = [r for r in runs if r.data.tags["harness.method"] == "kd"]
    assert len(kd) == 2 and all(r.info.status == "FINISHED" for r in kd)
    assert float(kd[0].data.params["params.T"]) == pytest.approx(best.params["methods.kd.T"])


def test_running_again_resumes_and_extends(searched):
    """A finished search run again does nothing new; --trials extends it by the difference."""
    _, tmp, study = searched
    assert main(["tune", str(study), "--no-report"]) == 0
    journal = str(tmp / "results/tiny/tune.journal")
    assert len(_trials(journal, "tiny/kd")) == 5
    assert main(["tune", str(study), "--no-report", "--trials", "6"]) == 0
    trials = _trials(journal, "tiny/kd")
    assert len(trials) == 6 and trials[5].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert sum(bool(t.user_attrs.get(DEFAULT)) for t in trials) == 1


def test_pruned_trials_are_visible_in_optuna_and_mlflow(isolated):
    search = {**SEARCH, "trials": 2, "pruner": {"type": "threshold", "lower": 1.01, "n_warmup_steps": 2}}
    study = write_study(isolated / "tiny.yaml", train={"epochs": 3, "batch_size": 128}, search=search)
    assert main(["tune", str(study), "--no-report"]) == 1  # nothing completed: no tuned study
    assert not (isolated / "tiny.tuned.yaml").exists()
    trials = _trials(str(isolated / "results/tiny/tune.journal"), "tiny/kd")
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)  # pruned at epoch 2 of the first seed
    for r in _runs(isolated, "tune_trial"):
        assert r.data.tags["harness.optuna_state"] == "PRUNED" and r.info.status == "FINISHED"
        assert "pruned at step 2" in r.data.tags["harness.pruned"]
    seeds = _runs(isolated, "tune_run")
    assert len(seeds) == 2  # the second seed never started
    for r in seeds:
        assert r.info.status == "KILLED" and r.data.tags["harness.failure_kind"] == "pruned"
    for r in seeds:  # the two epochs before pruning were logged, each one a validation accuracy
        hist = MlflowClient().get_metric_history(r.info.run_id, "val/union_acc")
        assert sorted(h.step for h in hist) == [1, 2]
        assert all(h.value * 135 == pytest.approx(round(h.value * 135), abs=1e-3) for h in hist)  # 135 val images


def test_only_validation_data_reaches_the_objective(isolated):
    """Two data sets that differ only in their test images and labels give the same objective,
    to the last bit, and the same validation curves."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (600, 8, 8), dtype=np.uint8)
    y = np.arange(600) % 4
    x[np.arange(600), y, y] = 255  # a learnable mark
    xt, yt = x[:100].copy(), y[:100].copy()
    np.savez(isolated / "a.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    np.savez(isolated / "b.npz", x_train=x, y_train=y, x_test=rng.integers(0, 256, (100, 8, 8), dtype=np.uint8),
             y_test=rng.permutation(yt))
    values = []
    for root in ("a.npz", "b.npz"):
        data = {**TINY, "dataset": {"name": "npz", "root": str(isolated / root), "val_fraction": 0.2},
                "splits": [{"name": "2x2", "tasks": [[0, 1], [2, 3]]}], "train": {"epochs": 2, "batch_size": 64},
                "search": SEARCH}
        path = isolated / f"{root}.yaml"
        path.write_text(yaml.safe_dump(data))
        study = load_study(path)
        from harness.search import SearchPlan
        from harness.trial import prepare_teachers
        from harness.grid import build_splits

        plan = SearchPlan(study)
        prepare_teachers(study, build_splits(study)["2x2"])
        storage = str(isolated / f"{root}.journal")
        ostudy = optuna.create_study(storage=storage_for(storage), study_name="s", direction="maximize")
        trial = ostudy.ask()
        tracker = Tracker()
        exp = tracker.experiment("tiny")
        run_id = tracker.start(exp, "t", {"harness.kind": "tune_trial"})
        cfg = plan.study_for("kd", {})
        job = TuneJob(cfg, "kd", plan.params_for("kd", cfg), plan.units(), trial.number, trial._trial_id, storage,
                      "s", plan.search.pruner, "val_last", tracker.uri, exp, run_id)
        out = run_tune_job(job, Slot("cpu#0", "cpu", "", 1, "cpu"))
        assert out["state"] == "COMPLETE"
        curves = ostudy.get_trials()[0].intermediate_values
        values.append((out["values"], curves))
    assert values[0] == values[1]
    assert 0 < np.mean(values[0][0]) <= 1


def test_a_killed_worker_fails_its_trial_and_the_configuration_is_rerun(isolated, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
    search = {"trials": 2, "space": {"methods.test_kill_once.T": {"type": "float", "low": 0.5, "high": 2}},
              "pruner": {"type": "none"}}
    study = write_study(isolated / "tiny.yaml", methods={"test_kill_once": {"marker": str(isolated / "m")}},
                        train={"epochs": 2, "batch_size": 128}, seeds=[0], search=search)
    assert main(["tune", str(study), "--no-report", "--workers", "1"]) == 0
    trials = _trials(str(isolated / "results/tiny/tune.journal"), "tiny/test_kill_once")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs[RETRY_OF] == 0 and trials[1].params == trials[0].params == {"methods.test_kill_once.T": 1.0}
    assert "worker died" in trials[0].user_attrs["harness.failure"]
    assert len(counted(trials)) == 2
    runs = {int(r.data.tags["harness.optuna_number"]): r for r in _runs(isolated, "tune_trial")}
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["harness.failure_kind"] == "worker_died"
    assert runs[1].data.tags["harness.retry_of"] == "0" and runs[1].info.status == "FINISHED"
    assert not [r for r in _runs(isolated, "tune_run") if r.info.status == "RUNNING"]


def _run_tune(tmp: Path, study: Path, timeout: float = 300) -> tuple[int, str]:
    """``harness tune`` in a subprocess; if it hangs, its threads' tracebacks (faulthandler on
    SIGABRT) go into the assertion message."""
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "harness.cli", "tune", str(study),
                             "--no-report"], cwd=tmp, env=_env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=bound(timeout))[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        raise AssertionError(f"harness tune hung:\n{proc.communicate()[0]}") from None
    return proc.returncode, out


def test_a_killed_search_resumes_with_its_stale_trials_rerun(isolated):
    study = write_study(isolated / "tiny.yaml", **SLOW, search={**SLOW_SEARCH, "trials": 4})
    journal = str(isolated / "results/tiny/tune.journal")
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "tune", str(study), "--no-report"],
                            cwd=isolated, env=_env(isolated), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def one_done_one_running() -> bool:
        if not Path(journal).exists():
            return False
        try:
            states = [t.state for t in _trials(journal, "tiny/test_sleep")]
        except KeyError:
            return False
        return TrialState.COMPLETE in states and TrialState.RUNNING in states

    try:
        wait_for("one trial complete and one running", one_done_one_running, proc=proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    running = [t.number for t in _trials(journal, "tiny/test_sleep") if t.state == TrialState.RUNNING]
    assert running
    code, out = _run_tune(isolated, study)
    assert code == 0, out
    assert "stale: its process" in out
    trials = _trials(journal, "tiny/test_sleep")
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len([t for t in counted(trials) if t.state == TrialState.COMPLETE]) == 4
    for n in running:  # each stale trial failed, and its configuration ran again
        assert trials[n].state == TrialState.FAIL
        (retry,) = [t for t in trials if t.user_attrs.get(RETRY_OF) == n]
        assert retry.params == trials[n].params and retry.state == TrialState.COMPLETE
    runs = _runs(isolated, "tune_trial") + _runs(isolated, "tune_run")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    stale = [r for r in _runs(isolated, "tune_trial") if int(r.data.tags["harness.optuna_number"]) in running]
    assert stale and all(r.info.status == "KILLED" and r.data.tags["harness.failure_kind"] == "stale" for r in stale)
    assert (isolated / "tiny.tuned.yaml").exists()


def test_two_processes_share_one_journal_without_lost_or_duplicated_trials(isolated):
    study = write_study(isolated / "tiny.yaml", train={"epochs": 2, "batch_size": 128},
                        search={**SEARCH, "trials": 6})
    # the teachers once, so both searches start at the same time
    assert main(["run-study", str(write_study(isolated / "t.yaml", methods={"teachers": {}})), "--no-report"]) == 0
    cmd = [sys.executable, "-m", "harness.cli", "tune", str(study), "--no-report", "--workers", "1"]
    procs = [subprocess.Popen(cmd, cwd=isolated, env=_env(isolated), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=bound())[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _trials(str(isolated / "results/tiny/tune.journal"), "tiny/kd")
    done = counted(trials)
    assert len(done) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in done)
    assert all(t.user_attrs.get(SURPLUS) for t in trials if t not in done)  # only surplus asks are left over
    assert sum(bool(t.user_attrs.get(DEFAULT)) for t in trials) == 1
    assert len({t.user_attrs[OWNER] for t in done}) == 2  # both processes ran trials
    runs = _runs(isolated, "tune_trial")
    numbers = sorted(int(r.data.tags["harness.optuna_number"]) for r in runs)
    assert numbers == sorted(t.number for t in done)  # one MLflow run per trial, none twice
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(_runs(isolated, "search")) == 2


def _search(tmp: Path, stale_after: float = 300.0):
    from harness.scheduler import LocalPool, build_slots
    from harness.search import SearchPlan
    from harness.tune import Search

    study = load_study(write_study(tmp / "tiny.yaml", search=SEARCH))
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
    pool = LocalPool(build_slots("cpu", cores=1))
    return Search(SearchPlan(study), str(tmp / "tune.journal"), tracker, tracker.experiment("tiny"), pool, 5,
                  stale_after)


def test_trials_of_another_host_go_stale_without_heartbeat(isolated):
    search = _search(isolated, stale_after=60)
    study = search.studies["kd"]
    quiet, beating = study.ask(), study.ask()  # the default, then a sampled configuration
    for t, beat in ((quiet, time.time() - 600), (beating, time.time() - 5)):
        t.set_user_attr(OWNER, "elsewhere:4242")
        t.set_user_attr("harness.heartbeat", beat)
    assert search.fail_stale() == 1
    trials = study.get_trials()
    assert trials[quiet.number].state == TrialState.FAIL and trials[beating.number].state == TrialState.RUNNING
    (retry,) = [t for t in trials if t.user_attrs.get(RETRY_OF) == quiet.number]
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == trials[quiet.number].params
    assert search.fail_stale() == 0  # settled once, not again


def test_a_run_left_running_after_its_trial_ended_takes_optunas_state(isolated):
    search = _search(isolated)
    study = search.studies["kd"]
    t = study.ask()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is gone
    t.set_user_attr(OWNER, f"{os.uname().nodename}:{dead.pid}")
    run = search.tracker.start(search.exp, "kd/optuna0", {
        "harness.kind": "tune_trial", "harness.optuna_study": study.study_name, "harness.optuna_number": t.number,
        "harness.owner": f"{os.uname().nodename}:{dead.pid}", "harness.optuna_state": "RUNNING"})
    study.tell(t, 0.75)  # the killed search told Optuna, then died before ending its MLflow run
    search.fail_stale()
    r = search.tracker.run(run)
    assert r.info.status == "FINISHED" and r.data.tags["harness.optuna_state"] == "COMPLETE"
    assert r.data.metrics["objective"] == 0.75


def test_an_rdb_url_storage_works_like_the_journal(isolated):
    """``--storage sqlite:///...`` (any SQLAlchemy URL: postgresql://, mysql://) for clusters."""
    study = write_study(isolated / "tiny.yaml", train={"epochs": 2, "batch_size": 128}, seeds=[0],
                        search={**SEARCH, "trials": 2, "pruner": {"type": "none"}})
    url = f"sqlite:///{isolated}/optuna.db"
    assert main(["tune", str(study), "--no-report", "--storage", url]) == 0
    assert not (isolated / "results/tiny/tune.journal").exists()
    trials = optuna.load_study(study_name="tiny/kd", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].user_attrs[DEFAULT] is True
    (parent,) = _runs(isolated, "search")
    assert parent.data.tags["harness.storage"] == url
    assert main(["tune", str(study), "--no-report", "--storage", url, "--trials", "3"]) == 0  # resumes there
    assert len(optuna.load_study(study_name="tiny/kd", storage=url).get_trials()) == 3


def test_stopping_the_search_fails_the_running_trials_and_queues_them_for_the_next_run(isolated, monkeypatch):
    """SIGTERM (a batch system stopping the job) is handled like Ctrl-C. (SIGINT itself is ignored by
    processes started from a non-interactive shell's background job, as CI may run us.)"""
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
    study = write_study(isolated / "tiny.yaml", **SLOW, search={**SLOW_SEARCH, "trials": 3})
    journal = str(isolated / "results/tiny/tune.journal")
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "tune", str(study), "--no-report"],
                            cwd=isolated, env=_env(isolated), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running() -> bool:
        try:
            return any(t.state == TrialState.RUNNING for t in _trials(journal, "tiny/test_sleep"))
        except (KeyError, FileNotFoundError):
            return False

    wait_for("a running trial", running, proc=proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=bound(120))[0]
    assert proc.returncode == 130, out
    trials = _trials(journal, "tiny/test_sleep")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and not [t for t in trials if t.state == TrialState.RUNNING]
    for t in failed:  # each interrupted configuration waits to run again
        retries = [r for r in trials if r.user_attrs.get(RETRY_OF) == t.number]
        assert len(retries) == 1, (t.number, t.user_attrs, out, [(r.number, r.state, r.user_attrs) for r in trials])
        retry = retries[0]
        assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == t.params
    runs = {int(r.data.tags["harness.optuna_number"]): r for r in _runs(isolated, "tune_trial")}
    for t in failed:  # (no run when Ctrl-C came before it was opened)
        if t.number in runs:
            r = runs[t.number]
            assert (r.info.status, r.data.tags.get("harness.failure_kind")) == ("KILLED", "interrupted"), (
                t.number, r.data.tags, out)
    assert not [r for r in _runs(isolated, "tune_trial") + _runs(isolated, "tune_run") if r.info.status == "RUNNING"]
    (parent,) = _runs(isolated, "search")
    assert parent.info.status == "KILLED"
    assert main(["tune", str(study), "--no-report"]) == 0
    trials = _trials(journal, "tiny/test_sleep")
    assert len(counted(trials)) == 3 and all(t.state == TrialState.COMPLETE for t in counted(trials))


def test_a_stop_that_lands_as_optuna_hands_out_a_trial_still_fails_and_queues_it(isolated, monkeypatch):
    """The flake of the hunt (1 round of 3 beside two busy processes): SIGTERM arrived while the
    search asked Optuna for its second trial. ``ask`` had made it RUNNING in the storage, but the
    KeyboardInterrupt came before the search knew of it, so it stayed RUNNING for ever, queued for
    nothing. Here the signal lands exactly there, every time: as ``ask`` returns."""
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
    study = write_study(isolated / "tiny.yaml", **SLOW, search={**SLOW_SEARCH, "trials": 3})
    journal = str(isolated / "results/tiny/tune.journal")
    real_ask = optuna.Study.ask
    asked = []

    def ask(self, *args, **kwargs):
        trial = real_ask(self, *args, **kwargs)
        asked.append(trial.number)
        if len(asked) == 2:  # the first trial runs; the second is RUNNING in the storage now
            os.kill(os.getpid(), signal.SIGTERM)
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask)
    assert main(["tune", str(study), "--no-report"]) == 130
    trials = _trials(journal, "tiny/test_sleep")
    assert asked == [0, 1] and not [t for t in trials if t.state == TrialState.RUNNING], \
        [(t.number, t.state) for t in trials]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == [0, 1]  # the one running and the one just handed out
    for t in failed:
        (retry,) = [r for r in trials if r.user_attrs.get(RETRY_OF) == t.number]
        assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == t.params
    assert not [r for r in _runs(isolated, "tune_trial") if r.info.status == "RUNNING"]
    monkeypatch.setattr(optuna.Study, "ask", real_ask)
    assert main(["tune", str(study), "--no-report"]) == 0
    assert len(counted(_trials(journal, "tiny/test_sleep"))) == 3


@pytest.mark.parametrize("storage", ["/proc/nope/x.journal", "sqlite:////proc/nope/x.db"])
def test_a_storage_that_cannot_be_opened_is_one_line_and_creates_nothing(isolated, capsys, storage):
    study = write_study(isolated / "tiny.yaml", search=SEARCH)
    assert main(["tune", str(study), "--storage", storage]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"harness: error: --storage: cannot open '{storage}': ") and "\n" not in err
    assert not (isolated / "mlflow.db").exists() and not (isolated / "results").exists()


def test_a_journal_lock_left_by_a_killed_search_can_be_found_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's journal lock is a symlink to the journal path as given. With a relative path it
    dangled, so a lock left by a search killed inside a write was never seen as stale (its age is
    read through the link) and the next search spun on it at 100% CPU, forever."""
    monkeypatch.chdir(tmp_path)
    storage = storage_for("results/x/tune.journal")
    lock, lock_file = storage._backend._lock, tmp_path / "results/x/tune.journal.lock"
    assert lock.acquire()
    try:  # what a SIGKILL between acquire and release leaves behind
        assert lock_file.is_symlink()
        assert lock_file.exists(), f"the lock points nowhere: {os.readlink(lock_file)}"
        assert os.stat(lock_file).st_mtime == os.stat(tmp_path / "results/x/tune.journal").st_mtime
    finally:
        lock.release()
    assert not lock_file.is_symlink()


def test_the_report_after_a_search_says_whether_it_reproduced_the_committed_one(searched, capsys):
    """``harness tune`` builds the study's report at the end; over a committed report (as
    ``results/digits-tune`` is), it says in one line whether every accuracy cell reproduced, as
    ``run-study`` and ``harness report`` do."""
    import shutil

    from harness.tune import _print_report

    _, tmp, _ = searched
    if shutil.which("git") is None:
        pytest.skip("no git")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    with isolated_dir(tmp):
        uri = f"sqlite:///{tmp}/mlflow.db"
        _print_report("tiny", uri)
        assert "reproduced" not in capsys.readouterr().out  # nothing committed yet
        subprocess.run([*git, "init", "-q"], cwd=tmp, check=True)
        subprocess.run([*git, "add", "results/tiny"], cwd=tmp, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "the tuned report"], cwd=tmp, check=True)
        _print_report("tiny", uri)
        out = capsys.readouterr().out
    assert "report written to" in out and "reproduced: every accuracy cell equals the committed report" in out
