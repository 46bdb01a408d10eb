"""Aggregate statistics over runs and tasks, after Agarwal et al., NeurIPS 2021 ("Deep RL at the
edge of the statistical precipice", the ``rliable`` package), on numpy/scipy alone.

Scores: one 1-D array of run scores (seeds) per task; the number of runs may differ between tasks
(a failed seed). With R runs on every task this is the ``runs x tasks`` matrix of ``rliable``,
and every aggregate below equals ``rliable``'s.

- :func:`iqm`: interquartile mean of all run x task scores, ``scipy.stats.trim_mean(x, 0.25)`` of
  the flattened scores (``int(0.25 N)`` cut from each end);
- :func:`mean`: mean over tasks of the mean over runs (each task weighs the same);
- :func:`median`: median over tasks of the mean over runs;
- :func:`optimality_gap`: ``gamma − mean over tasks of the mean over runs of min(score, gamma)``
  (how far below ``gamma`` the scores fall; 0 when every score reaches it);
- :func:`interval_estimates`: point estimates and **stratified bootstrap** percentile intervals:
  each replicate resamples the runs of each task with replacement, independently per task and
  never across tasks (a task keeps its number of runs); the interval is the (2.5, 97.5)
  percentiles of the replicates' aggregate (``numpy.percentile``, linear interpolation);
- :func:`probability_of_improvement`: ``P(X > Y) = mean over tasks of [P(x > y) + ½ P(x = y)]``,
  x and y runs of X and of Y on that task: the Mann–Whitney U statistic of the task over
  ``n_x · n_y``; its interval resamples X's and Y's runs independently within each task;
- :func:`performance_profile`: ``F(τ)`` = mean over tasks of the fraction of the task's runs with
  a score ``> τ`` (= the fraction of all run x task scores above τ when every task has R runs),
  with stratified bootstrap bands;
- :func:`median_ranks`: rank per task by mean score (1 = best, ties share the average rank),
  median over tasks.

Every draw comes from ``numpy.random.default_rng(seed)``: same scores and seed, same intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

REPS = 2_000
CONFIDENCE = 0.95
SEED = 0
GAMMA = 1.0
NAN = float("nan")
#: the aggregates of :func:`interval_estimates`, in display order
AGGREGATES = ("iqm", "mean", "median", "optimality_gap")

Scores = Sequence[Sequence[float]] | np.ndarray  # per task, the scores of its runs; or a runs x tasks matrix
#: a batch of per-task samples, each (B, runs of the task) -> (B,) values of the aggregate
Batch = list[np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% bootstrap percentile interval."""

    point: float
    low: float
    high: float


def as_tasks(scores: Scores) -> list[np.ndarray]:
    """The scores as one float array per task: a 2-D array is ``runs x tasks`` (one column per
    task); else one sequence of run scores per task. Every task needs at least one finite score
    and no NaN (a missing run is left out, not written as NaN)."""
    if isinstance(scores, np.ndarray) and scores.ndim == 2:
        tasks = [np.asarray(scores[:, j], dtype=float) for j in range(scores.shape[1])]
    else:
        tasks = [np.asarray(t, dtype=float).reshape(-1) for t in scores]
    if not tasks:
        raise ValueError("no task")
    for j, t in enumerate(tasks):
        if t.size == 0:
            raise ValueError(f"task {j} has no run")
        if not np.all(np.isfinite(t)):
            raise ValueError(f"task {j} has a non-finite score")
    return tasks


# ----------------------------------------------------------------------------- aggregates (batched)
def _task_means(batch: Batch) -> np.ndarray:
    """(B, tasks): the mean over runs of every task."""
    return np.stack([b.mean(axis=1) for b in batch], axis=1)


def _iqm(batch: Batch) -> np.ndarray:
    return np.asarray(sps.trim_mean(np.concatenate(batch, axis=1), 0.25, axis=1), dtype=float)


def _mean(batch: Batch) -> np.ndarray:
    return _task_means(batch).mean(axis=1)


def _median(batch: Batch) -> np.ndarray:
    return np.median(_task_means(batch), axis=1)


def _optimality_gap(batch: Batch, gamma: float = GAMMA) -> np.ndarray:
    return gamma - _mean([np.minimum(b, gamma) for b in batch])


BATCHED: dict[str, Callable[[Batch], np.ndarray]] = {
    "iqm": _iqm, "mean": _mean, "median": _median, "optimality_gap": _optimality_gap}


def _one(scores: Scores) -> Batch:
    return [t[None, :] for t in as_tasks(scores)]


def iqm(scores: Scores) -> float:
    """Interquartile mean: ``trim_mean(all run x task scores, 0.25)``."""
    return float(_iqm(_one(scores))[0])


def mean(scores: Scores) -> float:
    """Mean over tasks of the mean over runs."""
    return float(_mean(_one(scores))[0])


def median(scores: Scores) -> float:
    """Median over tasks of the mean over runs."""
    return float(_median(_one(scores))[0])


def optimality_gap(scores: Scores, gamma: float = GAMMA) -> float:
    """``gamma − mean over tasks of the mean over runs of min(score, gamma)``."""
    return float(_optimality_gap(_one(scores), gamma)[0])


# ----------------------------------------------------------------------------- stratified bootstrap
def stratified_resamples(scores: Scores, reps: int, rng: np.random.Generator) -> Batch:
    """``reps`` stratified bootstrap replicates: per task a (reps, runs) array of its own runs
    drawn with replacement (never another task's)."""
    out = []
    for t in as_tasks(scores):
        out.append(t[rng.integers(0, t.size, size=(reps, t.size))])
    return out


def _percentiles(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail], axis=0)
    return lo, hi


def _check_reps(reps: int) -> None:
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")


def interval_estimates(scores: Scores, aggregates: Sequence[str] = AGGREGATES, reps: int = REPS,
                       seed: int = SEED, confidence: float = CONFIDENCE) -> dict[str, Interval]:
    """Point estimate and stratified bootstrap percentile interval of each aggregate (names of
    :data:`AGGREGATES`); every aggregate is computed on the same ``reps`` replicates."""
    _check_reps(reps)
    unknown = [a for a in aggregates if a not in BATCHED]
    if unknown:
        raise ValueError(f"unknown aggregate {unknown[0]!r}; known: {', '.join(BATCHED)}")
    point = _one(scores)
    batch = stratified_resamples(scores, reps, np.random.default_rng(seed))
    out = {}
    for name in aggregates:
        lo, hi = _percentiles(BATCHED[name](batch), confidence)
        out[name] = Interval(float(BATCHED[name](point)[0]), float(lo), float(hi))
    return out


# ----------------------------------------------------------------------------- probability of improvement
def poi_batch(x: Batch, y: Batch) -> np.ndarray:
    """(B,): mean over tasks of P(x > y) + ½ P(x = y) over every pair of runs of the task, for
    each of B replicates (:func:`stratified_resamples`)."""
    per_task = []
    for a, b in zip(x, y):
        gt = (a[:, :, None] > b[:, None, :]).mean(axis=(1, 2))
        eq = (a[:, :, None] == b[:, None, :]).mean(axis=(1, 2))
        per_task.append(gt + 0.5 * eq)
    return np.stack(per_task, axis=1).mean(axis=1)


def same_tasks(x: Scores, y: Scores) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """X's and Y's scores per task (:func:`as_tasks`); ValueError unless they have as many tasks."""
    xs, ys = as_tasks(x), as_tasks(y)
    if len(xs) != len(ys):
        raise ValueError(f"X has {len(xs)} tasks and Y {len(ys)}: P(X > Y) needs the same tasks")
    return xs, ys


def probability_of_improvement(x: Scores, y: Scores) -> float:
    """``P(X > Y)``: mean over tasks of ``P(x > y) + ½ P(x = y)`` (Mann–Whitney U / (n_x n_y))."""
    xs, ys = same_tasks(x, y)
    return float(poi_batch([t[None, :] for t in xs], [t[None, :] for t in ys])[0])


def poi_interval(x: Scores, y: Scores, reps: int = REPS, seed: int = SEED,
                 confidence: float = CONFIDENCE) -> Interval:
    """``P(X > Y)`` and its percentile interval: each replicate resamples X's runs and Y's runs
    with replacement, independently and within each task."""
    _check_reps(reps)
    xs, ys = same_tasks(x, y)
    rng = np.random.default_rng(seed)
    bx = stratified_resamples(xs, reps, rng)
    by = stratified_resamples(ys, reps, rng)
    lo, hi = _percentiles(poi_batch(bx, by), confidence)
    return Interval(probability_of_improvement(xs, ys), float(lo), float(hi))


# ----------------------------------------------------------------------------- performance profiles
def _profile(batch: Batch, taus: np.ndarray) -> np.ndarray:
    """(B, len(taus)): mean over tasks of the fraction of runs with a score > τ."""
    return np.mean([(b[:, :, None] > taus[None, None, :]).mean(axis=1) for b in batch], axis=0)


def performance_profile(scores: Scores, taus: Sequence[float]) -> np.ndarray:
    """``F(τ)`` for every τ: mean over tasks of the fraction of the task's runs scoring ``> τ``."""
    return _profile(_one(scores), np.asarray(taus, dtype=float))[0]


def profile_bands(scores: Scores, taus: Sequence[float], reps: int = REPS, seed: int = SEED,
                  confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(F(τ), low, high): the profile and its pointwise stratified bootstrap percentile band."""
    _check_reps(reps)
    t = np.asarray(taus, dtype=float)
    batch = stratified_resamples(scores, reps, np.random.default_rng(seed))
    lo, hi = _percentiles(_profile(batch, t), confidence)
    return performance_profile(scores, t), lo, hi


def tau_grid(scores: Sequence[Scores], n: int = 101) -> np.ndarray:
    """``n`` thresholds from just below the lowest to just above the highest score of all the
    score sets given (2% of the range either side; ±0.01 when every score is equal)."""
    every = np.concatenate([t for s in scores for t in as_tasks(s)])
    lo, hi = float(every.min()), float(every.max())
    pad = 0.02 * (hi - lo) if hi > lo else 0.01
    return np.linspace(lo - pad, hi + pad, n)


# ----------------------------------------------------------------------------- ranks
def median_ranks(task_means: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """``{row: mean score per task}`` (the same tasks, in the same order, for every row) ->
    ``{row: median over tasks of its rank}``; rank 1 = the highest mean on the task, ties share
    the average of their ranks (``scipy.stats.rankdata(method="average")``)."""
    if not task_means:
        return {}
    names = list(task_means)
    m = np.asarray([np.asarray(task_means[k], dtype=float) for k in names])
    if m.ndim != 2 or m.shape[1] == 0:
        raise ValueError("every row needs a mean on the same (at least one) tasks")
    ranks = sps.rankdata(-m, axis=0, method="average")
    return {k: float(np.median(ranks[i])) for i, k in enumerate(names)}
