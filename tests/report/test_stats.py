"""Statistics over seeds, against closed forms (t distribution with 2 df, exact Wilcoxon), scipy on
the same pairs, and Holm–Bonferroni computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from harness.report import stats


def p_two_sided_df2(t: float) -> float:
    """Student t with 2 degrees of freedom: P(|T| >= |t|) = 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


#: the 0.975 quantile of Student t with 2 df: (2q − 1) / sqrt(2q(1 − q)) at q = 0.975
T975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)


def test_summarize_uses_sample_std_and_skips_nan() -> None:
    s = stats.summarize([0.90, float("nan"), 0.92, 0.94])
    assert (s.mean, s.n) == (pytest.approx(0.92), 3)
    assert s.std == pytest.approx(0.02)
    one = stats.summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and one.n == 1
    none = stats.summarize([])
    assert none.n == 0 and math.isnan(none.mean)


def test_paired_t_test_and_t_interval_match_closed_forms() -> None:
    full = {0: 0.90, 1: 0.92, 2: 0.94}
    p = stats.paired_delta(full, {0: 0.88, 1: 0.91, 2: 0.91})  # differences -0.02, -0.01, -0.03
    assert p.n == 3 and p.seeds == (0, 1, 2)
    assert p.delta == pytest.approx(-0.02) and p.delta_std == pytest.approx(0.01)
    assert p.t_stat == pytest.approx(-2 * math.sqrt(3))
    assert p.p_ttest == pytest.approx(p_two_sided_df2(-2 * math.sqrt(3)))
    assert p.p_ttest == pytest.approx(1 - math.sqrt(6 / 7))
    # t-interval: -0.02 ± 4.3027 * 0.01 / sqrt(3) = [-0.044841, +0.004841]; it crosses 0, where the
    # percentile bootstrap of three values could only give their range [-0.03, -0.01]
    half = T975_DF2 * 0.01 / math.sqrt(3)
    assert half == pytest.approx(0.0248413771)
    assert (p.ci_low, p.ci_high) == (pytest.approx(-0.02 - half, abs=1e-12), pytest.approx(-0.02 + half, abs=1e-12))
    assert p.ci_method == "t"
    assert math.isnan(p.p_wilcoxon) and p.test == "paired t-test"


def test_differences_pair_seeds_not_ranks() -> None:
    """Seed order and value order disagree: pairing by sorted value would give other numbers."""
    full = {2: 0.95, 0: 0.93, 1: 0.90}
    var = {1: 0.92, 2: 0.91, 0: 0.90}
    p = stats.paired_delta(full, var)
    assert p.seeds == (0, 1, 2)
    assert p.diffs == pytest.approx((-0.03, +0.02, -0.04))
    assert p.delta == pytest.approx(-0.05 / 3)
    assert p.delta_std == pytest.approx(math.sqrt(31 / 3) * 0.01)  # pp: SS = 29 - 3 (5/3)^2 = 62/3, var = 31/3
    ref = sps.ttest_rel([0.90, 0.92, 0.91], [0.93, 0.90, 0.95])  # by seed
    assert (p.t_stat, p.p_ttest) == (pytest.approx(float(ref.statistic)), pytest.approx(float(ref.pvalue)))
    assert p.t_stat == pytest.approx(-0.8980265101)
    by_rank = sps.ttest_rel([0.90, 0.91, 0.92], [0.90, 0.93, 0.95])
    assert abs(float(by_rank.pvalue) - p.p_ttest) > 0.2  # 0.199 vs 0.464: a rank pairing cannot pass
    lo, hi = sps.t.interval(0.95, 2, loc=-0.05 / 3, scale=math.sqrt(31 / 3) * 0.01 / math.sqrt(3))
    assert (p.ci_low, p.ci_high) == (pytest.approx(lo), pytest.approx(hi))


def test_only_matching_seeds_are_paired_and_small_n_gets_no_test() -> None:
    p = stats.paired_delta({0: 0.9, 1: 0.92, 2: 0.94}, {0: 0.91, 1: 0.93, 5: 0.5})
    assert p.seeds == (0, 1) and p.delta == pytest.approx(0.01)
    assert math.isnan(p.p_ttest) and math.isnan(p.ci_low) and p.ci_method == ""
    assert p.test == "none" and "n too small" in p.note
    assert stats.paired_delta({0: 0.9}, {1: 0.9}).note == "no seed finished in both"


def test_constant_differences_have_a_point_interval_but_no_t_test() -> None:
    p = stats.paired_delta({0: 0.90, 1: 0.92, 2: 0.94}, {0: 0.92, 1: 0.94, 2: 0.96})
    assert p.delta == pytest.approx(0.02)
    assert math.isnan(p.p_ttest) and p.note == stats.CONSTANT_NOTE
    assert (p.ci_low, p.ci_high) == (pytest.approx(0.02), pytest.approx(0.02))


def test_wilcoxon_from_six_pairs_by_seed() -> None:
    """Differences -2, +1, -3, -5, -4, -6 (pp): the one positive has rank 1, so W+ = 1 and the exact
    two-sided p is 2 * P(W+ <= 1) = 2 * 2/64 = 1/16 (all six negative, as a rank pairing of
    these values gives, would be 1/32)."""
    full = dict(enumerate([0.84, 0.80, 0.83, 0.81, 0.85, 0.82]))
    diff = [-0.02, +0.01, -0.03, -0.05, -0.04, -0.06]
    var = {s: full[s] + diff[s] for s in full}
    p = stats.paired_delta(full, var)
    assert p.p_wilcoxon == pytest.approx(1 / 16)
    assert p.t_stat == pytest.approx(-19 / math.sqrt(37))  # mean -19/6, sd sqrt(37/6) (pp)
    assert p.test == "paired t-test + Wilcoxon signed-rank"
    five = stats.paired_delta({s: full[s] for s in range(5)}, {s: var[s] for s in range(5)})
    assert math.isnan(five.p_wilcoxon) and not math.isnan(five.p_ttest)


def test_interval_method_switches_to_bootstrap_at_30_pairs() -> None:
    rng = np.random.default_rng(3)
    d = rng.normal(0.01, 0.02, 30)
    full = {s: 0.9 for s in range(30)}
    p = stats.paired_delta(full, {s: 0.9 + d[s] for s in range(30)})
    assert p.ci_method == "bootstrap" and stats.ci_method(29) == "t" and stats.ci_method(2) == ""
    ref = sps.bootstrap((np.array(p.diffs),), np.mean, n_resamples=10_000, confidence_level=0.95, method="BCa",
                        random_state=0).confidence_interval
    assert (p.ci_low, p.ci_high) == (pytest.approx(ref.low), pytest.approx(ref.high))
    again = stats.paired_delta(full, {s: 0.9 + d[s] for s in range(30)})
    assert (again.ci_low, again.ci_high) == (p.ci_low, p.ci_high)  # seeded
    t_lo, t_hi = sps.t.interval(0.95, 29, loc=np.mean(p.diffs), scale=sps.sem(p.diffs))
    assert (p.ci_low, p.ci_high) != (pytest.approx(t_lo), pytest.approx(t_hi))


def test_holm_by_hand() -> None:
    # sorted: 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    # 0.02, 0.03, 0.06, 0.06, back in the input order
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = stats.holm([0.2, float("nan"), 0.5])  # m = 2: 0.4 and max(0.4, 0.5)
    assert out[0] == pytest.approx(0.4) and math.isnan(out[1]) and out[2] == pytest.approx(0.5)
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert stats.holm([0.03]) == [0.03] and stats.holm([]) == []
