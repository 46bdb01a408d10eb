"""MLflow schema and I/O: run names, tags, flattened params, metrics logged in batches.

Schema (the reports and the runner rely on it):
- one experiment per study (its name); one run per trial, and one per teacher;
- tags ``harness.study``, ``harness.split``, ``harness.method``, ``harness.variant`` (``full`` or
  ``-intra`` ...), ``harness.seed``, ``harness.trial_key``, ``harness.kind`` (``teacher``,
  ``trial`` or ``study``), ``harness.uses_labels``; teachers add ``harness.task``;
- params: the flattened resolved config;
- per-epoch metrics (step = epoch): ``loss/<term>``, ``loss/total``, ``val/union_acc``,
  ``val/task_acc/<k>``, ``epoch_seconds``, ``images_per_second``; one ``log_batch`` per epoch;
- final metrics: ``test/union_acc`` (last epoch), ``test/union_acc_best`` (best validation
  epoch), ``test/task_acc/<k>``, ``test/task_acc_best/<k>``, ``val/union_acc_best``,
  ``best_epoch`` and ``diag/*`` diagnostics.
"""

from __future__ import annotations

import functools
import os
import random
import time
from typing import Any, Callable, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

TAG = "harness."
F = TypeVar("F", bound=Callable[..., Any])
MAX_PARAM = 6000


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


def _retry(fn: F) -> F:
    """Retry on a locked SQLite store (several worker processes write to one file)."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        for attempt in range(12):
            try:
                return fn(*a, **kw)
            except Exception as e:  # MlflowException wraps sqlalchemy's OperationalError
                if "locked" not in str(e).lower() or attempt == 11:
                    raise
                time.sleep(0.05 * 2**min(attempt, 6) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


class Tracker:
    """A thin layer over ``MlflowClient`` that knows the harness schema."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(self.uri)

    @_retry
    def experiment(self, name: str) -> str:
        """The id of experiment ``name``, created if needed."""
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created concurrently by another worker
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    @_retry
    def start(
        self, experiment_id: str, run_name: str, tags: dict[str, Any], params: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> str:
        """Create a run with tags (and the parent link) and log its params in one batch."""
        all_tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        if params:
            flat = flatten(params)
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id

    @_retry
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """All metrics of one step in a single call."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

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
