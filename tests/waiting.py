"""Waiting on states, not on speed: a test that needs a running study to reach a state polls for
that state, with a bound that only catches a hang. ``HARNESS_TEST_PATIENCE`` (a factor, default
1) scales every bound for a slow or loaded machine; no test asserts how fast this machine is."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, Callable

#: the factor every bound is scaled by (``HARNESS_TEST_PATIENCE=3`` on a loaded machine)
PATIENCE = float(os.environ.get("HARNESS_TEST_PATIENCE", "1") or 1)
#: the default bound: long enough that only a hang reaches it
HANG = 300.0


def bound(seconds: float = HANG) -> float:
    """``seconds`` scaled by ``HARNESS_TEST_PATIENCE``: the time after which a wait is a hang."""
    return seconds * PATIENCE


def wait_for(what: str, cond: Callable[[], Any], timeout: float = HANG, every: float = 0.3,
             proc: subprocess.Popen | None = None) -> Any:
    """Poll ``cond`` until it returns something truthy (returned); raise naming ``what`` after
    :func:`bound` (``timeout``), or at once when ``proc`` (the process that should get there) ends."""
    deadline = time.monotonic() + bound(timeout)
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the process ended (exit code {proc.returncode}) before {what}:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound(timeout):.0f} s waiting for {what} "
                                 f"(a hang, or set HARNESS_TEST_PATIENCE above {PATIENCE:g} on a slow machine)")
        time.sleep(every)
