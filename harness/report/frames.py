"""MLflow -> pandas: tidy frames of one study, read from the tracking store alone.

Runs are scoped by trial key: only trial runs whose ``harness.trial_key`` is one of the study's
keys count (the keys given, e.g. by the CLI from a study file; else ``trial_keys.json`` logged
by the latest study run; else the keys of the logged ``study.yaml``, expanded by a callback the
caller supplies, since expanding needs torch). Without any of these the report is not scoped and
says so. Runs of other keys (an edited and reverted study, a partial rerun) are kept apart in
``others`` and never reach a table, figure or statistic.

- ``trials``: one row per (split, method, variant, seed), the latest FINISHED in-scope trial run
  of that key, with every final metric as a column (``test/union_acc``, ``diag/probe_acc``, ...);
- ``attempts``: every in-scope trial run whatever its status (FAILED/KILLED/RUNNING included),
  with the failure reason, so tables can say "n=2 of 3; 1 failed";
- ``others``: every trial run outside the scope (same columns as ``attempts``);
- ``teachers``: FINISHED teacher runs (metric ``test/own_task_acc``). Scoped: the runs of the
  teachers the in-scope trial runs used, by their ``harness.teacher_keys``/``teacher_digests``
  tags, or for older runs by the teacher config in their params (``teacher.*``, ``val_fraction``,
  ``image_size``); the latest run per teacher key and weights (several per task with
  ``teacher_seeds: per_seed``). None when the trials say neither (the tables then use the in-scope
  ``teachers`` reference run). Not scoped: the latest run per (split, task);
- ``history``: per-epoch metrics (``loss/*``, ``val/*``, ``epoch_seconds``, ...) of the trials
  in ``trials``, long form (one row per run, metric and epoch);
- ``params``: the flattened config of the trials in ``trials`` (one row per run).

Runs are read in today's vocabulary whatever wrote them (:func:`current_metrics`,
:func:`canonical_params`): stores written before it (teachers' ``test/acc``, trials'
``test/union_acc_best``, params as Python strings such as ``None`` and one ``teachers`` list) report
the same numbers. A store moved with its ``mlruns`` folder still gives its study runs' artifacts
(MLflow records absolute artifact paths; :func:`local_artifacts`).

Nothing here imports torch; nothing is computed that is not in the store.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence
from urllib.parse import urlparse

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from harness.errors import HarnessError
from harness.records import TeacherRunTags, TrialRunTags
from harness.store import (
    DETERMINISTIC, FAILURE, FAILURE_KIND, KIND, KIND_STUDY, KIND_TEACHER, KIND_TRIAL, POOL,
    PROVENANCE_TAGS, SOURCE_ARTIFACT, STUDY, STUDY_ARTIFACT, TEACHER_DIGESTS, TEACHER_KEYS, TRIAL_KEYS_ARTIFACT,
)
from harness.tracking import (  # noqa: F401
    bestval, flatten, missing_store, resolve_uri, row_label,
)

KEYS = ["split", "method", "variant", "seed"]
FINAL_PREFIXES = ("test/", "diag/")
#: ``gpu_peak_mb`` (CUDA trials; also logged per epoch, the final value is the trial's peak) and
#: ``cuda_max_allocated_mb`` (the older GPU metric, still logged beside it)
FINAL_KEYS = ("val/union_acc_best", "best_epoch", "trial_seconds", "peak_rss_mb", "gpu_peak_mb",
              "cuda_max_allocated_mb", "pool_size")
PROVENANCE = tuple(PROVENANCE_TAGS)  # the provenance columns, each a tag of the trial run (harness.store)
INFO_COLUMNS = ["run_id", "run_name", "status", "start_time", "end_time", "split", "method", "variant",
                "seed", "trial_key", "uses_labels", "failure", "failure_kind", "seeded", *PROVENANCE,
                "deterministic", "pool"]  # harness.deterministic: "true"/"false" as the trial read it back, "" if
# older; harness.pool: what the student learned from, "train" or "transfer:<dataset>:<fraction>", "" if older
#: a study file's text -> its trial keys (``harness.grid.expand``; the CLI supplies it)
KeyExpander = Callable[[str], Sequence[str]]
REFERENCE_METHOD = "teachers"  # the reference rows (claiming-teacher ensemble), seed-independent


#: metric names of teacher runs written before the one vocabulary -> today's names (trial runs:
#: :func:`harness.tracking.bestval`, ``test/union_acc_best`` -> ``test/union_acc_bestval``)
OLD_METRICS = {"test/acc": "test/own_task_acc", "test/acc_last": "test/own_task_acc_last",
               "val/acc_best": "val/own_task_acc_best", "val/union_acc": "val/own_task_acc"}


def current_metrics(metrics: dict[str, float], kind: str) -> dict[str, float]:
    """A run's metrics under today's names (teacher runs: :data:`OLD_METRICS`; trial runs: the
    best-val. model's ``*_bestval``); a metric logged under both names keeps the new one's value."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        new = OLD_METRICS.get(k, k) if kind == KIND_TEACHER else bestval(k)
        if new == k or new not in metrics:
            out[new] = v
    return out


def _old_value(v: str) -> Any:
    """A param value as older runs logged it (Python's ``None``/``True``/``False``, a list or dict
    in Python syntax) parsed, or the string itself when it is not one of these."""
    if v in ("None", "True", "False") or v[:1] in ("[", "{", "("):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return v
    return v


def canonical_params(params: dict[str, str]) -> dict[str, str]:
    """A run's params as today's :func:`harness.tracking.flatten` writes them: YAML-style values
    (``null``, ``false``, ``[a, b]``) and a list of mappings (older runs: one ``teachers`` param
    in Python syntax) as one param per item and field (``teachers.0.arch``). Today's params are
    returned unchanged."""
    out: dict[str, str] = {}
    for k, v in params.items():
        value = _old_value(v) if isinstance(v, str) else v
        if value is v:
            out[k] = v
        else:
            out.update(flatten({k: value}))
    return out


def is_final(key: str) -> bool:
    """Final metrics are logged once per run; every other metric is a per-epoch history."""
    return key.startswith(FINAL_PREFIXES) or key in FINAL_KEYS


def natural_key(s: str) -> tuple:
    """``task_acc/10`` sorts after ``task_acc/2``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s))


@dataclass
class StudyData:
    """Everything the report needs, read from one MLflow experiment."""

    name: str
    uri: str
    experiment_id: str
    trials: pd.DataFrame
    attempts: pd.DataFrame
    teachers: pd.DataFrame
    history: pd.DataFrame
    params: pd.DataFrame
    #: the study file: as written when known (given, or logged as ``study_source.yaml``), else the
    #: resolved ``study.yaml`` of the latest study run
    study_yaml: str | None = None
    #: the study's trial keys (None: not scoped), where they came from, and why not when None
    keys: frozenset[str] | None = None
    scope: str = ""
    others: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=INFO_COLUMNS))
    #: the study file as written (None: not known, e.g. a store of an older runner) and the
    #: resolved study the latest study run logged (every default filled in; None: not logged)
    study_source: str | None = None
    study_resolved: str | None = None

    @property
    def study(self) -> dict[str, Any]:
        """The parsed study file when one is known (given, or logged with the study run)."""
        try:
            data = yaml.safe_load(self.study_yaml) if self.study_yaml else None
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def splits(self) -> list[str]:
        """Split names in the study file's order when known, else sorted."""
        present = set(self.attempts["split"]) | set(self.teachers["split"])
        listed = [s.get("name") for s in self.study.get("splits", []) if isinstance(s, dict)]
        ordered = [s for s in listed if s in present]
        return ordered + sorted(present - set(ordered))

    def duplicates(self) -> pd.DataFrame:
        """Keys with more than one FINISHED run (only by mistake): the latest one is used."""
        fin = self.attempts[self.attempts["status"] == "FINISHED"]
        counts = fin.groupby(KEYS, sort=True).size().rename("n_finished").reset_index()
        dup = counts[counts["n_finished"] > 1]
        used = self.trials[KEYS + ["run_id"]].rename(columns={"run_id": "used_run_id"})
        return dup.merge(used, on=KEYS, how="left").reset_index(drop=True)


def resolve_study(study: str) -> tuple[str, str | None]:
    """(experiment name, study-file text or None) for a study name or a study YAML path."""
    path = Path(study)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        return study, None
    if not path.is_file():
        raise HarnessError(f"report: no study file '{study}'")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HarnessError(f"report: {study}: not valid YAML ({str(e).splitlines()[0]})") from None
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise HarnessError(f"report: {study}: the study file has no 'name:'")
    return name, text


def search_runs(client: MlflowClient, experiment_id: str, kind: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], f"tags.`{KIND}` = '{kind}'", max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def to_int(value: str | None) -> int:
    """A tag's integer value, -1 when absent or not an integer."""
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return -1


def run_info(run: Any) -> dict[str, Any]:
    """One row of a trial or teacher run: its info, its identity (:class:`harness.records.TrialRunTags`,
    read the one way every reader reads it), why it failed, its provenance."""
    tags = run.data.tags
    ident = TrialRunTags.from_tags(tags)
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "status": run.info.status,
        "start_time": int(run.info.start_time or 0),
        "end_time": int(run.info.end_time or 0),
        "split": ident.split,
        "method": ident.method,
        "variant": ident.variant,
        "seed": ident.seed,
        "trial_key": ident.trial_key,
        "uses_labels": ident.uses_labels,
        "failure": tags.get(FAILURE, ""),
        "failure_kind": tags.get(FAILURE_KIND, ""),
        "seeded": "" if ident.seeded is None else str(ident.seeded).lower(),  # "" on older runs
        **{name: tags.get(tag, "") for name, tag in PROVENANCE_TAGS.items()},
        "deterministic": tags.get(DETERMINISTIC, ""),
        "pool": tags.get(POOL, ""),
    }


def _latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The latest run (start time, then end time, then run id) of every key."""
    order = df.sort_values(keys + ["start_time", "end_time", "run_id"], kind="stable")
    return order.drop_duplicates(keys, keep="last").reset_index(drop=True)


def with_metrics(rows: pd.DataFrame, runs: dict[str, Any], final_only: bool, kind: str) -> pd.DataFrame:
    metrics = [
        {k: v for k, v in current_metrics(runs[rid].data.metrics, kind).items() if is_final(k) or not final_only}
        for rid in rows["run_id"]
    ]
    mf = pd.DataFrame(metrics, index=rows.index, dtype=float)
    mf = mf[sorted(mf.columns, key=natural_key)]
    return pd.concat([rows, mf], axis=1)


def metric_history(client: MlflowClient, trials: pd.DataFrame, runs: dict[str, Any]) -> pd.DataFrame:
    records = []
    for row in trials.itertuples(index=False):
        for key in sorted(k for k in runs[row.run_id].data.metrics if not is_final(k)):
            for m in client.get_metric_history(row.run_id, key):
                records.append((row.run_id, key, int(m.step), int(m.timestamp), float(m.value)))
    cols = ["run_id", "metric", "step", "timestamp", "value"]
    hist = pd.DataFrame(records, columns=cols)
    hist = hist.sort_values(cols, kind="stable").drop_duplicates(["run_id", "metric", "step"], keep="last")
    ids = trials[["run_id", *KEYS]].assign(label=[row_label(m, v) for m, v in zip(trials.method, trials.variant)])
    out = hist.drop(columns="timestamp").merge(ids, on="run_id", how="left")
    out = out[["split", "method", "variant", "label", "seed", "run_id", "metric", "step", "value"]]
    out = out.sort_values(["split", "method", "variant", "seed", "metric", "step"], kind="stable")
    return out.reset_index(drop=True)


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow prints a download progress bar by default; a report's output stays one line."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def local_artifacts(uri: str, run: Any) -> Path | None:
    """The folder of a run's artifacts when they are local files and that folder is not where MLflow
    recorded it: a SQLite store moved together with its ``mlruns`` folder (MLflow 3 records absolute
    artifact paths) has them at ``mlruns/<experiment id>/<run id>/artifacts`` beside the database.
    None when the recorded place exists (MLflow reads it) or nothing is found."""
    recorded = run.info.artifact_uri or ""
    if "://" in recorded and not recorded.startswith("file://"):
        return None
    if Path(urlparse(recorded).path if recorded.startswith("file://") else recorded).is_dir():
        return None
    if not uri.startswith("sqlite:///"):
        return None
    moved = (Path(uri[len("sqlite:///"):].split("?")[0]).parent / "mlruns" / run.info.experiment_id
             / run.info.run_id / "artifacts")
    return moved if moved.is_dir() else None


def _logged_study(client: MlflowClient, experiment_id: str, uri: str = "",
                  study: str | None = None) -> tuple[str | None, list[str] | None, str | None]:
    """(``study.yaml``, ``trial_keys.json``, ``study_source.yaml``) of the latest study run (of
    ``study`` when given) that logged either of the first two (the runner logs all three; older
    runners only the first, or the first two); Nones when no study run did."""
    runs = sorted(search_runs(client, experiment_id, KIND_STUDY), key=lambda r: (r.info.start_time or 0, r.info.run_id))
    if study is not None:
        runs = [r for r in runs if r.data.tags.get(STUDY) == study]
    for run in reversed(runs):
        try:
            moved = local_artifacts(uri, run)
            with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
                if moved is not None:
                    names = {p.name for p in moved.iterdir()}
                    fetch = lambda name: moved / name  # noqa: E731
                else:
                    names = {a.path for a in client.list_artifacts(run.info.run_id)}
                    fetch = lambda name: Path(client.download_artifacts(run.info.run_id, name, tmp))  # noqa: E731
                if not names & {STUDY_ARTIFACT, TRIAL_KEYS_ARTIFACT}:
                    continue
                text = keys = source = None
                if STUDY_ARTIFACT in names:
                    text = fetch(STUDY_ARTIFACT).read_text()
                if TRIAL_KEYS_ARTIFACT in names:
                    raw = json.loads(fetch(TRIAL_KEYS_ARTIFACT).read_text())
                    keys = [str(k) for k in raw] if isinstance(raw, list) else None
                if SOURCE_ARTIFACT in names:
                    source = fetch(SOURCE_ARTIFACT).read_text()
                return text, keys, source
        except Exception:  # an unreachable artifact store must not break the report
            continue
    return None, None, None


def experiment_of(text: str | None) -> str | None:
    """The experiment a study file names (``experiment:``), None when it names none."""
    if text:
        with contextlib.suppress(yaml.YAMLError):
            data = yaml.safe_load(text)
            if isinstance(data, dict) and isinstance(data.get("experiment"), str):
                return data["experiment"]
    return None


def recorded_keys(study: str, tracking_uri: str | None = None) -> list[str] | None:
    """The trial keys of a study *file* as the store recorded them: those its latest study run
    logged (``trial_keys.json``) when that run ran this very file (its ``study_source.yaml`` is the
    file's text), so the report's scope needs no expansion of the file (no grid, no torch). None
    when the file was edited since, never ran, or the store is older than these artifacts: then
    the caller expands the file (:func:`harness.grid.study_keys`)."""
    name, text = resolve_study(study)
    uri = resolve_uri(tracking_uri)
    if text is None or missing_store(uri):
        return None
    client = MlflowClient(uri)
    experiment = experiment_of(text)
    exp = client.get_experiment_by_name(experiment or name)
    if exp is None or exp.lifecycle_stage == "deleted":
        return None
    _, keys, source = _logged_study(client, exp.experiment_id, uri, name if experiment else None)
    return keys if source == text else None


def _scope(keys: Collection[str] | None, given_text: str | None, logged_text: str | None,
           logged_keys: list[str] | None, expand: KeyExpander | None) -> tuple[frozenset[str] | None, str]:
    """The study's trial keys and where they came from (or None and why the report is not scoped)."""
    if keys is not None:
        return frozenset(keys), "the study file given" if given_text else "the trial keys given"
    if logged_keys is not None and not (given_text and expand):
        return frozenset(logged_keys), f"`{TRIAL_KEYS_ARTIFACT}` of the latest study run"
    logged = f"`{STUDY_ARTIFACT}` of the latest study run (expanded; that run logged no `{TRIAL_KEYS_ARTIFACT}`)"
    text, source = (given_text, "the study file given") if given_text else (logged_text, logged)
    if text and expand is not None:
        try:
            return frozenset(expand(text)), source
        except HarnessError as e:
            return None, f"{source} could not be expanded ({e})"
    if text:
        return None, f"the store has no `{TRIAL_KEYS_ARTIFACT}` and the study file was not expanded"
    return None, f"no study run in this experiment logged `{TRIAL_KEYS_ARTIFACT}` or `{STUDY_ARTIFACT}`"


def _teacher_params(params: dict[str, str], k: int) -> dict[str, str] | None:
    """The params a teacher run of task ``k`` logs (``teacher.*``, ``val_fraction``,
    ``image_size``), as recorded in a trial run's params (``teachers.<k>.*``; older runs: one
    ``teachers`` list, :func:`canonical_params`); None when the trial did not record them."""
    p = canonical_params(params)
    prefix = f"teachers.{k}."
    want = {"teacher." + key[len(prefix):]: v for key, v in p.items() if key.startswith(prefix)}
    if not want:
        return None
    for name in ("val_fraction", "image_size"):
        if f"dataset.{name}" in p:
            want[name] = p[f"dataset.{name}"]
    return want


def _used_teachers(trial: Any, ntasks: int) -> list[tuple[int, dict[str, str]]]:
    """What identifies the teachers a trial run used, per task: ``{"teacher_key": .., "teacher_digest":
    ..}`` from its ``harness.teacher_keys``/``teacher_digests`` tags (task order), else the teacher
    params of its logged config (``teacher.*``, ``val_fraction``, ``image_size``); [] when neither."""
    tags, params = trial.data.tags, trial.data.params
    keys = [k for k in tags.get(TEACHER_KEYS, "").split(",") if k]
    if keys:
        digests = [d for d in tags.get(TEACHER_DIGESTS, "").split(",") if d]
        return [(k, {"teacher_key": key, **({"teacher_digest": digests[k]} if len(digests) == len(keys) else {})})
                for k, key in enumerate(keys)]
    out = []
    for k in range(ntasks):
        want = _teacher_params(params, k)
        if want is not None:
            out.append((k, want))
    return out


def _scoped_teachers(trows: pd.DataFrame, runs: dict[str, Any], trials: list[tuple[str, Any]]) -> pd.DataFrame:
    """The teacher runs that in-scope trials used (the latest run per teacher key and weights)."""
    ntasks = {s: int(g["task"].max()) + 1 for s, g in trows.groupby("split")} if not trows.empty else {}
    wanted: dict[tuple[str, int], list[dict[str, str]]] = {}
    for split, run in trials:
        for k, want in _used_teachers(run, ntasks.get(split, 0)):
            if want not in wanted.setdefault((split, k), []):
                wanted[(split, k)].append(want)
    keep = []
    for r in trows.itertuples(index=False):
        run = runs[r.run_id]
        have = {**canonical_params(run.data.params), "teacher_key": r.teacher_key, "teacher_digest": r.teacher_digest}
        for want in wanted.get((r.split, r.task), []):
            if all(have.get(name) == v or (name == "teacher_digest" and not r.teacher_digest)
                   for name, v in want.items()):
                keep.append(r.run_id)
                break
    rows = trows[trows["run_id"].isin(keep)]
    return _latest(rows, ["split", "task", "teacher_key", "teacher_digest"])


def load_study(study: str, tracking_uri: str | None = None, history: bool = True,
               allow_empty: bool = False, keys: Collection[str] | None = None,
               expand: KeyExpander | None = None, experiment: str | None = None) -> StudyData:
    """Read one study (a name, or a study file whose ``name:`` is used) from the MLflow store.

    Scope, the first that applies: ``keys`` (the study's trial keys: the CLI expands a study file
    given on the command line); ``expand`` of a study file given; the keys logged by the latest
    study run (``trial_keys.json``); ``expand`` of its logged ``study.yaml``; else none (the latest
    run of every split, method, variant and seed, as before trial keys). An experiment without a
    finished in-scope trial run is an error unless ``allow_empty`` (then ``trials``, ``history``
    and ``params`` are empty: an experiment that holds only the searches of ``harness tune``).
    ``experiment``: the experiment holding the study's runs when it is not the study's name (a
    benchmark suite's: then only this study's own study runs are read for its logged files)."""
    name, text = resolve_study(study)
    experiment = experiment or experiment_of(text)
    uri = resolve_uri(tracking_uri)
    if missing_store(uri):  # opening it would create an empty store: a report only reads
        raise HarnessError(f"report: no experiment '{name}' in {uri} (no tracking store there)")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment or name)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise HarnessError(f"report: no experiment '{experiment or name}' in {uri}")
    logged_text, logged_keys, logged_source = _logged_study(client, exp.experiment_id, uri,
                                                            name if experiment else None)
    scope_keys, scope = _scope(keys, text, logged_text, logged_keys, expand)
    trial_runs = {r.info.run_id: r for r in search_runs(client, exp.experiment_id, KIND_TRIAL)}
    every = pd.DataFrame([run_info(r) for r in trial_runs.values()], columns=INFO_COLUMNS)
    every = every.sort_values(KEYS + ["start_time", "run_id"], kind="stable").reset_index(drop=True)
    inside = every["trial_key"].isin(scope_keys) if scope_keys is not None else pd.Series(True, index=every.index)
    attempts = every[inside].reset_index(drop=True)
    others = every[~inside].reset_index(drop=True)
    finished = attempts[attempts["status"] == "FINISHED"]
    if finished.empty and not allow_empty:
        extra = f" ({len(others)} trial runs of other configurations)" if len(others) else ""
        raise HarnessError(f"report: experiment '{name}' has no finished trial runs in {uri}{extra}")
    trials = with_metrics(_latest(finished, KEYS), trial_runs, final_only=True, kind=KIND_TRIAL)

    teacher_runs = {r.info.run_id: r for r in search_runs(client, exp.experiment_id, KIND_TEACHER)}
    trows = pd.DataFrame(
        [{**run_info(r), "task": (t := TeacherRunTags.from_tags(r.data.tags)).task,
          "teacher_key": t.teacher_key, "teacher_digest": t.teacher_digest} for r in teacher_runs.values()],
        columns=INFO_COLUMNS + ["task", "teacher_key", "teacher_digest"],
    )
    trows = trows[trows["status"] == "FINISHED"]
    if scope_keys is None:
        trows = _latest(trows, ["split", "task"])
    else:
        trows = _scoped_teachers(
            trows, teacher_runs, [(s, trial_runs[r]) for s, r in zip(trials["split"], trials["run_id"])])
    teachers = with_metrics(trows, teacher_runs, final_only=False, kind=KIND_TEACHER)

    hist = metric_history(client, trials, trial_runs) if history else pd.DataFrame(
        columns=["split", "method", "variant", "label", "seed", "run_id", "metric", "step", "value"])
    params = pd.DataFrame([canonical_params(trial_runs[r].data.params) for r in trials["run_id"]],
                          index=trials["run_id"])
    params = params[sorted(params.columns)]
    source = text or logged_source
    return StudyData(name, uri, exp.experiment_id, trials, attempts, teachers, hist, params,
                     source or logged_text, scope_keys, scope, others, source, logged_text)
