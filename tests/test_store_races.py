"""Writes that two processes make to one store at the same moment: two trials of a fresh search
starting together both log the split's dataset input (and set the same tags). MLflow inserts a
new dataset after looking for it, so the second writer used to fail the trial with ``UNIQUE
constraint failed: datasets...``; :func:`harness.tracking._retry` makes each such write an
idempotent upsert. Checked on a real sqlite store and through a real ``mlflow server``, over
``PAIRS`` fresh experiments (the unfixed store loses about 9 pairs in 10)."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from harness.tracking import Tracker, split_dataset
from tests.mlflow_server import mlflow_server, wait_ready

#: fresh experiments, each raced by two writers
PAIRS = 20
WRITERS = 2


def _writer(uri: str, names: list[str], barrier, out) -> None:  # type: ignore[no-untyped-def]
    """One of two processes: for each experiment, a run, the barrier, then the same dataset input
    and the same tags on the experiment; puts ``(name, error or None)`` per experiment."""
    tracker = Tracker(uri)
    for name in names:
        exp = tracker.experiment(name)
        run = tracker.start(exp, "trial", {"harness.kind": "trial"})
        ds = split_dataset("digits", "2x5", {"split": "2x5"}, None)
        barrier.wait(timeout=120)
        try:
            tracker.log_inputs(run, [ds])
            tracker.set_experiment_tags(exp, {"harness.study": name})
            tracker.finish(run)
            out.put((name, None))
        except Exception as e:  # the failure a trial would have had
            out.put((name, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))


def race(uri: str) -> list[tuple[str, str | None]]:
    """``PAIRS`` rounds of two processes writing the same rows of a fresh experiment at once."""
    ctx = mp.get_context("spawn")  # each writer opens its own store, as a worker does
    barrier, out = ctx.Barrier(WRITERS), ctx.Queue()
    names = [f"race{i}" for i in range(PAIRS)]
    procs = [ctx.Process(target=_writer, args=(uri, names, barrier, out)) for _ in range(WRITERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in range(PAIRS * WRITERS)]
    for p in procs:
        p.join(timeout=60)
    return results


def check(uri: str) -> None:
    failed = [f"{name}: {err}" for name, err in race(uri) if err]
    assert not failed, f"{len(failed)} of {PAIRS * WRITERS} concurrent writes failed:\n" + "\n".join(failed[:5])
    tracker = Tracker(uri)
    for i in range(PAIRS):
        exp = tracker.experiment(f"race{i}", create=False)
        runs = tracker.client.search_runs([exp])
        assert len(runs) == WRITERS
        for r in runs:  # each run has the one input, both point to the same dataset
            assert [(d.dataset.name, d.dataset.digest) for d in r.inputs.dataset_inputs] == [
                ("digits:2x5", runs[0].inputs.dataset_inputs[0].dataset.digest)]


def test_two_trials_logging_one_dataset_at_once_on_sqlite(tmp_path: Path) -> None:
    check(f"sqlite:///{tmp_path}/mlflow.db")


def test_two_trials_logging_one_dataset_at_once_through_a_server(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri)  # the store exists before the server opens it
    with mlflow_server(uri, tmp_path, workers=2) as (base, proc):
        wait_ready(base, proc, tmp_path)
        check(base)


def test_a_write_that_is_no_conflict_still_fails(tmp_path: Path) -> None:
    """Only a concurrent writer's duplicate is retried: a real error fails at once, with its reason."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(Exception, match="(?i)run .*not found|no run"):
        tracker.log_inputs("0" * 32, [split_dataset("digits", "2x5", {}, None)])
