"""Statistics over seeds, against closed forms (t distribution with 2 df, exact Wilcoxon)."""

from __future__ import annotations

import math

import pytest

from harness.report import stats


def p_two_sided_df2(t: float) -> float:
    """Student t with 2 degrees of freedom: P(|T| >= |t|) = 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_summarize_uses_sample_std_and_skips_nan() -> None:
    s = stats.summarize([0.90, float("nan"), 0.92, 0.94])
    assert (s.mean, s.n) == (pytest.approx(0.92), 3)
    assert s.std == pytest.approx(0.02)
    one = stats.summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and one.n == 1
    none = stats.summarize([])
    assert none.n == 0 and math.isnan(none.mean)


def test_paired_t_test_matches_closed_form() -> None:
    full = {0: 0.90, 1: 0.92, 2: 0.94}
    p = stats.paired_delta(full, {0: 0.88, 1: 0.91, 2: 0.91})  # differences -0.02, -0.01, -0.03
    assert p.n == 3 and p.seeds == (0, 1, 2)
    assert p.delta == pytest.approx(-0.02) and p.delta_std == pytest.approx(0.01)
    assert p.t_stat == pytest.approx(-2 * math.sqrt(3))
    assert p.p_ttest == pytest.approx(p_two_sided_df2(-2 * math.sqrt(3)))
    assert p.p_ttest == pytest.approx(1 - math.sqrt(6 / 7))
    # each extreme resample (all three draws equal) has probability 1/27 > 2.5%: the percentile
    # interval is exactly the range of the differences
    assert (p.ci_low, p.ci_high) == (pytest.approx(-0.03), pytest.approx(-0.01))
    assert math.isnan(p.p_wilcoxon) and p.test == "paired t-test"


def test_only_matching_seeds_are_paired_and_small_n_gets_no_test() -> None:
    p = stats.paired_delta({0: 0.9, 1: 0.92, 2: 0.94}, {0: 0.91, 1: 0.93, 5: 0.5})
    assert p.seeds == (0, 1) and p.delta == pytest.approx(0.01)
    assert math.isnan(p.p_ttest) and math.isnan(p.ci_low)
    assert p.test == "none" and "n too small" in p.note
    assert stats.paired_delta({0: 0.9}, {1: 0.9}).note == "no seed finished in both"


def test_constant_differences_have_an_interval_but_no_t_test() -> None:
    p = stats.paired_delta({0: 0.90, 1: 0.92, 2: 0.94}, {0: 0.92, 1: 0.94, 2: 0.96})
    assert p.delta == pytest.approx(0.02)
    assert math.isnan(p.p_ttest) and p.note == stats.CONSTANT_NOTE
    assert (p.ci_low, p.ci_high) == (pytest.approx(0.02), pytest.approx(0.02))


def test_wilcoxon_from_six_pairs() -> None:
    full = {s: 0.80 + 0.01 * s for s in range(6)}
    var = {s: full[s] - 0.01 * (s + 1) for s in range(6)}
    p = stats.paired_delta(full, var)
    assert p.p_wilcoxon == pytest.approx(2 / 2**6)  # exact: all six differences negative
    assert p.test == "paired t-test + Wilcoxon signed-rank"
    five = stats.paired_delta({s: full[s] for s in range(5)}, {s: var[s] for s in range(5)})
    assert math.isnan(five.p_wilcoxon) and not math.isnan(five.p_ttest)


def test_bootstrap_is_deterministic() -> None:
    full = {s: 0.9 for s in range(4)}
    var = {0: 0.91, 1: 0.87, 2: 0.93, 3: 0.88}
    a, b = stats.paired_delta(full, var), stats.paired_delta(full, var)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert min(a.diffs) <= a.ci_low <= a.delta <= a.ci_high <= max(a.diffs)
