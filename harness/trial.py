"""One trial top to bottom: config -> data -> teachers (cached) -> method -> train loop -> MLflow.

This is the one place where the flow of a trial reads in order. Side effects (files, MLflow)
happen here and in :mod:`harness.tracking`; everything below is pure or module-local.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
import yaml

from harness import __version__
from harness.config import StudyConfig
from harness.data.splits import SplitData, attach_pool, build_split
from harness.grid import Trial, resolved_config
from harness.methods.base import SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.records import TeacherRunTags, TrialRunTags
from harness.store import (
    DETERMINISTIC, DEVICE, END, FAILURE, FAILURE_KIND, HOST, KIND, KIND_TEACHER_STAGE, KIND_TRIAL, PID, POOL,
    PRECISION, START, TEACHER_DIGESTS, TEACHER_KEYS, TRACEBACK, TRIAL_ARTIFACT, TRIAL_KEY,
)
from harness.teachers import OutputsOf, TeacherRecord, cached_outputs, get_teachers
from harness.tracking import (
    TEACHER_STAGE_NAME, Tracker, bestval, config_tag,
    split_dataset, teacher_run_name, trial_run_name, utc_iso, version_tags,
)
from harness.train import (
    EVAL_BATCH, EarlyStop, EpochCallback, NonFiniteLossError, determinism, effective_precision, fit,
    gpu_memory_metrics, predict_all, teacher_outputs,
)


class PrecisionMismatch(RuntimeError):
    """The trial's key was computed for another numeric precision than its device trains at."""


def default_routing(study: StudyConfig, trial: Trial) -> str | None:
    """The routing rule of a ``full`` variant in a study with a routing axis (what its name and
    ``harness.config`` say instead of ``full``); None otherwise."""
    rule = trial.params.get("routing") if isinstance(trial.params, dict) else None
    if not study.routing or trial.variant != "full" or not isinstance(rule, dict):
        return None
    from harness.routing import RoutingConfig

    return RoutingConfig.model_validate(rule).name


def trial_tags(trial: Trial, uses_labels: bool, seeded: bool = True, default_rule: str | None = None) -> dict[str, str]:
    """The identity tags of a trial run (:class:`harness.records.TrialRunTags`); ``harness.run``
    keeps the older full name (``2x5/kd/seed0``), ``harness.config`` is what group-by averages over seeds."""
    return TrialRunTags(
        study=trial.study, split=trial.split, method=trial.method, variant=trial.variant,
        config=config_tag(trial.method, trial.variant, default_rule), run=trial.run_name, seed=trial.seed,
        trial_key=trial.key, uses_labels=uses_labels, seeded=seeded, version=__version__,
    ).to_tags()


def teacher_metrics(rec: TeacherRecord) -> tuple[list[dict[str, float]], dict[str, float]]:
    """(per-epoch, final) metrics of a teacher run, over its own task only (no ``union`` name):
    ``val/own_task_acc`` per epoch (its one-task ``val/task_acc/0`` left out: the same number);
    ``test/own_task_acc`` (the cached best-val. weights every method uses), ``test/own_task_acc_last``,
    ``val/own_task_acc_best``, ``best_epoch``."""
    history = [{("val/own_task_acc" if k == "val/union_acc" else k): v for k, v in m.items()
                if not k.startswith("val/task_acc/")} for m in rec.history]
    nan = float("nan")
    final = {
        "test/own_task_acc": rec.metrics.get("test/union_acc_best", nan),
        "test/own_task_acc_last": rec.metrics.get("test/union_acc", nan),
        "val/own_task_acc_best": rec.metrics.get("val/union_acc_best", nan),
    }
    if "best_epoch" in rec.metrics:
        final["best_epoch"] = rec.metrics["best_epoch"]
    return history, final


class TeacherStage:
    """The ``teacher_stage`` run ("teacher training") of a study invocation, a child of its study
    run: created when the first teacher run is logged (teachers logged by an earlier invocation
    are not logged again, so a resumed study gets none), then the parent of the teacher runs."""

    def __init__(self, tracker: Tracker, experiment_id: str, parent_run_id: str, tags: dict[str, Any]) -> None:
        self.tracker, self.experiment_id, self.parent_run_id, self.tags = tracker, experiment_id, parent_run_id, tags
        self.run_id: str | None = None

    def __call__(self) -> str:
        if self.run_id is None:
            tags = {**self.tags, KIND: KIND_TEACHER_STAGE}
            self.run_id = self.tracker.start(self.experiment_id, TEACHER_STAGE_NAME, tags,
                                             parent_run_id=self.parent_run_id)
        return self.run_id

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.tracker.finish_if_running(self.run_id, status)


def log_teacher(tracker: Tracker, experiment_id: str, study: str, split: str, rec: TeacherRecord,
                parent: Callable[[], str] | None = None, per_seed: bool = False) -> None:
    """One FINISHED run per teacher key, weights (digest) and experiment (a cache hit logs only if
    none exists; a retrained teacher with other weights gets a run of its own), named
    ``teacher 0 · 2x5`` (with ``s<seed>`` when teachers are trained ``per_seed``), a child of
    ``parent()`` (the invocation's :class:`TeacherStage`) when given."""
    record = TeacherRunTags(study=study, split=split, task=rec.index, teacher_key=rec.key,
                            teacher_digest=rec.digest, teacher_seed=rec.seed, cached=rec.cached)
    if tracker.find(experiment_id, record.identity(), ("FINISHED",)):
        return
    tags = record.to_tags()
    name = teacher_run_name(split, rec.index, rec.seed if per_seed else None)
    run_id = tracker.start(experiment_id, name, tags, rec.spec, parent() if parent is not None else None)
    history, final = teacher_metrics(rec)
    for epoch, m in enumerate(history, start=1):
        tracker.log_metrics(run_id, m, step=epoch)
    tracker.log_metrics(run_id, final, step=len(history))
    tracker.finish(run_id)


def prepare_teachers(
    study: StudyConfig, split: SplitData, tracker: Tracker | None = None, experiment_id: str | None = None,
    device: str = "cpu", seed: int | None = None, parent: Callable[[], str] | None = None,
) -> list[TeacherRecord]:
    """Train or load the split's teachers for student seed ``seed`` (and log each once to MLflow,
    under ``parent()``: the invocation's :class:`TeacherStage`, when given).

    With ``teacher_seeds: fixed`` the seed is ignored (one set of teachers for every seed); with
    ``per_seed`` the teachers are trained with ``seed`` (see ``StudyConfig.teachers_for``)."""
    cfg = next(s for s in study.splits if s.name == split.name)

    def on_ready(rec: TeacherRecord) -> None:
        if tracker is not None and experiment_id is not None:
            log_teacher(tracker, experiment_id, study.name, split.name, rec, parent,
                        per_seed=study.teacher_seeds == "per_seed")

    return get_teachers(split, study.dataset, study.teachers_for(cfg, seed), study.cache_dir, device, on_ready)


def teacher_seeds_of(study: StudyConfig, seeds: Iterable[int]) -> list[int | None]:
    """The seeds whose teachers trials of these student ``seeds`` use: ``[None]`` (one set for
    all) with ``teacher_seeds: fixed``, else each seed once, in order."""
    return list(dict.fromkeys(seeds)) if study.teacher_seeds == "per_seed" else [None]


def teacher_tags(records: list[TeacherRecord]) -> dict[str, str]:
    """What a trial's numbers rest on: its teachers' cache keys and weight digests, in task order."""
    return {TEACHER_KEYS: ",".join(r.key for r in records),
            TEACHER_DIGESTS: ",".join(r.digest for r in records)}


@torch.no_grad()
def route_in_chunks(method: Any, logits: list[torch.Tensor], feats: list[torch.Tensor],
                    chunk: int = EVAL_BATCH) -> torch.Tensor:
    """The method's pseudo-labels of every row, routed ``chunk`` rows at a time (on the method's
    device, like a training batch), returned on the CPU: memory bounded by one chunk whatever N.
    Routing is per image (statistics fitted beforehand), so chunks change no decision."""
    n = len(logits[0]) if logits else 0
    out = [method.route([t[i:i + chunk] for t in logits], [f[i:i + chunk] for f in feats])[0].cpu()
           for i in range(0, n, chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def diagnostics(
    method: Any, teachers: TeacherSet, data: SplitData, device: str, pool_outputs: Any = None
) -> dict[str, float]:
    """Label-free quality measures; labels are read here only to *measure*, never to train.

    The *pool* is the split's unlabelled images (:attr:`SplitData.pool_part`: the training
    images, or the transfer set); ``pool_outputs`` are the teachers' outputs on it, if at hand.

    - ``diag/pseudo_label_acc``: accuracy of the pseudo-labels on the pool; not logged when the
      pool is a transfer set (it has no labels);
    - ``diag/ensemble_union_acc``: the claiming-teacher ensemble's union accuracy on the test split;
    - ``diag/oracle_pseudo_label_acc``, ``diag/oracle_ensemble_acc``: the same with oracle routing,
      each image sent to the teacher of its own task (:func:`harness.routing.oracle_labels`): the
      teachers' ceiling, so that oracle - claiming is what routing costs (the pool's, again, not
      with a transfer set: its images belong to no task);
    - ``diag/probe_acc``: logistic regression on the student's features of the pool fitted to
      the pool's pseudo-labels, scored on the test split.

    Memory: images, teacher outputs and student features are computed in chunks of
    :data:`~harness.train.EVAL_BATCH` images and routing runs chunk by chunk
    (:func:`route_in_chunks`), so nothing of size [N, C, d] exists; what is kept whole is N rows
    of outputs: teacher logits and features ([N, n_k + d_k] per teacher) and the student's
    features. At CIFAR scale (50k x 512 float32) those are 100 MB, and fitting the probe on them
    (standardised copy, 50 classes) peaks about 200 MB above that (tracemalloc), on the CPU: fine,
    so the probe is fitted on all of them in one go.
    """
    from sklearn.linear_model import LogisticRegression

    from harness.data.stream import on_device  # streamed parts are read in order in batches

    from harness.routing import oracle_labels

    out = {}
    pls = {}
    parts = {"pool": data.pool_part, "test": data.parts["test"]}
    labelled = {"pool": data.pool is None, "test": True}  # a transfer set has no labels to measure with
    for part, images in parts.items():
        if part == "pool" and pool_outputs is not None:
            logits, feats = pool_outputs
        else:
            logits, feats = teacher_outputs(teachers, on_device(images.x, device), device=device)
        pls[part] = route_in_chunks(method, logits, feats)
        if labelled[part]:
            oracle = oracle_labels([z.cpu() for z in logits], images.t, data.offsets)
            name = "oracle_pseudo_label_acc" if part == "pool" else "oracle_ensemble_acc"
            out[f"diag/{name}"] = (oracle == images.y).float().mean().item()
    if labelled["pool"]:
        out["diag/pseudo_label_acc"] = (pls["pool"] == parts["pool"].y).float().mean().item()
    out["diag/ensemble_union_acc"] = (pls["test"] == data.parts["test"].y).float().mean().item()
    if method.trains:
        feats = {p: predict_all(method.student.features, on_device(parts[p].x, device), device=device).cpu().numpy()
                 for p in pls}
        mu, sd = feats["pool"].mean(0), feats["pool"].std(0) + 1e-6
        y_pl = pls["pool"].numpy()
        if len(np.unique(y_pl)) > 1:
            clf = LogisticRegression(max_iter=300).fit((feats["pool"] - mu) / sd, y_pl)
            pred = clf.predict((feats["test"] - mu) / sd)
            out["diag/probe_acc"] = float((pred == data.parts["test"].y.numpy()).mean())
    return out


def open_trial_run(
    tracker: Tracker, experiment_id: str, study: StudyConfig, trial: Trial, *, parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None, source: str | None = None,
) -> str:
    """Create the trial's run (status RUNNING) with its name, tags, params, ``trial.yaml`` and the
    study's split as its dataset input (``digits:2x5``; ``source``: the study file, when known).

    The runner calls this in the parent process, so the run exists, and can be marked FAILED,
    even when the worker that executes it dies."""
    cls = get_method(trial.method)
    rule = default_routing(study, trial)
    tags = {**trial_tags(trial, cls.uses_labels, cls.seeded, rule), **(extra_tags or {})}
    cfg = resolved_config(study, trial)
    run_id = tracker.start(experiment_id, trial_run_name(trial.split, trial.method, trial.variant, trial.seed, rule),
                           tags, cfg, parent_run_id)
    try:
        tracker.log_text(run_id, yaml.safe_dump(cfg, sort_keys=False), TRIAL_ARTIFACT)
        tracker.log_inputs(run_id, [study_split_dataset(study, trial.split, source)])
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    return run_id


def study_split_dataset(study: StudyConfig, split: str, source: str | None = None) -> Any:
    """The dataset input of a split of the study (:func:`harness.tracking.split_dataset`): named
    ``<data set>:<split>``, its digest over the data set and split config."""
    cfg = next(s for s in study.splits if s.name == split)
    config = {"dataset": study.dataset.model_dump(mode="json"), "split": cfg.model_dump(mode="json")}
    return split_dataset(study.dataset.name, split, config, source)


def execute_trial(
    study: StudyConfig, trial: Trial, tracker: Tracker, run_id: str, *, data: SplitData | None = None,
    device: str = "cpu", extra_tags: dict[str, Any] | None = None, epoch_hook: EpochCallback | None = None,
    diagnose: bool = True,
) -> dict[str, float]:
    """Run one trial in this process and log it to the open run ``run_id``.

    The run ends FINISHED, or FAILED/KILLED with ``harness.failure`` on any exception (re-raised;
    ``EarlyStop`` from ``epoch_hook``, called after each epoch is logged, ends it KILLED as pruned).
    Teachers are loaded from the cache (the runner trained them before the trials). ``diagnose``
    adds the label-free diagnostics (they read the test split). ``train.deterministic`` holds for
    training and diagnostics (:func:`harness.train.determinism`); the run is tagged
    ``harness.deterministic`` with what was really set, and on CUDA logs ``gpu_peak_mb``."""
    t0 = time.time()
    tracker.set_tags(run_id, {
        PID: os.getpid(), HOST: platform.node(), DEVICE: device,
        START: utc_iso(t0), **version_tags(), **(extra_tags or {}),
    })
    try:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        precision = effective_precision(study.train, device)
        if precision != trial.precision:  # the key promised other arithmetic than this device does
            raise PrecisionMismatch(f"the trial key is for {trial.precision}, but on {device} the trial "
                                    f"would train in {precision}; run it on a device of its precision")
        with determinism(study.train.deterministic, device) as deterministic:  # training and diagnostics
            tracker.set_tags(run_id, {PRECISION: precision,
                                      DETERMINISTIC: str(deterministic).lower()})
            final = _train_and_measure(study, trial, tracker, run_id, data, device, epoch_hook, diagnose)
        final.update(memory_metrics(device))
        final["trial_seconds"] = time.time() - t0
        tracker.log_metrics(run_id, final, step=study.train.epochs if get_method(trial.method).trains else 0)
        tracker.set_tags(run_id, {END: utc_iso(time.time())})
        finish_unique(tracker, run_id, trial.key)
        return final
    except BaseException as e:
        kind, reason = failure_reason(e)
        try:
            tracker.set_tags(run_id, {FAILURE: reason, FAILURE_KIND: kind,
                                      END: utc_iso(time.time()),
                                      TRACEBACK: traceback.format_exc()[-4000:]})
            tracker.finish(run_id, "KILLED" if kind in ("interrupted", "pruned") else "FAILED")
        except Exception as log_error:  # the store failed too: the trial's own failure still wins (the
            # runner marks a run left RUNNING with the reason the worker reports)
            warnings.warn(f"could not record the failure of run {run_id}: {log_error}", stacklevel=1)
        raise


def _train_and_measure(
    study: StudyConfig, trial: Trial, tracker: Tracker, run_id: str, data: SplitData | None, device: str,
    epoch_hook: EpochCallback | None, diagnose: bool,
) -> dict[str, float]:
    """The trial's teachers, method and training, its curves logged as they come; returns the
    final metrics with the diagnostics (not yet logged)."""
    cls = get_method(trial.method)
    split_cfg = next((i, s) for i, s in enumerate(study.splits) if s.name == trial.split)
    field = f"splits[{split_cfg[0]}]"
    # the pool too, whatever built ``data`` (e.g. tuning's copy without the test part)
    data = attach_pool(data or build_split(split_cfg[1], study.dataset, field), split_cfg[1], study.dataset, field)
    records = prepare_teachers(study, data, device=device, seed=trial.seed)
    # label-free methods learn from the pool (a transfer set, if any); scratch from the labelled part
    learns_from: OutputsOf = "train" if cls.uses_labels else "pool"
    train_data = data.student_view(cls.uses_labels)
    tracker.set_tags(run_id, {**teacher_tags(records),
                              POOL: "train" if cls.uses_labels else data.pool_label})
    teachers = TeacherSet([r.net for r in records], [r.stats for r in records])
    torch.manual_seed(trial.seed)
    np.random.seed(trial.seed)
    student = build_model(study.student.arch, data.in_shape, data.num_classes, **study.student.options())
    params = cls.ParamsModel.model_validate(trial.params)
    method = cls(student, teachers, params, SplitInfo(tuple(data.sizes), tuple(data.offsets)))
    if tags := method.run_tags():  # what really ran, e.g. cfl's pooled fallback for an MLP
        tracker.set_tags(run_id, tags)

    curves = tracker.buffered(run_id)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        curves.log(metrics, step=epoch)
        if epoch_hook is not None:
            epoch_hook(epoch, metrics)

    # frozen teachers, no augmentation: their outputs come from the per-split disk cache
    outputs = None if study.train.augment else cached_outputs(records, data, study.cache_dir, learns_from)
    try:
        res = fit(method, train_data, study.train, trial.seed, device, on_epoch, cached_outputs=outputs)
    except BaseException:
        try:
            curves.flush()  # the epochs so far, also of a trial that fails or is pruned ...
        except Exception as flush_error:  # ... but the trial's own failure is the reason
            warnings.warn(f"could not log the last epochs of run {run_id}: {flush_error}", stacklevel=1)
        raise
    curves.flush()
    if (after := method.run_tags()) != tags:  # what is known only once it ran (crd's pool size)
        tracker.set_tags(run_id, after)
    final = {bestval(k): v for k, v in res.final.items()}  # test/union_acc_best -> test/union_acc_bestval
    final["pool_size"] = float(len(train_data.parts["train"]))
    if diagnose:
        same = learns_from == "pool" or data.pool is None  # ``outputs`` are on the pool
        pool_outputs = outputs if same or outputs is None else cached_outputs(records, data, study.cache_dir)
        final.update(diagnostics(method, teachers, data, device, pool_outputs))
    return final


def run_trial(
    study: StudyConfig, trial: Trial, tracker: Tracker, experiment_id: str, *, data: SplitData | None = None,
    parent_run_id: str | None = None, device: str = "cpu", extra_tags: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Open the trial's run and execute it here, in this process (no worker)."""
    run_id = open_trial_run(tracker, experiment_id, study, trial, parent_run_id=parent_run_id, extra_tags=extra_tags)
    return execute_trial(study, trial, tracker, run_id, data=data, device=device)


def memory_metrics(device: str) -> dict[str, float]:
    """Peak resident memory of this process and, on CUDA, the trial's peak GPU memory
    (``gpu_peak_mb``, what the pool's packing check reads, and ``cuda_max_allocated_mb``:
    :func:`harness.train.gpu_memory_metrics`)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 1024)}  # bytes on macOS, KiB on Linux
    out.update(gpu_memory_metrics(device))
    return out


def failure_reason(e: BaseException) -> tuple[str, str]:
    """(``harness.failure_kind``, ``harness.failure``) of an exception, the reason on one line."""
    first = (str(e).strip().splitlines() or [""])[0][:500]
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", "interrupted"
    if isinstance(e, EarlyStop):
        return "pruned", f"pruned: {first}"
    if isinstance(e, NonFiniteLossError):
        return "nonfinite", f"non-finite loss: {first}"
    if isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e).lower() for m in ("out of memory", "not enough memory"))
    ):
        return "oom", f"out of memory: {text}"
    return "exception", text


def finish_unique(tracker: Tracker, run_id: str, key: str) -> None:
    """End the run FINISHED unless the trial key already has a FINISHED run or the run was ended
    by someone else (a rerun marked it stale): exactly one FINISHED run per trial key."""
    run = tracker.run(run_id)
    if run.info.status != "RUNNING":
        return
    if run.data.tags.get(KIND, KIND_TRIAL) != KIND_TRIAL:  # a tuning run measures one Optuna trial
        tracker.finish(run_id, "FINISHED")
        return
    same = {TRIAL_KEY: key, KIND: KIND_TRIAL}
    others = [r.info.run_id for r in tracker.find(run.info.experiment_id, same, ("FINISHED",)) if r.info.run_id != run_id]
    if others:
        tracker.set_tags(run_id, {FAILURE: f"duplicate: run {others[0]} already finished this trial",
                                  FAILURE_KIND: "duplicate"})
        tracker.finish(run_id, "KILLED")
    else:
        tracker.finish(run_id, "FINISHED")
