"""The Slurm pool: the same jobs as Slurm jobs, submitted through submitit.

- The trials of one submission go out as **one job array** (``array_parallelism`` tasks at a
  time), named ``harness:<study>``; each task's comment is ``harness:<study>:<trial key>``, so
  ``squeue``/``sacct`` tell which trial a job runs (:func:`active_trials`). The array is
  submitted held, its tasks labelled, then released: no task starts unlabelled.
- Each split's teachers go first as one job per split (comment ``harness:<study>:teachers:<split>``,
  :class:`TeacherJob`); the next array waits for them (``afterok``; a failed teacher job cancels
  the trials waiting on it, with that reason).
- A job runs :func:`_slurm_main`: the local worker's set-up (:func:`enter_worker`) and then the
  very function a local worker runs, so its numbers are those of a local run. The trial's run is
  tagged ``harness.slurm_job`` (``12_3``), ``harness.slurm_job_id`` (``12``) and
  ``harness.slurm_array_index`` (``3``).
- A job that ends without a result (``scancel``, time limit, out of memory, node failure,
  SIGKILL) is an :class:`Outcome` with Slurm's state and reason from ``sacct``, so the runner
  marks the trial FAILED with it and ``max_retries`` resubmits it. A job that Slurm requeues
  (preemption, ``scontrol requeue``) starts again: the run of the interrupted start ends KILLED
  (``preempted``) and the new start logs to a fresh run, so each key ends with one FINISHED run.
- Every call to Slurm has a time limit (:data:`COMMAND_TIMEOUT_S`); a cluster that stays
  unreachable for :data:`UNREACHABLE_S` fails the jobs in flight instead of waiting forever.
"""

from __future__ import annotations

import getpass
import os
import platform
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from harness.devices import cpu_cores
from harness.errors import HarnessError
from harness.scheduler._slots import Slot
from harness.scheduler._worker import Outcome, Target, TrialJob, WorkerContext, enter_worker
from harness.store import (
    ATTEMPT, FAILURE, FAILURE_KIND, GIT_COMMIT, GIT_DIRTY, KIND, KIND_TRIAL, SLURM_ARRAY_INDEX,
    SLURM_JOB, SLURM_JOB_ID, SLURM_RESTARTS, STUDY, TRIAL_KEY,
)

if TYPE_CHECKING:
    from harness.config import SlurmConfig, StudyConfig

#: seconds one call of a Slurm command (squeue, sacct, scontrol, scancel) may take
COMMAND_TIMEOUT_S = 60
#: seconds a submission (sbatch of one array, then labelling and release) may take
SUBMIT_TIMEOUT_S = 180
#: seconds between two looks at the queue while jobs are in flight
POLL_S = 2.0
#: a job that left the queue without a result whose end sacct has not recorded after this long
#: is reported as ended without a result all the same
GONE_GRACE_S = 60.0
#: seconds the cluster may stay unreachable before the jobs in flight are reported failed
UNREACHABLE_S = 600.0
#: job states after which a job runs no more (sacct's ``State`` first word)
FINAL = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "REVOKED")
COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo", "srun")
_KEY = re.compile(r"^[0-9a-f]{16}$")


def job_name(study: str) -> str:
    """The name of every job of a study (trials and teachers)."""
    return f"harness:{study}"


def trial_comment(study: str, key: str) -> str:
    """The comment of a trial's job: finds the trial's job with ``squeue``/``sacct``."""
    return f"harness:{study}:{key}"


def teacher_comment(study: str, split: str) -> str:
    return f"harness:{study}:teachers:{split}"


def trial_key_of(comment: str, study: str) -> str | None:
    """The trial key in a job's comment (None for a teachers' job or another study's job)."""
    prefix = f"harness:{study}:"
    key = comment[len(prefix):] if comment.startswith(prefix) else ""
    return key if _KEY.match(key) else None


def run_command(args: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a Slurm command; its stdout, or HarnessError with one line (stderr's last line)."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise HarnessError(f"--backend slurm: {args[0]} is not on PATH (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{args[0]} did not answer within {timeout:.0f} s (is slurmctld up?)") from None
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(args[:2])}: {_error_line(proc.stderr or proc.stdout, proc.returncode)}")
    return proc.stdout


def _error_line(text: str, code: int = 1) -> str:
    """The line of a Slurm command's output that says what went wrong."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    bad = [ln for ln in lines if any(w in ln.lower() for w in ("error", "failure", "unrecognized", "invalid"))]
    return (bad or lines or [f"exit code {code}"])[0][:300]


@dataclass
class JobInfo:
    """One job (or array task) as ``squeue`` or ``sacct`` shows it."""

    job_id: str  # 12 for a job, 12_3 for an array task
    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...
    reason: str = ""  # why it is pending (Resources, Priority, JobHeldUser, Dependency, ...) or ended
    comment: str = ""
    node: str = ""
    exit_code: str = ""  # sacct's "exit:signal"
    elapsed: str = ""

    @property
    def final(self) -> bool:
        return self.state.split()[0] in FINAL if self.state else False


def _rows(text: str, n: int) -> list[list[str]]:
    return [row.split("|", n - 1) for row in text.splitlines() if row.count("|") >= n - 1]


def squeue(user: str | None = None) -> list[JobInfo]:
    """The user's jobs in the queue (pending, running, completing), array tasks one per line."""
    out = run_command(["squeue", "-h", "-r", "-u", user or getpass.getuser(), "-o", "%i|%T|%r|%N|%M|%k"])
    return [JobInfo(i, st, r if r != "None" else "", c if c != "(null)" else "", node=n, elapsed=m)
            for i, st, r, n, m, c in _rows(out, 6)]


def _expand(job_id: str) -> list[str]:
    """``12_[0-3%2]`` (a pending array's record in sacct) as ``12_0`` ... ``12_3``."""
    m = re.match(r"^(\d+)_\[([0-9,\-]+)(%\d+)?\]$", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def sacct(job_ids: list[str]) -> dict[str, JobInfo]:
    """Accounting records (allocations, not steps) of these jobs (``12``, ``12_3``: a job id asks
    for all its array tasks) by job id; a later record of a requeued job replaces an earlier one.
    (By id, not by name: a job cancelled before it was eligible is missing from time windows.)"""
    args = ["sacct", "-X", "-P", "-n", "-D", "-o", "JobID,State,Reason,NodeList,ExitCode,Elapsed,Comment",
            "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))]
    out: dict[str, JobInfo] = {}
    for jid, st, reason, node, code, elapsed, comment in _rows(run_command(args), 7):
        for one in _expand(jid):
            out[one] = JobInfo(one, st, reason if reason != "None" else "", comment, node, code, elapsed)
    return out


def active_trials(study: str, jobs: list[JobInfo] | None = None) -> dict[str, JobInfo]:
    """Trial key -> its job, for the study's trials pending or running in Slurm now (found by the
    comment their jobs carry)."""
    out = {}
    for job in squeue() if jobs is None else jobs:
        key = trial_key_of(job.comment, study)
        if key is not None and job.state not in ("COMPLETING",) and not job.final:
            out[key] = job
    return out


def job_precision(study: "StudyConfig", cfg: "SlurmConfig") -> str:
    """The precision the study's trials train at in jobs of ``cfg`` (their trial keys carry it):
    ``bf16`` on GPUs with ``train.amp`` (a GPU without bf16 then refuses the trial, naming the
    precision), else ``fp32``. The runner need not see a GPU itself."""
    return "bf16" if cfg.gpus_per_task and study.train.amp else "fp32"


def signal_name(code: str) -> str:
    """``0:9`` (sacct's exit:signal) as ``exit code 0, signal 9 (SIGKILL)``."""
    ex, _, sig = code.partition(":")
    text = f"exit code {ex}"
    if sig and sig != "0":
        try:
            text += f", signal {sig} ({signal.Signals(int(sig)).name})"
        except ValueError:
            text += f", signal {sig}"
    return text


def ended_text(info: JobInfo | None, job_id: str, cfg: "SlurmConfig | None" = None) -> str:
    """Why a job ended without a result, in Slurm's words (sacct's state and exit code)."""
    if info is None:
        return f"Slurm job {job_id} left the queue without a result and without an accounting record"
    state = info.state.split()[0] if info.state else "UNKNOWN"
    text = f"Slurm job {job_id} {info.state or 'UNKNOWN'}"
    if state == "TIMEOUT":
        text += f": its time limit{f' of {cfg.time_min} min (slurm.time_min)' if cfg else ''} was reached"
    elif state == "OUT_OF_MEMORY":
        text += f": over its memory{f' of {cfg.mem_gb:g} GB (slurm.mem_gb)' if cfg and cfg.mem_gb else ''}"
    elif state == "NODE_FAIL":
        text += f": node {info.node or '?'} failed"
    elif state == "CANCELLED" and "DependencyNeverSatisfied" in info.reason:
        text += ": the split's teachers' job did not succeed"
    elif state in ("FAILED", "COMPLETED") and info.exit_code:
        text += f" ({signal_name(info.exit_code)})"
    return text


# ---------------------------------------------------------------------------- the job side


@dataclass(frozen=True)
class TeacherJob:
    """A split's teacher stage as a Slurm job: train (or load) its teachers for these teacher
    seeds and log them under the invocation's study run (``parent``)."""

    study: "StudyConfig"
    split: str
    seeds: tuple[int | None, ...]
    tracking_uri: str
    experiment_id: str
    parent: str | None = None


def run_teacher_job(job: TeacherJob, slot: Slot) -> dict[str, list[float]]:
    """Job side of a teacher stage: teacher seed -> the teachers' test accuracies."""
    from harness.data.splits import build_split
    from harness.tracking import Tracker
    from harness.trial import TeacherStage, prepare_teachers

    index, cfg = next((i, s) for i, s in enumerate(job.study.splits) if s.name == job.split)
    data = build_split(cfg, job.study.dataset, f"splits[{index}]")
    tracker = Tracker(job.tracking_uri)
    stage = TeacherStage(tracker, job.experiment_id, job.parent, {STUDY: job.study.name}) \
        if job.parent else None
    out = {}
    try:
        for seed in job.seeds:
            recs = prepare_teachers(job.study, data, tracker, job.experiment_id, device=slot.device, seed=seed,
                                    parent=stage)
            out[str(seed)] = [r.metrics.get("test/union_acc_best", float("nan")) for r in recs]
    except BaseException:
        if stage is not None:
            stage.finish("FAILED")
        raise
    if stage is not None:
        stage.finish()
    return out


def this_job() -> tuple[str, str, str]:
    """(``12_3`` or ``12``, the job id ``12``, the array index ``3`` or "") from Slurm's variables."""
    array_id, index = os.environ.get("SLURM_ARRAY_JOB_ID", ""), os.environ.get("SLURM_ARRAY_TASK_ID", "")
    if array_id and index:
        return f"{array_id}_{index}", array_id, index
    jid = os.environ.get("SLURM_JOB_ID", "")
    return jid, jid, ""


def slurm_tags(restarts: int) -> dict[str, str]:
    full, jid, index = this_job()
    tags = {SLURM_JOB: full, SLURM_JOB_ID: jid, SLURM_ARRAY_INDEX: index}
    if restarts:
        tags[SLURM_RESTARTS] = str(restarts)
    return tags


def _this_start(job: TrialJob) -> TrialJob | dict[str, float]:
    """The run this start of the job logs to (tagged with the Slurm job), or the metrics of the
    trial's FINISHED run when an earlier start of this job finished it.

    On a first start that is the run the runner opened. A job Slurm requeued (preemption, node
    failure, ``scontrol requeue``) starts again with ``SLURM_RESTART_COUNT`` > 0: the runs its
    earlier starts left RUNNING end KILLED (``preempted``) and this start opens a fresh run of
    the trial (same parent and attempt), so the key ends with exactly one FINISHED run."""
    from harness.tracking import Tracker
    from harness.trial import open_trial_run

    tracker = Tracker(job.tracking_uri)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    tags = slurm_tags(restarts)
    if restarts == 0:
        tracker.set_tags(job.run_id, tags)
        return job
    first = tracker.run(job.run_id)
    exp = first.info.experiment_id
    same = {TRIAL_KEY: job.trial.key, KIND: KIND_TRIAL}
    done = tracker.find(exp, same, ("FINISHED",))
    if done:
        return dict(done[0].data.metrics)
    reason = {FAILURE: f"preempted: Slurm requeued job {tags[SLURM_JOB]} (start {restarts + 1})",
              FAILURE_KIND: "preempted"}
    tracker.finish_if_running(job.run_id, "KILLED", reason)
    for r in tracker.find(exp, {**same, SLURM_JOB: tags[SLURM_JOB]}, ("RUNNING",)):
        tracker.finish_if_running(r.info.run_id, "KILLED", reason)
    keep = {k: v for k, v in first.data.tags.items()
            if k.startswith((ATTEMPT, GIT_COMMIT, GIT_DIRTY, "mlflow.source.git"))}
    run_id = open_trial_run(tracker, exp, job.study, job.trial, parent_run_id=first.data.tags.get("mlflow.parentRunId"),
                            extra_tags={**keep, **tags})
    return replace(job, run_id=run_id)


def _exit_on_term(signum: int, frame: Any) -> None:
    """SIGTERM (scancel, the time limit, preemption): end now and leave the run to the pool (or
    to the next start of a requeued job), which marks it with Slurm's reason."""
    os._exit(128 + signum)


def _clear_interrupted_result() -> None:
    """A start of a requeued job: remove the result file an earlier start of this job left half
    written (SIGTERM while submitit saved its result). submitit saves through
    ``<result>.save_tmp`` and refuses to start over one that exists ("A temporary saved file
    already exists"), so the new start would end FAILED with exit code 1 after doing its work."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0:
        return
    try:
        from submitit import JobEnvironment

        result = JobEnvironment().paths.result_pickle
    except Exception:  # not under submitit (a test calling this directly): nothing of ours to clear
        return
    result.with_suffix(result.suffix + ".save_tmp").unlink(missing_ok=True)


def _slurm_main(target: Target, payload: Any, ctx: WorkerContext, threads: int | None, gpus: int) -> Any:
    """Entry point of a Slurm job (submitit runs it in the job's process): the local worker's
    set-up for a slot of ``threads`` torch threads (None: this process's cores) on the job's
    GPU (``cuda:0``, Slurm sets ``CUDA_VISIBLE_DEVICES``) or CPU, then ``target(payload, slot)``."""
    signal.signal(signal.SIGTERM, _exit_on_term)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # submitit's "time limit near" signal: the limit's SIGTERM ends us
    _clear_interrupted_result()
    full, _, _ = this_job()
    device = "cuda:0" if gpus else "cpu"
    slot = Slot(f"slurm {full}@{platform.node()}", device, None, threads or cpu_cores(), device)
    enter_worker(ctx, slot)
    if isinstance(payload, TrialJob):
        start = _this_start(payload)
        if not isinstance(start, TrialJob):
            return start
        payload = start
    return target(payload, slot)


# ---------------------------------------------------------------------------- the pool


@dataclass
class _Job:
    key: str
    payload: Any
    label: str | None  # the comment naming the job's trial or teachers
    job: Any = None  # the submitit job
    gone: float | None = None  # when squeue first stopped listing it
    teachers: bool = False

    @property
    def job_id(self) -> str:
        return str(self.job.job_id) if self.job is not None else ""


@dataclass
class Submission:
    """What one submission sent: the array (or job) id and the keys of its tasks."""

    job_id: str
    keys: list[str] = field(default_factory=list)
    kind: str = "trials"


def sbatch_options(cfg: "SlurmConfig") -> list[str]:
    """The sbatch options of one job of ``cfg`` (what ``sbatch --test-only`` checks)."""
    args = [f"--cpus-per-task={cfg.cpus_per_task}", f"--time={cfg.time_min}"]
    if cfg.partition:
        args.append(f"--partition={cfg.partition}")
    if cfg.gpus_per_task:
        args.append(f"--gpus-per-task={cfg.gpus_per_task}")
    if cfg.mem_gb:
        args.append(f"--mem={max(1, round(cfg.mem_gb * 1024))}MB")
    args += [f"--{k}" if v is True else f"--{k}={v}" for k, v in cfg.extra.items()]
    return args


def check_slurm(cfg: "SlurmConfig") -> list[str]:
    """HarnessError (one line) when Slurm's commands are missing, the controller does not answer,
    the partition does not exist or Slurm would refuse a job of these options (``sbatch
    --test-only``: unknown options, GPUs or memory no node has, a bad account or QOS), before
    anything is created. Returns the cluster's partitions."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        raise HarnessError(f"--backend slurm: {', '.join(missing)} not on PATH (run it on a Slurm login node)")
    parts = [p.rstrip("*") for p in run_command(["sinfo", "-h", "-o", "%P"]).split()]
    for p in (cfg.partition or "").split(","):
        if p and p not in parts:
            raise HarnessError(f"slurm partition {p!r}: no such partition on this cluster "
                               f"(sinfo lists: {', '.join(parts)})")
    opts = sbatch_options(cfg)
    try:
        run_command(["sbatch", "--test-only", "--output=/dev/null", *opts, "--wrap=true"])
    except HarnessError as e:
        raise HarnessError(f"slurm: Slurm refuses a job with {' '.join(opts)}: "
                           f"{str(e).removeprefix('sbatch --test-only: ')}") from None
    return parts


class SlurmPool:
    """Jobs as Slurm jobs (submitit): trials of one submission as one job array, at most
    ``array_parallelism`` running at once.

    ``submit`` only queues a job; the next ``wait`` (or :meth:`flush`) sends every queued job as
    one array. ``has_room`` is always true: Slurm, not the runner, decides what runs when."""

    def __init__(self, cfg: "SlurmConfig", study: str, check: bool = True) -> None:
        try:
            import submitit
        except ImportError:
            raise HarnessError("--backend slurm needs submitit: pip install submitit") from None
        self._submitit = submitit
        if check:
            check_slurm(cfg)
        self.cfg = cfg
        self.study = study
        self.limit = cfg.array_parallelism
        self.folder = Path(cfg.folder or Path(".harness_slurm") / study).resolve()
        self.detached = False
        self.submissions: list[Submission] = []
        self._queued: list[tuple[str, Target, Any, WorkerContext]] = []
        self._jobs: dict[str, _Job] = {}  # pool key -> job in flight
        self._after: list[str] = []  # teacher job ids the next array waits for
        self._last_poll = 0.0
        self._queue_ok = time.time()  # the last time squeue answered

    @property
    def teacher_device(self) -> str:
        return "cuda:0" if self.cfg.gpus_per_task else "cpu"

    def warm(self) -> None:
        pass

    def describe(self) -> str:
        c = self.cfg
        per = f"{c.cpus_per_task} CPU{'s' * (c.cpus_per_task != 1)}"
        per += f", {c.gpus_per_task} GPU{'s' * (c.gpus_per_task != 1)}" if c.gpus_per_task else ""
        per += f", {c.mem_gb:g} GB" if c.mem_gb else ""
        where = f"partition {c.partition}" if c.partition else "the default partition"
        return f"Slurm job arrays on {where} ({per}, {c.time_min} min per job), {self.limit} at a time"

    def has_room(self) -> bool:
        return True

    # ------------------------------------------------------------------ submitting

    def _executor(self, name: str, comment: str, hold: bool) -> Any:
        c = self.cfg
        self.folder.mkdir(parents=True, exist_ok=True)
        ex = self._submitit.SlurmExecutor(folder=str(self.folder), max_num_timeout=0)
        extra: dict[str, Any] = dict(c.extra)
        if hold:
            extra["hold"] = True
        deps = self._waiting_for()
        if deps:
            extra["dependency"] = "afterok:" + ":".join(deps)
            extra["kill-on-invalid-dep"] = "yes"
        params: dict[str, Any] = dict(
            job_name=name, comment=comment, time=c.time_min, cpus_per_task=c.cpus_per_task,
            array_parallelism=self.limit, setup=list(c.setup), additional_parameters=extra,
            signal_delay_s=max(5, min(90, c.time_min * 6)),
        )
        if c.partition:
            params["partition"] = c.partition
        if c.gpus_per_task:
            params["gpus_per_task"] = c.gpus_per_task
        if c.mem_gb:
            params["mem"] = f"{max(1, round(c.mem_gb * 1024))}MB"
        ex.update_parameters(**params)
        return ex

    def _waiting_for(self) -> list[str]:
        """The teacher jobs still in the queue (a finished one satisfies ``afterok`` anyway, and
        one Slurm has forgotten would make the dependency invalid)."""
        if not self._after:
            return []
        listed = {j.job_id for j in squeue()}
        self._after = [j for j in self._after if j in listed]
        return list(self._after)

    def _send(self, submit: Callable[[], Any]) -> Any:
        """Run a submission with a time limit (submitit's own sbatch call has none)."""
        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box["ok"] = submit()
            except BaseException as e:  # handed to the caller
                box["error"] = e

        t = threading.Thread(target=go, name="harness-slurm-submit", daemon=True)
        t.start()
        t.join(SUBMIT_TIMEOUT_S)
        if t.is_alive():
            raise HarnessError(f"sbatch did not answer within {SUBMIT_TIMEOUT_S} s (is slurmctld up?)")
        if "error" in box:
            e = box["error"]
            if isinstance(e, HarnessError):
                raise e
            raise HarnessError(f"sbatch refused the jobs: {_error_line(str(e) or type(e).__name__)}") from None
        return box["ok"]

    def submit(self, key: str, target: Target, payload: Any, ctx: WorkerContext) -> Slot | None:
        """Queue a job; it goes out with the next :meth:`flush` (the next :meth:`wait`)."""
        self._queued.append((key, target, payload, ctx))
        return None  # Slurm picks the node; the job tags its run

    def submit_teachers(self, jobs: list[tuple[str, TeacherJob]], target: Target, ctx: WorkerContext) -> list[str]:
        """One job per split now (``(split, job)`` pairs); the next array waits for them. Returns
        their job ids. Teachers train with the job's cores (as in the runner of a local run)."""
        ids = []
        for split, payload in jobs:
            ex = self._executor(f"{job_name(self.study)}:teachers", teacher_comment(self.study, split), hold=False)
            gpus = self.cfg.gpus_per_task
            job = self._send(lambda: ex.submit(_slurm_main, target, payload, ctx, None, gpus))
            key = f"teachers:{split}"
            self._jobs[key] = _Job(key, payload, teacher_comment(self.study, split), job, teachers=True)
            ids.append(str(job.job_id))
            self.submissions.append(Submission(str(job.job_id), [key], "teachers"))
        self._after += ids
        return ids

    def flush(self) -> Submission | None:
        """Send the queued jobs as one array (held, labelled with their trial keys, released)."""
        if not self._queued:
            return None
        queued, self._queued = self._queued, []
        ex = self._executor(job_name(self.study), job_name(self.study), hold=True)
        threads, gpus = self.cfg.cpus_per_task, self.cfg.gpus_per_task

        def send() -> list[Any]:
            with ex.batch():
                return [ex.submit(_slurm_main, target, payload, ctx, threads, gpus)
                        for _, target, payload, ctx in queued]

        jobs = self._send(send)
        array = str(jobs[0].job_id).split("_")[0]
        try:
            for (key, _, payload, _), job in zip(queued, jobs):
                label = _label(payload, self.study)
                if label:
                    run_command(["scontrol", "update", f"JobId={job.job_id}", f"Comment={label}"])
                self._jobs[key] = _Job(key, payload, label, job)
            _tag_runs([(payload, str(job.job_id)) for (_, _, payload, _), job in zip(queued, jobs)])
            run_command(["scontrol", "release", array])
        except BaseException:
            for key, *_ in queued:
                self._jobs.pop(key, None)
            _quiet_cancel([array])
            raise
        sub = Submission(array, [k for k, *_ in queued])
        self.submissions.append(sub)
        return sub

    # ------------------------------------------------------------------ waiting

    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes of the jobs that ended within ``timeout`` seconds (maybe none)."""
        self.flush()
        deadline = time.time() + timeout
        while True:
            out = self._poll()
            if out or not self._jobs or time.time() >= deadline:
                return out
            time.sleep(min(0.25, max(0.0, deadline - time.time())))

    def _result(self, j: _Job) -> Outcome | None:
        """The job's outcome from its result file, None while it has none."""
        paths = j.job.paths
        try:
            paths.folder.chmod(paths.folder.stat().st_mode)  # refresh a network file system's view
        except OSError:
            pass
        if not paths.result_pickle.exists():
            return None
        try:
            return Outcome(j.key, None, True, j.job.result())
        except Exception as e:  # the job's function raised: the last line of its traceback says what
            parts = str(e).split("-" * 22)  # submitit puts the job's traceback between two such rules
            trace = parts[1] if len(parts) >= 3 else str(e)
            lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip() and not ln.startswith(" ")]
            return Outcome(j.key, None, False, error=lines[-1][:500] if lines else type(e).__name__, kind="exception")

    def _poll(self) -> list[Outcome]:
        out = []
        for key, j in list(self._jobs.items()):
            o = self._result(j)
            if o is not None:
                out.append(self._done(key, o))
        out = [o for o in out if o is not None]
        now = time.time()
        if now - self._last_poll < POLL_S or not self._jobs:
            return out
        self._last_poll = now
        try:
            listed = {i.job_id: i for i in squeue()}
            self._queue_ok = now
        except HarnessError as e:
            if now - self._queue_ok < UNREACHABLE_S:
                return out
            why = f"worker died (Slurm unreachable for {UNREACHABLE_S:.0f} s: {e})"
            for key in list(self._jobs):
                out.append(self._done(key, Outcome(key, None, False, error=why, kind="worker_died")))
            return [o for o in out if o is not None]
        gone = []
        for key, j in self._jobs.items():
            if j.job_id in listed or j.job_id.split("_")[0] in listed:
                j.gone = None
            else:
                j.gone = j.gone or now
                gone.append(key)
        if not gone:
            return out
        try:
            records = sacct([self._jobs[k].job_id for k in gone])
        except HarnessError:  # accounting did not answer: the grace below still ends the wait
            records = {}
        for key in gone:
            j = self._jobs[key]
            o = self._result(j)  # written just before the job left the queue
            if o is None:
                info = records.get(j.job_id)
                if (info is None or not info.final) and now - (j.gone or now) < GONE_GRACE_S:
                    continue  # accounting has not caught up yet
                o = Outcome(key, None, False, error=f"worker died ({self._why(j, info)})", kind="worker_died")
                self._close_runs(j, o.error)
            out.append(self._done(key, o))
        return [o for o in out if o is not None]

    def _why(self, j: _Job, info: JobInfo | None) -> str:
        """Slurm's reason, srun's last error line (``task 0: Killed``) and where the log is."""
        text = ended_text(info, j.job_id, self.cfg)
        log = j.job.paths.stderr
        try:
            lines = log.read_text(errors="replace").splitlines()[-50:] if log.exists() else []
        except OSError:
            lines = []
        srun = [ln.split(": ", 2)[-1] for ln in lines if ln.startswith("srun: error:")]
        if srun:
            text += f"; srun: {srun[-1].strip()}"
        return text + (f"; log {log}" if log.exists() else "")

    def _close_runs(self, j: _Job, reason: str) -> None:
        """Runs of the trial that a requeued start of the job opened (the runner settles the run
        it opened itself), marked FAILED with Slurm's reason."""
        if not isinstance(j.payload, TrialJob):
            return
        from harness.tracking import Tracker

        try:
            tracker = Tracker(j.payload.tracking_uri)
            exp = tracker.run(j.payload.run_id).info.experiment_id
            same = {TRIAL_KEY: j.payload.trial.key, SLURM_JOB: j.job_id}
            for r in tracker.find(exp, same, ("RUNNING",)):
                if r.info.run_id != j.payload.run_id:
                    tracker.finish_if_running(r.info.run_id, "FAILED", {FAILURE: reason,
                                                                        FAILURE_KIND: "worker_died"})
        except Exception:  # best effort: a rerun marks such runs stale
            pass

    def _done(self, key: str, o: Outcome) -> Outcome | None:
        """The outcome for the runner; None for a teachers' job (not the runner's: printed)."""
        j = self._jobs.pop(key)
        if not j.teachers:
            return o
        if o.ok:
            accs = "; ".join(", ".join(f"{a:.3f}" for a in v) for v in (o.result or {}).values())
            print(f"teachers of {key.split(':', 1)[1]} (Slurm job {j.job_id}): ready (own-task test acc {accs})")
        else:
            print(f"teachers of {key.split(':', 1)[1]} (Slurm job {j.job_id}) FAILED: {o.error}")
        return None

    def stop(self) -> list[str]:
        """Cancel every job in flight (and forget the queued ones); returns the runner's keys."""
        keys = [k for k, j in self._jobs.items() if not j.teachers] + [k for k, *_ in self._queued]
        _quiet_cancel([j.job_id for j in self._jobs.values()])
        self._jobs.clear()
        self._queued.clear()
        return keys

    def detach(self) -> None:
        """Leave the submitted jobs to Slurm: :meth:`close` then cancels nothing."""
        self.detached = True

    def close(self) -> None:
        if not self.detached:
            self.stop()


def _quiet_cancel(ids: list[str]) -> None:
    ids = [i for i in ids if i]
    if ids:
        try:
            run_command(["scancel", *ids])
        except HarnessError:
            pass


def _tag_runs(jobs: list[tuple[Any, str]]) -> None:
    """Tag each trial's run with its job as soon as it is submitted (``harness status`` finds the
    job of a run whose job never started); the job tags it again when it starts."""
    from harness.tracking import Tracker

    trackers: dict[str, Any] = {}
    for payload, job_id in jobs:
        if isinstance(payload, TrialJob):
            tracker = trackers.setdefault(payload.tracking_uri, Tracker(payload.tracking_uri))
            jid, _, index = job_id.partition("_")
            tracker.set_tags(payload.run_id, {SLURM_JOB: job_id, SLURM_JOB_ID: jid,
                                              SLURM_ARRAY_INDEX: index})


def _label(payload: Any, study: str) -> str | None:
    return trial_comment(study, payload.trial.key) if isinstance(payload, TrialJob) else None
