"""One dispatch loop for ``run-study`` and ``harness tune``: a job source feeds a pool.

The loop (:func:`dispatch`) owns the mechanics both share, on every pool (local worker processes,
Ray; a Slurm pool in ``run-study``); the source owns what a job is and what its end means:

- **refill**: while the pool has room, ``source.start_next()`` opens one job's run and hands it to
  the pool (False: nothing to start now). run-study's source takes the grid's next trial
  (:class:`harness.runner.GridJobs`), a search asks Optuna (:class:`harness.tune.Search`);
- **settle**: each outcome the pool reports goes to ``source.settle``: a result, or a failure and
  whether it is tried again (run-study queues the trial's next attempt up to ``max_retries``; a
  search enqueues the configuration in Optuna when its worker died);
- **tick**: ``source.tick()`` once a pass (the progress line; a search's heartbeat);
- **stop**: on Ctrl-C, SIGTERM (under :func:`harness.interrupts.sigterm_as_interrupt`) or any
  error, the pool is stopped and ``source.stopped(keys)`` ends what was in flight (runs KILLED; a
  search fails their Optuna trials and queues their configurations for the next invocation), then
  the exception goes on.

Every start, settle, tick and stop runs whole (:func:`harness.interrupts.deferred`): a signal lands
between two of them, so a job is either in flight (and ended by the stop) or settled, never half
of either. The loop returns when nothing is in flight after a refill. Runs left behind by an
invocation that died are the source's to close before the loop starts (the runner's
``mark_stale``, the search's ``fail_stale``).
"""

from __future__ import annotations

from typing import Protocol

from harness.interrupts import deferred
from harness.scheduler import Outcome

#: seconds the loop waits for outcomes before it ticks again
WAIT_S = 1.0


class Pool(Protocol):
    """What the loop needs of a pool (:class:`harness.scheduler.LocalPool`, ``RayPool``, ``SlurmPool``)."""

    def has_room(self) -> bool: ...

    def wait(self, timeout: float) -> list[Outcome]: ...

    def stop(self) -> list[str]: ...


class JobSource(Protocol):
    """What the loop needs of a source of jobs (the module docstring)."""

    def start_next(self) -> bool:
        """Open one job's run and submit it to the pool; False when there is nothing to start now."""
        ...

    def in_flight(self) -> int:
        """How many jobs were submitted and not settled."""
        ...

    def settle(self, out: Outcome) -> None:
        """One job ended (a result or a failure); may queue it again."""
        ...

    def tick(self) -> None:
        """Once a pass of the loop (progress, heartbeats)."""
        ...

    def stopped(self, keys: list[str]) -> None:
        """The pool was stopped with the jobs ``keys`` running: end what was in flight."""
        ...


def dispatch(pool: Pool, source: JobSource) -> None:
    """Keep ``pool`` full from ``source`` until nothing is in flight and nothing is left to start."""
    try:
        while True:
            while pool.has_room():
                with deferred():  # a run opened is a job the source knows (and ends on a stop)
                    started = source.start_next()
                if not started:
                    break
            if not source.in_flight():
                return
            for out in pool.wait(timeout=WAIT_S):
                with deferred():
                    source.settle(out)
            with deferred():
                source.tick()
    except BaseException:
        with deferred():  # a second Ctrl-C meanwhile is delivered once the clean-up is done
            source.stopped(pool.stop())
        raise
