"""Conclusive or not (:mod:`harness.report.verdicts`): the verdict rule, pairwise verdicts on
constructed score tables (clearly ahead, clearly behind, overlapping), their antisymmetry and rank
ranges, the tasks needed against known answers, the ablation leaderboard, duplicate tasks by
content; then the leaderboard built from a small real MLflow store with a duplicate study."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.report import aggregate as agg
from harness.report import leaderboard as lb
from harness.report import verdicts as vd
from tests.report import store
from tests.report.conftest import _store_dir

REPS = 1000  # bootstrap replicates of the constructed pairs (the leaderboard's default is 2000)


# ----------------------------------------------------------------------------- the rule
def test_the_verdict_rule() -> None:
    assert vd.verdict(0.6, 0.9) == "ahead"
    assert vd.verdict(0.1, 0.4) == "behind"
    assert vd.verdict(0.4, 0.6) == "inconclusive"
    assert vd.verdict(0.5, 0.9) == "inconclusive" and vd.verdict(0.1, 0.5) == "inconclusive"  # 0.5 in the interval
    assert vd.verdict(1.0, 1.0) == "ahead" and vd.verdict(0.0, 0.0) == "behind"
    assert vd.component_verdict(0.01, 0.03) == "helps" and vd.component_verdict(-0.03, -0.01) == "hurts"
    assert vd.component_verdict(-0.01, 0.02) == "inconclusive"
    assert vd.say("inconclusive") == "inconclusive at 95%" and vd.say("ahead") == "ahead"
    for bad in ((float("nan"), 0.6), (0.7, 0.6)):
        with pytest.raises(ValueError):
            vd.verdict(*bad)
    with pytest.raises(ValueError):
        vd.verdict(0.1, 0.2, level=1.0)


# ----------------------------------------------------------------------------- constructed score tables
def _tables() -> dict[str, list[np.ndarray]]:
    """Six tasks, three seeds each. ``base``: 0.79, 0.80, 0.81 plus 0.02 per task; ``plus``: base +
    0.10 on every seed of every task (clearly ahead); ``minus``: base − 0.10 (clearly behind);
    ``mixed``: base + 0.005 on four tasks and − 0.005 on two (overlapping: per task P(mixed >
    base) is 6/9 or 3/9, 0.556 on average); ``twin``: base itself (P = 0.5 exactly: no difference)."""
    base = [0.80 + 0.02 * t + np.array([-0.01, 0.0, 0.01]) for t in range(6)]
    sign = [1, 1, -1, 1, 1, -1]
    return {"plus": [b + 0.10 for b in base], "base": base, "mixed": [b + 0.005 * s for b, s in zip(base, sign)],
            "twin": [b.copy() for b in base], "minus": [b - 0.10 for b in base]}


@pytest.fixture(scope="module")
def pairs() -> pd.DataFrame:
    return vd.pairwise(_tables(), reps=REPS, seed=0)


def _pair(pairs: pd.DataFrame, x: str, y: str) -> pd.Series:
    return pairs[(pairs["x"] == x) & (pairs["y"] == y)].iloc[0]


def test_clearly_ahead_and_clearly_behind(pairs: pd.DataFrame) -> None:
    plus = _pair(pairs, "plus", "base")  # every seed of plus beats every seed of base on every task
    assert (plus["poi"], plus["poi_low"], plus["poi_high"], plus["verdict"]) == (1.0, 1.0, 1.0, "ahead")
    minus = _pair(pairs, "minus", "base")
    assert (minus["poi"], minus["poi_low"], minus["poi_high"], minus["verdict"]) == (0.0, 0.0, 0.0, "behind")
    assert _pair(pairs, "plus", "minus")["verdict"] == "ahead"
    assert pd.isna(plus["tasks_needed"])  # only an inconclusive pair has a tasks-needed estimate


def test_overlapping_is_inconclusive_with_the_tasks_needed(pairs: pd.DataFrame) -> None:
    mixed = _pair(pairs, "mixed", "base")
    assert mixed["verdict"] == "inconclusive"
    assert mixed["poi_low"] < 0.5 < mixed["poi_high"]
    assert mixed["poi"] == pytest.approx((4 * 6 / 9 + 2 * 3 / 9) / 6)
    assert bool(mixed["needed_resolvable"]) and not bool(mixed["needed_capped"]) and mixed["tasks_needed"] > 6
    # computed once for the pair, base before mixed (the order of the rows), mirrored
    direct = vd.tasks_needed(_tables()["base"], _tables()["mixed"])
    assert mixed["tasks_needed"] == direct.n and mixed["needed_power"] == direct.power >= 0.8
    # from the other side (other bootstrap draws): the same answer, up to the simulation's noise; and near the
    # normal approximation: per task P = 6/9 or 3/9, within-task bootstrap variance of a 3 x 3 Mann-Whitney
    mirror = vd.tasks_needed(_tables()["mixed"], _tables()["base"])
    assert mirror.n == pytest.approx(direct.n, rel=0.15)
    per = [agg.probability_of_improvement([m], [b]) for m, b in zip(_tables()["mixed"], _tables()["base"])]
    within = vd.poi_replicates(_tables()["mixed"], _tables()["base"]).var(axis=1)
    assert direct.n == pytest.approx(vd.normal_tasks_needed(per, within, 0.5), rel=0.25)
    # the same numbers as the estimator itself (seeded)
    iv = agg.poi_interval(_tables()["plus"], _tables()["mixed"], reps=REPS, seed=0)
    p = _pair(pairs, "plus", "mixed")
    assert (p["poi"], p["poi_low"], p["poi_high"]) == (iv.point, iv.low, iv.high)
    twin = _pair(pairs, "twin", "base")  # every pair of seeds tied: P = 0.5, nothing to resolve
    assert (twin["poi"], twin["verdict"], bool(twin["needed_resolvable"])) == (0.5, "inconclusive", False)
    assert pd.isna(twin["tasks_needed"])


def test_the_pairwise_table_is_antisymmetric(pairs: pd.DataFrame) -> None:
    rows = list(_tables())
    assert len(pairs) == len(rows) * (len(rows) - 1)
    mirror = {"ahead": "behind", "behind": "ahead", "inconclusive": "inconclusive"}
    for _, p in pairs.iterrows():
        q = _pair(pairs, p["y"], p["x"])
        assert q["verdict"] == mirror[p["verdict"]]
        assert q["poi"] == pytest.approx(1 - p["poi"], abs=1e-12)
        assert (q["poi_low"], q["poi_high"]) == (pytest.approx(1 - p["poi_high"]), pytest.approx(1 - p["poi_low"]))
        assert q["tasks_needed"] == p["tasks_needed"] or (pd.isna(q["tasks_needed"]) and pd.isna(p["tasks_needed"]))


def test_ranks_are_ranges_where_the_verdicts_do_not_order(pairs: pd.DataFrame) -> None:
    ranges = vd.rank_ranges(pairs, list(_tables()))
    assert ranges == {"plus": (1, 1), "base": (2, 4), "mixed": (2, 4), "twin": (2, 4), "minus": (5, 5)}
    assert [vd.rank_text(*ranges[r]) for r in ("plus", "base", "minus")] == ["1", "2–4", "5"]
    assert vd.rank_ranges(pairs, ["plus", "minus"]) == {"plus": (1, 1), "minus": (2, 2)}  # among the rows given
    assert vd.rank_text(float("nan"), float("nan")) == "–"


# ----------------------------------------------------------------------------- tasks needed
def _identical(m: int, k: int, tasks: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Identical tasks: X has m seeds, k of them above Y's one seed (P(X > Y) = k/m on every task)."""
    return [np.array([1.0] * k + [0.0] * (m - k))] * tasks, [np.array([0.5])] * tasks


def _exact(m: int, k: int, level: float = 0.95) -> int:
    """The known answer for identical tasks. Resampling Y's one seed changes nothing and each of X's
    m seeds is above it with probability q = k/m: a bootstrap replicate of one task's P(X > Y) is
    Bin(m, q)/m, and of the mean over n tasks (each resampled independently) Bin(m·n, q)/(m·n).
    Every simulated leaderboard draws the same task n times, so all of them resolve the pair, or
    none: n is the smallest with the (1 − level)/2 quantile of Bin(m·n, q)/(m·n) above 0.5.
    (The normal approximation of the same: q − z · sqrt(q(1 − q)/(m n)) > 0.5.)"""
    tail = (1 - level) / 2
    return next(n for n in range(1, 10_000) if stats.binom.ppf(tail, m * n, k / m) / (m * n) > 0.5)


@pytest.mark.parametrize(("m", "k"), [(10, 6), (20, 11), (10, 7)])
def test_tasks_needed_has_the_known_answer_of_identical_tasks(m: int, k: int) -> None:
    x, y = _identical(m, k)
    got = vd.tasks_needed(x, y)
    exact = _exact(m, k)  # 11, 21, 3
    assert got.resolvable and not got.capped and got.power >= 0.8
    assert abs(got.n - exact) <= max(1, round(0.1 * exact)), (got.n, exact)
    q = k / m  # and the normal approximation agrees with the exact answer to within a task or two
    assert vd.normal_tasks_needed([q], [q * (1 - q) / m], 0.5) == pytest.approx(exact, abs=2)


def test_tasks_needed_with_spread_between_tasks_follows_the_normal_approximation() -> None:
    """Tasks differ: half have P(X > Y) = 0.4 (4 of 10 seeds above), half 0.8: p̄ = 0.6, between-task
    σ_b = 0.2, within-task bootstrap variances q(1 − q)/10 (mean σ_w² = 0.02). Power 80% at 95%:
    n ≈ ((1.96 σ_w + 0.84 σ_b) / (p̄ − 0.5))² = ((1.96 · 0.1414 + 0.8416 · 0.2) / 0.1)² ≈ 19.8."""
    x = [np.array([1.0] * k + [0.0] * (10 - k)) for k in (4, 8)]
    y = [np.array([0.5])] * 2
    q = np.array([0.4, 0.8])
    approx = vd.normal_tasks_needed(q, q * (1 - q) / 10, 0.5)
    assert approx == pytest.approx(19.85, abs=0.01)
    got = vd.tasks_needed(x, y)
    assert got.n == pytest.approx(approx, rel=0.25)


def test_a_larger_effect_needs_fewer_tasks() -> None:
    needed = [vd.tasks_needed(*_identical(10, k)).n for k in (6, 7, 8)]
    assert needed[0] > needed[1] > needed[2] >= 1
    behind = vd.tasks_needed(*_identical(10, 4))  # the mirror image: X behind, as many tasks as 6 of 10 ahead
    assert behind.n == pytest.approx(needed[0], abs=2)


def test_no_difference_is_not_resolvable_and_a_cap_is_said() -> None:
    none = vd.tasks_needed(*_identical(10, 5))  # P(X > Y) = 0.5 exactly
    assert (none.n, none.resolvable, none.short()) == (None, False, "no difference")
    assert "not resolvable" in none.sentence(3)
    capped = vd.tasks_needed(*_identical(20, 11), cap=8)  # needs about 21
    assert (capped.n, capped.resolvable, capped.capped) == (None, True, True)
    assert capped.short() == "> 8 tasks" and "more than 8 tasks" in capped.sentence(3)
    found = vd.tasks_needed(*_identical(10, 6))
    assert found.short() == f"~{found.n} tasks"
    assert "at least 80% of 200 simulated leaderboards" in found.sentence(3)
    assert vd.tasks_needed(*_identical(10, 6)) == found  # seeded


# ----------------------------------------------------------------------------- ablations
def _ablation_scores() -> pd.DataFrame:
    """cka full and three ablations on four tasks, seeds 0-2 (the rows shuffled: pairing is by seed).
    ``-align``: 5 points below full on every seed (the component clearly helps); ``-intra``: 3
    points above (it hurts); ``-task``: ±1 point by seed, mean 0 over the tasks (noise). ``-inter``
    only on t0 and missing seed 2."""
    rng = np.random.default_rng(3)
    recs = []
    for t in range(4):
        full = 0.8 + 0.05 * t + rng.normal(0, 0.02, 3)
        noise = [0.01, -0.01, 0.005 * (-1) ** t]
        for seed in range(3):
            f = float(full[seed])
            recs += [(f"t{t}", seed, "cka", "full", f), (f"t{t}", seed, "cka", "-align", f - 0.05),
                     (f"t{t}", seed, "cka", "-intra", f + 0.03), (f"t{t}", seed, "cka", "-task", f - noise[seed])]
            if t == 0 and seed < 2:
                recs.append((f"t{t}", seed, "cka", "-inter", f - 0.01))
    df = pd.DataFrame(recs, columns=["task", "seed", "method", "variant", "score"])
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)


def test_the_ablation_leaderboard() -> None:
    scores = _ablation_scores()
    abl = vd.ablation_frame(scores, ["t0", "t1", "t2", "t3"], "cka", ["-intra", "-inter", "-align", "-task"],
                            reps=REPS)
    assert list(abl["variant"]) == ["-intra", "-inter", "-align", "-task"]
    by = abl.set_index("variant")
    align = by.loc["-align"]
    assert (align["verdict"], align["n_tasks"], align["n_pairs"]) == ("helps", 4, 12)
    assert align["delta"] == pytest.approx(0.05) and align["delta_low"] == pytest.approx(0.05)  # paired: no spread
    assert align["poi_low"] > 0.5 and pd.isna(align["tasks_needed"])
    intra = by.loc["-intra"]
    assert intra["verdict"] == "hurts" and intra["delta"] == pytest.approx(-0.03) and intra["poi_high"] < 0.5
    task = by.loc["-task"]
    assert task["verdict"] == "inconclusive" and task["delta_low"] < 0 < task["delta_high"]
    assert not bool(task["needed_resolvable"]) or bool(task["needed_capped"]) or task["tasks_needed"] >= 1
    inter = by.loc["-inter"]  # one task, the two seeds both ran
    assert (inter["n_tasks"], inter["tasks"], inter["n_pairs"]) == (1, "t0", 2)
    assert inter["delta"] == pytest.approx(0.01) and inter["verdict"] == "helps"
    assert vd.component_name("-intra-inter") == "intra+inter"


def test_an_inconclusive_component_gets_the_tasks_needed() -> None:
    """Δ of +1 point on two seeds and −1 on the third of every task: mean +1/3 point, inconclusive
    on three tasks; resolvable with more tasks like these."""
    recs = []
    for t in range(3):
        for seed, d in enumerate((0.01, 0.01, -0.01)):
            recs += [(f"t{t}", seed, "cka", "full", 0.8), (f"t{t}", seed, "cka", "-align", 0.8 - d)]
    scores = pd.DataFrame(recs, columns=["task", "seed", "method", "variant", "score"])
    row = vd.ablation_frame(scores, ["t0", "t1", "t2"], reps=REPS).iloc[0]
    assert row["verdict"] == "inconclusive" and row["delta"] == pytest.approx(0.01 / 3)
    assert bool(row["needed_resolvable"]) and not bool(row["needed_capped"]) and row["tasks_needed"] > 3
    direct = vd.tasks_needed_paired([np.array([0.01, 0.01, -0.01])] * 3)
    assert row["tasks_needed"] == direct.n


# ----------------------------------------------------------------------------- duplicates by content
def _params(tasks: str, name: str, seed: int, teacher_seeds: str = "shared", **extra: str) -> dict[str, str]:
    return {"study": "s", "dataset.name": "mnist5k", "dataset.root": "null", "dataset.val_fraction": "0.1",
            "dataset.download": "false", "split.name": name, "split.tasks": tasks,
            "teachers.0.arch": "cnn", "teachers.0.seed": str(seed if teacher_seeds == "per_seed" else 0),
            "teacher_seeds": teacher_seeds, "student.arch": "cnn", "train.epochs": "15", "train.lr": "0.001",
            "method": "kd", "variant": "full", "seed": str(seed), "params.T": "1.0", "results_version": "3",
            **extra}


def test_content_keys() -> None:
    ck = vd.content_keys
    a = ck([_params("[[0, 1], [2, 3]]", "2x5", s) for s in range(3)])
    same = ck([_params("[[0, 1], [2, 3]]", "renamed", s) | {"study": "other", "method": "cka",
                                                            "dataset.download": "true"} for s in (2, 0, 1)])
    assert len(a) == 1 and a == same  # name, study, method, seed and the download switch are no content
    other = ck([_params("[[0, 1, 2], [3]]", "2x5", s) for s in range(3)])
    recipe = ck([_params("[[0, 1], [2, 3]]", "2x5", s, **{"train.lr": "0.01"}) for s in range(3)])
    assert not (a & other) and not (a & recipe) and not (other & recipe)
    # per-seed teachers: their seed is the student's; seeds 0-2 and 3-4 of the same config are one task
    ps = [ck([_params("[[0]]", "x", s, "per_seed") for s in seeds]) for seeds in ((0, 1, 2), (3, 4))]
    assert ps[0] == ps[1] and not ps[0] & ck([_params("[[0]]", "x", s) for s in range(3)])
    # shared teachers of another seed are other teachers
    assert not ck([_params("[[0]]", "x", 0, **{"teachers.0.seed": "1"})]) & ck([_params("[[0]]", "x", 0)])
    assert ck([{"train.epochs": "3", "split.name": "a1"}, {}]) == frozenset()  # no data set or split logged
    assert vd.run_key({"dataset.name": "d", "split.tasks": float("nan")}) is None
    # a task partly logged by a harness with one more config field still shares a key with its twin
    mixed = ck([_params("[[0, 1], [2, 3]]", "2x5", 0), _params("[[0, 1], [2, 3]]", "2x5", 1, **{"train.new": "x"})])
    assert len(mixed) == 2 and mixed & a
    assert vd.duplicate_tasks([("a/x", a), ("b/y", other), ("c/z", mixed), ("d/w", None), ("e/v", frozenset()),
                               ("f/u", same), ("g/t", recipe)]) == {"c/z": "a/x", "f/u": "a/x"}


# ----------------------------------------------------------------------------- a real store
ONE = {  # split -> row -> per-seed last-epoch union accuracy
    "s1": {"scratch": [0.80, 0.80, 0.80], "kd": [0.60, 0.64, 0.68], "cka": [0.72, 0.76, 0.80],
           "cka:-align": [0.62, 0.66, 0.70], "cka:-task": [0.73, 0.75, 0.81]},
    "s2": {"scratch": [0.50, 0.50, 0.50], "kd": [0.35, 0.40, 0.45], "cka": [0.45, 0.46, 0.47],
           "cka:-align": [0.40, 0.41, 0.42], "cka:-task": [0.44, 0.47, 0.46]},
}
TWO = {  # r1 is one/s1 under another name (its seeds 0-2 logged other values: the first study's count)
    "r1": {"scratch": [0.10, 0.10, 0.10], "kd": [0.10, 0.10, 0.10, 0.70], "cka": [0.10, 0.10, 0.10],
           "kd:wide": [0.78, 0.79, 0.80]},
    "r2": {"scratch": [0.90, 0.90, 0.90], "kd": [0.80, 0.81, 0.82], "cka": [0.85, 0.86, 0.87]},
}
TASKS_OF = {"s1": "[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]", "r1": "[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]",
            "s2": "[[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]", "r2": "[[0, 1], [2, 3], [4, 5]]"}


def _log_seed(client, exp: str, study: str, split: str, method: str, variant: str, seed: int, acc: float) -> None:
    params = {**_params(TASKS_OF[split], split, seed), "method": method, "variant": variant, "study": study}
    store.log_run(client, exp, store.trial_tags(split, method, variant, seed, method == "scratch"),
                  {"test/union_acc": acc}, params=params)


def _log(folder: Path) -> str:
    return store.log_studies(folder, {"one": ONE, "two": TWO}, _log_seed)


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[lb.Leaderboard]:
    folder = _store_dir(tmp_path_factory)
    uri = _log(folder)
    yield lb.build_leaderboard(["one", "two"], uri, tmp_path_factory.mktemp("lb") / "board", reps=REPS)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_duplicate_task_is_counted_once_and_said(board: lb.Leaderboard) -> None:
    assert [t.label for t in board.tasks] == ["one/s1", "one/s2", "two/r2"]  # two/r2: other content, kept
    assert board.duplicates == {"two/r1": "one/s1"}
    s1 = board.tasks[0]
    assert (s1.also, s1.pooled) == (("two/r1",), 4)  # kd seed 3 and kd:wide's three seeds
    sc = board.scores[board.scores["task"] == "one/s1"]
    kd = sc[sc["row"] == "kd"].set_index("seed")["raw"]
    assert kd.to_dict() == {0: 0.60, 1: 0.64, 2: 0.68, 3: 0.70}  # seeds 0-2 from one/s1, never twice
    assert sorted(sc.loc[sc["row"] == "kd:wide", "raw"]) == [0.78, 0.79, 0.80]
    assert s1.scale == pytest.approx(0.80)  # the kept task's scratch, not r1's
    assert not (board.scores["task"] == "two/r1").any() and set(board.scores["study"]) == {"one", "two"}
    md = (board.out / "leaderboard.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("**Duplicate tasks**"))
    assert "`two/r1` is `one/s1` under a second name" in line and "runs added: 4 from `two/r1` into `one/s1`" in line
    assert "- `two` (experiment id 2): 22 finished trials, 1 task in the leaderboard" in md


def test_the_cli_says_the_duplicate_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    uri = _log(tmp_path)
    assert main(["leaderboard", "one", "two", "--tracking-uri", uri, "--out", str(tmp_path / "lb"),
                 "--reps", str(REPS), "--power", "0.5", "--max-tasks", "64"]) == 0
    err = [x for x in capsys.readouterr().err.splitlines() if "second name" in x]
    assert err == ["harness: note: two/r1 is one/s1 under a second name (same content): counted once, as one/s1"]
    with pytest.raises(SystemExit) as e:
        main(["leaderboard", "one", "--tracking-uri", uri, "--power", "1.5"])
    assert e.value.code == 2


def test_the_leaderboard_has_the_verdicts_and_the_ablations(board: lb.Leaderboard) -> None:
    md = (board.out / "leaderboard.md").read_text()
    assert "## Pairwise verdicts" in md and "| X \\ Y | scratch † | cka | kd |" in md
    pairs = pd.read_csv(board.out / "leaderboard_pairs.csv")
    assert len(pairs) == 6 and set(pairs["verdict"]) <= {"ahead", "behind", "inconclusive"}
    cka_kd = pairs[(pairs["x"] == "cka") & (pairs["y"] == "kd")].iloc[0]
    csv = pd.read_csv(board.out / "leaderboard.csv").set_index("row")
    assert cka_kd["poi"] == csv.loc["kd", "poi_cka"] and cka_kd["verdict"] == csv.loc["kd", "verdict_cka"]
    abl = pd.read_csv(board.out / "leaderboard_ablations.csv").set_index("variant")
    assert list(abl.index) == ["-align", "-task"]  # the preferred component order: intra, inter, align, task
    assert abl.loc["-align", "verdict"] == "helps" and abl.loc["-align", "n_tasks"] == 2
    assert abl.loc["-task", "verdict"] == "inconclusive"
    assert "## Ablations of `cka` over tasks" in md and "| `align` (`cka-align`) | 2/3 | 6 |" in md
    assert "component **helps**" in md and "inconclusive at 95%" in md
    assert "| kd:wide | 1/3 tasks ‡ |" in md  # only on the merged task: marked, no aggregate
