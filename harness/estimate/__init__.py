"""``harness run-study STUDY --estimate``: what a study will cost, measured before it runs.

One short **calibration** (:mod:`harness.estimate.calibration`) per distinct combination the study
needs, with real (random-initialised) networks on the study's real data, on the device the study
would run on (its first slot's; CPU slots with their own thread count), through the functions a
real run calls (:func:`harness.train.train_epoch`, :func:`harness.train.evaluate`,
:func:`harness.trial.diagnostics`, :func:`harness.routing.fit_stats`):

- a *teacher* combination (architecture + options, image shape, batch size, augmentation,
  optimiser, precision): its supervised training step, its evaluation pass and its routing
  statistics;
- a *student* combination (student architecture + options, method, image shape, batch size,
  augmentation, optimiser, precision, the split's teacher architectures): the method's
  ``loss_terms`` step with its teachers (run live on every batch when the recipe augments,
  outputs computed beforehand otherwise, as ``fit`` decides), its evaluation pass, the
  diagnostics (routing, oracle, linear probe) and the per-trial set-up (building the method,
  loading the teachers' checkpoints and their cached outputs). Variants and seeds of one method
  share it (the first variant, ``full``, is the one timed).

A training rate is the time of :data:`TIMED_BATCHES` batches (fewer if they would exceed
:data:`BUDGET_S`) after :data:`WARMUP_BATCHES` warm-up batches, per image; evaluation and
diagnostics are timed on a subset (:data:`EVAL_IMAGES`, :data:`DIAG_IMAGES`) and scaled
linearly to the real sizes. Nothing is written: calibration networks are thrown away, no
teacher cache entry is made, the study's MLflow store is never opened, data sets are not
downloaded (one error line naming ``dataset.root`` when they are not there).

**Arithmetic** (:func:`plan` in :mod:`harness.estimate.arithmetic`, pure: injected numbers give
hand-checkable results). With
``b(n) = n // batch_size * batch_size`` (``n`` below one batch: ``n``) the images the loop
trains on per epoch (the last partial batch is dropped):

- a teacher: ``epochs x (b(n_train) x s_train + n_val x s_eval) + 2 x n_test x s_eval``
  (test with the last and the best-validation model) ``+ (n_train + n_val) x s_stats`` (routing
  statistics on its own images) ``+ n_pool x s_eval`` (its outputs on the pool)
  ``+ (epochs + 4) x s_op`` (its MLflow run: one request per epoch); 0 when its checkpoint is
  already in the teacher cache (:func:`harness.teachers.checkpoint_path` exists);
- a trial of a training method: ``epochs x (b(n_pool) x s_train + n_val x s_eval)
  + 2 x n_test x s_eval``; of an evaluating one (``teachers``): ``n_test x s_eval``; plus
  ``(n_pool + n_test) x s_diag`` (diagnostics), its set-up (measured per combination) and the
  MLflow work of one trial (opening the run, tags, curves, final metrics, finishing);
- wall time: ``startup + shared(teacher stage, pool start) + worker setup + shared(slot loads)``:
  the teachers run first, one after the other, on the teacher device, while the forkserver starts
  (a fresh interpreter importing what it preloads); then a slot's first worker opens the store
  and loads the data, and the trials, packed greedily longest-first (:func:`lpt`) onto
  ``min(slots, --workers)`` slots, run. ``shared`` (:func:`shared_makespan`) is the finishing
  time of jobs that run side by side, each ``slowdown(k)`` times slower while ``k`` run
  (``max`` when nothing slows down);
- device-hours of a split: teachers + trials (their slot time divided by ``trials_per_device``
  on GPUs, whose packed trials share one device).

**Overheads** are measured, not assumed (:mod:`harness.estimate.probes`): the runner's start-up
(imports in this process, reading and expanding the study, loading the data, creating the MLflow
store when the target store does not exist yet, its requests around the trials), the forkserver's
start-up (a fresh interpreter importing what it preloads: the imports timed here when this process
had not imported torch yet, else a child process that does them), the MLflow requests of a teacher
and of a trial (on a store created in a temporary folder and deleted), and how much slower each of
``min(slots, --workers)`` processes runs when they run at once than one alone
(:func:`measure_contention`: other users' load, shared cores; it slows the trials while several run
and the teacher stage while the forkserver imports beside it). Not included: the report at the end,
``train.compile``'s compilation, retries of failed trials, trials already finished in the store (the
estimate never reads it), and the slow-down of trials packed onto one GPU (each is timed alone).

Where each part lives: :mod:`~harness.estimate.arithmetic` (rates, work, overheads and :func:`plan`;
imports neither torch nor numpy), :mod:`~harness.estimate.work` (what the study needs:
:func:`describe_work` and the calibration keys), :mod:`~harness.estimate.calibration` (the torch
timing: :func:`calibrate`), :mod:`~harness.estimate.probes` (the fixed costs:
:func:`import_preload`, :func:`measure_pool_start`, :func:`measure_mlflow`,
:func:`measure_contention`) and :mod:`~harness.estimate.rendering` (:func:`render`,
:func:`print_rates`). This face holds the command (:func:`load_splits`, :func:`estimate_study`,
:func:`run_estimate`) and re-exports the public names of the others: ``from harness.estimate import
X`` works for each of them. Importing it imports neither torch nor numpy (:func:`estimate_study`
times the runner's start-up, torch's import included, from there on).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError
from harness.estimate.arithmetic import (
    PARENT_OPS, TEACHER_OPS, TEST_PASSES, Estimate, Overheads, Rate, SplitRow, TeacherWork, TrialWork,
    images_per_epoch, lpt, plan, shared_makespan, teacher_seconds, trial_seconds,
)
from harness.estimate.calibration import (
    BUDGET_S, DIAG_IMAGES, EVAL_IMAGES, MIN_TIMED, TIMED_BATCHES, WARMUP_BATCHES, Calibration, calibrate,
    calibrate_teacher, calibrate_trial, time_diagnostics, time_eval, time_loading, time_training,
)
from harness.estimate.probes import (
    import_preload, measure_contention, measure_mlflow, measure_pool_start, store_is_new,
)
from harness.estimate.rendering import format_duration, print_rates, render
from harness.estimate.work import describe_work, student_combo, teacher_combo

if TYPE_CHECKING:
    from harness.config import StudyConfig
    from harness.data.splits import SplitData

__all__ = [
    "BUDGET_S", "DIAG_IMAGES", "EVAL_IMAGES", "MIN_TIMED", "PARENT_OPS", "TEACHER_OPS", "TEST_PASSES",
    "TIMED_BATCHES", "WARMUP_BATCHES", "Calibration", "Estimate", "Overheads", "Rate", "SplitRow", "TeacherWork",
    "TrialWork", "calibrate", "calibrate_teacher", "calibrate_trial", "describe_work", "estimate_study",
    "format_duration", "images_per_epoch", "import_preload", "load_splits", "lpt", "measure_contention",
    "measure_mlflow", "measure_pool_start", "plan", "print_rates", "render", "run_estimate", "shared_makespan",
    "student_combo", "teacher_combo", "teacher_seconds", "time_diagnostics", "time_eval", "time_loading",
    "time_training", "trial_seconds",
]


def load_splits(study: "StudyConfig") -> dict[str, "SplitData"]:
    """Every split's data, without downloading: a data set that is not there is one error line
    naming ``dataset.root`` (with ``download: true``, a note that the estimate does not fetch)."""
    from harness.data.splits import build_split

    out = {}
    for i, split in enumerate(study.splits):
        try:
            out[split.name] = build_split(split, study.dataset, f"splits[{i}]")
        except HarnessError as e:
            if not study.dataset.download:
                raise
            raise HarnessError(f"{e} (--estimate does not download: run `harness data download "
                               f"{study.dataset.name} --root {study.dataset.root}` first)") from None
    return out


def estimate_study(
    path: str | Path, workers: int | None = None, tracking_uri: str | None = None, overheads: bool = True,
    budget: float = BUDGET_S,
) -> Estimate:
    """Calibrate and plan study ``path`` on the local pool it would run on (``--workers`` bounds
    concurrency); ``overheads=False`` leaves the fixed costs out (no child process)."""
    fresh = "torch" not in sys.modules  # then the imports here are what the forkserver will do
    import_s = import_preload()
    t0 = time.perf_counter()
    from harness.config import load_study
    from harness.grid import expand, resolved_config
    from harness.scheduler import build_slots, describe_slots
    from harness.tracking import resolve_uri

    study = load_study(path)
    trials = expand(study)
    slots = build_slots(study.devices, study.trials_per_device)
    limit = min(len(slots), workers or len(slots))
    t_data = time.perf_counter()
    data = load_splits(study)
    data_s = time.perf_counter() - t_data
    setup_s = time.perf_counter() - t0
    device = slots[0].parent_device
    teachers, works = describe_work(study, data, trials, device)
    o = Overheads()
    if overheads:
        m = measure_mlflow(resolved_config(study, trials[0]) if trials else {}, study.train.epochs)
        store = m["store"] if store_is_new(resolve_uri(tracking_uri)) else m["reopen"]
        procs = max(2, limit)
        o = Overheads(startup=import_s + setup_s + store + PARENT_OPS * m["op"],
                      pool_start=import_s if fresh else measure_pool_start(), worker_setup=m["reopen"] + data_s,
                      per_trial=m["trial"], op=m["op"], contention=measure_contention(procs), contention_procs=procs)
    threads = slots[0].threads if device == "cpu" else None
    cal = calibrate(study, data, trials, device, threads, budget)
    gpu = any(s.parent_device.startswith("cuda") for s in slots)
    est = plan(teachers, works, cal.rates, o, limit, study.trials_per_device if gpu else 1)
    est.device, est.pool, est.study = device, describe_slots(slots, limit), study.name
    est.calibration_seconds = cal.seconds
    return est


def run_estimate(path: str | Path, workers: int | None = None, tracking_uri: str | None = None) -> int:
    """``harness run-study STUDY --estimate``: print the table; exit code 0."""
    est = estimate_study(path, workers, tracking_uri)
    lines = render(est)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown("\n".join(lines)))
    else:
        print("\n".join(lines))
    print("calibration (per image):")
    print_rates(est)
    return 0
