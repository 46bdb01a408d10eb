"""harness.interrupts: SIGTERM as Ctrl-C, and steps that a signal must not cut in half."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from harness.interrupts import deferred, sigterm_as_interrupt


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT as in an interactive shell (a background job, as CI may run the suite, ignores it)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_sigterm_becomes_keyboard_interrupt_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_deferred_step_comes_after_the_whole_step(sig: int) -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            with deferred():
                os.kill(os.getpid(), sig)
                for i in range(1000):
                    done.append(i)
            done.append("after")  # never: the held signal is delivered as the step ends
    assert done == list(range(1000))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nested_steps_hand_the_signal_to_the_outer_one_and_nothing_held_is_nothing_raised() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt(), deferred():
            with deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("inner")
            done.append("outer")  # the inner step's end hands it on: the outer step still finishes
    assert done == ["inner", "outer"]
    with sigterm_as_interrupt(), deferred():
        done.append("quiet")
    assert done[-1] == "quiet"


def test_outside_the_main_thread_it_does_nothing() -> None:
    seen = []

    def work() -> None:
        with deferred():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]
