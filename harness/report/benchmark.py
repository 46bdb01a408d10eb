"""The report of ``harness benchmark``, read from the suite's MLflow experiment alone.

Given each task's trial keys (the tuned configurations' and the defaults'), it writes into
``results/<suite>/``:

- ``tuned/`` and ``defaults/``: the leaderboard (:func:`harness.report.leaderboard.write_leaderboard`:
  pairwise verdicts, tasks needed, CKA's ablations) over the tuned configurations and over the
  defaults, on the same evaluation seeds;
- ``budget.csv``: per (method, task) the Optuna trials started, counted (``harness tune``'s rule:
  a failure rerun uses no budget), complete, pruned, failed, and their compute seconds; any cell
  whose count differs from the budget is named in bold in the report;
- ``chosen.csv``: per (method, task) the chosen trial, its validation objective, the default
  trial's, and the chosen values;
- ``seeds.csv``: the seeds of the tuning runs and of the evaluation runs, read from the runs;
- ``phases.csv``: the wall time of each phase, summed over the invocations that ran it (the
  ``benchmark`` runs' ``phase_seconds/<phase>`` metrics);
- ``benchmark.md``: all of it, with the tuned-versus-defaults change of each method.

Nothing here imports torch: the keys come from the caller.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from mlflow.tracking import MlflowClient

from harness.errors import HarnessError
from harness.report.frames import StudyData, load_study, search_runs
from harness.report.leaderboard import Leaderboard, write_leaderboard
from harness.report.tables import markdown
from harness.report.tuning import best_trial, default_trial, format_value, load_tuning
from harness.store import KIND_BENCHMARK, KIND_TRIAL, KIND_TUNE_RUN, SEED, STUDY, TRIAL_KEY
from harness.tracking import resolve_uri

BUDGET_COLUMNS = ["method", "task", "started", "counted", "complete", "pruned", "failed", "retried", "seconds"]


@dataclass(frozen=True)
class TaskKeys:
    """One task of the suite: its name, tuned methods and the trial keys of both boards."""

    name: str
    methods: tuple[str, ...]
    tuned: tuple[str, ...]
    defaults: tuple[str, ...]


@dataclass(frozen=True)
class SuiteInfo:
    name: str
    trials: int
    tune_seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    sampler: str
    pruner: str
    objective: str
    source: str  # the suite file


def optuna_study(task: str, method: str) -> str:
    """The Optuna study of a (task, method) search (``harness.tune.optuna_name``)."""
    return f"{task}/{method}"


def budget_frame(trials: pd.DataFrame, tasks: Sequence[TaskKeys]) -> pd.DataFrame:
    """One row per (method, task): what its search spent (from the ``tune_trial`` runs)."""
    rows = []
    for t in tasks:
        for m in t.methods:
            sub = trials[trials["optuna_study"] == optuna_study(t.name, m)]
            rerun = set(sub["retry_of"]) - {-1}
            retried = sub[(sub["state"] == "FAIL") & sub["number"].isin(rerun)]
            rows.append({"method": m, "task": t.name, "started": len(sub), "counted": len(sub) - len(retried),
                         "complete": int((sub["state"] == "COMPLETE").sum()),
                         "pruned": int((sub["state"] == "PRUNED").sum()),
                         "failed": int((sub["state"] == "FAIL").sum()), "retried": len(retried),
                         "seconds": float(sub["duration"].fillna(0).sum())})
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS)


def unequal(budget: pd.DataFrame, trials: int) -> list[str]:
    """The (method, task) searches whose counted trials are not the budget."""
    bad = budget[budget["counted"] != trials]
    return [f"{m} on {t} ({c} of {trials})" for m, t, c in zip(bad["method"], bad["task"], bad["counted"])]


def chosen_frame(trials: pd.DataFrame, tasks: Sequence[TaskKeys]) -> pd.DataFrame:
    """One row per (method, task): the chosen (best COMPLETE) trial and the default trial."""
    rows = []
    for t in tasks:
        for m in t.methods:
            sub = trials[trials["optuna_study"] == optuna_study(t.name, m)]
            b, d = best_trial(sub), default_trial(sub)
            rows.append({"method": m, "task": t.name,
                         "trial": None if b is None else int(b["number"]),
                         "val": math.nan if b is None else float(b["value"]),
                         "default_val": math.nan if d is None or d["state"] != "COMPLETE" else float(d["value"]),
                         "params": "" if b is None else json.dumps(b["params"], sort_keys=True)})
    df = pd.DataFrame(rows, columns=["method", "task", "trial", "val", "default_val", "params"])
    df["trial"] = df["trial"].astype("Int64")
    return df


def seeds_frame(uri: str, experiment_id: str, tasks: Sequence[TaskKeys]) -> pd.DataFrame:
    """The seeds each phase trained on, read from its runs: ``tune_run`` runs (tuning) and the
    trial runs in the tuned or defaults scope (evaluation)."""
    client = MlflowClient(uri)
    names = {t.name for t in tasks}
    scoped = {k for t in tasks for k in (*t.tuned, *t.defaults)}
    tune = sorted({int(r.data.tags.get(SEED, -1))
                   for r in search_runs(client, experiment_id, KIND_TUNE_RUN)
                   if r.data.tags.get(STUDY) in names})
    evaluate = sorted({int(r.data.tags.get(SEED, -1))
                       for r in search_runs(client, experiment_id, KIND_TRIAL)
                       if r.data.tags.get(TRIAL_KEY) in scoped and r.info.status == "FINISHED"})
    return pd.DataFrame({"phase": ["tune", "evaluate"], "seeds": [" ".join(map(str, tune)),
                                                                  " ".join(map(str, evaluate))],
                         "disjoint": [not set(tune) & set(evaluate)] * 2})


def phase_frame(uri: str, experiment_id: str) -> pd.DataFrame:
    """Wall seconds of each phase, summed over the ``harness benchmark`` invocations that ran it
    (a resumed phase adds up; an invocation killed mid-phase logged nothing for that phase)."""
    client = MlflowClient(uri)
    totals: dict[str, float] = {}
    runs: dict[str, int] = {}
    for r in search_runs(client, experiment_id, KIND_BENCHMARK):
        for k, v in r.data.metrics.items():
            if k.startswith("phase_seconds/"):
                phase = k.split("/", 1)[1]
                totals[phase] = totals.get(phase, 0.0) + float(v)
                runs[phase] = runs.get(phase, 0) + 1
    order = ["tune", "evaluate", "defaults"]
    return pd.DataFrame([{"phase": p, "seconds": totals[p], "invocations": runs[p]}
                         for p in sorted(totals, key=lambda p: order.index(p) if p in order else 9)],
                        columns=["phase", "seconds", "invocations"])


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def mean_accuracy(board: Leaderboard) -> pd.Series:
    """Per row: the mean over tasks of the mean test union accuracy over seeds (raw, not normalised)."""
    s = board.scores
    return s.groupby(["row", "task"], sort=False)["raw"].mean().groupby(level=0, sort=False).mean()


def change_frame(tuned: Leaderboard, defaults: Leaderboard) -> pd.DataFrame:
    """Per row in both boards (tuned order): mean test accuracy at the defaults and tuned, the change
    in points, and the IQM of the normalised score on each board."""
    ta, da = mean_accuracy(tuned), mean_accuracy(defaults)
    d = defaults.frame.set_index("row")
    rows = []
    for r in tuned.frame.itertuples(index=False):
        if r.row not in d.index:
            continue
        rows.append({"row": r.row, "defaults acc": _pct(da[r.row]), "tuned acc": _pct(ta[r.row]),
                     "change (pt)": f"{100 * (ta[r.row] - da[r.row]):+.1f}",
                     "defaults IQM": _pct(d.loc[r.row, "iqm"]), "tuned IQM": _pct(r.iqm)})
    return pd.DataFrame(rows, columns=["row", "defaults acc", "tuned acc", "change (pt)", "defaults IQM",
                                       "tuned IQM"])


def _verdict_lines(board: Leaderboard) -> list[str]:
    """Each pair of complete rows once, with its verdict."""
    lines = []
    done: set[frozenset[str]] = set()
    for p in board.pairs.itertuples(index=False):
        pair = frozenset((p.x, p.y))
        if pair in done:
            continue
        done.add(pair)
        lines.append(f"| {p.x} | {p.y} | {p.poi:.2f} [{p.poi_low:.2f}, {p.poi_high:.2f}] | {p.verdict} |")
    if not lines:
        return []
    return ["| X | Y | P(X > Y) [95%] | verdict |", "|:---|:---|---:|:---|", *lines]


def build_benchmark_report(suite: SuiteInfo, tasks: Sequence[TaskKeys], out: str | Path,
                           tracking_uri: str | None = None) -> Path:
    """Read the suite's runs and write its report into ``out``; everything is read first."""
    uri = resolve_uri(tracking_uri)
    exp = MlflowClient(uri).get_experiment_by_name(suite.name)
    if exp is None:
        raise HarnessError(f"benchmark report: no experiment '{suite.name}' in {uri} (run the phases first)")

    def read(keys_of: str) -> list[StudyData]:
        return [load_study(t.name, uri, history=False, keys=getattr(t, keys_of), experiment=suite.name)
                for t in tasks]

    tuned_data, default_data = read("tuned"), read("defaults")
    tuning = load_tuning(uri, exp.experiment_id, curves=False)
    budget = budget_frame(tuning.trials, tasks)
    chosen = chosen_frame(tuning.trials, tasks)
    seeds = seeds_frame(uri, exp.experiment_id, tasks)
    phases = phase_frame(uri, exp.experiment_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tuned = write_leaderboard(tuned_data, out / "tuned")
    defaults = write_leaderboard(default_data, out / "defaults")
    budget.to_csv(out / "budget.csv", index=False)
    chosen.to_csv(out / "chosen.csv", index=False)
    seeds.to_csv(out / "seeds.csv", index=False)
    phases.to_csv(out / "phases.csv", index=False)
    (out / "benchmark.md").write_text(benchmark_markdown(suite, tasks, tuned, defaults, budget, chosen, seeds,
                                                         phases))
    return out


def benchmark_markdown(suite: SuiteInfo, tasks: Sequence[TaskKeys], tuned: Leaderboard, defaults: Leaderboard,
                       budget: pd.DataFrame, chosen: pd.DataFrame, seeds: pd.DataFrame,
                       phases: pd.DataFrame | None = None) -> str:
    bad = unequal(budget, suite.trials)
    md = [f"# Benchmark {suite.name}", "",
          f"{len(tasks)} tasks; every method tuned with the same budget: {suite.trials} Optuna trials per method and "
          f"task (sampler {suite.sampler}, pruner {suite.pruner}), scored on the validation split only "
          f"({suite.objective}), on tuning seeds {', '.join(map(str, suite.tune_seeds))}; each method's best "
          f"configuration, and every method at its defaults, then ran on the evaluation seeds "
          f"{', '.join(map(str, suite.eval_seeds))} (test metrics from these runs only). Suite file: "
          f"`{suite.source}`.", ""]
    if bad:
        md += [f"**The budgets were not equal**: {'; '.join(bad)}. Rerun `harness benchmark` to finish the "
               "searches before reading the comparison.", ""]
    else:
        md += [f"The budgets were equal: every search counted {suite.trials} trials (`budget.csv`).", ""]
    md += ["## Tuned: verdicts (95%, over tasks)", "",
           "From [the tuned leaderboard](tuned/leaderboard.md): each pair of methods with every task, "
           "P(X > Y) over tasks with its interval; *inconclusive* when the interval holds 0.5.", ""]
    md += _verdict_lines(tuned) + [""]
    if not tuned.ablations.empty:
        md += ["CKA's components (paired differences over tasks, tuned CKA): see the ablation section of "
               "[the tuned leaderboard](tuned/leaderboard.md).", ""]
        a = tuned.ablations
        md += [markdown(pd.DataFrame({
            "variant": a["variant"], "component": a["component"], "tasks": a["n_tasks"],
            "Δ (pt) [95%]": [f"{100 * x:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                             for x, lo, hi in zip(a["delta"], a["delta_low"], a["delta_high"])],
            "verdict": a["verdict"]})), ""]
    md += ["## Defaults: verdicts", "", "[The defaults leaderboard](defaults/leaderboard.md), on the same "
           "evaluation seeds.", ""]
    md += _verdict_lines(defaults) + [""]
    md += ["## What tuning changed", "", "Test union accuracy (%, mean over tasks of the mean over evaluation "
           "seeds) at the defaults and tuned, and the IQM of the normalised score on each board (% of scratch at "
           "its defaults on the defaults board, of tuned scratch on the tuned board: each board's normaliser had "
           "the same tuning as its rows).", "",
           markdown(change_frame(tuned, defaults)), ""]
    show = chosen.assign(val=chosen["val"].map(_pct), default_val=chosen["default_val"].map(_pct),
                         params=chosen["params"].map(_params_cell))
    md += ["## Chosen configurations", "", "The best COMPLETE trial of each search (validation accuracy %; the "
           "default trial is trial 0).", "", markdown(show, left=2), ""]
    b = budget.assign(seconds=budget["seconds"].map(lambda s: f"{s:.0f}"))
    b["counted"] = [f"**{c}**" if c != suite.trials else str(c) for c in budget["counted"]]
    totals = budget.groupby("method", sort=False)[["started", "counted", "complete", "pruned", "seconds"]].sum()
    md += ["## Budget", "", "Per search (trials counted as `harness tune` counts them: a failure that was rerun "
           "uses no budget; bold where not the budget):", "", markdown(b, left=2), "",
           "Per method, over tasks:", "",
           markdown(totals.reset_index().assign(seconds=totals["seconds"].map(lambda s: f"{s:.0f}").values)), ""]
    md += ["## Seeds, read from the runs", "", markdown(seeds), ""]
    if phases is not None and not phases.empty:
        md += ["## Wall time per phase", "", "Summed over the `harness benchmark` invocations that ran the phase "
               "(`phases.csv`; the wall times depend on the machine and on what else ran on it).", "",
               markdown(phases.assign(seconds=phases["seconds"].map(lambda s: f"{s:.0f}"))), ""]
    return "\n".join(md)


def _params_cell(text: str) -> str:
    if not text:
        return ""
    values = json.loads(text)
    return ", ".join(f"{k.split('.', 2)[-1] if k.startswith('methods.') else k}={format_value(v)}"
                     for k, v in values.items()).replace("|", r"\|")
