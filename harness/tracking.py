"""MLflow schema and I/O: run names, tags, flattened params, metrics logged in batches.

Every ``harness.*`` name below (tags, run kinds, artifacts) is a constant of :mod:`harness.store`;
this docstring says how the runs hang together and what the tags hold.

Schema (the reports and the runner rely on it; docs/mlflow.md is the user's view):
- one experiment per study (its name), with a description (tag ``mlflow.note.content``), tags
  from the study (``harness.dataset``, ``harness.splits``, ``harness.methods``, ``harness.seeds``),
  ``mlflow.experimentKind`` = ``custom_model_development`` (the UI opens it in "Model training",
  not GenAI) and a shared view of the student trials (``mlflow.sharedViewState.<VIEW_KEY>``,
  :func:`shared_view`; :func:`runs_url` is its link);
- run tree: a run of kind ``study`` per invocation; under it one ``teacher_stage`` run
  ("teacher training", only when a teacher is logged) that parents the ``teacher`` runs (one per
  teacher key, weights and split, across invocations); the student ``trial`` runs are direct
  children of the study run;
- run names put what differs first (:func:`trial_run_name`): ``kd · mahalanobis/z/routed · s0 ·
  3way``, ``cka-intra · s1 · 2x5``, ``teacher 0 · 2x5``; the older full name is the tag
  ``harness.run`` (``3way/kd:mahalanobis/z/routed/seed0``);
- tags ``harness.study``, ``harness.split``, ``harness.method``, ``harness.variant`` (``full`` or
  ``-intra`` ...), ``harness.config`` (what group-by averages over seeds: ``method:variant``,
  ``kd:full``, ``kd:mahalanobis/z/routed``; an ablation as its run name says it, ``cka-intra``; in
  a study with a routing axis the default variant is named by its rule:
  ``kd:confidence/none/concat (default)``), ``harness.seed``, ``harness.trial_key``,
  ``harness.kind`` (``study``, ``teacher_stage``, ``teacher`` or ``trial``),
  ``harness.uses_labels``; teachers add ``harness.task``,
  ``harness.teacher_key``, ``harness.teacher_digest`` (sha256 of its weights) and
  ``harness.teacher_seed``; trials add ``harness.teacher_keys`` and ``harness.teacher_digests``
  (comma-joined, in task order: the weights the numbers rest on) and ``harness.precision``
  (``fp32``/``bf16``, the arithmetic the trial really trained in) and ``harness.deterministic``
  (whether deterministic algorithms were really on);
- params: the flattened resolved config (:func:`flatten`: dotted keys, YAML-style scalars
  ``null``/``true``/``false``, a list of mappings such as the teachers as one param per field,
  ``teachers.0.arch``; with ``precision`` and ``results_version``, both in the trial key); the
  study run has the flattened study as params;
- inputs: each trial run (and the study run) has the study's split as a dataset input named
  ``<data set>:<split>`` (:func:`split_dataset`, the Dataset column of the UI);
- metrics, one vocabulary for every run kind. Trials, per epoch (step = epoch): ``loss/<term>``,
  ``loss/total``, ``val/union_acc``, ``val/task_acc/<k>``, ``epoch_seconds``,
  ``images_per_second``; sent in one ``log_batch`` at most every 5 s (and at the end), so short
  epochs cost no store round trip each. Trials, final: ``test/union_acc`` (last epoch),
  ``test/union_acc_bestval`` (the model of the best validation epoch), ``test/task_acc/<k>``,
  ``test/task_acc_bestval/<k>``, ``val/union_acc_best``, ``best_epoch``, ``diag/*`` diagnostics,
  ``peak_rss_mb``, ``cuda_max_allocated_mb`` and ``gpu_peak_mb`` (CUDA only; the reserved peak
  that decides packing, also per epoch), ``trial_seconds``. Teachers (their own task only, never a
  ``union`` name): ``val/own_task_acc`` per epoch, ``test/own_task_acc`` (the cached best-val.
  weights every method uses), ``test/own_task_acc_last``, ``val/own_task_acc_best``,
  ``best_epoch``. Stores written before this vocabulary are translated where the report loads
  them (:data:`harness.report.frames.OLD_METRICS`);
- execution tags of a trial run: ``harness.attempt`` (0 for the first try), ``harness.slot``,
  ``harness.device``, ``harness.host``, ``harness.pid``, ``harness.start`` and ``harness.end``
  (ISO-8601 UTC, :func:`utc_iso`; :func:`tag_seconds` reads them and the unix seconds of older
  runs), ``harness.failure`` and ``harness.failure_kind`` (``exception``, ``nonfinite``,
  ``oom``, ``worker_died``, ``interrupted``, ``stale``, ``duplicate``) when it did not finish;
- provenance tags: ``mlflow.source.git.commit`` and ``harness.git_commit`` (empty outside a git
  checkout), ``harness.git_dirty``, ``harness.version`` and ``harness.<package>_version`` for
  torch, mlflow, numpy and python;
- a study run has the tags ``harness.host``, ``harness.runner_pid``, ``harness.backend``; the
  artifacts ``study.yaml`` (the resolved study), ``study_source.yaml`` (the study file as
  written, comments kept) and ``trial_keys.json`` (the keys of the whole
  study as run, which scope its report); ``harness report`` adds ``report/`` (report.md, its
  figures and tables) and sets its description to the report's headline tables
  (:func:`attach_report`); its trials point to it with ``mlflow.parentRunId``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import random
import subprocess
import time
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlencode, urlparse

import yaml
from mlflow.entities import DatasetInput, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from harness.store import (
    CONFIG, DATASET, GIT_COMMIT, GIT_DIRTY, KIND, KIND_STUDY, KIND_TRIAL, METHODS, MLFLOW_VERSION,
    NUMPY_VERSION, PYTHON_VERSION, REPORT_ARTIFACTS, SEEDS, SPLIT, SPLITS, STUDY, STUDY_ARTIFACT,
    STUDY_FILE, TORCH_VERSION, VERSION,
)

try:
    import fcntl
except ImportError:  # Windows: no lock (run one process per new store there)
    fcntl = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])
MAX_PARAM = 6000
RETRIES = 14


def row_label(method: str, variant: str) -> str:
    """``cka``, ``cka-intra`` (ablation) or ``cka:wide`` (named variant), as in report rows and
    the older full run names (tag ``harness.run``; run names: :func:`trial_run_name`)."""
    if variant in ("", "full"):
        return method
    return f"{method}{variant}" if variant.startswith("-") else f"{method}:{variant}"


def resolve_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default."""
    if cli_uri:
        return cli_uri
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def yaml_value(v: Any) -> str:
    """A param value as YAML writes it: ``null``, ``true``/``false``, numbers and strings as they
    are, lists and mappings in flow style (``[0, 1, 2]``, ``{}``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        text = yaml.safe_dump(v if not isinstance(v, tuple) else list(v), default_flow_style=True,
                              width=1 << 30, sort_keys=False)
        return text.strip()
    return str(v)


def _records(v: Any) -> bool:
    """A non-empty list of mappings (the teachers, a split's teachers): one param per field."""
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "t": [{"arch": "cnn"}], "n": None} -> {"a.b": "1", "t.0.arch": "cnn",
    "n": "null"}``: dotted keys, a list of mappings as one key per item and field, every other
    value as :func:`yaml_value` writes it (at most ``MAX_PARAM`` characters)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif _records(v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = yaml_value(v)[:MAX_PARAM]
    return out


# ----------------------------------------------------------------------------- names a researcher reads
#: separator of the parts of a run name
SEP = " · "
TEACHER_STAGE_NAME = "teacher training"


def variant_label(method: str, variant: str, default_rule: str | None = None) -> str:
    """What a run name and ``harness.config`` call a variant: ``kd`` (the study's own parameters),
    ``kd · confidence/none/concat (default)`` (the same in a study with a routing axis, named by
    its rule), ``cka-intra`` (ablation), ``kd · mahalanobis/z/routed`` (a routing rule or a named
    variant)."""
    if variant in ("", "full"):
        return f"{method}{SEP}{default_rule} (default)" if default_rule else method
    return f"{method}{variant}" if variant.startswith("-") else f"{method}{SEP}{variant}"


def config_tag(method: str, variant: str, default_rule: str | None = None) -> str:
    """``harness.config``: ``method:variant`` (``kd:full``, ``kd:mahalanobis/z/routed``,
    ``kd:confidence/none/concat (default)``), an ablation as its run name and the report's rows
    say it (``cka-intra``): the runs MLflow's group-by should average over seeds (group by
    ``harness.split`` too when a study has several). Older runs keep ``cka:-intra``; the report
    groups by ``harness.method``/``harness.variant``, never by this tag."""
    if variant.startswith("-"):
        return f"{method}{variant}"
    shown = f"{default_rule} (default)" if variant in ("", "full") and default_rule else (variant or "full")
    return f"{method}:{shown}"


def trial_run_name(split: str, method: str, variant: str, seed: int, default_rule: str | None = None) -> str:
    """``kd · mahalanobis/z/routed · s0 · 3way``: what differs between trials first, the split last."""
    return SEP.join((variant_label(method, variant, default_rule), f"s{seed}", split))


def teacher_run_name(split: str, task: int, seed: int | None = None) -> str:
    """``teacher 0 · 2x5`` (``teacher 0 · s1 · 2x5`` for teachers trained per student seed)."""
    return SEP.join((f"teacher {task}", *([f"s{seed}"] if seed is not None else []), split))


def study_run_name(t: float) -> str:
    """``study · 2026-11-30 15:28:18`` (UTC), and the older ``study/20261130-152818`` as its tag."""
    return f"study{SEP}{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t))}"


def bestval(key: str) -> str:
    """The logged name of a final metric the training loop calls ``test/union_acc_best`` or
    ``test/task_acc_best/<k>`` (the model of the best validation epoch): ``test/union_acc_bestval``,
    ``test/task_acc_bestval/<k>``; any other name unchanged."""
    if key == "test/union_acc_best":
        return "test/union_acc_bestval"
    if key.startswith("test/task_acc_best/"):
        return "test/task_acc_bestval/" + key[len("test/task_acc_best/"):]
    return key


def utc_iso(t: float) -> str:
    """``2026-11-30T15:28:18.123Z``: unix seconds as ISO-8601 UTC, to the millisecond."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tag_seconds(value: str) -> float:
    """Unix seconds of a ``harness.start``/``harness.end`` tag: ISO-8601 (:func:`utc_iso`) or the
    unix seconds older runs logged."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# ----------------------------------------------------------------------------- datasets, views, links
def split_dataset(dataset: str, split: str, config: dict[str, Any], source: str | None = None) -> DatasetInput:
    """The study's split as an MLflow dataset input named ``<data set>:<split>`` (``digits:2x5``):
    its digest hashes ``config`` (the data set and split config: equal digests, equal data), its
    profile is ``config`` as JSON, its source the study file (``source``, a path) when known."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, InputTag

    body = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    if source:
        with warnings.catch_warnings():  # a local path resolves to MLflow's local artifact source
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(str(Path(source).resolve()))
    else:
        from mlflow.data.code_dataset_source import CodeDatasetSource

        src = CodeDatasetSource({STUDY_FILE: "unknown"})
    meta = MetaDataset(src, name=f"{dataset}:{split}", digest=digest)._to_mlflow_entity()
    entity = Dataset(meta.name, meta.digest, meta.source_type, meta.source, profile=body[:MAX_PARAM])
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", "study")])


#: the study's shared UI view (``?viewStateShareKey=...``): an experiment tag ``mlflow.sharedViewState.<key>``
VIEW_KEY = "harness-trials"
TRIALS_FILTER = f"tags.`{KIND}` = '{KIND_TRIAL}'"
#: the two union accuracies every student trial logs, the primary first
HEADLINE_METRICS = ("test/union_acc", "test/union_acc_bestval")


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def shared_view(group_by_split: bool = False) -> dict[str, Any]:
    """The view of the study's student trials that MLflow 3's UI loads from the experiment tag
    ``mlflow.sharedViewState.<VIEW_KEY>``: filter ``tags.`harness.kind` = 'trial'``, sorted by
    ``test/union_acc``, grouped by ``harness.config`` (and ``harness.split`` with several splits;
    group rows show the mean over seeds), the accuracies, the dataset and the config as columns,
    a wide run-name column, every run shown in charts, and a first chart section with the test
    accuracies (bars) and the validation curve (``val/union_acc``). Keys as the UI's state uses them."""
    name = _column("attributes", "Run Name")
    columns = [*(_column("metrics", m) for m in HEADLINE_METRICS), _column("tags", CONFIG),
               _column("attributes", "Dataset")]
    keys = ([{"mode": "tag", "groupByData": SPLIT}] if group_by_split else []) + [
        {"mode": "tag", "groupByData": CONFIG}]
    results, curves = "harness-results", "harness-curves"

    def chart(kind: str, metric: str, section: str) -> dict[str, Any]:
        c: dict[str, Any] = {"uuid": f"harness-{kind.lower()}-{metric}", "type": kind, "runsCountToCompare": 100,
                             "metricSectionId": section, "deleted": False, "isGenerated": False,
                             "metricKey": metric, "displayName": metric}
        if kind == "LINE":
            c.update({"selectedMetricKeys": [metric], "lineSmoothness": 0, "xAxisKey": "step",
                      "xAxisScaleType": "linear", "scaleType": "linear", "selectedXAxisMetricKey": ""})
        return c

    return {
        "searchFilter": TRIALS_FILTER, "orderByKey": _column("metrics", HEADLINE_METRICS[0]), "orderByAsc": False,
        "selectedColumns": columns, "columnOrder": [name, *columns], "columnWidths": {name: 330},
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average", "groupByKeys": keys},
        "compareRunSections": [{"uuid": results, "name": "test accuracy", "display": True, "isReordered": False},
                               {"uuid": curves, "name": "learning curve", "display": True, "isReordered": False}],
        "compareRunCharts": [*(chart("BAR", m, results) for m in HEADLINE_METRICS),
                             chart("LINE", "val/union_acc", curves)],
        "isAccordionReordered": True,
    }


def runs_path(experiment_id: str, chart: bool = False) -> str:
    """The UI's path (after the server's address) of the experiment's student trials in "Model
    training" mode (``workflowType=machine_learning``), with the shared view (:func:`shared_view`),
    as a table or (``chart``) as charts."""
    query = urlencode({"viewStateShareKey": VIEW_KEY, "workflowType": "machine_learning",
                       **({"compareRunsMode": "CHART"} if chart else {})})
    return f"/#/experiments/{experiment_id}/runs?{query}"


def runs_url(uri: str, experiment_id: str, port: int = 5000) -> tuple[str, str | None]:
    """(URL of the student trials in the UI, the command that serves it or None). An http(s)
    tracking URI is the server itself; a database or file store needs ``mlflow ui`` on 127.0.0.1."""
    if urlparse(uri).scheme in ("http", "https"):
        return uri.rstrip("/") + runs_path(experiment_id), None
    base = f"http://127.0.0.1:{port}"
    return base + runs_path(experiment_id), f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}"


def experiment_text(study: Any, comment: str = "") -> tuple[str, dict[str, str]]:
    """(description, tags) of a study's experiment: the study file's leading comment, what the study
    is (data set, splits, methods, seeds) and how to read its runs; tags from the study."""
    splits = ", ".join(s.name for s in study.splits)
    methods = ", ".join(study.methods)
    seeds = ", ".join(map(str, study.seeds))
    paragraphs = [comment.strip(),
                  f"Study `{study.name}`: data set `{study.dataset.name}`, splits {splits}; methods {methods}; "
                  f"seeds {seeds}; {study.train.epochs} epochs.",
                  f"Student trials: filter `{TRIALS_FILTER}`, group by `{CONFIG}` (mean over seeds). "
                  "`test/union_acc` is the primary metric (last epoch), `test/union_acc_bestval` the model of the "
                  "best validation epoch; teachers log `test/own_task_acc` (their own task only). The study runs "
                  f"hold `{STUDY_ARTIFACT}` and, after `harness report`, the report."]
    text = "\n\n".join(p for p in paragraphs if p)
    tags = {"mlflow.note.content": text, "mlflow.experimentKind": "custom_model_development",
            STUDY: study.name, DATASET: study.dataset.name, SPLITS: splits,
            METHODS: methods, SEEDS: seeds,
            f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(shared_view(len(study.splits) > 1))}
    return text, tags


def leading_comment(text: str) -> str:
    """The ``#`` comment block at the top of a study file, without the ``#``."""
    out = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return " ".join(x for x in out if x)


#: Store errors that go away when retried a little later (several processes writing one file).
_TRANSIENT = ("database is locked", "database table is locked", "database is busy")
#: A concurrent writer inserted the same row first (two trials logging one dataset input, two
#: processes setting one tag): every write :func:`_retry` wraps is an upsert, so the retry finds
#: the row and succeeds (sqlite, PostgreSQL and MySQL wording, and MLflow's own).
_CONFLICT = ("unique constraint failed", "integrityerror", "duplicate key value", "duplicate entry",
             "already exists")
#: a conflict is retried at most this many times (a second try normally succeeds)
CONFLICT_RETRIES = 5


def _transient(e: Exception) -> bool:
    """A locked SQLite store (the runner and its workers write to one file) is worth a retry."""
    return any(m in str(e).lower() for m in _TRANSIENT)


def _conflict(e: Exception) -> bool:
    """Another process wrote the same row first (:data:`_CONFLICT`)."""
    return any(m in str(e).lower() for m in _CONFLICT)


def store_path(uri: str) -> str | None:
    """The file of a ``sqlite:///`` tracking store (None for a server or another database)."""
    return uri[len("sqlite:///"):].split("?")[0] if uri.startswith("sqlite:///") else None


def missing_store(uri: str) -> str | None:
    """The file of a ``sqlite:///`` tracking store that does not exist (opening it, even to read,
    would create an empty store there), else None: it exists, or the store is a server or another
    database. Commands that only read (``report``, ``status``) look here first and create nothing."""
    path = store_path(uri)
    return path if path and not os.path.exists(path) else None


@contextlib.contextmanager
def _opening(uri: str) -> Iterator[None]:
    """Lock a SQLite store's file while it is opened: MLflow creates and migrates a new store on
    first open, and two processes doing that at once leave it broken. A new (empty) file is
    opened under an exclusive ``flock``, an existing one under a shared one, which waits for a
    creator but not for other readers. (SQLite's own locks are POSIX record locks, independent
    of ``flock``.)"""
    path = store_path(uri)
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
    waiting in all, on top of SQLite's own 20 s busy timeout per attempt), and on a conflict with
    a concurrent writer of the same row (:data:`_CONFLICT`, at most ``CONFLICT_RETRIES`` tries).
    Wrap only calls that are safe to repeat and idempotent: one MLflow request each, whose second
    try after a concurrent writer's identical insert is a no-op (tags, params, dataset inputs).
    Anything else still raises, and fails the trial with its reason."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        for attempt in range(RETRIES):
            try:
                return fn(*a, **kw)
            except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
                conflict = not _transient(e) and _conflict(e)
                if not (_transient(e) or conflict) or attempt == (CONFLICT_RETRIES if conflict else RETRIES) - 1:
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
    tags = {GIT_COMMIT: commit, GIT_DIRTY: str(dirty).lower()}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def version_tags() -> dict[str, str]:
    """Versions of the packages that determine a result (read without importing them)."""
    out = {PYTHON_VERSION: platform.python_version()}
    for dist, tag in (("ka-harness", VERSION), ("torch", TORCH_VERSION), ("mlflow", MLFLOW_VERSION),
                      ("numpy", NUMPY_VERSION)):
        try:
            out[tag] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[tag] = ""
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

    def buffered(self, run_id: str, every: float | None = None) -> "MetricBuffer":
        """A per-run buffer of step metrics, written at most every ``every`` seconds (default
        :data:`FLUSH_SECONDS`; and on ``flush``): per-epoch curves stay live while short epochs cost
        no store round trip each."""
        return MetricBuffer(self, run_id, FLUSH_SECONDS if every is None else every)

    @_retry
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_PARAM]) for k, v in tags.items()])

    @_retry
    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    @_retry
    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    @_retry
    def log_inputs(self, run_id: str, datasets: list[DatasetInput]) -> None:
        """Dataset inputs of a run (the UI's Dataset column)."""
        self.client.log_inputs(run_id, datasets=datasets)

    @_retry
    def set_experiment_tags(self, experiment_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_experiment_tag(experiment_id, k, v)

    @_retry
    def latest(self, experiment_id: str, kind: str) -> Any | None:
        """The latest run (by start time) of this kind, None when there is none."""
        page = self.client.search_runs([experiment_id], f"tags.`{KIND}` = '{kind}'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return page[0] if page else None

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


#: how often a trial's step metrics are sent while it trains, in seconds (:class:`MetricBuffer`)
FLUSH_SECONDS = 5.0


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


# ----------------------------------------------------------------------------- the report on the study run
REPORT_FILES = ("report.md", "*.png", "*.csv", "*.tex")


def headline(report_md: str, limit: int = 5000) -> str:
    """The report's headline: its title, then under ``## Comparison`` each split's heading and first
    table (the comparison table), as Markdown of at most ``limit`` characters."""
    lines = report_md.splitlines()
    out = [next((x for x in lines if x.startswith("# ")), "")]
    inside = took = appending = False  # in the section; this split's table taken; in that table
    heading = ""
    for line in lines:
        if line.startswith("## "):
            inside = line.strip() == "## Comparison"
            continue
        if not inside:
            continue
        if line.startswith("### "):
            heading, took = line, False
        elif line.startswith("|") and not took:
            if heading:
                out += ["", heading, ""]
                heading = ""
            out.append(line)
            appending = True
        elif appending and not line.startswith("|"):
            took, appending = True, False
    text = "\n".join(out).strip()
    if len(text) <= limit:
        return text
    kept: list[str] = []
    note = f"\n\n… (cut; the whole report is `{REPORT_ARTIFACTS}/report.md`)"
    for line in out:
        if sum(len(x) + 1 for x in kept) + len(line) + len(note) > limit:
            break
        kept.append(line)
    return "\n".join(kept).strip() + note


def attach_report(tracker: Tracker, study: str, out: str | Path) -> str | None:
    """Log the report in ``out`` (``report.md``, its figures and tables) as ``report/`` artifacts of
    the study's latest study run, and set that run's description to :func:`headline`. Returns the
    run id, None when the experiment has no study run (nothing is logged)."""
    exp = tracker.experiment(study, create=False)
    run = tracker.latest(exp, KIND_STUDY) if exp is not None else None
    if run is None:
        return None
    out = Path(out)
    files = sorted({f for pattern in REPORT_FILES for f in out.glob(pattern) if f.is_file()})
    for f in files:
        tracker.log_file(run.info.run_id, f, REPORT_ARTIFACTS)
    if (out / "report.md").is_file():
        tracker.set_tags(run.info.run_id, {"mlflow.note.content": headline((out / "report.md").read_text())})
    return run.info.run_id


def log_report(uri: str | None, study: str, out: str | Path) -> str:
    """:func:`attach_report` for the CLI: what to add to its "report written to ..." line (where the
    report was logged, or why not: a store that refuses the artifacts does not undo the report)."""
    try:
        run = attach_report(Tracker(uri), study, out)
    except Exception as e:  # the report on disk stands; say why it is not in the store
        return f" (not logged with the study run: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    return f" and logged with study run {run}" if run else " (no study run to log it with)"
