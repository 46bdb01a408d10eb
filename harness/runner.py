"""``harness run-study``: validate, expand, train teachers, run trials on a pool, summarise.

Order of a study invocation:

1. validate (study file, methods, parameters, model options, class ranges, data roots, devices,
   and on GPUs that ``trials_per_device`` trials fit in memory when a finished run of the study
   logged its peak ``gpu_peak_mb``) before anything is created, so bad input leaves no
   experiment, cache entry or run behind;
2. resume: a trial whose key already has a FINISHED run is skipped; every other trial is redone
   (its last run FAILED or KILLED); RUNNING runs of those keys (left by a killed study) are
   marked KILLED; the plan is printed: the counts, the pool and what a method says once
   (:func:`plan_notes`, e.g. cfl's pooled space), not from every trial;
3. the experiment's description, tags and shared view of its trials, a parent run for this
   invocation (kind ``study``, the study as params, ``study.yaml`` resolved and
   ``study_source.yaml`` as written), then the teacher stage:
   each split's teachers (one set, or one per seed with ``teacher_seeds: per_seed``) are trained
   or loaded once, here, with their routing statistics and outputs, so workers only load them
   from the cache (teachers new to the store are logged under a ``teacher_stage`` run);
4. the trials on the pool: the parent opens each trial's run (RUNNING) and a worker executes it;
   a trial that raises, hits a NaN/inf loss or runs out of memory ends FAILED with the reason,
   and so does one whose worker dies (unless it had ended the run FINISHED: then the trial is
   done); failed trials are retried up to ``max_retries`` times; a finished trial's
   ``gpu_peak_mb`` that shows ``trials_per_device`` trials do not fit on its GPU lowers the
   number run there at once (said in the progress); workers of a ``train.deterministic`` study
   get ``CUBLAS_WORKSPACE_CONFIG`` before they start CUDA;
5. a summary, exit code 0 if every trial finished, 1 otherwise; the report when all finished
   (also logged with the study run); the link to the trials in MLflow's UI.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union
from urllib.parse import urlparse

from harness.config import StudyConfig, dump_study, load_study, slurm_config
from harness.dispatch import dispatch
from harness.errors import HarnessError
from harness.files import process_alive, reason_fault, refused
from harness.interrupts import sigterm_as_interrupt
from harness.grid import Trial, build_splits, expand, method_variants
from harness.methods.base import get_method
from harness.progress import Progress, make_progress
from harness.records import InvocationRunTags
from harness.scheduler import (
    LocalPool, Outcome, PackingGuard, RayPool, Slot, SlurmPool, TeacherJob, TrialJob, WorkerContext, active_trials, build_slots,
    check_packing, check_slurm, gpu_total_mb, job_precision, run_teacher_job, run_trial_job, warm_trial_worker,
)
from harness.store import (
    ATTEMPT, DETACHED, END, FAILURE, FAILURE_KIND, KIND, KIND_STUDY, KIND_TRIAL,
    SLURM_JOBS, SOURCE_ARTIFACT, STUDY, STUDY_ARTIFACT, TRIAL_KEY,
    TRIAL_KEYS_ARTIFACT,
)
from harness.teachers import cache_files
from harness.tracking import (
    Tracker, experiment_text, git_tags, leading_comment, log_report, runs_url,
    store_path, study_run_name, utc_iso, version_tags,
)
from harness.train import deterministic_env, ensure_cublas_workspace
from harness.trial import TeacherStage, open_trial_run, prepare_teachers, study_split_dataset, teacher_seeds_of

Pool = Union[LocalPool, RayPool, SlurmPool]


def finished_keys(tracker: Tracker, experiment_id: str | None) -> set[str]:
    if experiment_id is None:
        return set()
    runs = tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("FINISHED",))
    return {r.data.tags.get(TRIAL_KEY, "") for r in runs}


def known_peak(tracker: Tracker, experiment_id: str | None, keys: set[str]) -> tuple[float, str] | None:
    """The largest ``gpu_peak_mb`` of the FINISHED runs of these trial keys in the store, and which
    run it is (None when no such run logged one: e.g. a study that never ran on a GPU)."""
    if experiment_id is None:
        return None
    best: tuple[float, str] | None = None
    for r in tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("FINISHED",)):
        peak = r.data.metrics.get("gpu_peak_mb")
        if r.data.tags.get(TRIAL_KEY) in keys and peak is not None and (best is None or peak > best[0]):
            best = (peak, r.info.run_name or r.info.run_id)
    return best


def check_packing_before(study: StudyConfig, tracker: Tracker, experiment_id: str | None, keys: set[str],
                         totals_mb: dict[str, float]) -> None:
    """HarnessError (one line naming ``trials_per_device``, with the numbers) when a finished run
    of the study in the store says that ``trials_per_device`` trials do not fit on a GPU of the
    pool (``totals_mb``: GPU -> total memory in MiB, :func:`harness.scheduler.gpu_total_mb`)."""
    known = known_peak(tracker, experiment_id, keys) if totals_mb and study.trials_per_device > 1 else None
    if known is None:
        return
    peak, run = known
    bad = check_packing(study.trials_per_device, peak, totals_mb, f"gpu_peak_mb of the finished run {run}")
    if bad:
        raise HarnessError(bad[0].refusal())


def _deterministic_anywhere(study: StudyConfig) -> bool:
    """Whether the student's or any teacher's recipe asks for deterministic training."""
    teachers = list(study.teachers) + [t for s in study.splits for t in (s.teachers or [])]
    return study.train.deterministic or any(t.deterministic for t in teachers)


def check_not_running(tracker: Tracker, experiment_id: str, study: str) -> None:
    """HarnessError if another runner on this host is running this study now (its runs would be
    marked stale and its trials run twice)."""
    for r in tracker.find(experiment_id, {KIND: KIND_STUDY}, ("RUNNING",)):
        pid = InvocationRunTags.from_tags(r.data.tags).runner_on(platform.node())
        if pid and pid != os.getpid() and process_alive(pid):
            raise HarnessError(f"study {study!r} is already being run by process {pid} on this host; "
                               "wait for it or stop it first")


def mark_stale(tracker: Tracker, experiment_id: str, keys: set[str]) -> int:
    """Runs left RUNNING by a killed study become KILLED: its study runs, and the trial runs of
    these keys (so their trials are redone). Returns the number of trial runs marked."""
    n = 0
    reason = {FAILURE: "stale: the study running it was killed", FAILURE_KIND: "stale"}
    for r in tracker.find(experiment_id, {KIND: KIND_STUDY}, ("RUNNING",)):
        tracker.finish_if_running(r.info.run_id, "KILLED", reason)
    for r in tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("RUNNING",)):
        if r.data.tags.get(TRIAL_KEY) in keys:
            n += tracker.finish_if_running(r.info.run_id, "KILLED", reason)
    return n


def print_table(trials: list[Trial], done: set[str], pool: str) -> None:
    """The trial table of ``--dry-run`` (a rich table on a terminal, plain columns otherwise)."""
    rows = [(t.split, t.method, t.variant, str(t.seed), t.key, "yes" if t.key in done else "no") for t in trials]
    footer = f"{len(trials)} trials, {sum(t.key in done for t in trials)} already finished; pool: {pool}"
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table("split", "method", "variant", "seed", "trial key", "cached")
        for row in rows:
            table.add_row(*row, style="dim" if row[-1] == "yes" else None)
        console = Console()
        console.print(table)
        console.print(footer)
        return
    print(f"{'split':<12} {'method':<10} {'variant':<16} {'seed':>4}  {'trial key':<16}  cached")
    for split, method, variant, seed, key, cached in rows:
        print(f"{split:<12} {method:<10} {variant:<16} {seed:>4}  {key:<16}  {cached}")
    print(footer)


def make_pool(study: StudyConfig, backend: str, workers: int | None, address: str | None,
              slurm: dict[str, Any] | None = None) -> Pool:
    """The study's pool; ``slurm``: the ``--slurm-*`` options (over the study's ``slurm:`` block)."""
    if workers is not None and workers < 1:
        raise HarnessError(f"--workers must be at least 1, got {workers}")
    if backend == "ray":
        return RayPool(study.devices, study.trials_per_device, workers, address)
    if backend not in ("local", "slurm"):
        raise HarnessError(f"--backend must be local, ray or slurm, got {backend!r}")
    if address:
        raise HarnessError("--address is for --backend ray")
    if backend == "slurm":  # --workers N: at most N array tasks at once, unless --slurm-array-parallelism says
        opts = {**({"array_parallelism": workers} if workers else {}), **(slurm or {})}
        return SlurmPool(slurm_config(study, opts), study.name)
    return LocalPool(build_slots(study.devices, study.trials_per_device), workers)


def teacher_files(paths: Iterable[Path]) -> dict[str, bytes]:
    """These cache files (checkpoints, routing statistics and teacher outputs of the current
    weights: :func:`harness.teachers.cache_files`) by path, relative to here when inside, for
    workers on nodes that do not share this file system."""
    out = {}
    for path in dict.fromkeys(p.resolve() for p in paths):
        rel = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
        out[rel] = path.read_bytes()
    return out


@dataclass
class Session:
    """One invocation of a study: where it logs, where its trials run, its parent run."""

    study: StudyConfig
    tracker: Tracker
    experiment_id: str
    pool: Pool
    parent: str = ""
    context: WorkerContext = field(default_factory=WorkerContext.capture)
    #: the trial keys of the whole study as run (logged as ``trial_keys.json``: reports use these)
    keys: list[str] = field(default_factory=list)
    provenance: dict[str, str] = field(default_factory=git_tags)
    started: float = field(default_factory=time.time)
    #: the run-time packing check of a local pool on GPUs (None: nothing to check)
    packing: PackingGuard | None = None
    #: the study file (the source of the runs' dataset inputs; its leading comment describes the experiment)
    source: str | None = None
    #: ``--detach`` (Slurm): submit every trial, print the job ids and return without waiting
    detach: bool = False


def run_study(
    path: str | Path, tracking_uri: str | None = None, dry_run: bool = False, workers: int | None = None,
    report: bool = True, backend: str = "local", address: str | None = None, live: bool | None = None,
    slurm: dict[str, Any] | None = None, detach: bool = False,
) -> int:
    """Run (or resume) a whole study; 0 if every trial finished, 1 if any finally failed.

    With ``backend="slurm"`` (``slurm``: the ``--slurm-*`` options), trials pending or running in
    Slurm (found by the comment their jobs carry) are neither resubmitted nor marked stale;
    ``detach`` submits the rest and returns 0 without waiting for them."""
    study = load_study(path)
    if detach and backend != "slurm":
        raise HarnessError("--detach needs --backend slurm")
    if slurm and backend != "slurm":
        raise HarnessError(f"{'--slurm-' + next(iter(slurm)).replace('_', '-')} needs --backend slurm")
    if backend == "slurm":  # bad options and a missing Slurm or partition stop us before anything is created
        cfg = slurm_config(study, slurm)
        check_slurm(cfg)
        # the jobs train where the runner may have no GPU: their precision comes from slurm.gpus_per_task
        trials = expand(study, precision=job_precision(study, cfg))
    else:
        trials = expand(study)
    splits = build_splits(study)
    tracker = Tracker(tracking_uri)
    exp_id = tracker.experiment(study.experiment_name, create=not dry_run)
    done = finished_keys(tracker, exp_id)
    if dry_run:
        plan = "Ray places the trials" if backend == "ray" else \
            make_pool(study, backend, workers, address, slurm).describe()
        if backend == "local":
            check_packing_before(study, tracker, exp_id, {t.key for t in trials},
                                 gpu_total_mb(build_slots(study.devices, study.trials_per_device)))
        print_table(trials, done, plan)
        for note in variant_notes(study):
            print(f"note: {note}")
        return 0
    assert exp_id is not None
    todo = [t for t in trials if t.key not in done]
    pool = make_pool(study, backend, workers, address, slurm)
    try:
        gpus = isinstance(pool, LocalPool) and any(sl.parent_device.startswith("cuda") for sl in pool.slots)
        if gpus and _deterministic_anywhere(study):  # before this process starts CUDA (teachers, memory sizes)
            ensure_cublas_workspace()
        totals = gpu_total_mb(pool.slots) if isinstance(pool, LocalPool) else {}
        check_packing_before(study, tracker, exp_id, {t.key for t in trials}, totals)
        if backend == "ray" and address and urlparse(tracker.uri).scheme in ("", "file", "sqlite"):
            print(f"warning: workers on other machines cannot write to {tracker.uri}; give --tracking-uri "
                  "http://<mlflow server> (see docs/cluster.md)", file=sys.stderr)
        check_not_running(tracker, exp_id, study.name)  # before the pool's start-up: a refusal leaves no process behind
        pool.warm()
        in_slurm = active_trials(study.name) if isinstance(pool, SlurmPool) else {}
        todo = [t for t in todo if t.key not in in_slurm]  # never a second job for a pending or running trial
        stale = mark_stale(tracker, exp_id, {t.key for t in todo})
        print(f"study {study.name}: {len(trials)} trials, {len(trials) - len(todo) - len(in_slurm)} already finished"
              f"{f', {len(in_slurm)} pending or running in Slurm' if in_slurm else ''}"
              f"{f', {stale} stale runs marked KILLED' if stale else ''}; tracking at {tracker.uri}")
        print(f"pool: {pool.describe()}")
        for note in [*variant_notes(study), *plan_notes(study, todo, splits)]:
            print(f"note: {note}")
        session = Session(study, tracker, exp_id, pool, keys=[t.key for t in trials],
                          packing=PackingGuard(study.trials_per_device, totals) if totals else None, source=str(path),
                          detach=detach)
        with sigterm_as_interrupt():
            failed = execute(session, todo, splits, backend, live)
    finally:
        pool.close()
    if detach:
        finish_detached(session, len(trials), todo, len(in_slurm))
        return 0
    summarise(session, len(trials), todo, failed)
    if report and not failed:
        try:
            from harness.report.build import build_report
        except ImportError:
            pass
        else:
            from harness.report.reproduce import committed_line

            out = build_report(study.name, tracking_uri=tracker.uri, experiment=study.experiment)
            print(f"report written to {out}{log_report(tracker.uri, study.name, out)}")
            if (line := committed_line(out)) is not None:  # over a committed report: does it reproduce?
                print(line)
    print_browse(tracker.uri, exp_id)
    return 1 if failed else 0


def variant_notes(study: StudyConfig) -> list[str]:
    """What the grid left out of the study's variants and why (e.g. a routing rule under which
    ``kd`` would train exactly like ``kd``: :func:`harness.grid.method_variants`)."""
    notes: list[str] = []
    method_variants(study, notes)
    return notes


def plan_notes(study: StudyConfig, trials: list[Trial], splits: dict) -> list[str]:
    """What the methods of these trials say once, before any of them starts
    (:meth:`harness.methods.base.Method.plan_note`), each note once: e.g. ``cfl runs in the pooled
    space in split 2x5 (teacher 1 (MLP) has no conv feature map)``, which its workers then do not
    warn about."""
    notes: dict[str, None] = {}
    asked: set[tuple[str, str, str]] = set()
    for t in trials:
        params = json.dumps(t.params, sort_keys=True, default=str)
        if (t.method, t.split, params) in asked:
            continue
        asked.add((t.method, t.split, params))
        cls = get_method(t.method)
        split = next(sp for sp in study.splits if sp.name == t.split)
        note = cls.plan_note(cls.parse_params(t.params, f"methods.{t.method}"), study.student,
                             study.teachers_for(split), splits[t.split].in_shape, t.split)
        if note:
            notes[note] = None
    return list(notes)


def print_browse(uri: str, experiment_id: str) -> None:
    """Where to see the student trials in MLflow's UI ("Model training", the study's shared view)."""
    url, command = runs_url(uri, experiment_id)
    if command:
        print(f"browse the trials: {command}, then open {url}")
    else:
        print(f"browse the trials: {url}")


def execute(session: Session, todo: list[Trial], splits: dict, backend: str, live: bool | None) -> list[tuple[Trial, str]]:
    """The parent run, the teacher stage, then the trials; returns the trials that failed."""
    s = session
    describe_experiment(s)
    now = time.time()
    invocation = InvocationRunTags(KIND_STUDY, s.study.name, platform.node(), os.getpid(), backend, s.pool.describe(),
                                   f"study/{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")
    s.parent = s.tracker.start(s.experiment_id, study_run_name(now), {
        **invocation.to_tags(), **s.provenance, **version_tags(),
    }, {k: v for k, v in s.study.model_dump(mode="json").items() if not (k in ("search", "slurm") and v is None)})
    try:
        s.tracker.log_text(s.parent, dump_study(s.study), STUDY_ARTIFACT)
        if (text := source_text(s)) is not None:  # as written, comments kept: the report's appendix
            s.tracker.log_text(s.parent, text, SOURCE_ARTIFACT)
        s.tracker.log_text(s.parent, json.dumps(s.keys, indent=0), TRIAL_KEYS_ARTIFACT)
        s.tracker.log_inputs(s.parent, [study_split_dataset(s.study, sp.name, s.source) for sp in s.study.splits])
        files = teacher_stage(s, todo, splits)
        env = deterministic_env(s.study.train.deterministic)  # in the worker before it starts CUDA
        if isinstance(s.pool, RayPool):  # nodes without this file system get the teachers with the jobs
            s.context = WorkerContext.capture(teacher_files(files), env=env)
        else:  # a standby worker opens the store and loads the data while the slot's trial runs
            s.context = WorkerContext.capture(warm=((warm_trial_worker, (s.tracker.uri, s.study)),), env=env)
        if s.detach:
            return submit_detached(s, todo)
        with make_progress(len(todo), s.pool.limit, live) as progress:
            return run_trials(s, todo, progress)
    except BaseException as e:
        stopped = isinstance(e, KeyboardInterrupt)
        reason = "interrupted" if stopped else f"{type(e).__name__}: {e}".splitlines()[0][:500]
        s.tracker.set_tags(s.parent, {FAILURE: reason})
        s.tracker.finish(s.parent, "KILLED" if stopped else "FAILED")
        raise


def source_text(s: Session) -> str | None:
    """The study file as written (None when there is none, or it cannot be read any more)."""
    try:
        return Path(s.source).read_text() if s.source else None
    except OSError:
        return None


def describe_experiment(s: Session) -> None:
    """The experiment's description, its tags from the study, "Model training" as its kind and the
    shared view of its student trials (:func:`harness.tracking.experiment_text`)."""
    comment = leading_comment(source_text(s) or "")
    s.tracker.set_experiment_tags(s.experiment_id, experiment_text(s.study, comment)[1])


def teacher_stage(s: Session, todo: list[Trial], splits: dict) -> list[Path]:
    """Train (or load) the teachers of every split with trials to run, once per teacher seed those
    trials use (``teacher_seeds``), with their outputs on the pool (the training images) and their
    routing statistics, so workers only load them. Teachers not yet in the store are logged under
    a ``teacher_stage`` run of this invocation. Returns their cache files. On Slurm, each split's
    teachers are one job instead, and the trials' array waits for them (no files here)."""
    if isinstance(s.pool, SlurmPool):
        names = list(dict.fromkeys(t.split for t in todo))
        seeds = {name: tuple(teacher_seeds_of(s.study, [t.seed for t in todo if t.split == name])) for name in names}
        jobs = [(name, TeacherJob(s.study, name, seeds[name], s.tracker.uri, s.experiment_id, s.parent))
                for name in names]
        for (name, _), job_id in zip(jobs, s.pool.submit_teachers(jobs, run_teacher_job, WorkerContext.capture())):
            print(f"teachers of {name}: Slurm job {job_id}")
        return []
    files: list[Path] = []
    stage = TeacherStage(s.tracker, s.experiment_id, s.parent, {STUDY: s.study.name})
    try:
        for name in dict.fromkeys(t.split for t in todo):  # only splits with trials to run
            for seed in teacher_seeds_of(s.study, [t.seed for t in todo if t.split == name]):
                recs = prepare_teachers(s.study, splits[name], s.tracker, s.experiment_id,
                                        device=s.pool.teacher_device, seed=seed, parent=stage)
                files += cache_files(recs, splits[name], s.study.cache_dir)
                accs = ", ".join(f"{r.metrics.get('test/union_acc_best', float('nan')):.3f}" for r in recs)
                which = f" (teacher seed {seed})" if seed is not None else ""
                print(f"teachers of {name}{which}: {'cached' if all(r.cached for r in recs) else 'trained'} "
                      f"(own-task test acc {accs})")
    except BaseException as e:
        stage.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    stage.finish()
    return files


def run_trials(s: Session, todo: list[Trial], progress: Progress) -> list[tuple[Trial, str]]:
    """Keep the pool full until every trial finished or failed ``max_retries + 1`` times
    (:func:`harness.dispatch.dispatch` over :class:`GridJobs`); returns the failures."""
    jobs = GridJobs(s, todo, progress)
    dispatch(s.pool, jobs)
    return jobs.failed


class GridJobs:
    """run-study's job source: the grid's trials in order, each attempt a new run opened here.

    A failed attempt is queued again until the trial failed ``max_retries + 1`` times; a worker that
    died without a word has its run marked FAILED here; a full or read-only disk stops the study
    (every next trial would fail the same way); on a stop, the running trials' runs end KILLED."""

    def __init__(self, s: Session, todo: list[Trial], progress: Progress) -> None:
        self.s, self.progress = s, progress
        self.queue = deque((t, 0) for t in todo)
        self.inflight: dict[str, tuple[Trial, int]] = {}
        self.failed: list[tuple[Trial, str]] = []

    def start_next(self) -> bool:
        if not self.queue:
            return False
        trial, attempt = self.queue.popleft()
        run_id, slot = submit(self.s, trial, attempt)
        self.inflight[run_id] = (trial, attempt)
        self.progress.started(trial.run_name, slot.name if slot else None, attempt)
        return True

    def in_flight(self) -> int:
        return len(self.inflight)

    def settle(self, out: Outcome) -> None:
        s = self.s
        trial, attempt = self.inflight.pop(out.key)
        result = out.result if out.ok else finished_result(s.tracker, out.key)
        if result is not None:  # also a worker that ended its run FINISHED and died before replying
            cls = get_method(trial.method)
            self.progress.finished(trial.run_name, result, ranked=cls.trains and not cls.uses_labels)
            learn_packing(s, out.slot, result, self.progress)
            return
        reason = settle_failure(s.tracker, out.key, out.error, out.kind)
        if refused(reason):  # a full or read-only disk fails every next trial too: one line, exit 2
            raise reason_fault(f"trial {trial.run_name}", reason, store_path(s.tracker.uri) or s.tracker.uri)
        retry = attempt < s.study.max_retries
        if retry:
            self.queue.append((trial, attempt + 1))
        else:
            self.failed.append((trial, reason))
        self.progress.failed_attempt(trial.run_name, reason, retry)

    def tick(self) -> None:
        self.progress.tick()

    def stopped(self, keys: list[str]) -> None:
        for run_id in keys:
            self.s.tracker.finish_if_running(run_id, "KILLED", {FAILURE: "interrupted: the study was stopped",
                                                                FAILURE_KIND: "interrupted",
                                                                END: utc_iso(time.time())})


def submit_detached(s: Session, todo: list[Trial]) -> list[tuple[Trial, str]]:
    """``--detach``: open every trial's run and send the trials as one job array, then leave them
    to Slurm (nothing is cancelled when the runner exits)."""
    run_ids = []
    try:
        for trial in todo:
            run_ids.append(submit(s, trial, 0)[0])
        assert isinstance(s.pool, SlurmPool)
        sub = s.pool.flush()
    except BaseException:
        s.pool.stop()
        for run_id in run_ids:
            s.tracker.finish_if_running(run_id, "KILLED", {FAILURE: "interrupted: the submission was stopped",
                                                           FAILURE_KIND: "interrupted"})
        raise
    s.pool.detach()
    if sub is not None:
        print(f"trials: Slurm job array {sub.job_id} ({len(sub.keys)} tasks, {s.pool.limit} at a time)")
    return []


def finish_detached(s: Session, n_trials: int, todo: list[Trial], n_in_slurm: int) -> None:
    """The parent run of a ``--detach`` submission ends FINISHED with what it submitted; the trials
    report to MLflow themselves."""
    jobs = ",".join(sub.job_id for sub in s.pool.submissions) if isinstance(s.pool, SlurmPool) else ""
    s.tracker.set_tags(s.parent, {DETACHED: "true", SLURM_JOBS: jobs})
    s.tracker.log_metrics(s.parent, {"trials_total": n_trials, "trials_submitted": len(todo),
                                     "trials_in_slurm": n_in_slurm,
                                     "trials_skipped": n_trials - len(todo) - n_in_slurm})
    s.tracker.finish(s.parent, "FINISHED")
    print(f"submitted {len(todo)} trials ({n_in_slurm} already in Slurm, "
          f"{n_trials - len(todo) - n_in_slurm} finished before): Slurm jobs {jobs or 'none'}")
    print(f"follow them with: harness status {s.source or s.study.name}; rerun the same command to resubmit "
          "what failed")


def learn_packing(s: Session, slot: Slot | None, result: dict[str, float], progress: Progress) -> None:
    """A finished trial's ``gpu_peak_mb``: when ``trials_per_device`` such trials do not fit on
    its GPU, the pool runs fewer at a time there from now on, and the progress says so."""
    if s.packing is None or slot is None or not isinstance(s.pool, LocalPool):
        return
    p = s.packing.observe(slot.parent_device, result.get("gpu_peak_mb"))
    if p is not None:
        s.pool.cap(p.device, p.fit)
        progress.emit(p.reduction())


def submit(s: Session, trial: Trial, attempt: int) -> tuple[str, Slot | None]:
    """Open the attempt's run here (RUNNING), then hand the trial to a worker."""
    run_id = open_trial_run(s.tracker, s.experiment_id, s.study, trial, parent_run_id=s.parent,
                            extra_tags={ATTEMPT: attempt, **s.provenance}, source=s.source)
    try:
        slot = s.pool.submit(run_id, run_trial_job, TrialJob(s.study, trial, run_id, s.tracker.uri), s.context)
    except BaseException as e:
        s.tracker.finish_if_running(run_id, "FAILED", {FAILURE: f"could not start a worker: {e}",
                                                       FAILURE_KIND: "exception"})
        raise
    return run_id, slot


def finished_result(tracker: Tracker, run_id: str) -> dict[str, float] | None:
    """The final metrics of a run whose worker gave no result but that ended FINISHED (the worker
    finished it and died before replying): the trial is done, not failed. None otherwise."""
    run = tracker.run(run_id)
    return dict(run.data.metrics) if run.info.status == "FINISHED" else None


def settle_failure(tracker: Tracker, run_id: str, error: str, kind: str) -> str:
    """The reason a run failed: the worker's own (it tagged the run), else the pool's (the worker
    died before it could), in which case the run is marked FAILED here."""
    tags = {FAILURE: error, FAILURE_KIND: kind or "exception", END: utc_iso(time.time())}
    if tracker.finish_if_running(run_id, "FAILED", tags):
        return error
    return tracker.run(run_id).data.tags.get(FAILURE, error)


def summarise(s: Session, n_trials: int, todo: list[Trial], failed: list[tuple[Trial, str]]) -> None:
    """Counts on the parent run (then ended), and a summary with every failed trial's reason."""
    finished, skipped = len(todo) - len(failed), n_trials - len(todo)
    seconds = time.time() - s.started
    s.tracker.log_metrics(s.parent, {"trials_total": n_trials, "trials_skipped": skipped, "trials_finished": finished,
                                     "trials_failed": len(failed), "study_seconds": seconds})
    s.tracker.finish(s.parent, "FAILED" if failed else "FINISHED")
    print(f"done: {finished} finished, {len(failed)} failed, {skipped} skipped in {seconds:.0f}s")
    for trial, reason in failed:
        print(f"  FAILED {trial.run_name} (key {trial.key}): {reason}")
