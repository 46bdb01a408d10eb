"""The one dispatch loop (harness.dispatch) on a real pool of worker processes: refill up to the
pool's room, settle every outcome (a retry queued by the source runs again), tick, and on an
error or a SIGTERM stop the pool and hand the source what was running, with a signal that lands
mid-start delivered only once the start is complete. run-study and tune run on it: their kill -9,
retry and stale-run tests (test_runner.py, test_tune.py) exercise it end to end."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

import tests.plugins_for_tests as plug
from harness.dispatch import dispatch
from harness.interrupts import sigterm_as_interrupt
from harness.scheduler import LocalPool, Outcome, WorkerContext, build_slots


class Jobs:
    """A job source for the test: ``(key, target, payload)`` in order; a failed job runs again once."""

    def __init__(self, pool: LocalPool, jobs: list[tuple[str, Any, Any]], raise_on_settle: int | None = None,
                 signal_on_start: int | None = None) -> None:
        self.pool, self.queue = pool, list(jobs)
        self.ctx = WorkerContext.capture()
        self.inflight: set[str] = set()
        self.settled: list[Outcome] = []
        self.started: list[str] = []
        self.stops: list[list[str]] = []
        self.ticks = self.peak = 0
        self.retried: set[str] = set()
        self.raise_on_settle, self.signal_on_start = raise_on_settle, signal_on_start

    def start_next(self) -> bool:
        if not self.queue:
            return False
        key, target, payload = self.queue.pop(0)
        if self.signal_on_start == len(self.started):  # lands here, before the job is submitted
            os.kill(os.getpid(), signal.SIGTERM)
        self.pool.submit(key, target, payload, self.ctx)
        self.inflight.add(key)
        self.started.append(key)
        self.peak = max(self.peak, len(self.inflight))
        return True

    def in_flight(self) -> int:
        return len(self.inflight)

    def settle(self, out: Outcome) -> None:
        self.inflight.remove(out.key)
        self.settled.append(out)
        if self.raise_on_settle == len(self.settled):
            raise RuntimeError("the source failed while settling")
        if not out.ok and out.key not in self.retried:
            self.retried.add(out.key)
            self.queue.append((out.key, plug.nap, 0.0))  # the retry succeeds

    def tick(self) -> None:
        self.ticks += 1

    def stopped(self, keys: list[str]) -> None:
        self.stops.append(sorted(keys))


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
    p = LocalPool(build_slots("cpu", cores=2), workers=2)
    yield p
    p.close()


def test_the_loop_keeps_the_pool_full_settles_everything_and_runs_a_retry(pool):
    jobs = Jobs(pool, [("a", plug.nap, 0.3), ("b", plug.fail, "no luck"), ("c", plug.nap, 0.3),
                       ("d", plug.kill_self, None), ("e", plug.nap, 0.0)])
    dispatch(pool, jobs)
    assert jobs.started == ["a", "b", "c", "d", "e", "b", "d"]  # in order, then the two retries
    assert jobs.peak == 2 and not jobs.inflight and not jobs.stops and jobs.ticks >= 1
    first: dict[str, Outcome] = {}
    for o in jobs.settled:  # each key's first outcome (a retry may settle before the last first attempt)
        first.setdefault(o.key, o)
    assert first["b"].kind == "exception" and "no luck" in first["b"].error
    assert first["d"].kind == "worker_died" and not first["d"].ok
    assert [o.ok for o in jobs.settled if o.key in ("a", "c", "e")] == [True, True, True]
    for key in ("b", "d"):  # the failed attempt, then its retry, which succeeds
        assert [o.ok for o in jobs.settled if o.key == key] == [False, True]
    assert len(jobs.settled) == 7


def test_an_error_while_settling_stops_the_pool_and_hands_the_source_what_was_running(pool):
    jobs = Jobs(pool, [("quick", plug.nap, 0.0), ("slow", plug.nap, 60.0), ("never", plug.nap, 0.0)],
                raise_on_settle=1)
    with pytest.raises(RuntimeError, match="while settling"):
        dispatch(pool, jobs)
    assert [o.key for o in jobs.settled] == ["quick"]
    assert jobs.started == ["quick", "slow"] and jobs.stops == [["slow"]]  # stopped, not waited for


def test_a_sigterm_that_lands_mid_start_is_delivered_once_the_job_is_known_to_the_source(pool):
    """The signal arrives before the second job is submitted; the start completes (the job is in
    flight), then the KeyboardInterrupt stops the loop and the source is told of both jobs."""
    jobs = Jobs(pool, [("first", plug.nap, 60.0), ("second", plug.nap, 60.0), ("third", plug.nap, 0.0)],
                signal_on_start=1)
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        dispatch(pool, jobs)
    assert jobs.started == ["first", "second"]
    assert jobs.stops == [["first", "second"]] and not jobs.settled
