"""MLflow schema and I/O: run names, tags, flattened params, metrics logged in batches.

Schema (the reports and the runner rely on it):
- one experiment per study (its name); one run per trial, and one per teacher;
- tags ``harness.study``, ``harness.split``, ``harness.method``, ``harness.variant`` (``full`` or
  ``-intra`` ...), ``harness.seed``, ``harness.trial_key``, ``harness.kind`` (``teacher``,
  ``trial`` or ``study``), ``harness.uses_labels``; teachers add ``harness.task``,
  ``harness.teacher_key``, ``harness.teacher_digest`` (sha256 of its weights) and
  ``harness.teacher_seed``; trials add ``harness.teacher_keys`` and ``harness.teacher_digests``
  (comma-joined, in task order: the weights the numbers rest on) and ``harness.precision``
  (``fp32``/``bf16``, the arithmetic the trial really trained in) and ``harness.deterministic``
  (whether deterministic algorithms were really on);
- params: the flattened resolved config (with ``precision`` and ``results_version``, both in the
  trial key);
- per-epoch metrics (step = epoch): ``loss/<term>``, ``loss/total``, ``val/union_acc``,
  ``val/task_acc/<k>``, ``epoch_seconds``, ``images_per_second``; sent in one ``log_batch``
  at most every 5 s (and at the end), so short epochs cost no store round trip each;
- final metrics: ``test/union_acc`` (last epoch), ``test/union_acc_best`` (best validation
  epoch), ``test/task_acc/<k>``, ``test/task_acc_best/<k>``, ``val/union_acc_best``,
  ``best_epoch``, ``diag/*`` diagnostics, ``peak_rss_mb``, ``cuda_max_allocated_mb`` and
  ``gpu_peak_mb`` (CUDA only; the reserved peak that decides packing, also per epoch),
  ``trial_seconds``;
- execution tags of a trial run: ``harness.attempt`` (0 for the first try), ``harness.slot``,
  ``harness.device``, ``harness.host``, ``harness.pid``, ``harness.start`` and ``harness.end``
  (unix seconds), ``harness.failure`` and ``harness.failure_kind`` (``exception``, ``nonfinite``,
  ``oom``, ``worker_died``, ``interrupted``, ``stale``, ``duplicate``) when it did not finish;
- provenance tags: ``mlflow.source.git.commit`` and ``harness.git_commit`` (empty outside a git
  checkout), ``harness.git_dirty``, ``harness.version`` and ``harness.<package>_version`` for
  torch, mlflow, numpy and python;
- a study invocation is a run of kind ``study`` (tags ``harness.host``, ``harness.runner_pid``,
  ``harness.backend``; artifacts ``study.yaml`` and ``trial_keys.json``, the keys of the whole
  study as run, which scope its report); its trials point to it with ``mlflow.parentRunId``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

try:
    import fcntl
except ImportError:  # Windows: no lock (run one process per new store there)
    fcntl = None  # type: ignore[assignment]

#: artifact of a study run: the JSON list of the trial keys of the study as run (its report's scope)
TRIAL_KEYS_ARTIFACT = "trial_keys.json"
TAG = "harness."
F = TypeVar("F", bound=Callable[..., Any])
MAX_PARAM = 6000
RETRIES = 14


def row_label(method: str, variant: str) -> str:
    """``cka``, ``cka-intra`` (ablation) or ``cka:wide`` (named variant), as in run names and
    report rows."""
    if variant in ("", "full"):
        return method
    return f"{method}{variant}" if variant.startswith("-") else f"{method}:{variant}"


def resolve_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default."""
    if cli_uri:
        return cli_uri
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}} -> {"a.b": "1"}``; lists kept as their string form."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM]
    return out


#: Store errors that go away when retried a little later (several processes writing one file).
_TRANSIENT = ("database is locked", "database table is locked", "database is busy")


def _transient(e: Exception) -> bool:
    """A locked SQLite store (the runner and its workers write to one file) is worth a retry."""
    return any(m in str(e).lower() for m in _TRANSIENT)


@contextlib.contextmanager
def _opening(uri: str) -> Iterator[None]:
    """Lock a SQLite store's file while it is opened: MLflow creates and migrates a new store on
    first open, and two processes doing that at once leave it broken. A new (empty) file is
    opened under an exclusive ``flock``, an existing one under a shared one, which waits for a
    creator but not for other readers. (SQLite's own locks are POSIX record locks, independent
    of ``flock``.)"""
    path = uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else ""
    if not path or fcntl is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "ab") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if new else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _retry(fn: F) -> F:
    """Retry ``fn`` on a transient store error, with exponential back-off and jitter (about 25 s of
    waiting in all, on top of SQLite's own 20 s busy timeout per attempt). Wrap only calls that
    are safe to repeat: one MLflow request each."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        for attempt in range(RETRIES):
            try:
                return fn(*a, **kw)
            except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
                if not _transient(e) or attempt == RETRIES - 1:
                    raise
                time.sleep(0.05 * 2 ** min(attempt, 6) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


def _git(args: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def git_tags() -> dict[str, str]:
    """Commit of the checkout that holds the harness code (empty when it is not a git checkout)
    and whether it had uncommitted changes."""
    import harness

    where = Path(harness.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], where)
    dirty = bool(commit) and bool(_git(["status", "--porcelain", "--untracked-files=no"], where))
    tags = {f"{TAG}git_commit": commit, f"{TAG}git_dirty": str(dirty).lower()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def version_tags() -> dict[str, str]:
    """Versions of the packages that determine a result (read without importing them)."""
    out = {f"{TAG}python_version": platform.python_version()}
    for dist, name in (("ka-harness", "version"), ("torch", "torch_version"), ("mlflow", "mlflow_version"),
                       ("numpy", "numpy_version")):
        try:
            out[f"{TAG}{name}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[f"{TAG}{name}"] = ""
    return out


class Tracker:
    """A thin layer over ``MlflowClient`` that knows the harness schema."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_uri(uri)
        with _opening(self.uri):
            self.client = _retry(MlflowClient)(self.uri)  # opens (and may first create) the store

    @_retry
    def experiment(self, name: str, create: bool = True) -> str | None:
        """The id of experiment ``name``, created if needed (None if it does not exist and not
        ``create``)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                if not create:
                    return None
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        if not create:
            return None
        try:
            return self.client.create_experiment(name)
        except Exception:  # created concurrently by another worker
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(
        self, experiment_id: str, run_name: str, tags: dict[str, Any], params: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """Create a run (status RUNNING) with tags and the parent link, and log its params in batches.

        Each request is retried on its own, so a locked store never creates a run twice."""
        all_tags = {k: str(v)[:MAX_PARAM] for k, v in tags.items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run_id = _retry(self.client.create_run)(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        if params:
            items = [Param(k, v) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):
                _retry(self.client.log_batch)(run_id, params=items[i : i + 100])
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """All metrics of one step in a single request (chunks of 1000, each retried on its own)."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            _retry(self.client.log_batch)(run_id, metrics=items[i : i + 1000])

    def buffered(self, run_id: str, every: float = 5.0) -> "MetricBuffer":
        """A per-run buffer of step metrics, written at most every ``every`` seconds (and on
        ``flush``): per-epoch curves stay live while short epochs cost no store round trip each."""
        return MetricBuffer(self, run_id, every)

    @_retry
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_PARAM]) for k, v in tags.items()])

    @_retry
    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    @_retry
    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @_retry
    def run(self, run_id: str) -> Any:
        """The run (``info.status``, ``data.tags``, ``data.metrics``)."""
        return self.client.get_run(run_id)

    def finish_if_running(self, run_id: str, status: str, tags: dict[str, Any] | None = None) -> bool:
        """End a run that is still RUNNING with ``status`` (and tags); False if it already ended.

        The parent uses this for a worker that died or was stopped: a run the worker ended
        itself keeps the worker's status and reason."""
        if self.run(run_id).info.status != "RUNNING":
            return False
        if tags:
            self.set_tags(run_id, tags)
        self.finish(run_id, status)
        return True

    @_retry
    def find(self, experiment_id: str, tags: dict[str, str], statuses: tuple[str, ...] | None = None) -> list:
        """Runs whose tags equal ``tags`` (optionally only with these statuses)."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs = []
        token = None
        while True:
            page = self.client.search_runs(
                [experiment_id], " and ".join(clauses), max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        if statuses is not None:
            runs = [r for r in runs if r.info.status in statuses]
        return runs


class MetricBuffer:
    """Step metrics of one run, sent in one ``log_batch`` when ``every`` seconds have passed since
    the last send, and by ``flush`` (call it before the run ends; a worker killed in between loses
    at most the last ``every`` seconds of curves, never a final metric)."""

    def __init__(self, tracker: Tracker, run_id: str, every: float = 5.0) -> None:
        self.tracker, self.run_id, self.every = tracker, run_id, every
        self._items: list[Metric] = []
        self._sent = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._items += [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if time.monotonic() - self._sent >= self.every:
            self.flush()

    def flush(self) -> None:
        items, self._items = self._items, []
        self._sent = time.monotonic()
        for i in range(0, len(items), 1000):
            _retry(self.tracker.client.log_batch)(self.run_id, metrics=items[i : i + 1000])
