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
  are in each study's report, and ``cka``'s in the ablation leaderboard), references included: ``teachers`` (the claiming ensemble) and the
  supervised ``scratch`` (†, it sees labels);
- **duplicate tasks**: a (study, split) whose trial runs logged the same data set, split,
  teachers, student and training recipe as an earlier one (by content, not name:
  :func:`harness.report.verdicts.content_keys`) is counted once, under the first name; its
  (row, seed) runs the first lacks are added to it, a (row, seed) both have counts once. One line
  of the Markdown names them (today ``mnist5k-routing``'s splits are ``mnist5k``'s);
- **cells**: per task, the mean score over seeds ± the half-width of its 95% t-interval
  (mean ± t(0.975, n − 1) · sd / √n); per row, IQM and mean over every run x task score with
  stratified bootstrap 95% intervals. A row without a score on every task gets no aggregate,
  rank or probability of improvement (never an average over fewer tasks);
- **verdicts** (:mod:`.verdicts`): for every pair of rows with every task, X is *ahead* of Y when
  the 95% interval of P(X > Y) lies above 0.5, *behind* when below, else *inconclusive at 95%*,
  and then the number of tasks like the observed ones that would resolve the observed difference
  (by resampling tasks, at 80% power);
- **rank**: never a bare rank where the intervals do not order the rows. The table's rank column
  is the range the verdicts allow, ``1 + #rows ahead of it`` to ``K − #rows it is ahead of`` (K
  rows with every task): ``2`` when every other row is ahead or behind, ``2–4`` when one row is
  ahead of it, K − 4 behind it and two not ordered with it. The rows are sorted by IQM, which is
  no rank where the range says otherwise; the median over tasks of the per-task rank stays in the
  CSV only;
- the probability of improvement of ``cka`` (``full``) over every other row, with its interval
  and verdict;
- the **ablation leaderboard** of ``cka``: per component, Δ = full − ablated paired by seed,
  aggregated over the tasks that ran the ablation with its interval, P(full > ablated), and the
  verdict *helps* / *hurts* / *inconclusive* (with the tasks needed);
- figures: interval estimates (IQM and mean, :func:`leaderboard_intervals_plot`) and performance
  profiles (:func:`performance_profile_plot`).

Outputs (``--out``, default ``results/leaderboard``): ``leaderboard.md``, ``leaderboard.csv``
(fractions, not percent), ``leaderboard_pairs.csv`` (every ordered pair),
``leaderboard_ablations.csv``, ``leaderboard_intervals.png``, ``leaderboard_profiles.png``. Every
draw is seeded and no build date is written: the same store gives the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.report import aggregate as agg
from harness.report import stats
from harness.report import verdicts as vd
from harness.report.figures import Palette, figure, palette, save
from harness.report.frames import REFERENCE_METHOD, KeyExpander, StudyData, load_study, resolve_study
from harness.report.paths import redact_paths, show_uri
from harness.report.scaling import t_interval
from harness.report.tables import PRIMARY, ablation_order, markdown, method_rank, variant_rank
from harness.tracking import row_label

NORMALISERS = ("scratch", "teachers", "none")
SUPERVISED = "scratch"
ORACLE = "diag/oracle_ensemble_acc"
HEADLINE = ("cka", "full")  # the method whose probability of improvement over the others is tabled
DEFAULT_OUT = Path("results") / "leaderboard"
GENERATED = ("leaderboard.md", "leaderboard.csv", "leaderboard_pairs.csv", "leaderboard_ablations.csv",
             "leaderboard_*.png")
DAGGER, DDAGGER, DASH = "†", "‡", "–"
RANK = "Rank (95%)"
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
    #: the labels of tasks with the same content folded into this one, and how many of their
    #: (row, seed) runs it did not have and took from them
    also: tuple[str, ...] = ()
    pooled: int = 0

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
    #: one row per ordered pair of rows with every task (``leaderboard_pairs.csv``)
    pairs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=vd.PAIR_COLUMNS))
    #: one row per ablation of ``cka`` (``leaderboard_ablations.csv``)
    ablations: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=vd.ABLATION_COLUMNS))
    #: ``{duplicate task label: the task it was counted as}`` (same content, :func:`duplicates`)
    duplicates: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- scores
def normaliser(data: StudyData, split: str, how: str) -> tuple[float | None, str]:
    """(value, source) of the split's normaliser; (None, why not) when the split has none."""
    return trials_normaliser(data.trials[data.trials["split"] == split], how)


def trials_normaliser(t: pd.DataFrame, how: str) -> tuple[float | None, str]:
    """:func:`normaliser` of one task's trials (one row per method, variant and seed)."""
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


def duplicates(studies: Sequence[StudyData]) -> dict[str, str]:
    """``{task label: the earlier task label of the same content}`` over every (study, split) with
    trial runs, studies in the order given and splits in study order (:func:`verdicts.content_keys`
    of the params its trial runs logged: a run of one has the content of a run of the other; a split
    whose runs logged no data-set and split config is never a duplicate)."""
    keys = []
    for data in studies:
        for split in data.splits:
            ids = data.trials.loc[data.trials["split"] == split, "run_id"]
            rows = data.params.loc[data.params.index.intersection(ids)] if not data.params.empty else pd.DataFrame()
            keys.append((f"{data.name}/{split}", vd.content_keys(r.to_dict() for _, r in rows.iterrows())))
    return vd.duplicate_tasks(keys)


def _merged_trials(studies: Sequence[StudyData],
                   merged: Mapping[str, str]) -> list[tuple[str, str, pd.DataFrame, tuple[str, ...], int]]:
    """(study, split, trials, folded-in labels, runs taken from them) of every task that is not a
    duplicate: a duplicate's (method, variant, seed) runs that its kept task lacks are added to it."""
    own = {f"{d.name}/{s}": (d.name, s, d.trials[d.trials["split"] == s]) for d in studies for s in d.splits}
    out = []
    for label, (study, split, t) in own.items():
        if label in merged:
            continue
        also = tuple(k for k, v in merged.items() if v == label)
        added = 0
        for dup in also:
            extra = own[dup][2]
            have = set(zip(t["method"], t["variant"], t["seed"]))
            new = extra[[k not in have for k in zip(extra["method"], extra["variant"], extra["seed"])]]
            added += len(new)
            t = pd.concat([t, new.assign(split=split)], ignore_index=True) if len(new) else t
        out.append((study, split, t, also, added))
    return out


def _scores(studies: Sequence[StudyData], how: str, merged: Mapping[str, str] | None,
            ablations: bool) -> tuple[pd.DataFrame, list[Task], list[str]]:
    records: list[dict[str, Any]] = []
    tasks: list[Task] = []
    left: list[str] = []
    for study, split, every, also, added in _merged_trials(studies, merged or {}):
        abl = every["variant"].str.startswith("-")
        t = every[~abl]
        label = f"{study}/{split}"
        named = f"`{label}`" + "".join(f" (and `{d}`, the same task)" for d in also)
        if PRIMARY not in t or t[PRIMARY].dropna().empty:
            if not t.empty:
                left.append(f"{named}: no finished trial run logged `{PRIMARY}`: left out")
            continue
        scale, source = trials_normaliser(t, how)
        if scale is None:
            left.append(f"{named}: {source}: left out of the leaderboard and its aggregates")
            continue
        tasks.append(Task(study, split, scale, source, also, added))
        t = (every[abl] if ablations else t).dropna(subset=[PRIMARY])
        for method, variant, labels, seed, raw in zip(t["method"], t["variant"], t["uses_labels"], t["seed"],
                                                      t[PRIMARY]):
            records.append({"study": study, "split": split, "task": label, "method": method,
                            "variant": variant, "row": row_label(method, variant),
                            "kind": "reference" if method == REFERENCE_METHOD else "method",
                            "uses_labels": bool(labels), "seed": int(seed), "raw": float(raw),
                            "score": float(raw) / scale})
    df = pd.DataFrame(records, columns=SCORE_COLUMNS)
    return df.sort_values(["task", "row", "seed"], kind="stable").reset_index(drop=True), tasks, left


def scores_frame(studies: Sequence[StudyData], how: str,
                 merged: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, list[Task], list[str]]:
    """(scores, tasks, left out): one row per task, method/variant (no ablation) and finished seed
    with the primary metric; the tasks in the studies' and splits' order; one line per split
    left out (no normaliser, or no run with the primary metric). ``merged``: ``{duplicate task:
    kept task}`` (:func:`duplicates`): a duplicate is no task of its own, its runs of a (method,
    variant, seed) the kept task lacks count on the kept task (normaliser included)."""
    return _scores(studies, how, merged, ablations=False)


def ablation_scores(studies: Sequence[StudyData], how: str, merged: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The ablation variants' (``-x``) scores, as :func:`scores_frame` (same tasks and normalisers)."""
    return _scores(studies, how, merged, ablations=True)[0]


# ----------------------------------------------------------------------------- the table
def _rows(scores: pd.DataFrame) -> list[tuple[str, str]]:
    keys = set(zip(scores["method"], scores["variant"]))
    return sorted(keys, key=lambda k: (method_rank(k[0]), variant_rank(k[1])))


def per_task(scores: pd.DataFrame, row: str, tasks: Sequence[Task]) -> list[np.ndarray]:
    """The row's scores per task (seed order), an empty array where it has none."""
    sub = scores[scores["row"] == row]
    return [sub.loc[sub["task"] == t.label].sort_values("seed")["score"].to_numpy(dtype=float) for t in tasks]


def complete_rows(scores: pd.DataFrame, tasks: Sequence[Task]) -> dict[str, list[np.ndarray]]:
    """``{row: its scores per task}`` of the rows with a score on every task, ``cka`` (full) first,
    then in the preferred method order."""
    out = {}
    for method, variant in _rows(scores):
        label = row_label(method, variant)
        per = per_task(scores, label, tasks)
        if all(a.size > 0 for a in per):
            out[label] = per
    head = row_label(*HEADLINE)
    return {k: out[k] for k in sorted(out, key=lambda k: k != head)}


def pairs_frame(scores: pd.DataFrame, tasks: Sequence[Task], reps: int = agg.REPS, seed: int = agg.SEED,
                needed: bool = True, power: float = vd.POWER, cap: int = vd.CAP) -> pd.DataFrame:
    """:func:`verdicts.pairwise` over the rows with every task (``cka`` first: P(cka > Y) is the
    same number as in :func:`leaderboard_frame`'s ``poi_cka``)."""
    return vd.pairwise(complete_rows(scores, tasks), reps=reps, seed=seed, needed=needed, power=power, cap=cap)


def leaderboard_frame(scores: pd.DataFrame, tasks: Sequence[Task], reps: int = agg.REPS, seed: int = agg.SEED,
                      normalise: str = "scratch", pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method/variant: per task mean, 95% t-interval and n; for rows with every task
    the aggregates (point, low, high), the median rank among those rows, the range of ranks the
    pairwise verdicts allow (``rank_best``, ``rank_worst``), P(cka > row) and its verdict; sorted by
    IQM (highest first), rows without every task last. ``pairs``: :func:`pairs_frame` (computed,
    without the tasks needed, when not given)."""
    out: list[dict[str, Any]] = []
    arrays = complete_rows(scores, tasks)
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
            for name, iv in agg.interval_estimates(per, reps=reps, seed=seed).items():
                rec.update({name: iv.point, f"{name}_low": iv.low, f"{name}_high": iv.high})
        out.append(rec)
    ranks = agg.median_ranks({k: [float(a.mean()) for a in v] for k, v in arrays.items()})
    if pairs is None:
        pairs = pairs_frame(scores, tasks, reps, seed, needed=False)
    ranges = vd.rank_ranges(pairs, list(arrays))
    head = row_label(*HEADLINE)
    mine = pairs[pairs["x"] == head].set_index("y")
    for rec in out:
        rec["median_rank"] = ranks.get(rec["row"], agg.NAN)
        rec["rank_best"], rec["rank_worst"] = ranges.get(rec["row"], (agg.NAN, agg.NAN))
        if rec["row"] in mine.index:
            p = mine.loc[rec["row"]]
            rec.update({"poi_cka": p["poi"], "poi_cka_low": p["poi_low"], "poi_cka_high": p["poi_high"],
                        "verdict_cka": p["verdict"]})
    cols = ["row", "method", "variant", "kind", "uses_labels", "normalise", "n_tasks", "n_tasks_total", "complete"]
    cols += [f"{t.label}.{c}" for t in tasks for c in ("mean", "ci_low", "ci_high", "n")]
    cols += [f"{a}{s}" for a in agg.AGGREGATES for s in ("", "_low", "_high")]
    cols += ["median_rank", "rank_best", "rank_worst", "poi_cka", "poi_cka_low", "poi_cka_high", "verdict_cka"]
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
    """The table as Markdown strings: method, tasks, one column per task, IQM, mean, and the rank
    range the pairwise verdicts allow (never a bare rank where they are inconclusive)."""
    total = len(tasks)
    out: dict[str, list[str]] = {"Method": [], "Tasks": []}
    for t in tasks:
        out[f"`{t.label}`"] = []
    out.update({"IQM [95% CI]": [], "Mean [95% CI]": [], RANK: []})
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
        out[RANK].append(vd.rank_text(r["rank_best"], r["rank_worst"]))
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
    md.append(f"Verdict: `{head}` is *ahead* of Y when the whole interval lies above 0.5, *behind* when below, "
              "else *inconclusive at 95%*.\n")
    poi, word = f"P({head} > Y) [95% CI]", f"`{head}` vs Y"
    rows: dict[str, list[str]] = {"Y": [], "Tasks": [], poi: [], word: []}
    for _, r in frame[frame["row"] != head].iterrows():
        n = int(r["n_tasks"])
        rows["Y"].append(display_name(r["row"], r["kind"], bool(r["uses_labels"])).replace("|", r"\|"))
        rows["Tasks"].append(f"{n}/{total}" if n == total else f"{n}/{total} tasks {DDAGGER}")
        none = pd.isna(r["poi_cka"])
        rows[poi].append(DASH if none else f"{r['poi_cka']:.3f} [{r['poi_cka_low']:.3f}, {r['poi_cka_high']:.3f}]")
        rows[word].append(DASH if none else vd.say(r["verdict_cka"]))
    return md + [markdown(pd.DataFrame(rows))]


def _needed(p: Mapping[str, Any], power: float = vd.POWER, cap: int = vd.CAP, null: float = 0.5) -> vd.Needed | None:
    """The tasks needed of a pair (``null`` 0.5) or ablation row (0); None where not computed."""
    if pd.isna(p["needed_power"]):
        return None
    return vd.Needed(None if pd.isna(p["tasks_needed"]) else int(p["tasks_needed"]), bool(p["needed_resolvable"]),
                     bool(p["needed_capped"]), float(p["needed_power"]), power, cap, vd.DRAWS, null)


def pairs_section(frame: pd.DataFrame, pairs: pd.DataFrame, total: int, power: float = vd.POWER,
                  cap: int = vd.CAP) -> list[str]:
    """Every pair of rows with every task: ahead / behind / inconclusive at 95%, with P(X > Y) and
    its interval, and for an inconclusive pair the tasks needed (a matrix, then one line per
    inconclusive pair)."""
    md = ["## Pairwise verdicts\n"]
    rows = [r for r in frame["row"] if r in set(pairs["x"])]
    if len(rows) < 2:
        return md + ["Fewer than two rows have a score on every task: no pair to compare.\n"]
    names = {r: display_name(r, k, bool(u)) for r, k, u in zip(frame["row"], frame["kind"], frame["uses_labels"])}
    md.append("Cell (row X, column Y): X is **ahead** of Y when the 95% interval of P(X > Y) lies above 0.5, "
              "**behind** when it lies below, else *inconclusive at 95%*, with P(X > Y) [95% CI] (the estimator of "
              "the section above; P(Y > X) = 1 − P(X > Y), so the table is antisymmetric). Only the rows with a "
              "score on every task. For an inconclusive pair, *~n tasks*: how many tasks like these would resolve "
              f"it: n tasks are drawn with replacement from the {total} observed (with their seeds), the interval is "
              "recomputed by the same stratified bootstrap, and n is the smallest number at which it excludes 0.5, "
              f"on the observed side, in at least {power:.0%} of {vd.DRAWS} such simulated leaderboards (searched "
              f"up to {cap} by doubling and bisection); *no difference* when P(X > Y) is exactly 0.5.\n")
    at = pairs.set_index(["x", "y"])
    table: dict[str, list[str]] = {"X \\ Y": [names[r].replace("|", r"\|") for r in rows]}
    for y in rows:
        col = []
        for x in rows:
            if x == y:
                col.append(DASH)
                continue
            p = at.loc[(x, y)]
            cell = f"{p['verdict']} {p['poi']:.2f} [{p['poi_low']:.2f}, {p['poi_high']:.2f}]"
            if p["verdict"] == vd.INCONCLUSIVE:
                nd = _needed(p, power, cap)
                cell += f", {nd.short()}" if nd else ""
            else:
                cell = f"**{p['verdict']}**" + cell[len(p["verdict"]):]
            col.append(cell)
        table[names[y]] = col
    md.append(markdown(pd.DataFrame(table), left=1))
    lines = []
    for i, x in enumerate(rows):
        for y in rows[i + 1:]:
            p = at.loc[(x, y)]
            if p["verdict"] == vd.INCONCLUSIVE:
                nd = _needed(p, power, cap)
                lines.append(f"- `{x}` vs `{y}`: inconclusive at 95% (P(`{x}` > `{y}`) = {p['poi']:.3f} "
                             f"[{p['poi_low']:.3f}, {p['poi_high']:.3f}])"
                             + (f"; {nd.sentence(total)}" if nd else "") + ".\n")
    if lines:
        md += ["Inconclusive pairs:\n", "".join(lines)]
    else:
        md.append("Every pair is resolved at 95%.\n")
    return md


def ablation_section(abl: pd.DataFrame, total: int, power: float = vd.POWER, cap: int = vd.CAP) -> list[str]:
    """The ablation leaderboard of ``cka``: per component, Δ = full − ablated paired by seed and
    aggregated over tasks, P(full > ablated), the verdict and, when inconclusive, the tasks needed."""
    method = HEADLINE[0]
    md = [f"## Ablations of `{method}` over tasks\n"]
    if abl.empty:
        return md + [f"No ablation of `{method}` (variant `-x`) in these studies.\n"]
    md.append(f"Per task and component c: Δ = score of `{method}` − score of `{method}-c` for each seed finished in "
              "both (paired by seed; normalised scores, x 100 = points), averaged over those seeds; then averaged "
              "over the tasks that ran the ablation (*Tasks*), with a 95% stratified bootstrap interval (the paired "
              f"differences resampled within each task, seeded). P(full > ablated): the probability of improvement "
              "over the same seeds, with its interval. Verdict from Δ's interval: the component **helps** when it "
              "lies above 0 (removing it costs), **hurts** when below, else *inconclusive at 95%*, with the tasks "
              f"needed to resolve Δ (as for the pairs: {power:.0%} of {vd.DRAWS} simulated leaderboards, up to "
              f"{cap} tasks).\n")
    rows: dict[str, list[str]] = {"Component": [], "Tasks": [], "Pairs": [], "Δ (points) [95% CI]": [],
                                  "P(full > ablated) [95% CI]": [], "Verdict": []}
    lines = []
    for _, r in abl.iterrows():
        rows["Component"].append(f"`{r['component']}` (`{method}{r['variant']}`)")
        rows["Tasks"].append(f"{int(r['n_tasks'])}/{total}")
        rows["Pairs"].append(str(int(r["n_pairs"])))
        if not int(r["n_tasks"]):
            rows["Δ (points) [95% CI]"].append(DASH)
            rows["P(full > ablated) [95% CI]"].append(DASH)
            rows["Verdict"].append("no seed paired with `full`")
            continue
        rows["Δ (points) [95% CI]"].append(
            f"{100 * r['delta']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]")
        rows["P(full > ablated) [95% CI]"].append(f"{r['poi']:.3f} [{r['poi_low']:.3f}, {r['poi_high']:.3f}]")
        word = r["verdict"]
        if word == vd.INCONCLUSIVE:
            nd = _needed(r, power, cap, null=0.0)
            rows["Verdict"].append("inconclusive at 95%" + (f", {nd.short()}" if nd else ""))
            if nd:
                n = int(r["n_tasks"])
                lines.append(f"- `{r['component']}`: inconclusive at 95% over {n} task{'s' * (n != 1)}; "
                             f"{nd.sentence(n)}.\n")
        else:
            rows["Verdict"].append(f"component **{word}**")
    md.append(markdown(pd.DataFrame(rows), left=2))
    if lines:
        md += ["".join(lines)]
    return md


def duplicate_line(tasks: Sequence[Task]) -> str | None:
    """One line naming every task counted under another's name, or None."""
    parts = []
    for t in tasks:
        for dup in t.also:
            parts.append(f"`{dup}` is `{t.label}` under a second name")
    if not parts:
        return None
    pooled = [f"{t.pooled} from {', '.join(f'`{d}`' for d in t.also)} into `{t.label}`" for t in tasks if t.also]
    return ("**Duplicate tasks**, detected by content (equal data set, split, teachers, student and training recipe "
            "in their runs' logged config): " + "; ".join(parts) + ". Each is counted once, under the first name; a "
            "(row, seed) both have is taken from the first, a (row, seed) only the second has is added to it (seeds "
            "pooled, none counted twice; runs added: " + "; ".join(pooled) + ").\n")


def _study_line(data: StudyData, tasks: Sequence[Task]) -> str:
    n = sum(t.study == data.name for t in tasks)
    return (f"- `{data.name}` (experiment id {data.experiment_id}): {len(data.trials)} finished trials, "
            f"{n} task{'s' * (n != 1)} in the leaderboard; runs scoped by {redact_paths(data.scope or 'nothing')}\n")


def leaderboard_markdown(studies: Sequence[StudyData], board: Leaderboard, normalise: str, reps: int, seed: int,
                         figures: Mapping[str, Path], power: float = vd.POWER, cap: int = vd.CAP) -> str:
    """``leaderboard.md``: sources, duplicate tasks, tasks and normalisers, the table, P(cka > ·),
    the pairwise verdicts, the ablations of cka, figures, method."""
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
    dup = duplicate_line(tasks)
    if dup:
        md.append(dup)
    if board.left_out:
        md.append("Left out: " + "; ".join(board.left_out) + ".\n")
    md += ["## Scores per task and aggregates\n",
           "Per task: mean score over seeds ± the half-width of its 95% t-interval (mean ± t(0.975, n − 1) · sd / "
           "√n; none for one seed); n where a row has fewer seeds than the task's other rows. IQM: interquartile "
           "mean of every seed x task score; mean: mean over tasks of the mean over seeds; both with 95% stratified "
           f"bootstrap intervals. {RANK}: never a bare rank where the evidence does not order the rows: among the "
           "rows with every task, from 1 + the number of rows *ahead* of the row to the number of rows minus the "
           "number it is *ahead* of (verdicts of the 95% intervals of P(X > Y), section *Pairwise verdicts*); one "
           "number only when every other row is ahead or behind. Sorted by IQM (the order of the rows is no rank "
           "where the range says otherwise; the median over tasks of the per-task rank is in `leaderboard.csv`).\n",
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
    md += pairs_section(frame, board.pairs, total, power, cap)
    md += ablation_section(board.ablations, total, power, cap)
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
           "each task's fraction), with pointwise bootstrap bands. Ablation variants (`-x`) are left out of the "
           f"rows (they are in each study's report and, for `{HEADLINE[0]}`, in the ablation section); "
           "`leaderboard.csv` has every number as a fraction, with the median and the optimality gap (1 − mean of "
           "min(score, 1)) and their intervals, the median rank and the rank range; `leaderboard_pairs.csv` every "
           "ordered pair (P(X > Y), interval, verdict, tasks needed); `leaderboard_ablations.csv` the ablation "
           f"section. Tasks needed: {agg.REPS} bootstrap replicates of each observed task's statistic (centred on "
           f"it), {vd.NEEDED_REPS} replicates per simulated interval, {vd.DRAWS} simulated leaderboards per number "
           f"of tasks, seeded (`numpy.random.default_rng({seed})`); the search assumes the fraction resolved grows "
           "with the number of tasks and stops within 5% of it: an estimate (another seed moves it by about a "
           "tenth), to read as an order of magnitude.\n"]
    return "\n".join(md)


# ----------------------------------------------------------------------------- figures
def leaderboard_intervals_plot(frame: pd.DataFrame, names: dict[str, str], pal: Palette, axis: str,
                               path: Path) -> Path | None:
    """Interval estimates of the leaderboard (:mod:`.leaderboard`), ``rliable`` style: one panel
    per aggregate (IQM, mean), one row per method in the frame's order (top first), the 95%
    stratified bootstrap interval as a bar and the point estimate as a black tick (scores x 100)."""
    d = frame.dropna(subset=["iqm", "mean"])
    if d.empty:
        return None
    rows = list(d["row"])
    fig, axes = figure(1, 2, 10.5, 1.3 + 0.42 * len(rows))
    for ax, (estimator, title) in zip(axes[0], (("iqm", "IQM"), ("mean", "Mean"))):
        for y, (_, r) in enumerate(d.iterrows()):
            colour = pal.get(r["row"], (0.0, 0.0, 0.0))
            lo, hi, point = 100 * r[f"{estimator}_low"], 100 * r[f"{estimator}_high"], 100 * r[estimator]
            ax.barh(y, hi - lo, left=lo, height=0.6, color=colour, alpha=0.75, edgecolor=colour, linewidth=1.0)
            ax.plot([point, point], [y - 0.3, y + 0.3], color="black", linewidth=2.0, zorder=3)
        ax.set_yticks(range(len(rows)), [names.get(r, r) for r in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(title)
        ax.set_xlabel(axis)
        ax.grid(axis="y", visible=False)
    axes[0][1].set_yticklabels([])
    fig.suptitle("Aggregate scores over every task: point estimate (black) and 95% stratified bootstrap interval")
    return save(fig, path)


def performance_profile_plot(profiles: pd.DataFrame, names: dict[str, str], pal: Palette, axis: str,
                             path: Path) -> Path | None:
    """Performance profiles of the leaderboard: per method, the fraction of seed x task scores
    above τ against τ (x 100), with its pointwise 95% stratified bootstrap band; drawn as steps
    (the value at a grid point holds until the next one)."""
    if profiles.empty:
        return None
    fig, axes = figure(1, 1, 8.2, 4.6)
    ax = axes[0][0]
    for row in dict.fromkeys(profiles["row"]):
        d = profiles[profiles["row"] == row]
        colour = pal.get(row, (0.0, 0.0, 0.0))
        tau = 100 * d["tau"].to_numpy()
        ax.fill_between(tau, d["low"], d["high"], color=colour, alpha=0.2, linewidth=0, step="post")
        ax.plot(tau, d["fraction"], color=colour, linewidth=1.8, label=names.get(row, row), drawstyle="steps-post")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"τ: {axis}")
    ax.set_ylabel("fraction of seed × task scores > τ")
    fig.legend(loc="outside right center", frameon=False)
    fig.suptitle("Performance profiles (bands: pointwise 95% stratified bootstrap intervals)")
    return save(fig, path)


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


def _ablation_order(studies: Sequence[StudyData]) -> list[str]:
    """The ablation variants in the first study file's order that lists them (then the preferred one)."""
    out: list[str] = []
    for d in studies:
        out += [v for v in ablation_order(d) if v not in out]
    return out


def _clear_outputs(out: Path) -> None:
    for pattern in GENERATED:
        for f in out.glob(pattern):
            if f.is_file():
                f.unlink()


def build_leaderboard(studies: Sequence[str], tracking_uri: str | None = None, out_dir: str | Path | None = None,
                      normalise: str = "scratch", reps: int = agg.REPS, seed: int = agg.SEED,
                      keys: Mapping[str, Collection[str]] | None = None,
                      expand: KeyExpander | None = None, power: float = vd.POWER, cap: int = vd.CAP) -> Leaderboard:
    """Read every study (a name or a study file; ``keys``: the trial keys of a study file given,
    by argument), write the leaderboard into ``out_dir`` and return it. Everything is read and
    computed before the folder is touched: an error leaves nothing half-written. ``power`` and
    ``cap``: of the tasks needed (:func:`verdicts.tasks_needed`)."""
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
    return write_leaderboard(datas, out_dir, normalise, reps, seed, power, cap)


def write_leaderboard(datas: Sequence[StudyData], out_dir: str | Path | None = None, normalise: str = "scratch",
                      reps: int = agg.REPS, seed: int = agg.SEED, power: float = vd.POWER,
                      cap: int = vd.CAP) -> Leaderboard:
    """The leaderboard of studies already read (:func:`build_leaderboard`; ``harness benchmark``
    reads each task's runs by its trial keys), written into ``out_dir``."""
    merged = duplicates(datas)
    scores, tasks, left = scores_frame(datas, normalise, merged)
    if not tasks:
        raise HarnessError(f"leaderboard: no split has its normaliser (--normalise {normalise}; "
                           + "; ".join(left) + "); --normalise none uses the raw accuracy")
    pairs = pairs_frame(scores, tasks, reps, seed, power=power, cap=cap)
    frame = leaderboard_frame(scores, tasks, reps, seed, normalise, pairs)
    order = {r: i for i, r in enumerate(frame["row"])}  # the pairs in the table's order
    pairs = pairs.sort_values(["x", "y"], key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    head = scores[(scores["method"] == HEADLINE[0]) & (scores["variant"] == "full")]
    abl = ablation_scores(datas, normalise, merged)
    ablations = vd.ablation_frame(pd.concat([head, abl[abl["method"] == HEADLINE[0]]], ignore_index=True),
                                  [t.label for t in tasks], HEADLINE[0], _ablation_order(datas), reps, seed,
                                  power=power, cap=cap)
    profiles = profiles_frame(scores, tasks, frame, reps, seed)
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    board = Leaderboard(out, tasks, left, frame, scores, pairs, ablations, dict(merged))
    frame.to_csv(out / "leaderboard.csv", index=False)
    pairs.to_csv(out / "leaderboard_pairs.csv", index=False)
    ablations.to_csv(out / "leaderboard_ablations.csv", index=False)
    complete = frame[frame["complete"].astype(bool)]
    pal = palette(list(frame["row"]))
    names_of = {r: display_name(r, k, bool(u)) for r, k, u in zip(frame["row"], frame["kind"], frame["uses_labels"])}
    figs = {"intervals": leaderboard_intervals_plot(complete, names_of, pal, AXIS[normalise],
                                                          out / "leaderboard_intervals.png"),
            "profiles": performance_profile_plot(profiles, names_of, pal, AXIS[normalise],
                                                       out / "leaderboard_profiles.png")}
    figures = {k: v for k, v in figs.items() if v is not None}
    (out / "leaderboard.md").write_text(leaderboard_markdown(datas, board, normalise, reps, seed, figures, power, cap))
    return board
