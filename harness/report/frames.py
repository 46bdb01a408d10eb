"""MLflow -> pandas: tidy frames of one study, read from the tracking store alone.

- ``trials``: one row per (split, method, variant, seed), the latest FINISHED trial run of that
  key, with every final metric as a column (``test/union_acc``, ``diag/probe_acc``, ...);
- ``attempts``: every trial run whatever its status (FAILED/KILLED/RUNNING included), with the
  failure reason, so tables can say "n=2 of 3; 1 failed";
- ``teachers``: the latest FINISHED teacher run per (split, task) (metric ``test/acc``);
- ``history``: per-epoch metrics (``loss/*``, ``val/*``, ``epoch_seconds``, ...) of the trials
  in ``trials``, long form (one row per run, metric and epoch);
- ``params``: the flattened config of the trials in ``trials`` (one row per run).

Nothing here imports torch; nothing is computed that is not in the store.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from harness.errors import HarnessError
from harness.tracking import TAG, resolve_uri

KEYS = ["split", "method", "variant", "seed"]
FINAL_PREFIXES = ("test/", "diag/")
FINAL_KEYS = ("val/union_acc_best", "best_epoch", "trial_seconds", "peak_rss_mb", "cuda_max_allocated_mb")
PROVENANCE = ("version", "torch_version", "mlflow_version", "numpy_version", "python_version", "git_commit",
              "git_dirty")  # harness.<name> tags of a trial run
INFO_COLUMNS = ["run_id", "run_name", "status", "start_time", "end_time", "split", "method", "variant",
                "seed", "uses_labels", "failure", "failure_kind", "seeded", *PROVENANCE]
REFERENCE_METHOD = "teachers"  # the reference rows (claiming-teacher ensemble), seed-independent


def is_final(key: str) -> bool:
    """Final metrics are logged once per run; every other metric is a per-epoch history."""
    return key.startswith(FINAL_PREFIXES) or key in FINAL_KEYS


def natural_key(s: str) -> tuple:
    """``task_acc/10`` sorts after ``task_acc/2``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s))


def row_label(method: str, variant: str) -> str:
    """``cka``, ``cka-intra`` (ablation) or ``cka:wide`` (named variant), as in run names."""
    if variant in ("", "full"):
        return method
    return f"{method}{variant}" if variant.startswith("-") else f"{method}:{variant}"


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
    study_yaml: str | None = None

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


def _search(client: MlflowClient, experiment_id: str, kind: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], f"tags.`{TAG}kind` = '{kind}'", max_results=1000, page_token=token
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


def _info(run: Any) -> dict[str, Any]:
    tags = run.data.tags
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "status": run.info.status,
        "start_time": int(run.info.start_time or 0),
        "end_time": int(run.info.end_time or 0),
        "split": tags.get(f"{TAG}split", ""),
        "method": tags.get(f"{TAG}method", ""),
        "variant": tags.get(f"{TAG}variant", "full") or "full",
        "seed": to_int(tags.get(f"{TAG}seed")),
        "uses_labels": tags.get(f"{TAG}uses_labels", "false").lower() == "true",
        "failure": tags.get(f"{TAG}failure", ""),
        "failure_kind": tags.get(f"{TAG}failure_kind", ""),
        "seeded": tags.get(f"{TAG}seeded", ""),
        **{name: tags.get(f"{TAG}{name}", "") for name in PROVENANCE},
    }


def _latest(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The latest run (start time, then end time, then run id) of every key."""
    order = df.sort_values(keys + ["start_time", "end_time", "run_id"], kind="stable")
    return order.drop_duplicates(keys, keep="last").reset_index(drop=True)


def _with_metrics(rows: pd.DataFrame, runs: dict[str, Any], final_only: bool) -> pd.DataFrame:
    metrics = [
        {k: v for k, v in runs[rid].data.metrics.items() if is_final(k) or not final_only}
        for rid in rows["run_id"]
    ]
    mf = pd.DataFrame(metrics, index=rows.index, dtype=float)
    mf = mf[sorted(mf.columns, key=natural_key)]
    return pd.concat([rows, mf], axis=1)


def _history(client: MlflowClient, trials: pd.DataFrame, runs: dict[str, Any]) -> pd.DataFrame:
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


def _study_yaml(client: MlflowClient, experiment_id: str) -> str | None:
    """``study.yaml`` logged as an artifact of the latest study run, if the runner logged one."""
    runs = sorted(_search(client, experiment_id, "study"), key=lambda r: (r.info.start_time or 0, r.info.run_id))
    for run in reversed(runs):
        try:
            if not any(a.path == "study.yaml" for a in client.list_artifacts(run.info.run_id)):
                continue
            with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
                return Path(client.download_artifacts(run.info.run_id, "study.yaml", tmp)).read_text()
        except Exception:  # an unreachable artifact store must not break the report
            continue
    return None


def load_study(study: str, tracking_uri: str | None = None, history: bool = True,
               allow_empty: bool = False) -> StudyData:
    """Read one study (a name, or a study file whose ``name:`` is used) from the MLflow store.

    An experiment without a finished trial run is an error unless ``allow_empty`` (then
    ``trials``, ``history`` and ``params`` are empty: an experiment that holds only the searches
    of ``harness tune``)."""
    name, text = resolve_study(study)
    uri = resolve_uri(tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        raise HarnessError(f"report: no experiment '{name}' in {uri}")
    trial_runs = {r.info.run_id: r for r in _search(client, exp.experiment_id, "trial")}
    attempts = pd.DataFrame([_info(r) for r in trial_runs.values()], columns=INFO_COLUMNS)
    attempts = attempts.sort_values(KEYS + ["start_time", "run_id"], kind="stable").reset_index(drop=True)
    finished = attempts[attempts["status"] == "FINISHED"]
    if finished.empty and not allow_empty:
        raise HarnessError(f"report: experiment '{name}' has no finished trial runs in {uri}")
    trials = _with_metrics(_latest(finished, KEYS), trial_runs, final_only=True)

    teacher_runs = {r.info.run_id: r for r in _search(client, exp.experiment_id, "teacher")}
    trows = pd.DataFrame(
        [{**_info(r), "task": to_int(r.data.tags.get(f"{TAG}task"))} for r in teacher_runs.values()],
        columns=INFO_COLUMNS + ["task"],
    )
    trows = trows[trows["status"] == "FINISHED"]
    teachers = _with_metrics(_latest(trows, ["split", "task"]), teacher_runs, final_only=False)

    hist = _history(client, trials, trial_runs) if history else pd.DataFrame(
        columns=["split", "method", "variant", "label", "seed", "run_id", "metric", "step", "value"])
    params = pd.DataFrame([trial_runs[r].data.params for r in trials["run_id"]], index=trials["run_id"])
    params = params[sorted(params.columns)]
    return StudyData(name, uri, exp.experiment_id, trials, attempts, teachers, hist, params,
                     text or _study_yaml(client, exp.experiment_id))
