"""End-to-end tests of ``harness run-study`` on a tiny digits study: the worker pool, failure
isolation and retries, resume after SIGKILL (no duplicate, no lost trial), the Ray backend."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from mlflow.tracking import MlflowClient

import tests.plugins_for_tests  # noqa: F401  (registers the test methods here; workers use HARNESS_PLUGINS)
from harness.cli import main
from harness.methods.base import Batch, Params, register
from harness.runner import run_study
from harness.store import TAG
from harness import tracking
from harness.tracking import tag_seconds
from tests.plugins_for_tests import _KD
from tests.waiting import bound, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCORE = "test/union_acc"
#: workers of the tests below also load the methods this module registers
PLUGINS = "tests.plugins_for_tests,tests.test_runner"


@register("test_finish_then_die")
class FinishesThenDies(_KD):
    """KD whose worker process dies (SIGKILL) right after it ended its run FINISHED, before it
    could send the result back: the moment between ``finish_unique`` and the reply."""

    description = "test: the worker dies after finishing its run"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import multiprocessing

        import harness.trial

        if multiprocessing.parent_process() is None:  # never in the test process itself
            return
        finish = harness.trial.finish_unique

        def finish_then_die(*a: Any) -> None:
            finish(*a)
            os.kill(os.getpid(), signal.SIGKILL)

        harness.trial.finish_unique = finish_then_die


@register("test_bad_term")
class BadTermName(_KD):
    """KD with a loss term MLflow refuses as a metric name (``loss/bad#term``)."""

    terms = {"bad#term": None}
    description = "test: a term whose metric name the store refuses"

    def loss_terms(self, batch: Batch) -> dict[str, Any]:
        return {"bad#term": super().loss_terms(batch)["kd"]}


class ProbeParams(Params):
    out: str


@register("test_det_probe")
class DeterminismProbe(_KD):
    """KD that writes, from inside its training loop, the determinism flags and the cuBLAS
    variable its process really has (to ``out``, once)."""

    ParamsModel = ProbeParams
    description = "test: records the determinism flags seen while training"

    def loss_terms(self, batch: Batch) -> dict[str, Any]:
        path = Path(self.params.out)
        if not path.exists():
            import json

            import torch

            path.write_text(json.dumps({
                "algorithms": torch.are_deterministic_algorithms_enabled(),
                "cudnn_deterministic": torch.backends.cudnn.deterministic,
                "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "pid": os.getpid()}))
        return super().loss_terms(batch)


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    """A working directory with one sqlite store and one teacher cache for the whole module (not
    under pytest's basetemp, which a concurrent pytest session may rotate away)."""
    with tempfile.TemporaryDirectory(prefix="harness-test-runner-") as tmp, pytest.MonkeyPatch.context() as mp:
        where = Path(tmp)
        mp.chdir(where)
        mp.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        yield {"dir": where, "uri": f"sqlite:///{where}/mlflow.db"}


def write_study(env: dict[str, Any], name: str, methods: dict[str, Any], seeds: list[int], **extra: Any) -> Path:
    study = {
        "name": name,
        "dataset": {"name": "digits"},
        "splits": [{"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}],
        "teachers": [{"arch": "mlp", "hidden": 32, "epochs": 3}],
        "student": {"arch": "mlp", "hidden": 32},
        "train": {"epochs": 3, "batch_size": 128},
        "methods": methods,
        "seeds": seeds,
        "cache_dir": str(env["dir"] / "cache"),
        **extra,
    }
    path = env["dir"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def trial_runs(uri: str, study: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return [] if exp is None else client.search_runs([exp.experiment_id], f"tags.`{TAG}kind` = 'trial'")


def study_runs(uri: str, study: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], f"tags.`{TAG}kind` = 'study'")


def finished_by_key(runs: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in runs:
        if r.info.status == "FINISHED":
            out.setdefault(r.data.tags[f"{TAG}trial_key"], []).append(r)
    return out


def intervals(runs: list[Any]) -> list[tuple[float, float, str, str]]:
    return sorted((tag_seconds(r.data.tags[f"{TAG}start"]), tag_seconds(r.data.tags[f"{TAG}end"]), r.data.tags[f"{TAG}slot"],
                   r.data.tags[f"{TAG}pid"]) for r in runs)


def peak_concurrency(spans: list[tuple[float, float, str, str]]) -> int:
    """Most trials running at one moment (a sweep over start and end times; ends sort first)."""
    events = sorted([(start, 1) for start, *_ in spans] + [(end, -1) for _, end, *_ in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


GRID = {"kd": {}, "cka": {}}  # x seeds [0, 1]: four trials


@pytest.fixture(scope="module")
def sequential(env: dict[str, Any]) -> dict[str, float]:
    """The grid run one trial at a time: test/union_acc by trial key."""
    assert run_study(write_study(env, "grid-w1", GRID, [0, 1]), env["uri"], workers=1, report=False, live=False) == 0
    runs = trial_runs(env["uri"], "grid-w1")
    assert peak_concurrency(intervals(runs)) == 1
    return {r.data.tags[f"{TAG}trial_key"]: r.data.metrics[SCORE] for r in runs}


def test_dry_run_prints_the_table_and_runs_nothing(env: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    path = write_study(env, "grid-dry", GRID, [0, 1], ablations=["intra"])
    assert main(["run-study", str(path), "--tracking-uri", env["uri"], "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "cka        -intra" in out and out.count("  no\n") == 6
    assert "6 trials, 0 already finished; pool: 2 CPU slots (1 torch thread each), 2 at a time" in out
    assert MlflowClient(env["uri"]).get_experiment_by_name("grid-dry") is None


def test_two_workers_overlap_and_match_one_worker(env: dict[str, Any], sequential: dict[str, float],
                                                  capsys: pytest.CaptureFixture) -> None:
    path = write_study(env, "grid-w2", GRID, [0, 1])
    assert run_study(path, env["uri"], workers=2, report=False, live=False) == 0
    runs = trial_runs(env["uri"], "grid-w2")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    # The same trials (keys) with the same results, whatever the number of workers.
    assert {r.data.tags[f"{TAG}trial_key"]: r.data.metrics[SCORE] for r in runs} == sequential
    # Two at a time, never more, never two on one slot, one process per trial.
    spans = intervals(runs)
    assert peak_concurrency(spans) == 2
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if a[0] < b[1] and b[0] < a[1]:
                assert a[2] != b[2] and a[3] != b[3]
    assert len({s[3] for s in spans}) == 4
    # The schema: parent link, execution and provenance tags, batched metrics, config artifact.
    (parent,) = study_runs(env["uri"], "grid-w2")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 4
    client = MlflowClient(env["uri"])
    for r in runs:
        tags = r.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags[f"{TAG}attempt"] == "0" and tags[f"{TAG}device"] == "cpu" and tags[f"{TAG}slot"].startswith("cpu#")
        assert {f"{TAG}git_commit", f"{TAG}torch_version", f"{TAG}mlflow_version", f"{TAG}version"} <= set(tags)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", tags[f"{TAG}start"])  # ISO-8601 UTC
        assert tag_seconds(tags[f"{TAG}start"]) < tag_seconds(tags[f"{TAG}end"])
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss/total")] == [1, 2, 3]
        assert r.data.metrics["peak_rss_mb"] > 10
        assert "cuda_max_allocated_mb" not in r.data.metrics and "gpu_peak_mb" not in r.data.metrics
        assert tags[f"{TAG}deterministic"] == "false"  # the study file's default
        assert r.data.params["seed"] == tags[f"{TAG}seed"]
        assert "trial.yaml" in [a.path for a in client.list_artifacts(r.info.run_id)]
    # Rerunning skips every finished trial; changing a parameter reruns only the trials it affects.
    capsys.readouterr()
    assert run_study(path, env["uri"], workers=2, report=False, live=False) == 0
    assert "4 trials, 4 already finished" in capsys.readouterr().out
    assert len(trial_runs(env["uri"], "grid-w2")) == 4
    write_study(env, "grid-w2", {"kd": {"T": 4.0}, "cka": {}}, [0, 1])
    assert run_study(path, env["uri"], dry_run=True) == 0
    table = capsys.readouterr().out
    assert [line.split()[1] for line in table.splitlines() if line.endswith("  no")] == ["kd", "kd"]
    assert "4 trials, 2 already finished" in table


def test_failing_trials_do_not_stop_the_others(env: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    marker = env["dir"] / "flaky.marker"
    methods = {"test_raise": {}, "test_nan": {}, "test_kill": {}, "kd": {}, "test_flaky": {"marker": str(marker)}}
    path = write_study(env, "failures", methods, [0], max_retries=1)
    assert run_study(path, env["uri"], workers=2, report=False, live=False) == 1
    out = capsys.readouterr().out
    assert "done: 2 finished, 3 failed, 0 skipped" in out
    runs = trial_runs(env["uri"], "failures")
    by_method: dict[str, list[tuple[str, str, str, str]]] = {}
    for r in runs:
        t = r.data.tags
        by_method.setdefault(t[f"{TAG}method"], []).append(
            (t[f"{TAG}attempt"], r.info.status, t.get(f"{TAG}failure_kind", ""), t.get(f"{TAG}failure", "")))
    for m in by_method:
        by_method[m].sort()
    assert by_method["kd"] == [("0", "FINISHED", "", "")]
    assert [a[:3] for a in by_method["test_flaky"]] == [("0", "FAILED", "exception"), ("1", "FINISHED", "")]
    assert by_method["test_raise"] == [(a, "FAILED", "exception", "RuntimeError: boom: test_raise always fails")
                                      for a in "01"]
    assert [a[:3] for a in by_method["test_nan"]] == [(a, "FAILED", "nonfinite") for a in "01"]
    assert by_method["test_nan"][0][3].startswith("non-finite loss: loss/kd is nan at batch 0")
    assert by_method["test_kill"] == [(a, "FAILED", "worker_died", "worker died (signal 9 SIGKILL)") for a in "01"]
    assert "FAILED 2x5/test_kill/seed0" in out and study_runs(env["uri"], "failures")[0].info.status == "FAILED"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks worker processes through /proc")
def test_sigkill_mid_study_then_resume_finishes_only_the_missing(env: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    seeds = list(range(5))  # killed after two finished and two started: one never started
    gate = env["dir"] / "killed-gate"  # trials 3 and 4 to start hold until it opens: the state waits for us
    path = write_study(env, "killed", {"test_hold": {"gate": str(gate), "free": 2}}, seeds)
    cmd = [sys.executable, "-m", "harness.cli", "run-study", str(path), "--tracking-uri", env["uri"],
           "--workers", "2", "--no-report"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def midway() -> list[Any] | None:
            runs = trial_runs(env["uri"], "killed")
            statuses = [r.info.status for r in runs]
            running = [r for r in runs if r.info.status == "RUNNING" and f"{TAG}pid" in r.data.tags]
            return runs if statuses.count("FINISHED") == 2 and len(running) == 2 else None

        wait_for("two finished trials and two held running", midway, proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(bound(60))
    finally:
        proc.kill()
    before = trial_runs(env["uri"], "killed")
    finished_before = {r.info.run_id for r in before if r.info.status == "FINISHED"}
    running_before = [r for r in before if r.info.status == "RUNNING"]
    assert finished_before and running_before and len(finished_before) < len(seeds)
    # Its workers die with it: nothing is left to finish a run that the resume will redo.
    pids = [int(r.data.tags[f"{TAG}pid"]) for r in running_before if f"{TAG}pid" in r.data.tags]
    wait_for(f"workers {pids} to die with the runner", lambda: not any(_alive(p) for p in pids), timeout=60)
    (gate / "open").touch()  # only now (a held orphan would hold on): the resume's trials go on

    assert run_study(path, env["uri"], workers=2, report=False, live=False) == 0
    out = capsys.readouterr().out
    assert f"{len(seeds)} trials, {len(finished_before)} already finished, {len(running_before)} stale runs" in out
    after = trial_runs(env["uri"], "killed")
    by_key = finished_by_key(after)
    assert len(by_key) == len(seeds), "lost trials"
    assert all(len(v) == 1 for v in by_key.values()), "duplicate FINISHED runs"
    assert finished_before <= {r.info.run_id for r in after if r.info.status == "FINISHED"}  # not redone
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert len(new) == len(seeds) - len(finished_before)
    stale = {r.info.run_id: r for r in after if r.info.run_id in {b.info.run_id for b in running_before}}
    assert {(r.info.status, r.data.tags[f"{TAG}failure_kind"]) for r in stale.values()} == {("KILLED", "stale")}
    assert sorted(r.info.status for r in study_runs(env["uri"], "killed")) == ["FINISHED", "KILLED"]


@pytest.mark.ray
def test_ray_backend_runs_the_same_grid(env: dict[str, Any], sequential: dict[str, float],
                                        capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray")
    path = write_study(env, "grid-ray", {**GRID, "test_kill": {}}, [0, 1])
    assert run_study(path, env["uri"], workers=2, report=False, backend="ray", live=False) == 1
    assert "pool: Ray tasks of 1 CPU each, 2 at a time" in capsys.readouterr().out
    runs = trial_runs(env["uri"], "grid-ray")
    ok = [r for r in runs if r.data.tags[f"{TAG}method"] != "test_kill"]
    assert {r.info.status for r in ok} == {"FINISHED"}
    assert {r.data.tags[f"{TAG}trial_key"]: r.data.metrics[SCORE] for r in ok} == sequential
    assert peak_concurrency(intervals(ok)) <= 2 and all("/cpu" in r.data.tags[f"{TAG}slot"] for r in ok)
    killed = [r for r in runs if r.data.tags[f"{TAG}method"] == "test_kill"]
    assert len(killed) == 2 and {(r.info.status, r.data.tags[f"{TAG}failure_kind"]) for r in killed} == {
        ("FAILED", "worker_died")}


def test_failure_reasons() -> None:
    import torch

    from harness.train import NonFiniteLossError
    from harness.trial import failure_reason

    assert failure_reason(ValueError("bad\nsecond line")) == ("exception", "ValueError: bad")
    assert failure_reason(NonFiniteLossError("loss/kd is nan at batch 3")) == (
        "nonfinite", "non-finite loss: loss/kd is nan at batch 3")
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert failure_reason(oom) == ("oom", "out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert failure_reason(MemoryError())[0] == "oom"
    assert failure_reason(RuntimeError("DefaultCPUAllocator: not enough memory"))[0] == "oom"
    assert failure_reason(KeyboardInterrupt()) == ("interrupted", "interrupted")


def test_progress_counts_eta_and_best(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from harness import progress as prog

    clock = [1000.0]
    monkeypatch.setattr(prog.time, "time", lambda: clock[0])
    out = io.StringIO()
    p = prog.Progress(total=5, concurrency=2, out=out)
    p.started("a", "cpu#0")
    p.started("b", "cpu#1")
    clock[0] += 10
    p.finished("a", {SCORE: 0.5})
    p.failed_attempt("b", "RuntimeError: boom", retrying=True)
    p.started("b", "cpu#1", attempt=1)
    p.finished("b", {SCORE: 0.9}, ranked=False)  # e.g. a method that sees labels
    assert (p.done, p.failed, p.retried, p.remaining) == (2, 0, 1, 3)
    assert p.eta() == pytest.approx(3 * 5.0 / 2)  # mean of 10 s and 0 s, three left, two at a time
    assert p.status() == "2 done, 0 running, 0 failed, 3 remaining, ETA 8s, best 0.5000 (a)"
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[0/5 0s] start  a on cpu#0 | 0 done, 1 running")
    assert "FAILED b: RuntimeError: boom (will retry)" in lines[3] and "start  b on cpu#1 (attempt 2)" in lines[4]

    live_out = io.StringIO()
    live = prog.LiveProgress(total=2, concurrency=1, out=live_out)
    live.started("x", "cuda:0")
    live.failed_attempt("x", "worker died (signal 9 SIGKILL)", retrying=False)
    live.close()
    text = live_out.getvalue()
    assert "FAILED x: worker died (signal 9 SIGKILL)" in text and "1 failed, 1 remaining" in text


# --------------------------------------------------------------------------- teachers per seed, shipped files


def _teacher_runs(uri: str, study: str) -> list[Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], f"tags.`{TAG}kind` = 'teacher'")


def test_per_seed_teachers_differ_by_seed_and_fixed_ones_do_not(env: dict[str, Any], sequential: dict[str, float],
                                                                capsys: pytest.CaptureFixture) -> None:
    # fixed (the sequential grid): every trial rests on the same teachers
    fixed = {r.data.tags[f"{TAG}teacher_digests"] for r in trial_runs(env["uri"], "grid-w1")}
    assert len(fixed) == 1
    path = write_study(env, "per-seed", {"kd": {}}, [0, 1], teacher_seeds="per_seed")
    assert run_study(path, env["uri"], workers=2, report=False, live=False) == 0
    out = capsys.readouterr().out
    assert "teachers of 2x5 (teacher seed 0): cached" in out and "teachers of 2x5 (teacher seed 1): trained" in out
    runs = {int(r.data.tags[f"{TAG}seed"]): r.data.tags for r in trial_runs(env["uri"], "per-seed")}
    digests = {seed: tags[f"{TAG}teacher_digests"].split(",") for seed, tags in runs.items()}
    keys = {seed: tags[f"{TAG}teacher_keys"].split(",") for seed, tags in runs.items()}
    assert len(digests[0]) == len(digests[1]) == 2 and all(len(d) == 64 for d in digests[0] + digests[1])
    assert not set(digests[0]) & set(digests[1]) and not set(keys[0]) & set(keys[1])
    assert ",".join(digests[0]) == fixed.pop()  # the study's teachers have seed 0: seed 0's are the fixed ones
    # one teacher run per (task, teacher seed), each with the digest the trials of that seed used
    teachers = {(r.data.tags[f"{TAG}task"], int(r.data.tags[f"{TAG}teacher_seed"])): r.data.tags
                for r in _teacher_runs(env["uri"], "per-seed")}
    assert sorted(teachers) == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    for (task, seed), tags in teachers.items():
        assert tags[f"{TAG}teacher_digest"] == digests[seed][int(task)]
        assert tags[f"{TAG}teacher_key"] == keys[seed][int(task)]
    # each seed's teachers have their own outputs on the split (besides those of the fixed grid)
    assert len(list((env["dir"] / "cache" / "teachers").glob("outputs-*.pt"))) == 2


def test_workers_without_the_runners_files_get_every_teacher_cache_file(env: dict[str, Any], tmp_path: Path) -> None:
    """A node that does not share this file system (Ray) is sent the checkpoints, routing statistics
    and teacher outputs, and runs its trial on them: it computes and writes nothing of its own."""
    from harness.config import load_study
    from harness.grid import build_splits, expand
    from harness.runner import Session, teacher_files, teacher_stage
    from harness.scheduler import LocalPool, TrialJob, WorkerContext, build_slots, run_trial_job
    from harness.tracking import Tracker
    from harness.trial import open_trial_run

    study = load_study(write_study(env, "shipped", {"kd": {}}, [0], cache_dir="shipcache"))
    (trial,) = expand(study)
    tracker = Tracker(env["uri"])
    exp = tracker.experiment(study.name)
    pool = LocalPool(build_slots("cpu", cores=1), standby=False)
    try:
        files = teacher_files(teacher_stage(Session(study, tracker, exp, pool), [trial], build_splits(study)))
        shipped = sorted(Path(p).name for p in files)
        assert all(not Path(p).is_absolute() for p in files) and len(shipped) == 5, shipped
        assert sum(n.startswith("outputs-") for n in shipped) == 1 and sum("-routing-" in n for n in shipped) == 2
        node = tmp_path / "node"  # the worker's own directory: the runner's cache is not there
        node.mkdir()
        here = WorkerContext.capture(files)
        ctx = WorkerContext(str(node), {**here.env, "HARNESS_PLUGINS": PLUGINS}, here.sys_path, files)
        run_id = open_trial_run(tracker, exp, study, trial)
        pool.submit(run_id, run_trial_job, TrialJob(study, trial, run_id, tracker.uri), ctx)
        outs: list[Any] = []
        wait_for("the trial", lambda: outs.extend(pool.wait(1.0)) or outs)
    finally:
        pool.close()
    assert outs[0].ok, outs[0].error
    assert sorted(p.name for p in (node / "shipcache" / "teachers").iterdir()) == shipped
    tags = tracker.run(run_id).data.tags
    assert tracker.run(run_id).info.status == "FINISHED"
    digests = [n.split("-routing-")[1][:16] for n in shipped if "-routing-" in n]
    assert sorted(d[:16] for d in tags[f"{TAG}teacher_digests"].split(",")) == sorted(digests)


# --------------------------------------------------------------------------- workers and failures


def test_a_worker_that_finished_its_run_and_died_is_not_a_failure(env: dict[str, Any], capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_PLUGINS", PLUGINS)
    path = write_study(env, "finish-die", {"test_finish_then_die": {}}, [0], max_retries=1)
    assert run_study(path, env["uri"], workers=1, report=False, live=False) == 0
    assert "done: 1 finished, 0 failed, 0 skipped" in capsys.readouterr().out
    (run,) = trial_runs(env["uri"], "finish-die")  # not retried
    assert run.info.status == "FINISHED" and run.data.tags[f"{TAG}attempt"] == "0"
    assert f"{TAG}failure" not in run.data.tags and 0 < run.data.metrics[SCORE] <= 1
    assert study_runs(env["uri"], "finish-die")[0].data.metrics["trials_finished"] == 1


def _in_process(env: dict[str, Any], name: str, method: str) -> tuple[Any, Any, Any, str]:
    from harness.config import load_study
    from harness.grid import expand
    from harness.tracking import Tracker
    from harness.trial import open_trial_run

    study = load_study(write_study(env, name, {method: {}}, [0], train={"epochs": 3, "batch_size": 128}))
    (trial,) = expand(study)
    tracker = Tracker(env["uri"])
    exp = tracker.experiment(name)
    assert exp is not None
    return study, trial, tracker, open_trial_run(tracker, exp, study, trial)


def _stop_after_first_epoch(epoch: int, metrics: dict[str, float]) -> None:
    raise RuntimeError(f"stopped by the test after epoch {epoch}")


def test_a_failing_flush_does_not_hide_why_the_trial_failed(env: dict[str, Any], monkeypatch) -> None:
    """The trial fails; flushing its curves then fails too (a metric name the store refuses):
    the trial's own exception is raised and recorded as the reason. The curves wait for the final
    flush however long the first epoch takes (on a loaded machine it took over the 5 s at which
    they are sent while training, and the store refused the name before the trial failed)."""
    from harness.trial import execute_trial

    monkeypatch.setattr(tracking, "FLUSH_SECONDS", math.inf)
    study, trial, tracker, run_id = _in_process(env, "flush-fails", "test_bad_term")
    with pytest.warns(UserWarning, match="could not log the last epochs"):
        with pytest.raises(RuntimeError, match="stopped by the test after epoch 1"):
            execute_trial(study, trial, tracker, run_id, epoch_hook=_stop_after_first_epoch, diagnose=False)
    run = tracker.run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[f"{TAG}failure"] == "RuntimeError: stopped by the test after epoch 1"
    assert run.data.tags[f"{TAG}failure_kind"] == "exception"


def test_a_store_that_fails_while_a_trial_fails_does_not_hide_the_reason(env: dict[str, Any]) -> None:
    """The run is deleted from the store while the trial fails: neither the curves nor the failure
    can be recorded, and the trial's own exception is still the one raised (the runner records it)."""
    from harness.trial import execute_trial

    study, trial, tracker, run_id = _in_process(env, "store-fails", "kd")

    def delete_and_fail(epoch: int, metrics: dict[str, float]) -> None:
        MlflowClient(env["uri"]).delete_run(run_id)
        _stop_after_first_epoch(epoch, metrics)

    with pytest.warns(UserWarning) as caught:
        with pytest.raises(RuntimeError, match="stopped by the test after epoch 1"):
            execute_trial(study, trial, tracker, run_id, epoch_hook=delete_and_fail, diagnose=False)
    texts = [str(w.message) for w in caught]
    assert any("could not log the last epochs" in t for t in texts)
    assert any("could not record the failure" in t for t in texts)


def test_resume_redoes_exactly_the_trials_whose_last_run_failed_or_was_killed(
        env: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    marker = env["dir"] / "resume-flaky.marker"
    path = write_study(env, "resume", {"kd": {}, "test_flaky": {"marker": str(marker)}}, [0, 1])
    assert run_study(path, env["uri"], workers=1, report=False, live=False) == 1  # the first flaky trial fails
    first = trial_runs(env["uri"], "resume")
    assert sorted(r.info.status for r in first) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    failed = next(r for r in first if r.info.status == "FAILED")
    assert failed.data.tags[f"{TAG}method"] == "test_flaky"
    killed = next(r for r in first if r.data.tags[f"{TAG}method"] == "kd" and r.data.tags[f"{TAG}seed"] == "1")
    client = MlflowClient(env["uri"])  # this one ended KILLED (as a stopped study leaves it)
    client.set_tag(killed.info.run_id, f"{TAG}failure_kind", "interrupted")
    client.set_terminated(killed.info.run_id, "KILLED")
    kept = {r.info.run_id for r in first} - {failed.info.run_id, killed.info.run_id}
    capsys.readouterr()

    assert run_study(path, env["uri"], workers=1, report=False, live=False) == 0
    assert "4 trials, 2 already finished" in capsys.readouterr().out
    after = trial_runs(env["uri"], "resume")
    new = [r for r in after if r.info.run_id not in {f.info.run_id for f in first}]
    redone = {failed.data.tags[f"{TAG}trial_key"], killed.data.tags[f"{TAG}trial_key"]}
    assert sorted(r.data.tags[f"{TAG}trial_key"] for r in new) == sorted(redone)
    assert {r.info.status for r in new} == {"FINISHED"}
    by_key = finished_by_key(after)
    assert len(by_key) == 4 and all(len(v) == 1 for v in by_key.values())
    assert kept <= {v[0].info.run_id for v in by_key.values()}  # the FINISHED ones were skipped
    old = {failed.info.run_id: "FAILED", killed.info.run_id: "KILLED"}
    assert {r.info.run_id: r.info.status for r in after if r.info.run_id in old} == old


# --------------------------------------------------------------------------- determinism and GPU memory


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_studies_set_every_flag_inside_the_worker_and_tag_it(
        env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, deterministic: bool) -> None:
    import json

    import torch

    monkeypatch.setenv("HARNESS_PLUGINS", PLUGINS)
    name = f"det-{str(deterministic).lower()}"
    probe = env["dir"] / f"{name}.json"
    path = write_study(env, name, {"test_det_probe": {"out": str(probe)}}, [0],
                       train={"epochs": 1, "batch_size": 128, "deterministic": deterministic})
    assert run_study(path, env["uri"], workers=1, report=False, live=False) == 0
    (run,) = trial_runs(env["uri"], name)
    seen = json.loads(probe.read_text())
    assert seen["pid"] == int(run.data.tags[f"{TAG}pid"]) != os.getpid()  # read in the worker, while it trained
    assert (seen["algorithms"], seen["cudnn_deterministic"]) == (deterministic, deterministic)
    assert seen["cublas"] == (":4096:8" if deterministic else None)  # in the worker's environment from its start
    assert run.data.tags[f"{TAG}deterministic"] == str(deterministic).lower()
    # the runner itself is left alone on the CPU: nothing set in this process
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_a_known_gpu_peak_that_does_not_fit_trials_per_device_stops_the_study_before_it_starts(
        env: dict[str, Any]) -> None:
    """The peak of a finished run of the study's own trial keys in the store; the GPU's total
    memory is given (as :func:`harness.scheduler.gpu_total_mb` reads it on a GPU machine)."""
    from harness.config import load_study
    from harness.errors import HarnessError
    from harness.grid import expand
    from harness.runner import check_packing_before
    from harness.tracking import Tracker

    study = load_study(write_study(env, "packed", {"kd": {}}, [0, 1], trials_per_device=3))
    trials = expand(study)
    keys = {t.key for t in trials}
    tracker = Tracker(env["uri"])
    exp = tracker.experiment("packed")
    assert exp is not None
    totals = {"cuda:0": 16384.0}
    check_packing_before(study, tracker, exp, keys, totals)  # no run yet: nothing known, the pool learns it
    other = tracker.start(exp, "other/kd/seed0", {f"{TAG}kind": "trial", f"{TAG}trial_key": "another-key"}, {})
    tracker.log_metrics(other, {"gpu_peak_mb": 9000.0})
    tracker.finish(other)
    check_packing_before(study, tracker, exp, keys, totals)  # a run of another configuration does not count
    for seed, peak in ((0, 6000.0), (1, 4000.0)):
        rid = tracker.start(exp, trials[seed].run_name,
                            {f"{TAG}kind": "trial", f"{TAG}trial_key": trials[seed].key}, {})
        tracker.log_metrics(rid, {"gpu_peak_mb": peak})
        tracker.finish(rid)
    with pytest.raises(HarnessError) as err:
        check_packing_before(study, tracker, exp, keys, totals)
    assert str(err.value) == (
        "trials_per_device: 3 trials x (6000 MB peak + 512 MB CUDA context) = 19536 MB > 16384 MB on cuda:0 "
        f"(peak: gpu_peak_mb of the finished run {trials[0].run_name}); at most 2 fit: set trials_per_device: 2")
    check_packing_before(study, tracker, exp, keys, {"cuda:0": 24576.0})  # 3 x 6512 MB fit on a larger GPU
    check_packing_before(study, tracker, exp, keys, {})  # no GPU in the pool: nothing to check


def test_a_study_another_live_runner_on_this_host_is_running_is_refused_in_one_line(
        env: dict[str, Any], capfd: pytest.CaptureFixture) -> None:
    """Its study run says which process runs it (harness.records.InvocationRunTags): while that
    process lives, a second run-study of the study is one line, exit 2, and starts nothing; once it
    is gone the study is not refused (its RUNNING runs are stale, marked KILLED by the next run)."""
    import platform

    from harness.records import InvocationRunTags
    from harness.runner import check_not_running
    from harness.tracking import Tracker

    path = write_study(env, "busy", {"kd": {}}, [0])
    tracker = Tracker(env["uri"])
    exp = tracker.experiment("busy")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        tracker.start(exp, "study/elsewhere", InvocationRunTags("study", "busy", platform.node(), other.pid).to_tags())
        capfd.readouterr()
        assert main(["run-study", str(path)]) == 2
        # one line (the refusal comes before the pool's start-up: a forkserver started for nothing and
        # stopped while it imported torch printed "Intel oneMKL FATAL ERROR" as pytest exited)
        assert capfd.readouterr().err.strip() == (
            f"harness: error: study 'busy' is already being run by process {other.pid} on this host; "
            "wait for it or stop it first")
        assert not trial_runs(env["uri"], "busy")  # nothing started
    finally:
        other.kill()
        other.wait()
    check_not_running(tracker, exp, "busy")  # its process is gone: not refused
