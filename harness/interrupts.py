"""Stopping a study or a search cleanly: SIGTERM as Ctrl-C, and bookkeeping that a signal must not
cut in half.

A batch system stops a job with SIGTERM; :func:`sigterm_as_interrupt` turns it into the
``KeyboardInterrupt`` of Ctrl-C, so both end a study the same way (its runs KILLED, its trials
queued again). Python raises that exception between any two bytecodes of the main thread, also
in the middle of a step that must finish once begun: an Optuna trial asked for (RUNNING in the
storage) but not yet registered for the clean-up, a result told but its run not yet ended. Such
steps run inside :func:`deferred`: a SIGINT or SIGTERM that arrives meanwhile is held and
delivered when the step is complete.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

_STOPS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch system stopping the job) ends the study like Ctrl-C: runs marked KILLED."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block has run, then deliver them (to the handlers in
    place before it: ``KeyboardInterrupt`` under :func:`sigterm_as_interrupt` or Ctrl-C). Outside
    the main thread (where no handler runs) it does nothing. Nests: an inner block hands what it
    held to the outer one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    old = {s: signal.getsignal(s) for s in _STOPS}
    for s in _STOPS:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python
        for s in dict.fromkeys(held):
            signal.raise_signal(s)  # the handler in place again: raises here, or holds for an outer block
