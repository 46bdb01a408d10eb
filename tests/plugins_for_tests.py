"""Test-only methods and pool targets.

Worker processes load the methods through ``HARNESS_PLUGINS=tests.plugins_for_tests``; the pool
targets are pickled by reference, so they live in an importable module too.

- ``test_raise``: every batch raises ``RuntimeError``;
- ``test_nan``: the loss is NaN (the training loop stops it);
- ``test_kill``: the worker kills its own process with SIGKILL;
- ``test_flaky``: raises on the first attempt (no ``marker`` file yet), then behaves like KD;
- ``test_sleep``: sleeps ``seconds`` when built, then behaves like KD (a slow trial);
- ``test_kill_once``: kills its worker on the first attempt (no ``marker`` file yet), then KD;
- ``test_hold``: the first ``free`` trials to start go on like KD, every later one holds (sleeps)
  until the file ``<gate>/open`` exists: a state such as "two finished, two running" that lasts
  until the test has seen it, however fast or slow the machine.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from harness import losses
from harness.methods.base import Batch, Method, Params, register


class _KD(Method):
    terms = {"kd": None}

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        z = self.student(batch.x)
        return {"kd": losses.soft_target_kl(torch.cat(batch.teacher_logits, dim=1), z, 1.0)}


@register("test_raise")
class Raises(_KD):
    description = "test: raises on every batch"

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        raise RuntimeError("boom: test_raise always fails")


@register("test_nan")
class ReturnsNaN(_KD):
    description = "test: a NaN loss"

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        return {"kd": self.student(batch.x).sum() * float("nan")}


@register("test_kill")
class KillsItsWorker(_KD):
    description = "test: kills its own process with SIGKILL"

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class FlakyParams(Params):
    marker: str


@register("test_flaky")
class FailsOnce(_KD):
    ParamsModel = FlakyParams
    description = "test: fails on the first attempt only"

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        marker = Path(self.params.marker)
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("flaky: first attempt fails")
        return super().loss_terms(batch)


class SleepParams(Params):
    seconds: float = Field(1.0, ge=0)


@register("test_sleep")
class Sleeps(_KD):
    ParamsModel = SleepParams
    description = "test: sleeps when built, then KD"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        time.sleep(self.params.seconds)


class KillOnceParams(Params):
    marker: str
    T: float = Field(1.0, gt=0)


@register("test_kill_once")
class KillsItsWorkerOnce(_KD):
    ParamsModel = KillOnceParams
    description = "test: the first attempt (no marker file yet) kills its worker, then KD"

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        marker = Path(self.params.marker)
        if not marker.exists():
            marker.write_text("killed once")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().loss_terms(batch)


class HoldParams(Params):
    gate: str
    free: int = Field(2, ge=0)


@register("test_hold")
class HoldsAfterTheFirst(_KD):
    ParamsModel = HoldParams
    description = "test: the first `free` trials to start go on, later ones wait for <gate>/open"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        gate = Path(self.params.gate)
        gate.mkdir(parents=True, exist_ok=True)
        ticket = 0
        while True:  # the start order, claimed atomically across worker processes
            try:
                os.close(os.open(gate / f"ticket{ticket}", os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                ticket += 1
        while ticket >= self.params.free and not (gate / "open").exists():
            time.sleep(0.1)


# --------------------------------------------------------------------------- pool targets


def nap(seconds: float, slot: Any) -> dict[str, Any]:
    """Sleep, and report what the worker saw."""
    start = time.time()
    time.sleep(seconds)
    return {"pid": os.getpid(), "start": start, "end": time.time(), "slot": slot.name,
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS"), "plugins": os.environ.get("HARNESS_PLUGINS"),
            "cwd": os.getcwd(), "has_tests_path": any(Path(p, "tests", "plugins_for_tests.py").exists()
                                                      for p in sys.path)}


def mark_warm(path: str) -> None:
    """A standby warm-up: note when and where it ran."""
    os.environ["TEST_WARMED"] = f"{os.getpid()}:{time.time()}"
    Path(path, f"warm-{os.getpid()}").write_text(str(time.time()))


def report_warm(_: Any, slot: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "warmed": os.environ.get("TEST_WARMED", ""), "start": time.time()}


def fail(message: str, slot: Any) -> None:
    raise ValueError(message)


def kill_self(_: Any, slot: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_quietly(code: int, slot: Any) -> None:
    os._exit(code)


def log_epochs(args: tuple[str, str, str, int, int], slot: Any) -> str:
    """Open a run and log ``epochs`` steps of ``n_metrics`` metrics, one request per epoch."""
    from harness.tracking import Tracker

    uri, experiment_id, name, epochs, n_metrics = args
    tracker = Tracker(uri)
    run_id = tracker.start(experiment_id, name, {"harness.kind": "stress", "harness.pid": os.getpid()},
                           {"epochs": epochs})
    for epoch in range(1, epochs + 1):
        tracker.log_metrics(run_id, {f"m{i}": epoch * 1000 + i for i in range(n_metrics)}, step=epoch)
    tracker.set_tags(run_id, {"harness.end": f"{time.time():.3f}"})
    tracker.finish(run_id)
    return run_id


def open_store(args: tuple[str, float, bool], slot: Any) -> str:
    """Open (and so create) the store at ``uri`` at time ``at``; ``unlocked`` skips the file lock."""
    import contextlib

    from harness import tracking

    uri, at, unlocked = args
    if unlocked:
        tracking._opening = lambda uri: contextlib.nullcontext()  # type: ignore[assignment]
    while time.time() < at:
        time.sleep(0.001)
    return tracking.Tracker(uri).experiment("race")
