"""A study's trials and learning curves as pandas DataFrames, for your own tables and plots.

>>> from harness.results import trials, curves
>>> df = trials("digits")                  # a study name, or a study file: "studies/digits.yaml"
>>> df.groupby(["split", "label"])["test/union_acc"].agg(["mean", "std", "count"])

Both read the MLflow store alone, through the same code as ``harness report``
(:func:`harness.report.frames.load_study`): the same runs, the same numbers, today's metric and
parameter names whatever version of the harness wrote the store (``test/union_acc_best`` of older
stores is ``test/union_acc_bestval``, a param logged as Python's ``None`` is ``null``).

**Scope** (``scope=``):

- ``"study"`` (default): the runs of the report's tables. ``study`` a study *file*: the trial keys
  of that file (those its latest study run recorded when it ran this very file, else the file
  expanded as ``harness report FILE`` expands it; ``precision`` as the report's ``--precision``,
  which always expands); a study *name*: the keys that the latest study run of the experiment logged
  (older stores: its logged study file, expanded). Of every key, the latest FINISHED run; one row
  per (split, method, variant, seed).
- ``"all"``: every FINISHED trial run of the experiment, whatever its trial key: runs of an
  earlier, edited version of the study file, of another precision, and older FINISHED runs of a
  key that was run twice. Column ``in_report`` says which of them the report uses (exactly the
  rows of ``scope="study"``).

Failed, killed and running runs, teacher runs and ``harness tune`` runs are never rows.

Column conventions (:data:`INFO_COLUMNS`, then metrics, then params):

- ``study``, ``split``, ``method``, ``variant`` (``full``, an ablation ``-intra``, a routing rule or a
  named variant), ``label`` (the report's row name: ``cka``, ``cka-intra``, ``kd:wide``), ``seed``,
  ``trial_key``, ``run_id``, ``run_name``, ``in_report``; then ``start_time``/``end_time`` (ms since
  the epoch: ``pd.to_datetime(df.start_time, unit="ms")``), ``uses_labels``, ``pool``,
  ``deterministic``, ``seeded`` and the provenance tags ``version``, ``torch_version``, ...,
  ``git_commit``, ``git_dirty`` (strings, ``""`` where an older run did not record one);
- metrics under their MLflow names, unprefixed (they all contain ``/`` or are one of
  :data:`harness.report.frames.FINAL_KEYS`), as floats, NaN where a run did not log one;
- params: the run's flattened config (``train.epochs``, ``params.T``, ``teachers.0.arch``), each
  prefixed :data:`PARAM_PREFIX`: ``param.train.epochs``, ``param.params.T`` (strings, as logged;
  NaN where a run has no such param).

Reading a study name, or a study file as its run ran it, never imports torch (a notebook without
a GPU stack can use it); an edited study file is expanded into its trial keys by the harness's
grid, which does.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from harness.errors import HarnessError
from harness.report import frames
from harness.report.frames import (
    KEYS,
    StudyData,
    canonical_params,
    load_study,
    resolve_study,
    row_label,
)
from harness.store import KIND_TRIAL, STUDY_ARTIFACT
from harness.tracking import missing_store, resolve_uri

__all__ = ["CURVE_COLUMNS", "INFO_COLUMNS", "PARAM_PREFIX", "SCOPES", "curves", "trials"]

SCOPES = ("study", "all")
#: what a param column's name starts with (``param.train.epochs``)
PARAM_PREFIX = "param."
#: the identifying columns of :func:`trials`, in order (the run's tags and info)
INFO_COLUMNS = ["study", "split", "method", "variant", "label", "seed", "trial_key", "run_id", "run_name",
                "in_report", "start_time", "end_time", "uses_labels", "pool", "deterministic", "seeded",
                *frames.PROVENANCE]
#: the columns of :func:`curves`, in order
CURVE_COLUMNS = ["study", "split", "method", "variant", "label", "seed", "trial_key", "run_id", "in_report",
                 "metric", "epoch", "value"]


def trials(study: str, tracking_uri: str | None = None, scope: str = "study", *,
           precision: str | None = None) -> pd.DataFrame:
    """One row per finished trial run of ``study`` in ``scope``, with its final metrics and params.

    ``study``: a study name or a study file, as ``harness report`` takes it; ``tracking_uri``: as
    ``--tracking-uri`` (default ``$MLFLOW_TRACKING_URI``, else MLflow's own default); ``scope``:
    ``"study"`` (the report's runs) or ``"all"`` (every finished trial run of the experiment; see
    the module's docstring); ``precision``: ``fp32``/``bf16``, only with a study file (the
    precision its trials ran at; default: the one this machine's devices give).

    Columns: :data:`INFO_COLUMNS` (``split``, ``method``, ``variant``, ``label``, ``seed``,
    ``trial_key``, ``run_id``, ``in_report``: the report uses this run), then the final metrics
    (``test/union_acc``: last-epoch model, the primary metric; ``test/union_acc_bestval``: the model
    of the best validation epoch; ``test/task_acc/<k>``, ``test/task_acc_bestval/<k>``: per task;
    ``val/union_acc_best`` and ``best_epoch`` (1-based): that epoch; ``diag/*``: diagnostics;
    ``trial_seconds``, ``peak_rss_mb``, ``gpu_peak_mb``: cost), then every param as
    ``param.<flattened name>``. Rows sorted by split, method, variant, seed (then start time).
    An unknown study or store, or no finished run in scope, is a :class:`HarnessError`."""
    data, runs = _load(study, tracking_uri, scope, precision, history=False)
    return _trials_frame(data, runs)


def curves(study: str, tracking_uri: str | None = None, scope: str = "study", *,
           precision: str | None = None) -> pd.DataFrame:
    """The per-epoch metrics of the same runs as :func:`trials`, long form: one row per run,
    metric and epoch.

    Columns (:data:`CURVE_COLUMNS`): ``split``, ``method``, ``variant``, ``label``, ``seed``,
    ``trial_key``, ``run_id``, ``in_report`` as in :func:`trials`; ``metric`` (``val/union_acc``,
    ``val/task_acc/<k>``, ``loss/<term>`` (unweighted batch means; ``loss/total`` the optimised
    weighted sum), ``epoch_seconds``, ``images_per_second``, ...); ``epoch`` (the MLflow step:
    1 for the first epoch, as ``best_epoch`` counts); ``value`` (float). Methods that do not train
    (the ``teachers`` reference rows) have no curves. Arguments as :func:`trials`."""
    data, runs = _load(study, tracking_uri, scope, precision, history=True)
    if runs is None:
        hist = data.history
        ids = data.trials[["run_id", "trial_key"]].assign(in_report=True)
    else:
        rows = _finished(runs, data)
        hist = frames.metric_history(MlflowClient(data.uri), rows, runs)
        ids = rows[["run_id", "trial_key", "in_report"]]
    out = hist.rename(columns={"step": "epoch"}).merge(ids, on="run_id", how="left").assign(study=data.name)
    out["epoch"] = out["epoch"].astype(int)
    out["value"] = out["value"].astype(float)
    out = out.sort_values(["split", "method", "variant", "seed", "run_id", "metric", "epoch"], kind="stable")
    return out[CURVE_COLUMNS].reset_index(drop=True)


# ----------------------------------------------------------------------------- reading
def _load(study: str, tracking_uri: str | None, scope: str, precision: str | None,
          history: bool) -> tuple[StudyData, dict[str, Any] | None]:
    """The report's :class:`StudyData` of ``study`` and, with ``scope="all"``, every trial run of
    its experiment by run id (None with ``scope="study"``)."""
    if scope not in SCOPES:
        raise HarnessError(f"scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
    if precision is not None and precision not in ("fp32", "bf16"):
        raise HarnessError(f"precision: expected fp32 or bf16, got {precision!r}")
    def study_keys(text: str, source: str, precision: str | None) -> list[str]:
        from harness.grid import study_keys as expand  # imports torch: only for a study file

        return expand(text, source, precision)

    try:
        name, text = resolve_study(study)  # a missing or broken study file: one line
        uri = resolve_uri(tracking_uri)
        if missing_store(uri):  # before a study file is expanded; opening it would create an empty store
            raise HarnessError(f"no experiment '{name}' in {uri} (no tracking store there)")
        keys = None
        if text is not None:  # the keys its run recorded (no torch), else the file expanded
            keys = (frames.recorded_keys(study, uri) if precision is None else None) or study_keys(text, study, precision)
        data = load_study(study, uri, history=history and scope == "study", allow_empty=scope == "all", keys=keys,
                          expand=lambda t: study_keys(t, f"{STUDY_ARTIFACT} logged by the latest study run", precision))
    except HarnessError as e:  # the report's messages, without its name
        raise HarnessError(str(e).removeprefix("report: ")) from None
    if scope == "study":
        return data, None
    runs = {r.info.run_id: r for r in frames.search_runs(MlflowClient(uri), data.experiment_id, KIND_TRIAL)}
    if not any(r.info.status == "FINISHED" for r in runs.values()):
        raise HarnessError(f"experiment '{data.name}' has no finished trial runs in {uri}")
    return data, runs


def _finished(runs: dict[str, Any], data: StudyData) -> pd.DataFrame:
    """Every FINISHED trial run (the report's columns, final metrics in today's names), sorted, with
    ``in_report``."""
    rows = pd.DataFrame([frames.run_info(r) for r in runs.values() if r.info.status == "FINISHED"],
                        columns=frames.INFO_COLUMNS)
    rows = rows.sort_values(KEYS + ["start_time", "end_time", "run_id"], kind="stable").reset_index(drop=True)
    rows = frames.with_metrics(rows, runs, final_only=True, kind=KIND_TRIAL)
    return rows.assign(in_report=rows["run_id"].isin(set(data.trials["run_id"])))


def _trials_frame(data: StudyData, runs: dict[str, Any] | None) -> pd.DataFrame:
    if runs is None:
        rows, params = data.trials.assign(in_report=True), data.params
    else:
        rows = _finished(runs, data)
        params = pd.DataFrame([canonical_params(runs[r].data.params) for r in rows["run_id"]], index=rows["run_id"])
        params = params[sorted(params.columns)]
    rows = rows.assign(study=data.name, label=[row_label(m, v) for m, v in zip(rows["method"], rows["variant"])])
    metrics = [c for c in rows.columns if frames.is_final(c)]  # already in natural order
    p = params.reindex(rows["run_id"]).add_prefix(PARAM_PREFIX).reset_index(drop=True)
    return pd.concat([rows[INFO_COLUMNS + metrics].reset_index(drop=True), p], axis=1)
