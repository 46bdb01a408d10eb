"""``harness leaderboard STUDY [STUDY ...]``: one table over several studies, with the aggregate
statistics of Agarwal et al. (NeurIPS 2021, ``rliable``; estimators in :mod:`.aggregate`).

Built from the MLflow store alone, like ``harness report``: each study's scoped trial runs
(:func:`harness.report.frames.load_study`).

- **task** = (study, split), named ``study/split``; **run** = one seed;
- **score** = the primary metric (``test/union_acc``, the last-epoch union accuracy) of the seed,
  divided by the split's **normaliser**:

  - ``scratch`` (default): the mean over seeds of the supervised ``scratch`` (variant ``full``)
    student's primary metric on the split (that row then has mean 1 on every task);
  - ``teachers``: the teachers' oracle ensemble, the mean of ``diag/oracle_ensemble_acc`` over the
    split's trial runs that logged it; without it, the mean primary metric of the ``teachers``
    (``full``) reference row (the claiming ensemble);
  - ``none``: the raw accuracy.

  A split without its normaliser is left out of every task, aggregate and figure, and said so;
- **rows**: one per method and variant (named variants included, ablations ``-x`` left out: they
  are in each study's report), references included: ``teachers`` (the claiming ensemble) and the
  supervised ``scratch`` (†, it sees labels);
- **cells**: per task, the mean score over seeds ± the half-width of its 95% t-interval
  (mean ± t(0.975, n − 1) · sd / √n); per row, IQM and mean over every run x task score with
  stratified bootstrap 95% intervals, and the median rank. A row without a score on every task
  gets no aggregate, rank or probability of improvement (never an average over fewer tasks);
- the probability of improvement of ``cka`` (``full``) over every other row, with its interval;
- figures: interval estimates (IQM and mean) and performance profiles.

Outputs (``--out``, default ``results/leaderboard``): ``leaderboard.md``, ``leaderboard.csv``
(fractions, not percent), ``leaderboard_intervals.png``, ``leaderboard_profiles.png``. Every draw
is seeded and no build date is written: the same store gives the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.report import aggregate as agg
from harness.report import plots, stats
from harness.report.frames import REFERENCE_METHOD, KeyExpander, StudyData, load_study, resolve_study
from harness.report.paths import redact_paths, show_uri
from harness.report.scaling import t_interval
from harness.report.tables import PRIMARY, markdown, method_rank, variant_rank
from harness.tracking import row_label

NORMALISERS = ("scratch", "teachers", "none")
SUPERVISED = "scratch"
ORACLE = "diag/oracle_ensemble_acc"
HEADLINE = ("cka", "full")  # the method whose probability of improvement over the others is tabled
DEFAULT_OUT = Path("results") / "leaderboard"
GENERATED = ("leaderboard.md", "leaderboard.csv", "leaderboard_*.png")
DAGGER, DDAGGER, DASH = "†", "‡", "–"
#: what a score is, per normaliser (the unit of every cell: scores x 100)
UNITS = {
    "scratch": "% of the supervised `scratch` student's union accuracy (its mean over seeds on the split)",
    "teachers": "% of the teachers' oracle ensemble (each test image sent to the teacher of its own task; "
                "without that diagnostic, of the `teachers` row's claiming ensemble)",
    "none": "union accuracy (%), not normalised",
}
AXIS = {"scratch": "normalised score (% of supervised scratch)", "teachers": "normalised score (% of teachers' oracle)",
        "none": "union accuracy (%)"}


@dataclass(frozen=True)
class Task:
    """One (study, split) with its normaliser (1.0 under ``none``) and where that came from."""

    study: str
    split: str
    scale: float
    source: str

    @property
    def label(self) -> str:
        return f"{self.study}/{self.split}"


@dataclass
class Leaderboard:
    """What a build wrote and the frames behind it."""

    out: Path
    tasks: list[Task]
    left_out: list[str]  # one line per split left out of the aggregates
    frame: pd.DataFrame  # one row per leaderboard row (``leaderboard.csv``)
    scores: pd.DataFrame  # one row per (task, row, seed): raw and normalised score


# ----------------------------------------------------------------------------- scores
def normaliser(data: StudyData, split: str, how: str) -> tuple[float | None, str]:
    """(value, source) of the split's normaliser; (None, why not) when the split has none."""
    t = data.trials[data.trials["split"] == split]
    if how == "none":
        return 1.0, "none (raw accuracy)"
    if how == "scratch":
        rows = t[(t["method"] == SUPERVISED) & (t["variant"] == "full")]
        vals = rows[PRIMARY].dropna() if PRIMARY in rows else pd.Series(dtype=float)
        if vals.empty:
            return None, f"no finished `{SUPERVISED}` (full) run with the primary metric"
        value, source = float(vals.mean()), f"`{SUPERVISED}` mean over {len(vals)} seed{'s' * (len(vals) != 1)}"
    elif how == "teachers":
        oracle = t[ORACLE].dropna() if ORACLE in t else pd.Series(dtype=float)
        ref = t[(t["method"] == REFERENCE_METHOD) & (t["variant"] == "full")]
        claim = ref[PRIMARY].dropna() if PRIMARY in ref else pd.Series(dtype=float)
        if not oracle.empty:
            value, source = float(oracle.mean()), f"oracle ensemble (`{ORACLE}`, mean of {len(oracle)} runs)"
        elif not claim.empty:
            value, source = float(claim.mean()), f"`{REFERENCE_METHOD}` claiming ensemble (no `{ORACLE}` logged)"
        else:
            return None, f"no `{ORACLE}` logged and no finished `{REFERENCE_METHOD}` run"
    else:
        raise HarnessError(f"leaderboard: --normalise must be one of {', '.join(NORMALISERS)}, got {how!r}")
    if not value > 0:
        return None, f"its normaliser ({source}) is {value:g}"
    return value, source


SCORE_COLUMNS = ["study", "split", "task", "method", "variant", "row", "kind", "uses_labels", "seed", "raw", "score"]


def scores_frame(studies: Sequence[StudyData], how: str) -> tuple[pd.DataFrame, list[Task], list[str]]:
    """(scores, tasks, left out): one row per task, method/variant (no ablation) and finished seed
    with the primary metric; the tasks in the studies' and splits' order; one line per split
    left out (no normaliser, or no run with the primary metric)."""
    records: list[dict[str, Any]] = []
    tasks: list[Task] = []
    left: list[str] = []
    for data in studies:
        for split in data.splits:
            t = data.trials[(data.trials["split"] == split) & ~data.trials["variant"].str.startswith("-")]
            label = f"{data.name}/{split}"
            if PRIMARY not in t or t[PRIMARY].dropna().empty:
                if not t.empty:
                    left.append(f"`{label}`: no finished trial run logged `{PRIMARY}`: left out")
                continue
            scale, source = normaliser(data, split, how)
            if scale is None:
                left.append(f"`{label}`: {source}: left out of the leaderboard and its aggregates")
                continue
            tasks.append(Task(data.name, split, scale, source))
            t = t.dropna(subset=[PRIMARY])
            for method, variant, labels, seed, raw in zip(t["method"], t["variant"], t["uses_labels"], t["seed"],
                                                          t[PRIMARY]):
                records.append({"study": data.name, "split": split, "task": label, "method": method,
                                "variant": variant, "row": row_label(method, variant),
                                "kind": "reference" if method == REFERENCE_METHOD else "method",
                                "uses_labels": bool(labels), "seed": int(seed), "raw": float(raw),
                                "score": float(raw) / scale})
    df = pd.DataFrame(records, columns=SCORE_COLUMNS)
    return df.sort_values(["task", "row", "seed"], kind="stable").reset_index(drop=True), tasks, left


# ----------------------------------------------------------------------------- the table
def _rows(scores: pd.DataFrame) -> list[tuple[str, str]]:
    keys = set(zip(scores["method"], scores["variant"]))
    return sorted(keys, key=lambda k: (method_rank(k[0]), variant_rank(k[1])))


def per_task(scores: pd.DataFrame, row: str, tasks: Sequence[Task]) -> list[np.ndarray]:
    """The row's scores per task (seed order), an empty array where it has none."""
    sub = scores[scores["row"] == row]
    return [sub.loc[sub["task"] == t.label].sort_values("seed")["score"].to_numpy(dtype=float) for t in tasks]


def leaderboard_frame(scores: pd.DataFrame, tasks: Sequence[Task], reps: int = agg.REPS, seed: int = agg.SEED,
                      normalise: str = "scratch") -> pd.DataFrame:
    """One row per method/variant: per task mean, 95% t-interval and n; for rows with every task
    the aggregates (point, low, high), the median rank among those rows and P(cka > row);
    sorted by IQM (highest first), rows without every task last."""
    out: list[dict[str, Any]] = []
    arrays: dict[str, list[np.ndarray]] = {}
    for method, variant in _rows(scores):
        label = row_label(method, variant)
        sub = scores[scores["row"] == label]
        per = per_task(scores, label, tasks)
        rec: dict[str, Any] = {"row": label, "method": method, "variant": variant, "kind": sub["kind"].iloc[0],
                               "uses_labels": bool(sub["uses_labels"].any()), "normalise": normalise,
                               "n_tasks": sum(a.size > 0 for a in per), "n_tasks_total": len(tasks)}
        rec["complete"] = rec["n_tasks"] == len(tasks)
        for t, a in zip(tasks, per):
            s = stats.summarize(list(a))
            lo, hi = t_interval(s.mean, s.std, s.n)
            rec.update({f"{t.label}.mean": s.mean, f"{t.label}.ci_low": lo, f"{t.label}.ci_high": hi,
                        f"{t.label}.n": s.n})
        if rec["complete"]:
            arrays[label] = per
            for name, iv in agg.interval_estimates(per, reps=reps, seed=seed).items():
                rec.update({name: iv.point, f"{name}_low": iv.low, f"{name}_high": iv.high})
        out.append(rec)
    ranks = agg.median_ranks({k: [float(a.mean()) for a in v] for k, v in arrays.items()})
    head = row_label(*HEADLINE)
    for rec in out:
        rec["median_rank"] = ranks.get(rec["row"], agg.NAN)
        if head in arrays and rec["row"] in arrays and rec["row"] != head:
            iv = agg.poi_interval(arrays[head], arrays[rec["row"]], reps=reps, seed=seed)
            rec.update({"poi_cka": iv.point, "poi_cka_low": iv.low, "poi_cka_high": iv.high})
    cols = ["row", "method", "variant", "kind", "uses_labels", "normalise", "n_tasks", "n_tasks_total", "complete"]
    cols += [f"{t.label}.{c}" for t in tasks for c in ("mean", "ci_low", "ci_high", "n")]
    cols += [f"{a}{s}" for a in agg.AGGREGATES for s in ("", "_low", "_high")]
    cols += ["median_rank", "poi_cka", "poi_cka_low", "poi_cka_high"]
    df = pd.DataFrame(out).reindex(columns=cols)
    df["order"] = range(len(df))  # the preferred method order breaks ties
    df["_key"] = df["iqm"].where(df["complete"].astype(bool), -np.inf)
    df = df.sort_values(["_key", "order"], ascending=[False, True], kind="stable")
    return df.drop(columns=["_key", "order"]).reset_index(drop=True)


def profiles_frame(scores: pd.DataFrame, tasks: Sequence[Task], frame: pd.DataFrame, reps: int = agg.REPS,
                   seed: int = agg.SEED, n: int = 101) -> pd.DataFrame:
    """Performance profiles of the rows with every task: one row per (row, τ) with F(τ) and its
    stratified bootstrap band; τ spans every score of those rows."""
    rows = list(frame.loc[frame["complete"].astype(bool), "row"])
    cols = ["row", "tau", "fraction", "low", "high"]
    if not rows:
        return pd.DataFrame(columns=cols)
    per = {r: per_task(scores, r, tasks) for r in rows}
    taus = agg.tau_grid(list(per.values()), n)
    parts = []
    for r in rows:
        f, lo, hi = agg.profile_bands(per[r], taus, reps=reps, seed=seed)
        parts.append(pd.DataFrame({"row": r, "tau": taus, "fraction": f, "low": lo, "high": hi}))
    return pd.concat(parts, ignore_index=True)[cols]


# ----------------------------------------------------------------------------- rendering
def display_name(row: str, kind: str, uses_labels: bool) -> str:
    """``teachers (claiming ensemble)``, ``scratch †``, ``kd``."""
    if kind == "reference":
        return f"{row} (claiming ensemble)"
    return row + (f" {DAGGER}" if uses_labels else "")


def _pct(x: float) -> str:
    return DASH if x is None or pd.isna(x) else f"{100 * x:.1f}"


def _interval(point: float, lo: float, hi: float) -> str:
    """``93.5 [91.2, 95.8]`` (x 100); a dash without a point."""
    return DASH if pd.isna(point) else f"{_pct(point)} [{_pct(lo)}, {_pct(hi)}]"


def task_cell(mean: float, lo: float, hi: float, n: int, most: int) -> str:
    """``95.0 ± 6.2`` (x 100, ± the half-width of the 95% t-interval), ``(n=k)`` appended when the
    task's rows have more seeds; ``87.5 (n=1)`` without an interval; a dash without a seed."""
    if not n or pd.isna(mean):
        return DASH
    s = _pct(mean) if pd.isna(lo) else f"{_pct(mean)} ± {100 * (hi - mean):.1f}"
    return s + (f" (n={n})" if n < most or (n == 1 and pd.isna(lo)) else "")


def leaderboard_display(frame: pd.DataFrame, tasks: Sequence[Task]) -> pd.DataFrame:
    """The table as Markdown strings: method, tasks, one column per task, IQM, mean, median rank."""
    total = len(tasks)
    out: dict[str, list[str]] = {"Method": [], "Tasks": []}
    for t in tasks:
        out[f"`{t.label}`"] = []
    out.update({"IQM [95% CI]": [], "Mean [95% CI]": [], "Median rank": []})
    most = {t.label: int(frame[f"{t.label}.n"].max()) for t in tasks}
    for _, r in frame.iterrows():
        out["Method"].append(display_name(r["row"], r["kind"], bool(r["uses_labels"])).replace("|", r"\|"))
        n = int(r["n_tasks"])
        out["Tasks"].append(f"{n}/{total}" if n == total else f"{n}/{total} tasks {DDAGGER}")
        for t in tasks:
            out[f"`{t.label}`"].append(task_cell(r[f"{t.label}.mean"], r[f"{t.label}.ci_low"],
                                                 r[f"{t.label}.ci_high"], int(r[f"{t.label}.n"]), most[t.label]))
        out["IQM [95% CI]"].append(_interval(r["iqm"], r["iqm_low"], r["iqm_high"]))
        out["Mean [95% CI]"].append(_interval(r["mean"], r["mean_low"], r["mean_high"]))
        out["Median rank"].append(DASH if pd.isna(r["median_rank"]) else f"{r['median_rank']:g}")
    return pd.DataFrame(out)


def poi_section(frame: pd.DataFrame, total: int) -> list[str]:
    """The probability of improvement of ``cka`` (full) over every other row, or why there is none."""
    head = row_label(*HEADLINE)
    md = [f"## Probability of improvement of `{head}`\n"]
    mine = frame[frame["row"] == head]
    if mine.empty:
        return md + [f"`{head}` (variant `full`) is not in these studies: no probability of improvement.\n"]
    if not bool(mine["complete"].iloc[0]):
        return md + [f"`{head}` has {int(mine['n_tasks'].iloc[0])}/{total} tasks: no probability of improvement "
                     "(never computed over fewer tasks).\n"]
    md.append(f"P(`{head}` > Y): the probability that a seed of `{head}` scores higher than a seed of Y on the same "
              "task, ties counting ½ (the Mann–Whitney U statistic over n_x · n_y), averaged over the tasks; 0.5 = "
              "neither is better. Per task it does not depend on the normaliser. 95% CI: stratified bootstrap "
              "percentile interval, both methods' seeds resampled independently within each task.\n")
    rows: dict[str, list[str]] = {"Y": [], "Tasks": [], f"P({head} > Y) [95% CI]": []}
    for _, r in frame[frame["row"] != head].iterrows():
        n = int(r["n_tasks"])
        rows["Y"].append(display_name(r["row"], r["kind"], bool(r["uses_labels"])).replace("|", r"\|"))
        rows["Tasks"].append(f"{n}/{total}" if n == total else f"{n}/{total} tasks {DDAGGER}")
        rows[f"P({head} > Y) [95% CI]"].append(
            DASH if pd.isna(r["poi_cka"]) else f"{r['poi_cka']:.3f} [{r['poi_cka_low']:.3f}, {r['poi_cka_high']:.3f}]")
    return md + [markdown(pd.DataFrame(rows))]


def _study_line(data: StudyData, tasks: Sequence[Task]) -> str:
    n = sum(t.study == data.name for t in tasks)
    return (f"- `{data.name}` (experiment id {data.experiment_id}): {len(data.trials)} finished trials, "
            f"{n} task{'s' * (n != 1)} in the leaderboard; runs scoped by {redact_paths(data.scope or 'nothing')}\n")


def leaderboard_markdown(studies: Sequence[StudyData], board: Leaderboard, normalise: str, reps: int, seed: int,
                         figures: Mapping[str, Path]) -> str:
    """``leaderboard.md``: sources, tasks and normalisers, the table, P(cka > ·), figures, method."""
    tasks, frame, total = board.tasks, board.frame, len(board.tasks)
    uris = sorted({show_uri(d.uri) for d in studies})
    md = ["# Leaderboard\n",
          f"Built from the MLflow store alone (`{'`, `'.join(uris)}`): {len(studies)} "
          f"stud{'ies' if len(studies) != 1 else 'y'}, {total} task{'s' * (total != 1)} (task = study/split).\n",
          "".join(_study_line(d, tasks) for d in studies),
          f"**Score** of a seed: its union accuracy after the last epoch (the primary metric, `{PRIMARY}`) divided "
          f"by its split's normaliser (`--normalise {normalise}`); cells show {UNITS[normalise]}.\n"]
    if normalise != "none":
        md += ["Normalisers:\n", markdown(pd.DataFrame({
            "Task": [f"`{t.label}`" for t in tasks], "Normaliser": [t.source for t in tasks],
            "Union acc. (%)": [_pct(t.scale) for t in tasks]}), left=2)]
    if board.left_out:
        md.append("Left out: " + "; ".join(board.left_out) + ".\n")
    md += ["## Scores per task and aggregates\n",
           "Per task: mean score over seeds ± the half-width of its 95% t-interval (mean ± t(0.975, n − 1) · sd / "
           "√n; none for one seed); n where a row has fewer seeds than the task's other rows. IQM: interquartile "
           "mean of every seed x task score; mean: mean over tasks of the mean over seeds; both with 95% stratified "
           "bootstrap intervals. Median rank: rank per task by mean score among the rows with every task "
           "(1 = best; ties share the average), median over tasks. Sorted by IQM.\n",
           markdown(leaderboard_display(frame, tasks), left=2)]
    notes = [f"{DAGGER} trained with labels (the supervised student"
             + (", and the normaliser: its mean is 100 on every task)." if normalise == "scratch" else ").")]
    if (frame["kind"] == "reference").any():
        notes.append("*claiming ensemble*: the teachers' reference row, each test image sent to the teacher that "
                     "claims it (seed-independent: one run per split).")
    if not frame["complete"].astype(bool).all():
        notes.append(f"{DDAGGER} rows without a score on every task have no aggregate, rank or probability of "
                     f"improvement ({DASH}): aggregates are never computed over fewer tasks.")
    md.append(" ".join(notes) + "\n")
    md += poi_section(frame, total)
    if figures:
        md.append("## Figures\n")
        if "intervals" in figures:
            md.append(f"![IQM and mean with 95% stratified bootstrap intervals]({figures['intervals'].name})\n")
        if "profiles" in figures:
            md.append(f"![Performance profiles]({figures['profiles'].name})\n")
    md += ["## How the numbers are computed\n",
           "After Agarwal et al., NeurIPS 2021 (*Deep RL at the edge of the statistical precipice*, the `rliable` "
           "package), on numpy/scipy. IQM = `scipy.stats.trim_mean(scores, 0.25)` of the flattened seed x task "
           "scores (a task with more finished seeds has more of them). Stratified bootstrap: each of "
           f"{reps} replicates resamples the seeds of every task with replacement, within the task only; the "
           "interval is the 2.5 and 97.5 percentiles of the replicates (`numpy.random.default_rng"
           f"({seed})`). Performance profile: the fraction of seed x task scores above τ (the mean over tasks of "
           "each task's fraction), with pointwise bootstrap bands. Ablation variants (`-x`) are left out (they "
           "are in each study's report); `leaderboard.csv` has every number as a fraction, with the median and "
           "the optimality gap (1 − mean of min(score, 1)) and their intervals.\n"]
    return "\n".join(md)


# ----------------------------------------------------------------------------- build
def resolve(study: str) -> tuple[str, str | None]:
    """(experiment name, study-file text or None) of a study name or file; errors say ``leaderboard:``."""
    try:
        return resolve_study(study)
    except HarnessError as e:
        raise HarnessError("leaderboard: " + str(e).removeprefix("report: ")) from None


def _load(study: str, tracking_uri: str | None, keys: Collection[str] | None,
          expand: KeyExpander | None) -> StudyData:
    try:
        return load_study(study, tracking_uri, history=False, keys=keys, expand=expand)
    except HarnessError as e:
        raise HarnessError("leaderboard: " + str(e).removeprefix("report: ")) from None


def _clear_outputs(out: Path) -> None:
    for pattern in GENERATED:
        for f in out.glob(pattern):
            if f.is_file():
                f.unlink()


def build_leaderboard(studies: Sequence[str], tracking_uri: str | None = None, out_dir: str | Path | None = None,
                      normalise: str = "scratch", reps: int = agg.REPS, seed: int = agg.SEED,
                      keys: Mapping[str, Collection[str]] | None = None,
                      expand: KeyExpander | None = None) -> Leaderboard:
    """Read every study (a name or a study file; ``keys``: the trial keys of a study file given,
    by argument), write the leaderboard into ``out_dir`` and return it. Everything is read and
    computed before the folder is touched: an error leaves nothing half-written."""
    if normalise not in NORMALISERS:
        raise HarnessError(f"leaderboard: --normalise must be one of {', '.join(NORMALISERS)}, got {normalise!r}")
    if reps < 1:
        raise HarnessError(f"leaderboard: --reps must be at least 1, got {reps}")
    if not studies:
        raise HarnessError("leaderboard: give at least one study")
    names = [resolve(s)[0] for s in studies]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise HarnessError(f"leaderboard: study '{twice[0]}' given more than once")
    datas = [_load(s, tracking_uri, (keys or {}).get(s), expand) for s in studies]
    scores, tasks, left = scores_frame(datas, normalise)
    if not tasks:
        raise HarnessError(f"leaderboard: no split has its normaliser (--normalise {normalise}; "
                           + "; ".join(left) + "); --normalise none uses the raw accuracy")
    frame = leaderboard_frame(scores, tasks, reps, seed, normalise)
    profiles = profiles_frame(scores, tasks, frame, reps, seed)
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    board = Leaderboard(out, tasks, left, frame, scores)
    frame.to_csv(out / "leaderboard.csv", index=False)
    complete = frame[frame["complete"].astype(bool)]
    pal = plots.palette(list(frame["row"]))
    names_of = {r: display_name(r, k, bool(u)) for r, k, u in zip(frame["row"], frame["kind"], frame["uses_labels"])}
    figs = {"intervals": plots.leaderboard_intervals_plot(complete, names_of, pal, AXIS[normalise],
                                                          out / "leaderboard_intervals.png"),
            "profiles": plots.performance_profile_plot(profiles, names_of, pal, AXIS[normalise],
                                                       out / "leaderboard_profiles.png")}
    figures = {k: v for k, v in figs.items() if v is not None}
    (out / "leaderboard.md").write_text(leaderboard_markdown(datas, board, normalise, reps, seed, figures))
    return board
