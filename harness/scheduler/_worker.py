"""The worker side: what a worker receives from the runner, how it sets itself up, what it runs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from harness.console import quiet
from harness.files import write_atomic
from harness.scheduler._slots import Slot
from harness.store import SLOT

if TYPE_CHECKING:
    from harness.config import StudyConfig
    from harness.grid import Trial

Target = Callable[[Any, Slot], Any]


@dataclass(frozen=True)
class WorkerContext:
    """What a worker takes from the runner explicitly: a forked or remote worker does not share
    the runner's working directory, environment (``HARNESS_PLUGINS``, ``MLFLOW_*``) or import path.
    ``files`` (relative path -> bytes) are written where missing, e.g. teacher cache entries for
    Ray nodes without a shared file system."""

    cwd: str
    env: dict[str, str]
    sys_path: tuple[str, ...]
    files: dict[str, bytes] = field(default_factory=dict)
    #: ``(function, argument)`` pairs a local standby worker calls while it waits for its job
    #: (open the tracking store, load the data); best effort, the job redoes whatever failed
    warm: tuple[tuple[Callable[[Any], Any], Any], ...] = ()

    @classmethod
    def capture(cls, files: dict[str, bytes] | None = None,
                warm: tuple[tuple[Callable[[Any], Any], Any], ...] = (),
                env: dict[str, str] | None = None) -> "WorkerContext":
        """This process's context; ``env`` adds variables the worker must have before it starts
        CUDA (e.g. :func:`harness.train.deterministic_env`: the cuBLAS workspace setting)."""
        own = {k: v for k, v in os.environ.items() if k.startswith(("HARNESS_", "MLFLOW_")) or k == "PYTHONPATH"}
        return cls(os.getcwd(), {**own, **(env or {})}, tuple(p for p in sys.path if p), dict(files or {}), warm)


@dataclass
class Outcome:
    """How one job ended: its result, or why not (``kind``: ``exception`` or ``worker_died``)."""

    key: str
    slot: Slot | None
    ok: bool
    result: Any = None
    error: str = ""
    kind: str = ""


def enter_worker(ctx: WorkerContext, slot: Slot) -> None:
    """Set up this worker process for its slot: the runner's directory, environment and import
    path, only the slot's GPU, and the slot's number of threads (torch, OpenMP and BLAS).

    Runs before anything in the worker starts CUDA (the forkserver imported torch but never
    initialised CUDA), so variables CUDA reads once per process, ``CUDA_VISIBLE_DEVICES`` and
    ``CUBLAS_WORKSPACE_CONFIG`` (deterministic studies), take effect."""
    if os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)
    os.environ.update(ctx.env)
    quiet()
    sys.path.extend(p for p in ctx.sys_path if p not in sys.path)
    if slot.visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.visible  # before anything initialises CUDA
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(slot.threads)
    import torch

    torch.set_num_threads(slot.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(slot.threads)  # numpy/scikit-learn BLAS (the diagnostics probe)
    except ImportError:
        pass
    for rel, blob in ctx.files.items():
        path = Path(rel)
        if not path.exists():
            write_atomic(path, blob, "shipped cache file")


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:500]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@dataclass(frozen=True)
class TrialJob:
    """One attempt of one trial as a worker receives it: its run is already open (RUNNING)."""

    study: "StudyConfig"
    trial: "Trial"
    run_id: str
    tracking_uri: str


def warm_trial_worker(args: tuple[str, "StudyConfig"]) -> None:
    """Standby warm-up for trials of a study: open the tracking store and load every split's
    data (both are cached in the process, so the trial finds them ready)."""
    from harness.data.splits import build_split
    from harness.tracking import Tracker

    uri, study = args
    Tracker(uri)
    for i, split in enumerate(study.splits):
        build_split(split, study.dataset, f"splits[{i}]")


def run_trial_job(job: TrialJob, slot: Slot) -> dict[str, float]:
    """Worker side of a trial: execute it on the slot's device, logging to its open run."""
    from harness.tracking import Tracker
    from harness.trial import execute_trial

    return execute_trial(job.study, job.trial, Tracker(job.tracking_uri), job.run_id, device=slot.device,
                         extra_tags={SLOT: slot.name})
