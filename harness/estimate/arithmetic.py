"""The estimate's arithmetic: calibrated rates, the work of each teacher and trial, the measured
overheads, and what they add up to (:func:`plan`: per-split seconds and device-hours, the teacher
stage, the trials' LPT makespan, the wall time; the formulas are in :mod:`harness.estimate`'s
docstring). Pure: injected numbers give hand-checkable results; imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

#: the test part is evaluated with the last and with the best-validation model
TEST_PASSES = 2
#: MLflow requests of a teacher's run besides one per epoch (find, start, final metrics, finish)
TEACHER_OPS = 4
#: MLflow requests of the runner around the trials (experiment, finished keys, running and stale
#: checks, the study run, its two artifacts, the summary metrics, its end)
PARENT_OPS = 9


@dataclass(frozen=True)
class Rate:
    """Calibrated seconds of one combination.

    ``train``: one training step per image; ``eval``: an evaluation pass per image; ``extra``:
    teachers: routing statistics per own (train + val) image, trials: diagnostics per (pool +
    test) image; ``fixed``: trials: the set-up of one trial (method built, teachers and their
    outputs loaded), in seconds."""

    train: float = 0.0
    eval: float = 0.0
    extra: float = 0.0
    fixed: float = 0.0


@dataclass(frozen=True)
class TeacherWork:
    """One distinct teacher of the study (by cache key) and the images it will see."""

    split: str
    task: int
    key: str
    combo: str
    epochs: int
    train_images: int  #: images trained on per epoch (full batches)
    val_images: int
    test_images: int
    own_images: int  #: its own training + validation images (routing statistics)
    pool_images: int  #: the split's pool (its outputs, cached for the students)
    cached: bool


@dataclass(frozen=True)
class TrialWork:
    """One trial and the images it will see."""

    split: str
    name: str
    combo: str
    trains: bool
    epochs: int
    train_images: int  #: images trained on per epoch (full batches of the pool or training part)
    val_images: int
    test_images: int
    diag_images: int  #: pool + test images the diagnostics read


@dataclass(frozen=True)
class Overheads:
    """Measured fixed costs in seconds, and how much slower processes run side by side here
    (see :mod:`harness.estimate`)."""

    startup: float = 0.0  #: the runner before its teacher stage
    pool_start: float = 0.0  #: the forkserver: a fresh interpreter and its imports
    worker_setup: float = 0.0  #: a slot's first worker: open the store, load the data
    per_trial: float = 0.0  #: the MLflow work of one trial
    op: float = 0.0  #: one MLflow request
    #: slow-down of each of ``contention_procs`` CPU-bound processes running at once, over one alone
    contention: float = 1.0
    contention_procs: int = 1

    def slowdown(self, k: int) -> float:
        """Slow-down with ``k`` processes at once: 1 for one, ``contention`` for
        ``contention_procs``, linear in between (and beyond)."""
        if k <= 1 or self.contention_procs <= 1:
            return 1.0
        return 1.0 + (self.contention - 1.0) * (k - 1) / (self.contention_procs - 1)


@dataclass
class SplitRow:
    split: str
    teacher_seconds: float
    teachers: int
    teachers_cached: int
    trials: int
    trial_seconds: float
    device_hours: float


@dataclass
class Estimate:
    """What :func:`plan` computes, with what it was computed from."""

    rows: list[SplitRow]
    teacher_stage_seconds: float
    makespan_seconds: float
    wall_seconds: float
    device_hours: float
    slots: int
    overheads: Overheads
    device: str = "cpu"
    pool: str = ""
    study: str = ""
    rates: dict[str, Rate] = field(default_factory=dict)
    calibration_seconds: float = 0.0


def images_per_epoch(n: int, batch_size: int) -> int:
    """Images one epoch trains on: full batches only (:func:`harness.train.batch_indices` drops
    the last partial one), all ``n`` when there is less than one batch."""
    return n if n < batch_size else n // batch_size * batch_size


def teacher_seconds(w: TeacherWork, r: Rate, o: Overheads) -> float:
    """Seconds to train teacher ``w`` at rates ``r`` (0 when it is already cached)."""
    if w.cached:
        return 0.0
    return (w.epochs * (w.train_images * r.train + w.val_images * r.eval) + TEST_PASSES * w.test_images * r.eval
            + w.own_images * r.extra + w.pool_images * r.eval + (w.epochs + TEACHER_OPS) * o.op)


def trial_seconds(w: TrialWork, r: Rate, o: Overheads) -> float:
    """Seconds trial ``w`` holds its slot at rates ``r``."""
    work = w.epochs * (w.train_images * r.train + w.val_images * r.eval) if w.trains else 0.0
    test = (TEST_PASSES if w.trains else 1) * w.test_images * r.eval
    return work + test + w.diag_images * r.extra + r.fixed + o.per_trial


def lpt(durations: Sequence[float], slots: int) -> tuple[float, list[list[int]]]:
    """Longest processing time first: each duration, longest first (ties: first listed), goes to
    the slot with the least work so far (ties: the lowest slot). Returns (makespan, the indices of
    the durations on each slot)."""
    if slots < 1:
        raise ValueError("at least one slot")
    loads = [0.0] * slots
    packed: list[list[int]] = [[] for _ in range(slots)]
    for i in sorted(range(len(durations)), key=lambda j: (-durations[j], j)):
        s = min(range(slots), key=lambda k: (loads[k], k))
        loads[s] += durations[i]
        packed[s].append(i)
    return max(loads), packed


def shared_makespan(loads: Sequence[float], slowdown: Callable[[int], float]) -> float:
    """When slots with these ``loads`` (seconds each alone) finish, if while ``k`` of them are
    busy each runs ``slowdown(k)`` times slower: with the loads sorted, ``sum_i (L_i - L_(i-1)) x
    slowdown(n - i)`` (i from 0, L_(-1) = 0). No slow-down: ``max(loads)``."""
    out, prev = 0.0, 0.0
    ordered = sorted(loads)
    for i, load in enumerate(ordered):
        out += (load - prev) * slowdown(len(ordered) - i)
        prev = load
    return out


def plan(
    teachers: Sequence[TeacherWork], trials: Sequence[TrialWork], rates: dict[str, Rate], overheads: Overheads,
    slots: int, packing: int = 1,
) -> Estimate:
    """Per-split seconds and device-hours, the teacher stage, the trials' LPT makespan on
    ``slots`` and the wall time (see :mod:`harness.estimate`); ``packing``: trials per device."""
    o = overheads
    t_sec = [teacher_seconds(w, rates[w.combo], o) for w in teachers]
    r_sec = [trial_seconds(w, rates[w.combo], o) for w in trials]
    rows = []
    for split in dict.fromkeys([w.split for w in teachers] + [w.split for w in trials]):
        ts = sum(s for w, s in zip(teachers, t_sec) if w.split == split)
        rs = sum(s for w, s in zip(trials, r_sec) if w.split == split)
        mine = [w for w in teachers if w.split == split]
        rows.append(SplitRow(split, ts, len(mine), sum(w.cached for w in mine),
                             sum(w.split == split for w in trials), rs, (ts + rs / packing) / 3600))
    stage = sum(t_sec)
    _, packed = lpt(r_sec, slots)
    makespan = shared_makespan([sum(r_sec[i] for i in p) for p in packed], o.slowdown)
    # the forkserver imports while the teachers train: the shorter runs slowed down beside the longer
    wall = o.startup + shared_makespan([stage, o.pool_start], o.slowdown)
    wall += (o.worker_setup + makespan) if trials else 0.0
    return Estimate(rows, stage, makespan, wall, sum(r.device_hours for r in rows), slots, o, rates=dict(rates))
