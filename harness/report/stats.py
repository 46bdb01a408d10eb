"""Statistics over seeds: mean ± std, and the paired evidence for an ablation's Δ.

Pure functions on plain numbers (no MLflow, no pandas state):

- :func:`summarize`: mean, sample standard deviation (ddof = 1) and n of the finite values;
- :func:`paired_delta`: Δ = variant − reference over the seeds present in both, with a two-sided
  paired t-test (``scipy.stats.ttest_rel``), a Wilcoxon signed-rank test when n >= 6
  (``scipy.stats.wilcoxon``), and a percentile bootstrap CI of the mean difference
  (``scipy.stats.bootstrap``, 10 000 resamples, ``random_state=0``). Below n = 3 no test is run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

MIN_TEST_N = 3
MIN_WILCOXON_N = 6
N_RESAMPLES = 10_000
CONFIDENCE = 0.95
RANDOM_STATE = 0
NAN = float("nan")
CONSTANT_NOTE = "every seed has the same difference: no t-test"

TEST_DESCRIPTION = (
    "Δ is the mean over seeds of the per-seed difference (variant − full), using only seeds "
    "finished in both. p: two-sided paired t-test (scipy.stats.ttest_rel) on those differences, "
    f"plus a Wilcoxon signed-rank test (scipy.stats.wilcoxon) when n ≥ {MIN_WILCOXON_N}. "
    f"CI: {CONFIDENCE:.0%} percentile bootstrap of the mean difference (scipy.stats.bootstrap, "
    f"{N_RESAMPLES} resamples, random_state={RANDOM_STATE}). With n < {MIN_TEST_N} no test is run "
    "(\"n too small\"). With 3 seeds a t-test has 2 degrees of freedom and the bootstrap can only "
    "resample 3 values (its interval never leaves their range): read the p-values as weak evidence."
)


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (NaN when n < 2) and n of the finite values."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Paired:
    """Δ = variant − reference over matching seeds, and the evidence for it."""

    n: int
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    delta: float
    delta_std: float
    ci_low: float
    ci_high: float
    t_stat: float
    p_ttest: float
    p_wilcoxon: float
    test: str
    note: str


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± sample std (ddof = 1) over the finite values, and their count."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    mean = float(np.mean(x)) if n else NAN
    std = float(np.std(x, ddof=1)) if n >= 2 else NAN
    return Summary(mean, std, n)


def _constant(d: np.ndarray) -> bool:
    """All differences equal up to float noise (the t statistic is then undefined)."""
    return float(np.ptp(d)) <= 1e-12 * max(1.0, float(np.max(np.abs(d))))


def _bootstrap(d: np.ndarray) -> tuple[float, float]:
    if _constant(d):
        return float(d[0]), float(d[0])
    res = stats.bootstrap(
        (d,), np.mean, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE, method="percentile",
        random_state=RANDOM_STATE,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _wilcoxon(d: np.ndarray) -> float:
    if not np.any(d != 0):
        return NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.wilcoxon(d).pvalue)


def paired_delta(reference: Mapping[int, float], variant: Mapping[int, float]) -> Paired:
    """Paired comparison of ``variant`` against ``reference`` (both ``{seed: value}``)."""
    seeds = tuple(sorted(
        s for s in set(reference) & set(variant)
        if math.isfinite(reference[s]) and math.isfinite(variant[s])
    ))
    ref = np.array([reference[s] for s in seeds], dtype=float)
    var = np.array([variant[s] for s in seeds], dtype=float)
    d = var - ref
    n = len(seeds)
    delta = float(np.mean(d)) if n else NAN
    delta_std = float(np.std(d, ddof=1)) if n >= 2 else NAN
    t_stat = p_t = p_w = lo = hi = NAN
    if n == 0:
        test, note = "none", "no seed finished in both"
    elif n < MIN_TEST_N:
        test, note = "none", f"n too small (n={n} paired seeds; a test needs {MIN_TEST_N})"
    else:
        lo, hi = _bootstrap(d)
        test = "paired t-test" + (" + Wilcoxon signed-rank" if n >= MIN_WILCOXON_N else "")
        note = "" if n >= MIN_WILCOXON_N else f"Wilcoxon needs n ≥ {MIN_WILCOXON_N}"
        if _constant(d):
            note = CONSTANT_NOTE
        else:
            res = stats.ttest_rel(var, ref)
            t_stat, p_t = float(res.statistic), float(res.pvalue)
        if n >= MIN_WILCOXON_N:
            p_w = _wilcoxon(d)
    return Paired(n, seeds, tuple(float(x) for x in d), delta, delta_std, lo, hi, t_stat, p_t, p_w, test, note)
