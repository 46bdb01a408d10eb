"""Aggregate estimators (rliable-style) against values computed by hand on small inputs: IQM,
mean, median, optimality gap, stratified bootstrap intervals, probability of improvement with
ties, performance profiles and median ranks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from harness.report import aggregate as agg


# ----------------------------------------------------------------------------- point estimates
def test_iqm_of_eight_known_numbers() -> None:
    # sorted: 1 2 | 3 4 7 8 | 9 10 -> the middle four: (3 + 4 + 7 + 8) / 4
    tasks = [[10, 1, 7, 3], [9, 2, 8, 4]]
    assert agg.iqm(tasks) == pytest.approx(5.5, abs=1e-12)
    matrix = np.array(tasks, dtype=float).T  # runs x tasks, as rliable takes it
    assert agg.iqm(matrix) == pytest.approx(5.5, abs=1e-12)
    # 12 numbers: 3 cut from each end -> mean of 4..9; 10 numbers: int(2.5) = 2 cut -> mean of 3..8
    assert agg.iqm([list(range(1, 7)), list(range(7, 13))]) == pytest.approx(6.5, abs=1e-12)
    assert agg.iqm([list(range(1, 11))]) == pytest.approx(5.5, abs=1e-12)
    # outliers do not move it, unlike the mean
    assert agg.iqm([[1, 2, 3, 4, 5, 6, 7, 1000]]) == pytest.approx(4.5, abs=1e-12)


def test_mean_median_and_optimality_gap_weigh_tasks_equally() -> None:
    tasks = [[1.0, 0.5], [0.2], [0.9, 0.7, 0.8]]  # task means 0.75, 0.2, 0.8
    assert agg.mean(tasks) == pytest.approx((0.75 + 0.2 + 0.8) / 3, abs=1e-12)
    assert agg.median(tasks) == pytest.approx(0.75, abs=1e-12)
    assert agg.optimality_gap(tasks) == pytest.approx(1 - (0.75 + 0.2 + 0.8) / 3, abs=1e-12)
    # scores above gamma count as gamma: min(1.2, 1) = 1, so the gap is 1 - (1 + 0.8) / 2
    assert agg.optimality_gap([[1.2, 0.8]]) == pytest.approx(0.1, abs=1e-12)
    assert agg.optimality_gap([[0.5, 0.7]], gamma=0.6) == pytest.approx(0.6 - 0.55, abs=1e-12)
    # with the same runs on every task the mean is the mean of the matrix (rliable's)
    m = np.array([[0.1, 0.4], [0.3, 0.8], [0.2, 0.9]])
    assert agg.mean(m) == pytest.approx(m.mean(), abs=1e-12)
    assert agg.median(np.array([[1.0, 5.0, 3.0, 4.0]])) == pytest.approx(3.5, abs=1e-12)


def test_bad_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="task 1 has no run"):
        agg.iqm([[1.0], []])
    with pytest.raises(ValueError, match="task 0 has a non-finite score"):
        agg.mean([[float("nan"), 1.0]])
    with pytest.raises(ValueError, match="no task"):
        agg.mean([])
    with pytest.raises(ValueError, match="reps"):
        agg.interval_estimates([[1.0]], reps=0)
    with pytest.raises(ValueError, match="unknown aggregate"):
        agg.interval_estimates([[1.0]], aggregates=("max",))


# ----------------------------------------------------------------------------- stratified bootstrap
def test_one_run_per_task_gives_zero_width_intervals() -> None:
    res = agg.interval_estimates([[0.3], [0.9], [0.6], [0.1]], reps=500)
    for name in agg.AGGREGATES:
        iv = res[name]
        assert iv.low == iv.point == iv.high, name
    assert res["mean"].point == pytest.approx(0.475, abs=1e-12)
    assert res["iqm"].point == pytest.approx(0.45, abs=1e-12)  # 0.1 | 0.3 0.6 | 0.9


def test_stratification_never_mixes_tasks() -> None:
    """A task of all 1s and a task of all 0s: every stratified replicate keeps three 1s and two
    0s, so mean, median and IQM never move (resampling across tasks would spread them)."""
    scores = [[1.0, 1.0, 1.0], [0.0, 0.0]]
    batch = agg.stratified_resamples(scores, 300, np.random.default_rng(0))
    assert batch[0].shape == (300, 3) and batch[1].shape == (300, 2)
    assert np.all(batch[0] == 1.0) and np.all(batch[1] == 0.0)
    res = agg.interval_estimates(scores, reps=300)
    assert (res["mean"].low, res["mean"].point, res["mean"].high) == (0.5, 0.5, 0.5)
    assert (res["median"].low, res["median"].high) == (0.5, 0.5)
    iqm = 2 / 3  # trim_mean([1, 1, 1, 0, 0], 0.25): one cut each end -> [0, 1, 1]
    assert res["iqm"].low == pytest.approx(iqm) and res["iqm"].high == pytest.approx(iqm)


def test_bootstrap_of_two_runs_by_hand() -> None:
    """One task with runs (0, 1): a replicate's mean is 0, ½ or 1 with probabilities ¼, ½, ¼, so
    the 95% percentile interval is [0, 1]; the draws follow those probabilities."""
    batch = agg.stratified_resamples([[0.0, 1.0]], 4000, np.random.default_rng(0))
    means = batch[0].mean(axis=1)
    assert set(np.unique(means)) == {0.0, 0.5, 1.0}
    for value, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert np.mean(means == value) == pytest.approx(p, abs=0.03)
    iv = agg.interval_estimates([[0.0, 1.0]], ("mean",), reps=4000)["mean"]
    assert (iv.point, iv.low, iv.high) == (0.5, 0.0, 1.0)


def test_intervals_are_seeded_and_contain_the_point() -> None:
    rng = np.random.default_rng(5)
    scores = [rng.normal(0.8, 0.05, 5) for _ in range(4)]
    a = agg.interval_estimates(scores, reps=400, seed=3)
    assert a == agg.interval_estimates(scores, reps=400, seed=3)
    assert a != agg.interval_estimates(scores, reps=400, seed=4)
    for iv in a.values():
        assert iv.low <= iv.point <= iv.high and iv.low < iv.high


# ----------------------------------------------------------------------------- probability of improvement
def test_probability_of_improvement_with_ties() -> None:
    # x = 1: beats none; x = 2: ties 2 and 2 (½ each), loses to 4; x = 3: beats 2 and 2 -> (0 + 1 + 2) / 9
    x, y = [1.0, 2.0, 3.0], [2.0, 2.0, 4.0]
    assert agg.probability_of_improvement([x], [y]) == pytest.approx(3 / 9, abs=1e-12)
    u = sps.mannwhitneyu(x, y).statistic  # U of x: pairs x > y plus half the ties
    assert agg.probability_of_improvement([x], [y]) == pytest.approx(u / 9, abs=1e-12)
    assert agg.probability_of_improvement([y], [x]) == pytest.approx(6 / 9, abs=1e-12)
    # averaged over tasks, each task weighing the same whatever its runs: (1/3 + 1) / 2
    assert agg.probability_of_improvement([x, [5.0]], [y, [4.0, 4.5]]) == pytest.approx((1 / 3 + 1) / 2, abs=1e-12)
    assert agg.probability_of_improvement([[0.7, 0.7]], [[0.7]]) == 0.5
    with pytest.raises(ValueError, match="same tasks"):
        agg.probability_of_improvement([x], [y, y])


def test_probability_of_improvement_interval() -> None:
    one = agg.poi_interval([[0.9], [0.1]], [[0.5], [0.5]], reps=200)
    assert (one.point, one.low, one.high) == (0.5, 0.5, 0.5)  # one run each: nothing to resample
    always = agg.poi_interval([[0.9, 0.95, 0.92]], [[0.1, 0.2]], reps=200)
    assert (always.point, always.low, always.high) == (1.0, 1.0, 1.0)
    iv = agg.poi_interval([[1.0, 2.0, 3.0]], [[2.0, 2.0, 4.0]], reps=2000)
    assert 0.0 <= iv.low <= iv.point <= iv.high <= 1.0 and iv.low < iv.high
    assert iv == agg.poi_interval([[1.0, 2.0, 3.0]], [[2.0, 2.0, 4.0]], reps=2000)


# ----------------------------------------------------------------------------- performance profiles
def test_performance_profile_by_hand() -> None:
    taus = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8]
    # scores 0.1, 0.5 | 0.3, 0.7: strictly above τ (0.5 is not above 0.5)
    prof = agg.performance_profile([[0.1, 0.5], [0.3, 0.7]], taus)
    np.testing.assert_allclose(prof, [1.0, 0.75, 0.5, 0.25, 0.25, 0.0], atol=1e-12)
    # runs differ: mean over tasks of each task's fraction (2/3 and 0 at τ = 0.4)
    assert agg.performance_profile([[0.1, 0.5, 0.9], [0.3]], [0.4])[0] == pytest.approx(1 / 3, abs=1e-12)
    f, lo, hi = agg.profile_bands([[0.1, 0.5], [0.3, 0.7]], taus, reps=500)
    np.testing.assert_array_equal(f, prof)
    assert np.all(lo <= f) and np.all(f <= hi) and lo[0] == hi[0] == 1.0 and lo[-1] == hi[-1] == 0.0
    f1, lo1, hi1 = agg.profile_bands([[0.1], [0.7]], taus, reps=100)  # one run per task: no band
    np.testing.assert_array_equal(lo1, f1)
    np.testing.assert_array_equal(hi1, f1)


def test_tau_grid_spans_every_score() -> None:
    grid = agg.tau_grid([[[0.5, 1.0]], [[0.0], [0.75]]], n=11)
    assert len(grid) == 11 and grid[0] == pytest.approx(-0.02) and grid[-1] == pytest.approx(1.02)
    flat = agg.tau_grid([[[0.4, 0.4]]], n=3)
    np.testing.assert_allclose(flat, [0.39, 0.40, 0.41])


# ----------------------------------------------------------------------------- ranks
def test_median_ranks_with_ties() -> None:
    # task 1: b (2) > a (1) > c (0); task 2: c (3) > a = b (2, ranks 2 and 3 -> 2.5 each)
    ranks = agg.median_ranks({"a": [1.0, 2.0], "b": [2.0, 2.0], "c": [0.0, 3.0]})
    assert ranks == {"a": 2.25, "b": 1.75, "c": 2.0}
    assert agg.median_ranks({"a": [0.9, 0.8, 0.1], "b": [0.5, 0.9, 0.2]}) == {"a": 2.0, "b": 1.0}
    assert agg.median_ranks({}) == {}
