"""Conclusive or not, said plainly: verdicts, tasks needed, the ablation leaderboard and duplicate
tasks, for :mod:`.leaderboard`. Pure numpy/pandas/scipy (no torch, no MLflow): every function
takes plain arrays and frames.

**Verdict** of a pair (X, Y) of leaderboard rows, from the probability of improvement
``P(X > Y)`` (:func:`harness.report.aggregate.probability_of_improvement`: per task the
Mann–Whitney U of X's and Y's seeds over ``n_x · n_y``, ties ½, averaged over tasks) and its
stratified bootstrap percentile interval ``[lo, hi]`` at level ``1 − α`` (seeds resampled within
each task, :func:`harness.report.aggregate.poi_interval`)::

    ahead         if lo > 0.5
    behind        if hi < 0.5
    inconclusive  otherwise (the interval holds 0.5)

The pairs are computed once per unordered pair and mirrored: ``P(Y > X) = 1 − P(X > Y)`` with the
interval ``[1 − hi, 1 − lo]`` (the percentiles of ``1 − v`` are ``1 −`` those of ``v``), so X is
*ahead* of Y exactly when Y is *behind* X.

The interval (``rliable``'s stratified bootstrap) resamples seeds within each task: it measures the
seed noise of these tasks, not the choice of tasks; the tasks needed, which draws tasks, carry both.

**Ranks** are never bare where intervals overlap: a row's rank is the range the verdicts allow,
``[1 + #rows ahead of it, K − #rows it is ahead of]`` among the K rows with every task (one number
when the two meet, e.g. ``1`` or ``2–4``).

**Tasks needed** (:func:`tasks_needed`) for an inconclusive pair: how many tasks *like the
observed ones* would resolve the observed difference, by resampling. For n tasks, each of
``draws`` simulated leaderboards draws n tasks with replacement from the observed ones (with their
seeds, paired as observed) and recomputes the interval of the statistic by the same stratified
bootstrap; the pair is resolved in that leaderboard when the interval excludes the null (0.5 for
``P(X > Y)``, 0 for a paired difference) on the side of the observed difference. The answer is the
smallest n (1 ≤ n ≤ ``cap``) at which a fraction ``≥ power`` (default 80%) of the simulated
leaderboards resolve it, found by doubling n and then bisecting (to within 5% of n, and exactly
below 40 tasks; the simulation reuses one seeded generator per n, and the search assumes the power
grows with n). ``None`` with ``resolvable=False`` when the observed statistic equals the null (no
difference to resolve); ``capped=True`` when even ``cap`` tasks do not reach the power.

Cost: the interval of a simulated leaderboard of n tasks has ``inner`` (400) bootstrap
replicates, each the mean over the drawn tasks of one replicate of each task's own statistic,
picked at random from ``reps`` (2000) per-task replicates computed once and centred on the task's
statistic (:func:`poi_replicates`, :func:`mean_replicates`): a stratified bootstrap replicate of a
mean over tasks is the mean over tasks of independent per-task replicates. The answer is an
estimate: another seed moves it by about a tenth. Its expectation, for
``m`` tasks with per-task statistics ``p_t``, within-task bootstrap variances ``w_t`` (mean
``σ_w²``) and between-task variance ``σ_b²`` around the mean ``p̄``, is the normal approximation::

    n ≈ ((z_(1−α/2) · σ_w + z_power · σ_b) / |p̄ − null|)²

(the interval of n tasks is ``p̄* ± z σ_w / √n`` and ``p̄*`` varies by ``σ_b / √n`` between
simulated leaderboards). The tests check the resampled answer against it and against an exact
binomial answer.

**Ablation leaderboard** (:func:`ablation_frame`): per task and ablation ``-c`` of a method, the
paired difference ``Δ = full − ablated`` of each seed finished in both (normalised scores), its
mean over seeds; aggregated over the tasks that ran the ablation: the mean over tasks with a
stratified bootstrap interval (the paired differences resampled within each task), and
``P(full > ablated)`` over the same seeds with its interval. Verdict from Δ's interval: the
component *helps* (``lo > 0``: removing it costs), *hurts* (``hi < 0``) or is *inconclusive*
(with the tasks needed, as above on the paired differences).

**Duplicate tasks** (:func:`run_key`, :func:`content_keys`, :func:`duplicate_tasks`): a trial
run's content key is the SHA-256 of the configuration it logged for the data set (``dataset.*`` but
its loading switches ``download`` and ``stream``), the split (``split.*`` but its ``name``), the
teachers (``teachers.*``, ``teacher_seeds``; a teacher's ``seed`` left out under ``teacher_seeds:
per_seed``, where it is the student's seed), the student (``student.*``) and the training recipe
(``train.*``); a task's keys are those of its runs (normally one). Two tasks that share a key are
the same task under two names (a run of one has exactly the content of a run of the other; comparing
run by run keeps two tasks comparable when one was partly logged by a harness version with one more
config field). The first one (studies in the order given, splits in study order) is kept, and the
other is folded into
it **by seed**: a (row, seed) the kept task has is taken from it, a (row, seed) only the other has
is added (a row only the other has comes with it). Why not pool every run: a seed of the same
content is the same trial, and counting it twice would narrow the intervals for no reason; why not
drop the duplicate: its other rows and seeds are real evidence about the same task. A task whose
runs logged no data-set and split config has no key and is never merged.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from harness.report import aggregate as agg

LEVEL = agg.CONFIDENCE
POWER = 0.8
CAP = 1000
DRAWS = 200  # simulated leaderboards per n
NEEDED_REPS = 400  # bootstrap replicates of each simulated leaderboard's interval (tasks_needed)
AHEAD, BEHIND, INCONCLUSIVE = "ahead", "behind", "inconclusive"
HELPS, HURTS = "helps", "hurts"
_CHUNK = 2_000_000  # array elements per step of the simulation


def verdict(lo: float, hi: float, level: float = LEVEL, null: float = 0.5) -> str:
    """``'ahead'`` if ``lo > null``, ``'behind'`` if ``hi < null``, else ``'inconclusive'``.

    ``[lo, hi]``: the ``level`` interval of ``P(X > Y)`` (``null`` 0.5; for a difference, 0);
    ``level`` does not change the rule, it is the level the words are said at (:func:`say`)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError("an interval with NaN has no verdict")
    if lo > hi:
        raise ValueError(f"not an interval: [{lo}, {hi}]")
    if lo > null:
        return AHEAD
    if hi < null:
        return BEHIND
    return INCONCLUSIVE


def component_verdict(lo: float, hi: float, level: float = LEVEL) -> str:
    """Of an ablated component, from the interval of ``Δ = full − ablated``: ``'helps'`` when it
    lies above 0, ``'hurts'`` below 0, else ``'inconclusive'``."""
    return {AHEAD: HELPS, BEHIND: HURTS}.get(verdict(lo, hi, level, null=0.0), INCONCLUSIVE)


def say(word: str, level: float = LEVEL) -> str:
    """``inconclusive at 95%``; the other words as they are."""
    return f"{word} at {level:.0%}" if word == INCONCLUSIVE else word


# ----------------------------------------------------------------------------- tasks needed
@dataclass(frozen=True)
class Needed:
    """How many tasks would resolve a difference (see the module docstring).

    ``n``: the smallest number found (None when not resolvable or above ``cap``); ``power`` the
    fraction of simulated leaderboards that resolve it at ``n`` (at ``cap`` when capped)."""

    n: int | None
    resolvable: bool
    capped: bool
    power: float
    target: float = POWER
    cap: int = CAP
    draws: int = DRAWS
    null: float = 0.5
    level: float = LEVEL

    def short(self) -> str:
        """``~40 tasks``, ``> 1000 tasks``, ``no difference``."""
        if not self.resolvable:
            return "no difference"
        return f"> {self.cap} tasks" if self.capped else f"~{self.n} task{'s' * (self.n != 1)}"

    def sentence(self, observed: int) -> str:
        """What a report line says after the verdict."""
        if not self.resolvable:
            return f"not resolvable: the observed value is exactly {self.null:g} (no difference to resolve)"
        how = (f"the {self.level:.0%} interval excludes {self.null:g} on the observed side in at least {self.target:.0%} of "
               f"{self.draws} simulated leaderboards, tasks drawn with replacement from the {observed} observed")
        if self.capped:
            return f"more than {self.cap} tasks like these would be needed ({how}: {self.power:.0%} at {self.cap})"
        return f"about {self.n} task{'s' * (self.n != 1)} like these would resolve it ({how})"


def _centred(replicates: np.ndarray, points: Sequence[float]) -> np.ndarray:
    """Each task's replicates shifted so that their mean is the task's own statistic: the exact
    bootstrap distribution is centred there (``E*[P(x* > y*)] = P(x > y)``, ``E*[mean d*] = mean d``,
    x* and y* drawn from the seeds), and a few hundred replicates miss it by enough to move the
    tasks needed by a fifth when the difference is small."""
    return replicates - replicates.mean(axis=1, keepdims=True) + np.asarray(points, dtype=float)[:, None]


def poi_replicates(x: agg.Scores, y: agg.Scores, reps: int = agg.REPS, seed: int = agg.SEED) -> np.ndarray:
    """(tasks, reps): per task, ``reps`` stratified bootstrap replicates of its ``P(x > y)`` (X's and
    Y's seeds resampled independently within the task, as :func:`harness.report.aggregate.poi_interval`),
    centred on the task's own ``P(x > y)`` (:func:`_centred`)."""
    xs, ys = agg.same_tasks(x, y)
    rng = np.random.default_rng(seed)
    bx = agg.stratified_resamples(xs, reps, rng)
    by = agg.stratified_resamples(ys, reps, rng)
    points = [agg.probability_of_improvement([a], [b]) for a, b in zip(xs, ys)]
    return _centred(np.stack([agg.poi_batch([a], [b]) for a, b in zip(bx, by)]), points)


def mean_replicates(d: agg.Scores, reps: int = agg.REPS, seed: int = agg.SEED) -> np.ndarray:
    """(tasks, reps): per task, ``reps`` bootstrap replicates of the mean of its values (e.g. paired
    differences), resampled within the task, centred on the task's mean (:func:`_centred`)."""
    tasks = agg.as_tasks(d)
    reps_ = np.stack([b.mean(axis=1) for b in agg.stratified_resamples(tasks, reps, np.random.default_rng(seed))])
    return _centred(reps_, [float(t.mean()) for t in tasks])


def simulated_power(replicates: np.ndarray, n: int, null: float, side: int, level: float = LEVEL,
                    draws: int = DRAWS, seed: int = agg.SEED, inner: int = NEEDED_REPS) -> float:
    """The fraction of ``draws`` simulated leaderboards of ``n`` tasks (drawn with replacement from
    the rows of ``replicates``) whose stratified bootstrap percentile interval of the mean over
    tasks excludes ``null`` on ``side`` (+1: above, −1: below). Each of the interval's ``inner``
    replicates takes an independent replicate (a random column of its row) of every drawn task."""
    tasks, reps = replicates.shape
    flat = np.ascontiguousarray(replicates, dtype=float).ravel()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, tasks, size=(draws, n))
    tail = 100 * (1 - level) / 2
    step = max(1, _CHUNK // (inner * n))
    hits = 0
    for s in range(0, draws, step):
        chosen = idx[s:s + step]
        pick = rng.integers(0, reps, size=(chosen.shape[0], inner, n))
        values = flat[chosen[:, None, :] * reps + pick].mean(axis=2)
        lo, hi = np.percentile(values, [tail, 100 - tail], axis=1)
        hits += int(np.sum(lo > null) if side > 0 else np.sum(hi < null))
    return hits / draws


def needed_from(replicates: np.ndarray, point: float, null: float, power: float = POWER, level: float = LEVEL,
                cap: int = CAP, draws: int = DRAWS, seed: int = agg.SEED, inner: int = NEEDED_REPS) -> Needed:
    """:class:`Needed` from per-task replicates (tasks, reps) of a per-task statistic whose mean
    over tasks is ``point``: doubling n from 1, then bisection (to within 5% of n)."""
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    if point == null or not np.isfinite(point):
        return Needed(None, False, False, 0.0, power, cap, draws, null, level)
    side = 1 if point > null else -1
    memo: dict[int, float] = {}

    def pw(n: int) -> float:
        if n not in memo:
            memo[n] = simulated_power(replicates, n, null, side, level, draws, seed, inner)
        return memo[n]

    fail, n = 0, 1
    while True:
        m = min(n, cap)
        if pw(m) >= power:
            ok = m
            break
        if m == cap:
            return Needed(None, True, True, pw(cap), power, cap, draws, null, level)
        fail, n = m, 2 * n
    while ok - fail > max(1, ok // 20):
        mid = (fail + ok) // 2
        if pw(mid) >= power:
            ok = mid
        else:
            fail = mid
    return Needed(ok, True, False, pw(ok), power, cap, draws, null, level)


def tasks_needed(x: agg.Scores, y: agg.Scores, power: float = POWER, level: float = LEVEL, cap: int = CAP,
                 draws: int = DRAWS, inner: int = NEEDED_REPS, seed: int = agg.SEED, reps: int = agg.REPS) -> Needed:
    """How many tasks like the observed ones would resolve ``P(X > Y)`` at ``level`` with
    probability ``power`` (X's and Y's seed scores per task, the same tasks): resampling, see the
    module docstring (``reps`` replicates per task, ``inner`` per simulated interval). Not
    resolvable when the observed ``P(X > Y)`` is exactly 0.5."""
    point = agg.probability_of_improvement(x, y)
    return needed_from(poi_replicates(x, y, reps, seed), point, 0.5, power, level, cap, draws, seed, inner)


def tasks_needed_paired(diffs: agg.Scores, power: float = POWER, level: float = LEVEL, cap: int = CAP,
                        draws: int = DRAWS, inner: int = NEEDED_REPS, seed: int = agg.SEED,
                        reps: int = agg.REPS) -> Needed:
    """The same for the mean over tasks of per-task mean paired differences (null 0)."""
    return needed_from(mean_replicates(diffs, reps, seed), agg.mean(diffs), 0.0, power, level, cap, draws, seed,
                       inner)


def normal_tasks_needed(per_task: Sequence[float], within_var: Sequence[float], null: float, power: float = POWER,
                        level: float = LEVEL) -> float:
    """The normal approximation ``((z_(1−α/2) σ_w + z_power σ_b) / |p̄ − null|)²`` (not rounded):
    ``per_task`` the tasks' statistics (``p̄`` their mean, ``σ_b²`` their variance, ddof 0),
    ``within_var`` their within-task bootstrap variances (``σ_w²`` their mean)."""
    p = np.asarray(per_task, dtype=float)
    delta = abs(float(p.mean()) - null)
    if delta == 0:
        return math.inf
    z_a, z_b = sps.norm.ppf(1 - (1 - level) / 2), sps.norm.ppf(power)
    return float(((z_a * math.sqrt(float(np.mean(within_var))) + z_b * float(p.std())) / delta) ** 2)


# ----------------------------------------------------------------------------- pairs and ranks
PAIR_COLUMNS = ["x", "y", "n_tasks", "poi", "poi_low", "poi_high", "verdict", "tasks_needed", "needed_capped",
                "needed_resolvable", "needed_power"]


def pairwise(per_task: Mapping[str, Sequence[np.ndarray]], reps: int = agg.REPS, seed: int = agg.SEED,
             level: float = LEVEL, needed: bool = True, power: float = POWER, cap: int = CAP, draws: int = DRAWS,
             inner: int = NEEDED_REPS) -> pd.DataFrame:
    """Every ordered pair of rows (``{row: its seed scores per task}``, the same tasks): ``P(x > y)``
    with its interval (:func:`harness.report.aggregate.poi_interval`, ``reps`` and ``seed``) and
    verdict; for an inconclusive pair (``needed``) the tasks needed. Computed once per unordered
    pair, x before y in the mapping's order, and mirrored (antisymmetric by construction). Rows in
    the mapping's order, x then y."""
    rows = list(per_task)
    got: dict[tuple[str, str], dict[str, Any]] = {}
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            iv = agg.poi_interval(per_task[a], per_task[b], reps=reps, seed=seed, confidence=level)
            v = verdict(iv.low, iv.high, level)
            rec = {"n_tasks": len(per_task[a]), "poi": iv.point, "poi_low": iv.low, "poi_high": iv.high,
                   "verdict": v, "tasks_needed": agg.NAN, "needed_capped": False, "needed_resolvable": True,
                   "needed_power": agg.NAN}
            if needed and v == INCONCLUSIVE:
                nd = tasks_needed(per_task[a], per_task[b], power, level, cap, draws, inner, seed)
                rec.update({"tasks_needed": agg.NAN if nd.n is None else float(nd.n), "needed_capped": nd.capped,
                            "needed_resolvable": nd.resolvable, "needed_power": nd.power})
            got[(a, b)] = rec
            mirror = {AHEAD: BEHIND, BEHIND: AHEAD}.get(v, v)
            got[(b, a)] = {**rec, "poi": 1 - iv.point, "poi_low": 1 - iv.high, "poi_high": 1 - iv.low,
                           "verdict": mirror}
    out = [{"x": a, "y": b, **got[(a, b)]} for a in rows for b in rows if a != b]
    return pd.DataFrame(out, columns=PAIR_COLUMNS)


def rank_ranges(pairs: pd.DataFrame, rows: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``{row: (best, worst)}``: ``1 + #rows ahead of it`` and ``K − #rows it is ahead of``."""
    k = len(rows)
    out = {}
    for r in rows:
        above = int(((pairs["y"] == r) & (pairs["verdict"] == AHEAD) & pairs["x"].isin(rows)).sum())
        below = int(((pairs["x"] == r) & (pairs["verdict"] == AHEAD) & pairs["y"].isin(rows)).sum())
        out[r] = (1 + above, k - below)
    return out


def rank_text(best: float, worst: float) -> str:
    """``3`` when determined, ``2–4`` when the verdicts leave a range; a dash without one."""
    if pd.isna(best) or pd.isna(worst):
        return "–"
    return f"{int(best)}" if best == worst else f"{int(best)}–{int(worst)}"


# ----------------------------------------------------------------------------- ablations
ABLATION_COLUMNS = ["method", "variant", "component", "n_tasks", "tasks", "n_pairs", "delta", "delta_low",
                    "delta_high", "poi", "poi_low", "poi_high", "verdict", "tasks_needed", "needed_capped",
                    "needed_resolvable", "needed_power"]


def component_name(variant: str) -> str:
    """``-intra-inter`` -> ``intra+inter``."""
    return "+".join(p for p in variant.split("-") if p)


def ablation_frame(scores: pd.DataFrame, tasks: Sequence[str], method: str = "cka",
                   order: Sequence[str] | None = None, reps: int = agg.REPS, seed: int = agg.SEED,
                   level: float = LEVEL, needed: bool = True, power: float = POWER, cap: int = CAP,
                   draws: int = DRAWS, inner: int = NEEDED_REPS) -> pd.DataFrame:
    """One row per ablation variant (``-c``) of ``method`` in ``scores`` (columns ``task``,
    ``method``, ``variant``, ``seed``, ``score``; ``full`` and the ablations), over the ``tasks``
    (labels) where it and ``full`` share a seed: Δ = full − ablated paired by seed, its mean over
    tasks with a stratified bootstrap interval, P(full > ablated) over the paired seeds with its
    interval, the component's verdict and, when inconclusive (``needed``), the tasks needed.
    Variants in ``order`` first, then by number of components and name."""
    mine = scores[scores["method"] == method]
    full = mine[mine["variant"] == "full"]
    variants = sorted({v for v in mine["variant"] if v.startswith("-")},
                      key=lambda v: (list(order).index(v) if order and v in order else len(order or []),
                                     v.count("-"), v))
    out = []
    for v in variants:
        abl = mine[mine["variant"] == v]
        diffs, fx, ax, used = [], [], [], []
        for t in tasks:
            f = full[full["task"] == t].set_index("seed")["score"]
            a = abl[abl["task"] == t].set_index("seed")["score"]
            seeds = sorted(set(f.index) & set(a.index))
            if not seeds:
                continue
            fs, as_ = f.loc[seeds].to_numpy(float), a.loc[seeds].to_numpy(float)
            diffs.append(fs - as_)
            fx.append(fs)
            ax.append(as_)
            used.append(t)
        rec: dict[str, Any] = {"method": method, "variant": v, "component": component_name(v),
                               "n_tasks": len(used), "tasks": ",".join(used), "n_pairs": sum(d.size for d in diffs),
                               "tasks_needed": agg.NAN, "needed_capped": False, "needed_resolvable": True,
                               "needed_power": agg.NAN}
        if diffs:
            iv = agg.interval_estimates(diffs, ("mean",), reps=reps, seed=seed, confidence=level)["mean"]
            poi = agg.poi_interval(fx, ax, reps=reps, seed=seed, confidence=level)
            word = component_verdict(iv.low, iv.high, level)
            rec.update({"delta": iv.point, "delta_low": iv.low, "delta_high": iv.high, "poi": poi.point,
                        "poi_low": poi.low, "poi_high": poi.high, "verdict": word})
            if needed and word == INCONCLUSIVE:
                nd = tasks_needed_paired(diffs, power, level, cap, draws, inner, seed)
                rec.update({"tasks_needed": agg.NAN if nd.n is None else float(nd.n), "needed_capped": nd.capped,
                            "needed_resolvable": nd.resolvable, "needed_power": nd.power})
        out.append(rec)
    return pd.DataFrame(out, columns=ABLATION_COLUMNS)


# ----------------------------------------------------------------------------- duplicate tasks
CONTENT_PREFIXES = ("dataset.", "split.", "teachers.", "student.", "train.")
CONTENT_PARAMS = ("teacher_seeds",)
NOT_CONTENT = ("split.name", "dataset.download", "dataset.stream")
_TEACHER_SEED = re.compile(r"^teachers\.\d+\.seed$")


def run_content(params: Mapping[str, Any]) -> dict[str, str]:
    """The task-defining part of one trial run's logged config (flattened params): data set,
    split, teachers, student and training recipe (see the module docstring); missing values
    (NaN, None) dropped."""
    out = {}
    per_seed = str(params.get("teacher_seeds", "")) == "per_seed"
    for k, v in params.items():
        if v is None or (isinstance(v, float) and math.isnan(v)) or k in NOT_CONTENT:
            continue
        if not (k.startswith(CONTENT_PREFIXES) or k in CONTENT_PARAMS):
            continue
        if per_seed and _TEACHER_SEED.match(k):
            continue
        out[k] = str(v)
    return out


def run_key(params: Mapping[str, Any]) -> str | None:
    """SHA-256 (hex) of one trial run's :func:`run_content`; None when the run logged no data-set
    (``dataset.*``) or no split (``split.*`` but ``name``) param."""
    c = run_content(params)
    if not (any(k.startswith("dataset.") for k in c) and any(k.startswith("split.") for k in c)):
        return None
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()


def content_keys(runs: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The distinct :func:`run_key` of a task's trial runs (empty: no run logged its content)."""
    return frozenset(k for k in (run_key(p) for p in runs) if k is not None)


def duplicate_tasks(keys: Sequence[tuple[str, Collection[str] | None]]) -> dict[str, str]:
    """``[(task label, its content keys), ...]`` in order -> ``{duplicate label: kept label}``: a task
    that shares a content key with an earlier kept task maps to the first such task (a task without
    keys is never a duplicate)."""
    kept: list[tuple[str, frozenset[str]]] = []
    out = {}
    for label, ks in keys:
        ks = frozenset(ks or ())
        if not ks:
            continue
        first = next((k for k, theirs in kept if theirs & ks), None)
        if first is None:
            kept.append((label, ks))
        else:
            out[label] = first
    return out
