"""The report's tuning section: the Optuna searches of ``harness tune``, read back from MLflow.

``harness tune`` logs, in the study's experiment, one run per Optuna trial (``harness.kind`` =
``tune_trial``) with the trial's study, number, state, sampled values and search space as tags,
its final ``objective`` metric and the running ``objective/running`` curve, and one ``search``
parent run per invocation (its Optuna storage). This module turns them into:

- :func:`load_tuning`: a :class:`TuningData` (one row per Optuna trial, duplicates resolved, and
  the running curves), read from the store alone;
- :func:`tuning_frame` (``tuning.csv``), :func:`summary_frame` (counts, default vs best),
  :func:`params_display` (best vs default values) and :func:`param_importances` (fANOVA over the
  COMPLETE trials of an in-memory Optuna study, seeded);
- :func:`tuning_markdown`: the report's ``## Tuning`` section; importances resting on fewer than
  :data:`FEW_TRIALS` complete trials carry a warning (:func:`few_trials_warning`) that says the
  same of optuna-dashboard's importances (PED-ANOVA over the same complete trials);
- the figures, one facet per Optuna study, coloured by trial state: :func:`tuning_history_plot`
  (objective per trial), :func:`tuning_curves_plot` (running objective),
  :func:`tuning_importance_plot` (importances); :mod:`harness.report.build` writes the files.

Optuna is imported only when importances are computed; nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient

from harness.report.figures import figure, save
from harness.report.frames import PROVENANCE, search_runs, to_int
from harness.report.paths import show_uri
from harness.report.tables import Fmt, markdown
from harness.store import (
    FAILURE, KIND_SEARCH, KIND_TUNE_TRIAL, METHOD, OBJECTIVE, OPTUNA_DEFAULT, OPTUNA_DISTRIBUTIONS,
    OPTUNA_NUMBER, OPTUNA_PARAMS, OPTUNA_STATE, OPTUNA_STUDIES, OPTUNA_STUDY, PROVENANCE_TAGS,
    RETRY_OF, STORAGE,
)

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")  # Optuna trial states, in display order
STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
OBJECTIVES = {
    "val_last": "validation union accuracy of the model after the last epoch",
    "val_best": "validation union accuracy of the model at its best epoch",
}
CURVE = "objective/running"
#: below this many complete trials, parameter importances (fANOVA here, the same in optuna-dashboard)
#: are mostly noise, and the report says so
FEW_TRIALS = 20
CSV_COLUMNS = ["optuna_study", "method", "number", "state", "default", "value", "duration", "run_id"]
COLUMNS = CSV_COLUMNS + ["status", "start_time", "end_time", "objective", "failure", "params", "distributions",
                         "retry_of", *PROVENANCE]


@dataclass
class TuningData:
    """The Optuna trials of one experiment (``trials``: one row per study and trial number) and
    their running objective (``curves``: long form, one row per trial and step)."""

    trials: pd.DataFrame
    curves: pd.DataFrame
    searches: pd.DataFrame  # the search runs: run_id, start_time, storage, optuna_studies
    superseded: pd.DataFrame  # runs of a trial that another run of the same trial replaced

    @property
    def empty(self) -> bool:
        return self.trials.empty

    @property
    def studies(self) -> list[str]:
        return sorted(set(self.trials["optuna_study"]))

    def of(self, study: str) -> pd.DataFrame:
        return self.trials[self.trials["optuna_study"] == study]


class Importances(NamedTuple):
    """fANOVA importances of one Optuna study (``values`` sums to 1, largest first; empty when
    not computed), the number of complete trials used and a note (why not, or what was left out)."""

    values: dict[str, float]
    n_trials: int
    note: str


# ----------------------------------------------------------------------------- MLflow -> frames
def _json(text: str | None, fallback: Any) -> Any:
    try:
        value = json.loads(text) if text else fallback
    except (TypeError, ValueError):
        return fallback
    return value if isinstance(value, type(fallback)) else fallback



def _row(run: Any) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    state = tags.get(OPTUNA_STATE, "").upper()
    if state not in STATES:  # no state tag: read it from the run's status
        state = {"FINISHED": "COMPLETE", "RUNNING": "RUNNING"}.get(run.info.status, "FAIL")
    start, end = int(run.info.start_time or 0), int(run.info.end_time or 0)
    duration = metrics.get("trial_seconds", (end - start) / 1000 if end > start else math.nan)
    method = tags.get(METHOD, "")
    return {
        "optuna_study": tags.get(OPTUNA_STUDY) or method or "(unnamed)",
        "method": method,
        "number": to_int(tags.get(OPTUNA_NUMBER)),
        "state": state,
        "default": tags.get(OPTUNA_DEFAULT, "false").lower() == "true",
        "value": float(metrics["objective"]) if state in ("COMPLETE", "PRUNED") and "objective" in metrics
        else math.nan,
        "duration": float(duration),
        "run_id": run.info.run_id,
        "status": run.info.status,
        "start_time": start,
        "end_time": end,
        "objective": tags.get(OBJECTIVE, ""),
        "failure": tags.get(FAILURE, ""),
        "params": _json(tags.get(OPTUNA_PARAMS), dict(run.data.params)),
        "distributions": _json(tags.get(OPTUNA_DISTRIBUTIONS), {}),
        #: the number of the failed trial this one reruns (that one then used no budget)
        "retry_of": to_int(tags.get(RETRY_OF)),
        **{name: tags.get(tag, "") for name, tag in PROVENANCE_TAGS.items()},
    }


def load_tuning(tracking_uri: str, experiment_id: str, curves: bool = True) -> TuningData:
    """Every Optuna trial logged by ``harness tune`` in one experiment.

    A trial logged by several runs (a resumed or repeated search) keeps one: a finished state
    before RUNNING, then the latest end time (then start time, then run id)."""
    client = MlflowClient(tracking_uri)
    rows = [_row(r) for r in search_runs(client, experiment_id, KIND_TUNE_TRIAL)]
    runs = pd.DataFrame(rows, columns=COLUMNS)
    runs["terminal"] = runs["state"] != "RUNNING"
    order = runs.sort_values(["optuna_study", "number", "terminal", "end_time", "start_time", "run_id"],
                             kind="stable")
    keep = ~order.duplicated(["optuna_study", "number"], keep="last")
    trials = order[keep].drop(columns="terminal").reset_index(drop=True)
    superseded = order[~keep].drop(columns="terminal").reset_index(drop=True)
    searches = pd.DataFrame(
        [{"run_id": r.info.run_id, "start_time": int(r.info.start_time or 0),
          "storage": r.data.tags.get(STORAGE, ""),
          "optuna_studies": r.data.tags.get(OPTUNA_STUDIES, "")}
         for r in search_runs(client, experiment_id, KIND_SEARCH)],
        columns=["run_id", "start_time", "storage", "optuna_studies"],
    ).sort_values(["start_time", "run_id"], kind="stable").reset_index(drop=True)
    records = []
    if curves:
        for t in trials.itertuples(index=False):
            for m in client.get_metric_history(t.run_id, CURVE):
                records.append((t.optuna_study, t.method, t.number, t.state, int(m.step), int(m.timestamp),
                                float(m.value)))
    cols = ["optuna_study", "method", "number", "state", "step", "timestamp", "value"]
    cur = pd.DataFrame(records, columns=cols).sort_values(cols, kind="stable")
    cur = cur.drop_duplicates(["optuna_study", "number", "step"], keep="last").drop(columns="timestamp")
    return TuningData(trials, cur.reset_index(drop=True), searches, superseded)


# ----------------------------------------------------------------------------- numeric frames
def tuning_frame(td: TuningData) -> pd.DataFrame:
    """``tuning.csv``: one row per Optuna trial (values as fractions), each parameter a column."""
    params = pd.DataFrame(list(td.trials["params"]), index=td.trials.index, dtype=object)  # ints stay ints
    params = params[sorted(params.columns)]
    return pd.concat([td.trials[CSV_COLUMNS], params], axis=1)


def default_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The trial that evaluated the study's own values (a COMPLETE one first, then the lowest number)."""
    d = trials[trials["default"]]
    if d.empty:
        return None
    return d.assign(done=d["state"] != "COMPLETE").sort_values(["done", "number"], kind="stable").iloc[0]


def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The COMPLETE trial with the largest objective (the lowest number on a tie), as Optuna picks it."""
    done = trials[(trials["state"] == "COMPLETE") & trials["value"].notna()]
    if done.empty:
        return None
    return done.assign(neg=-done["value"]).sort_values(["neg", "number"], kind="stable").iloc[0]


def summary_frame(td: TuningData) -> pd.DataFrame:
    """One row per Optuna study: trial counts per state, the default and the best trial, Δ."""
    rows = []
    for study in td.studies:
        t = td.of(study)
        d, b = default_trial(t), best_trial(t)
        row: dict[str, Any] = {"optuna_study": study, "method": _common(t["method"]),
                               "objective": _common(t["objective"]), "trials": len(t)}
        row.update({s: int((t["state"] == s).sum()) for s in STATES})
        row.update({"default_number": None if d is None else int(d["number"]),
                    "default_state": None if d is None else d["state"],
                    "default_value": math.nan if d is None or d["state"] != "COMPLETE" else d["value"],
                    "best_number": None if b is None else int(b["number"]),
                    "best_value": math.nan if b is None else b["value"]})
        row["delta"] = row["best_value"] - row["default_value"]
        rows.append(row)
    df = pd.DataFrame(rows, columns=["optuna_study", "method", "objective", "trials", *STATES, "default_number",
                                     "default_state", "default_value", "best_number", "best_value", "delta"])
    for c in ("default_number", "best_number"):
        df[c] = df[c].astype("Int64")
    return df


def _common(values: pd.Series) -> str:
    counts = values[values != ""].value_counts()
    return "" if counts.empty else sorted(counts.index[counts == counts.max()])[0]


def search_space(trials: pd.DataFrame) -> dict[str, str]:
    """Parameter path -> search space as logged (the latest trial that logged each)."""
    out: dict[str, str] = {}
    for dists in trials.sort_values(["start_time", "number"], kind="stable")["distributions"]:
        out.update(dists)
    return out


def describe_distribution(text: str) -> str:
    """``[0.0001, 0.1] log``, ``{1..8} step 2``, ``{cosine, l2}`` from ``distribution_to_json``."""
    d = _json(text, {})
    name, a = d.get("name", ""), d.get("attributes", {})
    if not isinstance(a, dict):
        return name or "?"
    if name == "CategoricalDistribution":
        return "{" + ", ".join(format_value(c) for c in a.get("choices", [])) + "}"
    if name in ("FloatDistribution", "IntDistribution"):
        lo, hi = format_value(a.get("low")), format_value(a.get("high"))
        s = f"{{{lo}..{hi}}}" if name == "IntDistribution" else f"[{lo}, {hi}]"
        if a.get("log"):
            s += " log"
        if a.get("step") not in (None, 1):
            s += f" step {format_value(a['step'])}"
        return s
    return name or "?"


def format_value(v: Any) -> str:
    """A parameter value as written in the tables: 4 significant digits, JSON-style literals."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def params_display(td: TuningData, study: str) -> pd.DataFrame | None:
    """Best vs default value of every parameter of one study (None without a COMPLETE trial)."""
    t = td.of(study)
    best, default = best_trial(t), default_trial(t)
    if best is None:
        return None
    space = search_space(t)
    names = sorted(set(best["params"]) | set(default["params"] if default is not None else {}) | set(space))
    out: dict[str, list[str]] = {"Parameter": [], "Search space": [], f"Best (#{best['number']})": []}
    dkey = f"Default (#{default['number']})" if default is not None else "Default"
    out[dkey] = []
    for name in names:
        out["Parameter"].append(f"`{_cell(name)}`")
        out["Search space"].append(_cell(describe_distribution(space[name])) if name in space else "–")
        out[f"Best (#{best['number']})"].append(_cell(format_value(best["params"][name]))
                                               if name in best["params"] else "–")
        out[dkey].append(_cell(format_value(default["params"][name]))
                         if default is not None and name in default["params"] else "–")
    return pd.DataFrame(out)


def _cell(s: str) -> str:
    return s.replace("|", r"\|").replace("`", "'").replace("\n", " ")


# ----------------------------------------------------------------------------- importances
def param_importances(td: TuningData, study: str) -> Importances:
    """fANOVA importances (seed 0) over the COMPLETE trials of one study, rebuilt in memory."""
    t = td.of(study)
    done = t[(t["state"] == "COMPLETE") & t["value"].notna()].sort_values("number")
    if len(done) < 2:
        return Importances({}, len(done), f"fewer than 2 complete trials ({len(done)})")
    if not any(done["distributions"]):
        return Importances({}, len(done), f"the trials carry no search space (tag `{OPTUNA_DISTRIBUTIONS}`)")
    import optuna  # here only: a report without tuning runs never imports it

    frozen, left_out = [], 0
    for r in done.itertuples(index=False):
        try:
            dists = {k: optuna.distributions.json_to_distribution(v) for k, v in r.distributions.items()
                     if k in r.params}
            params = {k: r.params[k] for k in dists}
            frozen.append(optuna.trial.create_trial(params=params, distributions=dists, value=float(r.value)))
        except Exception:  # a value outside the logged space (an enqueued default), an unknown distribution
            left_out += 1
    note = (f"{left_out} complete trial(s) left out: a value outside the logged search space (e.g. the default "
            "trial)" if left_out else "")
    why = _cannot_rank(frozen)
    if why:
        return Importances({}, len(frozen), "; ".join(x for x in (why, note) if x))
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = optuna.create_study(direction="maximize")
            s.add_trials(frozen)
            raw = optuna.importance.get_param_importances(
                s, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except Exception as e:  # noqa: BLE001 - any failure is one line in the report, never a traceback
        return Importances({}, len(frozen), "; ".join(
            x for x in (f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", note) if x))
    finally:
        optuna.logging.set_verbosity(old)
    values = {k: float(v) for k, v in raw.items()}
    values = dict(sorted(values.items(), key=lambda kv: (-kv[1], kv[0])))
    return Importances(values, len(frozen), note)


def _cannot_rank(frozen: list) -> str:
    if len(frozen) < 2:
        return f"fewer than 2 complete trials within the search space ({len(frozen)})"
    if len({t.value for t in frozen}) < 2:
        return "every complete trial has the same objective value"
    names = set().union(*(t.params for t in frozen))
    if not any(len({json.dumps(t.params.get(n), default=str) for t in frozen}) > 1 for n in names):
        return "no parameter takes two values in the complete trials"
    return ""


def few_trials_warning(imp: Importances, complete: int) -> str:
    """A warning next to importances that rest on fewer than :data:`FEW_TRIALS` complete trials,
    naming optuna-dashboard's too when the study has fewer (``complete``: its COMPLETE trials, all of
    which the dashboard uses); "" otherwise."""
    if not imp.values or imp.n_trials >= FEW_TRIALS:
        return ""
    dashboard = (f"; optuna-dashboard's importances (PED-ANOVA, so they may rank differently) rest on this "
                 f"study's {complete} complete trial{'s' if complete != 1 else ''} and are no more reliable"
                 if complete < FEW_TRIALS else "")
    return (f"**Too few trials to rank parameters:** these importances rest on {imp.n_trials} complete trials "
            f"(fewer than {FEW_TRIALS}), so they are mostly noise{dashboard}.\n")


def importances_display(imp: Importances) -> pd.DataFrame:
    return pd.DataFrame({"Parameter": [f"`{_cell(k)}`" for k in imp.values],
                         "Importance": [f"{v:.3f}" for v in imp.values.values()]})


# ----------------------------------------------------------------------------- Markdown
def redact(uri: str) -> str:
    """A storage URL or path as a committed report may show it: no ``user:password@`` part, no
    absolute path of this machine (:func:`harness.report.paths.show_uri`)."""
    return show_uri(uri)


def tuning_markdown(td: TuningData, imps: dict[str, Importances], figures: list[str]) -> list[str]:
    """The ``## Tuning`` section: the summary table (one row per Optuna study), the figures (Markdown
    image lines), then per study its counts, best vs default parameters, importances and failures."""
    summ = summary_frame(td)
    kinds = sorted(k for k in set(summ["objective"]) if k)
    if len(kinds) == 1:
        objective = (f"Objective (`{kinds[0]}`): the {OBJECTIVES.get(kinds[0], kinds[0])}, mean over seeds and "
                     "splits, in %. ")
    elif kinds:
        objective = ("Objectives (column Objective), means over seeds and splits, in %: " + "; ".join(
            f"`{k}` = the {OBJECTIVES.get(k, k)}" for k in kinds) + ". ")
    else:
        objective = "Objective: not recorded (mean validation accuracy over seeds and splits, in %). "
    md = ["## Tuning\n",
          "Hyper-parameter searches of `harness tune` (Optuna, direction: maximize), one row per Optuna study. "
          + objective +
          "The searches read validation labels (the objective is a validation accuracy), so any value chosen "
          "here rests on them. COMPLETE trials ran to the end; PRUNED ones were stopped by the pruner (their "
          "value, the last running objective, is not comparable); FAIL ones raised or were interrupted. The default trial evaluates the "
          "study file's own values; best = the best COMPLETE trial; Δ = best − default in percentage points. "
          "Every trial with its parameters: `tuning.csv`.\n",
          markdown(_summary_display(summ, len(kinds) > 1), left=2)]
    if not td.superseded.empty:
        md.append(f"{len(td.superseded)} run(s) of a trial already logged by another run were replaced by the "
                  "latest finished one (a resumed or repeated search).\n")
    md += figures
    for study in td.studies:
        md += _study_markdown(td, study, imps[study])
    return md


def _summary_display(summ: pd.DataFrame, objective: bool = False) -> pd.DataFrame:
    f = Fmt("md")
    out: dict[str, list[str]] = {"Optuna study": [], "Method": []}
    if objective:
        out["Objective"] = [f"`{_cell(k)}`" if k else "–" for k in summ["objective"]]
    out.update({"Trials": [], "Complete": [], "Pruned": [], "Failed": []})
    if summ["RUNNING"].any():
        out["Running"] = []
    out.update({"Default (%)": [], "Best (%)": [], "Best trial": [], "Δ best − default (pp)": []})
    for r in summ.itertuples(index=False):
        out["Optuna study"].append(f"`{_cell(r.optuna_study)}`")
        out["Method"].append(f"`{_cell(r.method)}`" if r.method else "–")
        out["Trials"].append(str(r.trials))
        for col, state in (("Complete", "COMPLETE"), ("Pruned", "PRUNED"), ("Failed", "FAIL"), ("Running", "RUNNING")):
            if col in out:
                out[col].append(str(getattr(r, state)))
        if pd.isna(r.default_number):
            default = "no default trial"
        elif r.default_state != "COMPLETE":
            default = f"{STATE_WORDS.get(r.default_state, r.default_state)} (#{r.default_number})"
        else:
            default = f"{f.num(100 * r.default_value)} (#{r.default_number})"
        out["Default (%)"].append(default)
        out["Best (%)"].append(f.num(100 * r.best_value))
        out["Best trial"].append(f.dash if pd.isna(r.best_number) else f"#{r.best_number}")
        out["Δ best − default (pp)"].append(f.num(100 * r.delta, signed=True))
    return pd.DataFrame(out)


def _study_markdown(td: TuningData, study: str, imp: Importances) -> list[str]:
    t = td.of(study)
    method = _common(t["method"])
    md = [f"### `{_cell(study)}`" + (f" (method `{_cell(method)}`)" if method else "") + "\n"]
    storages = sorted({redact(s.storage) for s in td.searches.itertuples(index=False)
                       if study in [x.strip() for x in s.optuna_studies.split(",")] and s.storage})
    counts = ", ".join(f"{int((t['state'] == s).sum())} {STATE_WORDS[s]}" for s in STATES if (t["state"] == s).any())
    line = f"{len(t)} trial{'s' if len(t) != 1 else ''} ({counts})"
    if storages:
        line += f"; Optuna storage {', '.join(f'`{_cell(s)}`' for s in storages)}"
    md.append(line + ".\n")
    params = params_display(td, study)
    if params is None:
        md.append("No COMPLETE trial with an objective value: no best values.\n")
    else:
        md += ["Best trial vs the default trial, per parameter:\n", markdown(params, left=2)]
    if imp.values:
        complete = int(((t["state"] == "COMPLETE") & t["value"].notna()).sum())
        md += [f"Parameter importances (fANOVA, seed 0, over {imp.n_trials} complete trials"
               + (f"; {imp.note}" if imp.note else "") + "):\n"]
        warning = few_trials_warning(imp, complete)
        md += ([warning] if warning else []) + [markdown(importances_display(imp))]
    else:
        md.append(f"Parameter importances: not computed ({imp.note}).\n")
    failed = t[t["state"] == "FAIL"]
    if not failed.empty:
        md.append("Failed trials: " + "; ".join(
            f"#{r.number} ({r.status}" + (f": {_cell(r.failure)[:120]}" if r.failure else "") + ")"
            for r in failed.itertuples(index=False)) + ".\n")
    return md


# ----------------------------------------------------------------------------- figures
STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#7f7f7f"}  # Optuna
STATE_MARKERS = {"COMPLETE": "o", "PRUNED": "v", "FAIL": "X", "RUNNING": "s"}


def _facets(n: int, width: float, height: float) -> tuple[Any, list]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = figure(nrows, ncols, width * ncols + 1.8, height * nrows + 0.7)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _state_legend(fig: Any, states: list[str], extra: list[tuple[Line2D, str]], marker: bool = True) -> None:
    handles = [Line2D([], [], color=STATE_COLOURS[s], marker=STATE_MARKERS[s] if marker else None,
                      linestyle="none" if marker else "-") for s in states]
    labels = [STATE_WORDS[s] for s in states] + [label for _, label in extra]
    fig.legend(handles + [h for h, _ in extra], labels, loc="outside right center", frameon=False)


def tuning_history_plot(td: TuningData, path: Path) -> Path | None:
    """Objective (%) per trial number, one facet per Optuna study: points by state, the running
    best of the COMPLETE trials as a step line, the default trial circled, failed trials as
    crosses along the bottom."""
    studies = td.studies
    if not studies:
        return None
    fig, axes = _facets(len(studies), 4.6, 3.4)
    for ax, study in zip(axes, studies):
        t = td.of(study).sort_values("number")
        has = t[t["value"].notna()]
        for state in STATES:
            d = has[has["state"] == state]
            if not d.empty:
                sns.scatterplot(x=d["number"], y=100 * d["value"], color=STATE_COLOURS[state],
                                marker=STATE_MARKERS[state], s=36, ax=ax, zorder=3, edgecolor="white", linewidth=0.4)
        done = t[(t["state"] == "COMPLETE") & t["value"].notna()]
        last = int(t["number"].max())
        if not done.empty:
            xs, ys = list(done["number"]), list(100 * done["value"].cummax())
            ax.step(xs + [last], ys + ys[-1:], where="post", color="black", linewidth=1.2, zorder=2)
        none = t[t["value"].isna()]
        for state in ("FAIL", "RUNNING"):
            d = none[none["state"] == state]
            if not d.empty:
                ax.scatter(d["number"], [0.03] * len(d), transform=ax.get_xaxis_transform(), clip_on=False,
                           color=STATE_COLOURS[state], marker=STATE_MARKERS[state], s=30, zorder=3)
        d = default_trial(t)
        if d is not None and not pd.isna(d["value"]):
            ax.scatter([d["number"]], [100 * d["value"]], s=150, facecolors="none", edgecolors="black",
                       linewidths=1.3, zorder=4)
        ax.set_xlim(int(t["number"].min()) - 0.5, last + 0.5)
        ax.set_title(study)
        ax.set_xlabel("trial number")
        ax.set_ylabel("objective (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    states = [s for s in STATES if (td.trials["state"] == s).any()]
    _state_legend(fig, states, [(Line2D([], [], color="black", linewidth=1.2), "best so far"),
                                (Line2D([], [], marker="o", markersize=11, markerfacecolor="none",
                                        markeredgecolor="black", linestyle="none"), "default trial")])
    fig.suptitle("Objective per trial (failed and running trials: marks along the bottom)")
    return save(fig, path)


def tuning_curves_plot(td: TuningData, path: Path) -> Path | None:
    """The running objective (%) of every trial against its step, one facet per Optuna study;
    pruned trials stop early (a cross at their last step); the best trial is drawn thick, the
    default trial dashed."""
    c = td.curves
    studies = [s for s in td.studies if (c["optuna_study"] == s).any()]
    if not studies:
        return None
    fig, axes = _facets(len(studies), 4.6, 3.4)
    for ax, study in zip(axes, studies):
        d = c[c["optuna_study"] == study].assign(pct=lambda x: 100 * x["value"])
        hue = [s for s in STATES if (d["state"] == s).any()]
        sns.lineplot(data=d, x="step", y="pct", hue="state", hue_order=hue, palette=STATE_COLOURS, units="number",
                     estimator=None, linewidth=0.9, alpha=0.55, ax=ax, legend=False)
        ends = d[d["state"] == "PRUNED"].sort_values("step").groupby("number").tail(1)
        ax.scatter(ends["step"], ends["pct"], marker="x", color=STATE_COLOURS["PRUNED"], s=28, zorder=3)
        t = td.of(study)
        for trial, style in ((best_trial(t), {"linewidth": 2.4, "color": "black"}),
                             (default_trial(t), {"linewidth": 1.6, "color": "black", "linestyle": "--"})):
            if trial is not None:
                one = d[d["number"] == trial["number"]].sort_values("step")
                ax.plot(one["step"], one["pct"], zorder=4, **style)
        ax.set_title(study)
        ax.set_xlabel("step (unit × epochs + epoch)")
        ax.set_ylabel("running objective (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    states = [s for s in STATES if (c["state"] == s).any()]
    _state_legend(fig, states, [(Line2D([], [], color="black", linewidth=2.4), "best trial"),
                                (Line2D([], [], color="black", linewidth=1.6, linestyle="--"), "default trial")],
                  marker=False)
    fig.suptitle("Running objective of each trial (pruned trials stop early)")
    return save(fig, path)


def tuning_importance_plot(imps: dict[str, Importances], path: Path) -> Path | None:
    """fANOVA importance per parameter, one facet per Optuna study that has them."""
    have = {s: i for s, i in imps.items() if i.values}
    if not have:
        return None
    n = max(len(i.values) for i in have.values())
    fig, axes = _facets(len(have), 5.0, 0.9 + 0.38 * n)
    for ax, (study, imp) in zip(axes, have.items()):
        d = pd.DataFrame({"param": list(imp.values), "importance": list(imp.values.values())})
        sns.barplot(data=d, x="importance", y="param", color=STATE_COLOURS["COMPLETE"], ax=ax)
        ax.set_xlim(0, 1)
        ax.set_title(f"{study} ({imp.n_trials} complete trials)")
        ax.set_xlabel("importance (fANOVA, sums to 1)")
        ax.set_ylabel("")
    fig.suptitle("Parameter importances")
    return save(fig, path)
