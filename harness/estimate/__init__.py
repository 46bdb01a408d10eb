"""``harness run-study STUDY --estimate``: what a study will cost, measured before it runs.

One short **calibration** per distinct combination the study needs, with real
(random-initialised) networks on the study's real data, on the device the study would run on
(its first slot's; CPU slots with their own thread count), through the functions a real run
calls (:func:`harness.train.train_epoch`, :func:`harness.train.evaluate`,
:func:`harness.trial.diagnostics`, :func:`harness.routing.fit_stats`):

- a *teacher* combination (architecture + options, image shape, batch size, augmentation,
  optimiser, precision): its supervised training step, its evaluation pass and its routing
  statistics;
- a *student* combination (student architecture + options, method, image shape, batch size,
  augmentation, optimiser, precision, the split's teacher architectures): the method's
  ``loss_terms`` step with its teachers (run live on every batch when the recipe augments,
  outputs computed beforehand otherwise, as ``fit`` decides), its evaluation pass, the
  diagnostics (routing, oracle, linear probe) and the per-trial set-up (building the method,
  loading the teachers' checkpoints and their cached outputs). Variants and seeds of one method
  share it (the first variant, ``full``, is the one timed).

A training rate is the time of :data:`TIMED_BATCHES` batches (fewer if they would exceed
:data:`BUDGET_S`) after :data:`WARMUP_BATCHES` warm-up batches, per image; evaluation and
diagnostics are timed on a subset (:data:`EVAL_IMAGES`, :data:`DIAG_IMAGES`) and scaled
linearly to the real sizes. Nothing is written: calibration networks are thrown away, no
teacher cache entry is made, the study's MLflow store is never opened, data sets are not
downloaded (one error line naming ``dataset.root`` when they are not there).

**Arithmetic** (:func:`plan`, pure: injected numbers give hand-checkable results). With
``b(n) = n // batch_size * batch_size`` (``n`` below one batch: ``n``) the images the loop
trains on per epoch (the last partial batch is dropped):

- a teacher: ``epochs x (b(n_train) x s_train + n_val x s_eval) + 2 x n_test x s_eval``
  (test with the last and the best-validation model) ``+ (n_train + n_val) x s_stats`` (routing
  statistics on its own images) ``+ n_pool x s_eval`` (its outputs on the pool)
  ``+ (epochs + 4) x s_op`` (its MLflow run: one request per epoch); 0 when its checkpoint is
  already in the teacher cache (:func:`harness.teachers.checkpoint_path` exists);
- a trial of a training method: ``epochs x (b(n_pool) x s_train + n_val x s_eval)
  + 2 x n_test x s_eval``; of an evaluating one (``teachers``): ``n_test x s_eval``; plus
  ``(n_pool + n_test) x s_diag`` (diagnostics), its set-up (measured per combination) and the
  MLflow work of one trial (opening the run, tags, curves, final metrics, finishing);
- wall time: ``startup + shared(teacher stage, pool start) + worker setup + shared(slot loads)``:
  the teachers run first, one after the other, on the teacher device, while the forkserver starts
  (a fresh interpreter importing what it preloads); then a slot's first worker opens the store
  and loads the data, and the trials, packed greedily longest-first (:func:`lpt`) onto
  ``min(slots, --workers)`` slots, run. ``shared`` (:func:`shared_makespan`) is the finishing
  time of jobs that run side by side, each ``slowdown(k)`` times slower while ``k`` run
  (``max`` when nothing slows down);
- device-hours of a split: teachers + trials (their slot time divided by ``trials_per_device``
  on GPUs, whose packed trials share one device).

**Overheads** are measured, not assumed: the runner's start-up (imports in this process, reading
and expanding the study, loading the data, creating the MLflow store when the target store does
not exist yet, its requests around the trials), the forkserver's start-up (a fresh interpreter
importing what it preloads: the imports timed here when this process had not imported torch yet,
else a child process that does them), the MLflow requests of a teacher and of a trial (on a store
created in a temporary folder and deleted), and how much slower each of ``min(slots,
--workers)`` processes runs when they run at once than one alone (:func:`measure_contention`:
other users' load, shared cores; it slows the trials while several run and the teacher stage
while the forkserver imports beside it). Not included: the report at the end,
``train.compile``'s compilation, retries of failed trials, trials already finished in the store
(the estimate never reads it), and the slow-down of trials packed onto one GPU (each is timed
alone).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from harness.errors import HarnessError
from harness.store import (
    ATTEMPT, END, GIT_COMMIT, KIND, KIND_STUDY, KIND_TRIAL, METHOD, SEED, SEEDED, SPLIT, STUDY,
    TRIAL_ARTIFACT, TRIAL_KEY, USES_LABELS, VARIANT, VERSION, probe_tag,
)

if TYPE_CHECKING:
    import torch

    from harness.config import Recipe, StudyConfig
    from harness.data.splits import PartData, SplitData
    from harness.grid import Trial
    from harness.methods.base import Method

#: calibration: warm-up batches (not timed), then at most this many timed batches ...
WARMUP_BATCHES = 3
TIMED_BATCHES = 20
#: ... but no more than this many seconds of timed batches per combination (at least MIN_TIMED)
BUDGET_S = 10.0
MIN_TIMED = 3
#: images of the evaluation and diagnostics subsets (scaled linearly to the real sizes)
EVAL_IMAGES = {"cpu": 256, "cuda": 1024}
DIAG_IMAGES = {"cpu": 512, "cuda": 2048}
#: the test part is evaluated with the last and with the best-validation model
TEST_PASSES = 2
#: MLflow requests of a teacher's run besides one per epoch (find, start, final metrics, finish)
TEACHER_OPS = 4
#: MLflow requests of the runner around the trials (experiment, finished keys, running and stale
#: checks, the study run, its two artifacts, the summary metrics, its end)
PARENT_OPS = 9


# --------------------------------------------------------------------------- the arithmetic


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
    (see the module docstring)."""

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
    ``slots`` and the wall time (see the module docstring); ``packing``: trials per device."""
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


# --------------------------------------------------------------------------- what the study needs


def _spec_label(arch: str, options: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{arch}({opts})" if opts else arch


def _recipe_label(shape: Sequence[int], r: "Recipe", precision: str) -> str:
    aug = f" aug={'+'.join(r.augment)}" if r.augment else ""
    return f"{'x'.join(map(str, shape))} bs{r.batch_size} {r.optimizer} {precision}{aug}"


def teacher_combo(cfg: Any, shape: Sequence[int], device: str) -> str:
    """The calibration key of a teacher config: architecture + options, image shape, batch size,
    optimiser, precision, augmentation."""
    from harness.train import effective_precision

    precision = effective_precision(cfg, device)
    return f"teacher {_spec_label(cfg.arch, cfg.options())} {_recipe_label(shape, cfg, precision)}"


def student_combo(study: "StudyConfig", split_index: int, method: str, shape: Sequence[int], device: str) -> str:
    """The calibration key of a trial: student architecture + options, method, image shape, batch
    size, optimiser, precision, augmentation, and the split's teachers (run or read per batch)."""
    from harness.train import effective_precision

    split = study.splits[split_index]
    teachers = ",".join(_spec_label(c.arch, c.options()) for c in study.teachers_for(split))
    return (f"{method} {_spec_label(study.student.arch, study.student.options())} "
            f"{_recipe_label(shape, study.train, effective_precision(study.train, device))} teachers=[{teachers}]")


def describe_work(
    study: "StudyConfig", data: dict[str, "SplitData"], trials: Sequence["Trial"], device: str
) -> tuple[list[TeacherWork], list[TrialWork]]:
    """Every distinct teacher the trials need (once per cache key, ``cached`` when its checkpoint
    exists) and every trial, with their image counts and calibration keys."""
    from harness.methods.base import get_method
    from harness.keys import stable_hash
    from harness.teachers import checkpoint_path, teacher_spec
    from harness.trial import teacher_seeds_of

    teachers: list[TeacherWork] = []
    seen: set[str] = set()
    for split in study.splits:
        mine = [t for t in trials if t.split == split.name]
        if not mine:
            continue
        d = data[split.name]
        for seed in teacher_seeds_of(study, [t.seed for t in mine]):
            for k, cfg in enumerate(study.teachers_for(split, seed)):
                key = stable_hash(teacher_spec(d, k, study.dataset, cfg))
                if key in seen:
                    continue
                seen.add(key)
                n = {p: int((d.parts[p].t == k).sum()) for p in ("train", "val", "test")}
                teachers.append(TeacherWork(
                    split.name, k, key, teacher_combo(cfg, d.in_shape, device), cfg.epochs,
                    images_per_epoch(n["train"], cfg.batch_size), n["val"], n["test"], n["train"] + n["val"],
                    len(d.pool_part), checkpoint_path(key, study.cache_dir).exists()))
    works = []
    index = {s.name: i for i, s in enumerate(study.splits)}
    for t in trials:
        cls = get_method(t.method)
        d = data[t.split]
        n_train = len(d.student_view(cls.uses_labels).parts["train"])
        works.append(TrialWork(
            t.split, t.run_name, student_combo(study, index[t.split], t.method, d.in_shape, device), cls.trains,
            study.train.epochs, images_per_epoch(n_train, study.train.batch_size), len(d.parts["val"]),
            len(d.parts["test"]), len(d.pool_part) + len(d.parts["test"])))
    return teachers, works


# --------------------------------------------------------------------------- calibration


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch and BLAS threads as a worker of the slot has them (:func:`harness.scheduler.enter_worker`)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits: Any = contextlib.nullcontext()
    else:
        limits = threadpool_limits(n)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(before)


def _cycled(part: "PartData", n: int, seed: int = 0) -> "PartData":
    """``n`` images of ``part`` (a fixed shuffle, repeated when the part is smaller)."""
    import torch

    from harness.data.splits import PartData

    perm = torch.randperm(len(part), generator=torch.Generator().manual_seed(seed))
    idx = perm[torch.arange(n) % len(part)]
    return PartData(part.x[idx], part.y[idx], part.t[idx])


def _slice(part: "PartData", a: int, b: int) -> "PartData":
    from harness.data.splits import PartData

    return PartData(part.x[a:b], part.y[a:b], part.t[a:b])


def _kind(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def time_training(method: "Method", part: "PartData", cfg: "Recipe", device: str, budget: float = BUDGET_S) -> float:
    """Seconds per image of :func:`harness.train.train_epoch` on ``part`` (real images, cycled):
    :data:`WARMUP_BATCHES` batches untimed, then up to :data:`TIMED_BATCHES` timed (fewer when the
    warm-up says they would take longer than ``budget``). Teachers run live on every batch when
    the recipe augments, else their outputs are computed beforehand (as ``fit`` does)."""
    import torch

    from harness.data.stream import is_lazy, on_device
    from harness.train import make_optimizer, teacher_outputs, train_epoch

    bs = cfg.batch_size
    sub = _cycled(part, (WARMUP_BATCHES + TIMED_BATCHES) * bs)
    x = on_device(sub.x, device)
    if not is_lazy(x) and _kind(device) == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = sub.y.to(device) if method.uses_labels else None
    cache = None
    if not cfg.augment:
        logits, feats = teacher_outputs(method.teachers, x, device=device)
        cache = ([t.to(device) for t in logits], [t.to(device) for t in feats])
    opt = make_optimizer(method.parameters(), cfg)
    gen = torch.Generator().manual_seed(0)

    def run(a: int, b: int) -> float:
        c = None if cache is None else ([t[a:b] for t in cache[0]], [t[a:b] for t in cache[1]])
        return _timed(lambda: train_epoch(method, opt, x[a:b], None if y is None else y[a:b], c, cfg, gen), device)

    warm = WARMUP_BATCHES * bs
    per_batch = run(0, warm) / WARMUP_BATCHES
    m = max(MIN_TIMED, min(TIMED_BATCHES, int(budget / max(per_batch, 1e-9))))
    return run(warm, warm + m * bs) / (m * bs)


def time_eval(fn: Callable[["torch.Tensor"], "torch.Tensor"], data: "SplitData", device: str) -> float:
    """Seconds per image of :func:`harness.train.evaluate` with ``fn`` on the validation part
    (the test part when there is none), on at most :data:`EVAL_IMAGES` of its images (after a
    warm-up; the median of three passes when one takes under a second)."""
    from harness.train import evaluate

    part = data.parts["val"] if len(data.parts["val"]) else data.parts["test"]
    sub = _cycled(part, min(len(part), EVAL_IMAGES[_kind(device)]))
    evaluate(fn, _slice(sub, 0, min(len(sub), 64)), data.sizes, data.offsets, device)  # warm-up
    times = [_timed(lambda: evaluate(fn, sub, data.sizes, data.offsets, device), device)]
    if times[0] < 1.0:  # short: the median of three
        times += [_timed(lambda: evaluate(fn, sub, data.sizes, data.offsets, device), device) for _ in range(2)]
    return sorted(times)[len(times) // 2] / max(1, len(sub))


def _diag_subset(data: "SplitData", device: str) -> "SplitData":
    """The split with its pool and test part cut to at most :data:`DIAG_IMAGES` images each."""
    from dataclasses import replace

    m = DIAG_IMAGES[_kind(device)]
    pool = _cycled(data.pool_part, min(len(data.pool_part), m))
    test = _cycled(data.parts["test"], min(len(data.parts["test"]), m))
    if data.pool is None:
        return replace(data, parts={**data.parts, "train": pool, "test": test})
    return replace(data, parts={**data.parts, "test": test}, pool=pool)


def time_diagnostics(method: "Method", data: "SplitData", device: str, augment: bool) -> float:
    """Seconds per (pool + test) image of :func:`harness.trial.diagnostics` on a subset: with the
    teachers' pool outputs at hand (read from the cache) unless the recipe augments (then the
    diagnostics compute them, as in a trial)."""
    from harness.train import teacher_outputs
    from harness.trial import diagnostics

    sub = _diag_subset(data, device)
    outputs = None if augment else teacher_outputs(method.teachers, sub.pool_part.x, device=device)
    n = len(sub.pool_part) + len(sub.parts["test"])
    return _timed(lambda: diagnostics(method, method.teachers, sub, device, outputs), device) / max(1, n)


def _random_stats(nets: list[Any], data: "SplitData", device: str) -> list[Any]:
    """Routing statistics of random-initialised teachers fitted on a subset (for rules that
    need them: the time is the routing's, not the statistics')."""
    from harness.routing import fit_background, fit_stats
    from harness.train import teacher_outputs
    from harness.methods.base import TeacherSet

    m = EVAL_IMAGES[_kind(device)]
    pool = _cycled(data.pool_part, min(len(data.pool_part), m))
    _, feats = teacher_outputs(TeacherSet(nets), pool.x, device=device)
    out = []
    for k, net in enumerate(nets):
        x, y = data.task_part(k, "train")
        xv, _ = data.task_part(k, "val")
        n = min(len(y), m)
        out.append(fit_stats(net, x[:n], y[:n], xv[: min(len(xv), m)], background=fit_background(feats[k].cpu())))
    return out


def time_loading(nets: list[Any], pool_outputs: tuple[list[Any], list[Any]], n_pool: int, loads: int) -> float:
    """Seconds a trial spends loading its teachers (checkpoint read, weights loaded and verified
    by digest) and ``loads`` times their cached outputs on the pool (scaled from the subset in
    ``pool_outputs`` to ``n_pool`` images), through files in a temporary folder (deleted)."""
    import torch

    from harness.teachers import pool_digest, state_digest

    logits, feats = pool_outputs
    m = len(logits[0]) if logits else 0
    with tempfile.TemporaryDirectory(prefix="harness-estimate-") as tmp:
        paths = []
        for i, net in enumerate(nets):
            p = Path(tmp) / f"t{i}.pt"
            torch.save({"state_dict": net.state_dict(), "meta": {"digest": state_digest(net.state_dict())}}, p)
            paths.append(p)
        out = Path(tmp) / "outputs.pt"
        torch.save({"logits": [t.cpu() for t in logits], "feats": [t.cpu() for t in feats]}, out)
        t0 = time.perf_counter()
        for p, net in zip(paths, nets):
            blob = torch.load(p, map_location="cpu", weights_only=True)
            net.load_state_dict(blob["state_dict"])
            state_digest(net.state_dict())
        t_nets = time.perf_counter() - t0
        t0 = time.perf_counter()
        blob = torch.load(out, map_location="cpu", weights_only=True)
        for f in blob["feats"]:
            pool_digest(f)
        t_out = time.perf_counter() - t0
    return t_nets + loads * t_out * (n_pool / max(1, m))


@dataclass
class Calibration:
    """Calibrated rates by combination; ``runs`` lists every calibration made, in order (each
    combination once)."""

    device: str
    threads: int | None
    rates: dict[str, Rate] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    seconds: float = 0.0


def calibrate_teacher(data: "SplitData", k: int, cfg: Any, device: str, budget: float = BUDGET_S) -> Rate:
    """Rates of teacher config ``cfg`` on task ``k`` of ``data``: supervised training step,
    evaluation, routing statistics (per own image, with a pool background)."""
    import torch

    from harness.config import Recipe, TrainConfig
    from harness.methods.base import SplitInfo, TeacherSet
    from harness.methods.supervised import SupervisedCE
    from harness.models import build_model
    from harness.routing import fit_background, fit_stats
    from harness.teachers import task_data
    from harness.train import determinism, gpu_setup, teacher_outputs

    td = task_data(data, k)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.arch, td.in_shape, td.num_classes, **cfg.options())
    method = SupervisedCE(net, TeacherSet([]), SupervisedCE.ParamsModel(), SplitInfo(tuple(td.sizes), (0,)))
    recipe = TrainConfig.model_validate(cfg.model_dump(include=set(Recipe.model_fields)))
    method.to(device)
    gpu_setup(method, recipe, torch.device(device))  # as fit() does: no TF32, channels_last, compile
    with determinism(recipe.deterministic, device):
        train = time_training(method, td.parts["train"], recipe, device, budget)
        method.eval()
        ev = time_eval(method.predict, td, device)
        m = EVAL_IMAGES[_kind(device)]
        x, y = data.task_part(k, "train")
        xv, _ = data.task_part(k, "val")
        n, nv = min(len(y), m), min(len(xv), m)
        pool = _cycled(data.pool_part, min(len(data.pool_part), m))
        _, feats = teacher_outputs(TeacherSet([net]), pool.x, device=device)
        t = _timed(lambda: fit_stats(net, x[:n], y[:n], xv[:nv], background=fit_background(feats[0].cpu())), device)
    return Rate(train=train, eval=ev, extra=t / max(1, n + nv))


def calibrate_trial(
    study: "StudyConfig", split_index: int, data: "SplitData", trial: "Trial", device: str,
    budget: float = BUDGET_S,
) -> Rate:
    """Rates of ``trial``'s combination: the method's training step with random-initialised
    teachers of the split's architectures, its evaluation, its diagnostics and its set-up."""
    import torch

    from harness.methods.base import SplitInfo, TeacherSet, get_method
    from harness.models import build_model
    from harness.routing import RoutingConfig
    from harness.train import determinism, gpu_setup, teacher_outputs

    cls = get_method(trial.method)
    split = study.splits[split_index]
    torch.manual_seed(0)
    nets = [build_model(c.arch, data.in_shape, t.n, **c.options())
            for c, t in zip(study.teachers_for(split), data.tasks)]
    params = cls.ParamsModel.model_validate(trial.params)
    rule = getattr(params, "routing", None)
    stats = _random_stats(nets, data, device) if isinstance(rule, RoutingConfig) and rule.needs_stats else None
    t0 = time.perf_counter()
    torch.manual_seed(trial.seed)
    student = build_model(study.student.arch, data.in_shape, data.num_classes, **study.student.options())
    method = cls(student, TeacherSet(nets, stats), params, SplitInfo(tuple(data.sizes), tuple(data.offsets)))
    built = time.perf_counter() - t0
    method.to(device)
    gpu_setup(method, study.train, torch.device(device))
    augment = bool(study.train.augment)
    with determinism(study.train.deterministic, device):
        train = time_training(method, data.student_view(cls.uses_labels).parts["train"], study.train, device,
                              budget) if cls.trains else 0.0
        method.eval()
        ev = time_eval(method.predict, data, device)
        diag = time_diagnostics(method, data, device, augment)
        pool = _cycled(data.pool_part, min(len(data.pool_part), EVAL_IMAGES[_kind(device)]))
        outputs = teacher_outputs(method.teachers, pool.x, device=device)
    loading = time_loading([n.cpu() for n in nets], outputs, len(data.pool_part), 1 if augment else 2)
    return Rate(train=train, eval=ev, extra=diag, fixed=built + loading)


def calibrate(
    study: "StudyConfig", data: dict[str, "SplitData"], trials: Sequence["Trial"], device: str,
    threads: int | None = None, budget: float = BUDGET_S,
) -> Calibration:
    """One calibration per distinct combination: teachers with this process's threads (the
    runner trains them itself), trials with ``threads`` (a worker of the slot's)."""
    from harness.trial import teacher_seeds_of

    t0 = time.perf_counter()
    cal = Calibration(device, threads)
    index = {s.name: i for i, s in enumerate(study.splits)}
    for split in study.splits:
        mine = [t for t in trials if t.split == split.name]
        d = data[split.name]
        for seed in teacher_seeds_of(study, [t.seed for t in mine]) if mine else []:
            for k, cfg in enumerate(study.teachers_for(split, seed)):
                combo = teacher_combo(cfg, d.in_shape, device)
                if combo not in cal.rates:
                    cal.rates[combo] = calibrate_teacher(d, k, cfg, device, budget)
                    cal.runs.append(combo)
    with _threads(threads):
        for t in trials:
            d = data[t.split]
            combo = student_combo(study, index[t.split], t.method, d.in_shape, device)
            if combo not in cal.rates:
                cal.rates[combo] = calibrate_trial(study, index[t.split], d, t, device, budget)
                cal.runs.append(combo)
    cal.seconds = time.perf_counter() - t0
    return cal


# --------------------------------------------------------------------------- overheads


def import_preload() -> float:
    """Seconds to import torch and what the forkserver preloads, here (0 where already imported:
    then the runner in this process would not pay them either)."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from harness.scheduler import PRELOAD

    for mod in PRELOAD:
        importlib.import_module(mod)
    return time.perf_counter() - t0


_IMPORTS = "from harness.estimate import import_preload; import_preload()"


def measure_pool_start(timeout: float = 600.0) -> float:
    """Seconds a fresh interpreter takes to import what the forkserver preloads (its start-up),
    in a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"--estimate: could not time a worker's start-up ({tail})")
    return time.perf_counter() - t0


def measure_mlflow(config: dict[str, Any], epochs: int) -> dict[str, float]:
    """MLflow's costs here, on a store created in a temporary folder (deleted afterwards):
    ``store`` (create it), ``reopen`` (open it again), ``op`` (one request, the median of five)
    and ``trial`` (one trial's requests: the run opened with the resolved ``config`` as params
    and ``trial.yaml``, its tags, ``epochs`` epochs of curves, final metrics, finishing)."""
    import logging
    import shutil

    import yaml

    from harness.tracking import Tracker

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="harness-estimate-")
    try:
        uri = f"sqlite:///{tmp}/probe.db"
        t0 = time.perf_counter()
        tracker = Tracker(uri)
        store = time.perf_counter() - t0
        t0 = time.perf_counter()
        Tracker(uri)
        reopen = time.perf_counter() - t0
        exp = tracker.client.create_experiment("estimate-probe", artifact_location=f"{tmp}/artifacts")
        parent = tracker.start(exp, "study", {KIND: KIND_STUDY})
        ops = []
        for i in range(5):
            t0 = time.perf_counter()
            tracker.log_metrics(parent, {"probe": float(i)}, step=i)
            ops.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # as open_trial_run, execute_trial and finish_unique do
        tags = {k: "x" * 16 for k in (STUDY, SPLIT, METHOD, VARIANT, SEED, TRIAL_KEY, USES_LABELS, SEEDED, VERSION,
                                      ATTEMPT, GIT_COMMIT)}
        run = tracker.start(exp, "trial", {**tags, KIND: KIND_TRIAL}, config, parent)
        tracker.log_text(run, yaml.safe_dump(config), TRIAL_ARTIFACT)
        for group in range(3):
            tracker.set_tags(run, {probe_tag(group, i): "x" * 16 for i in range(8)})
        buf = tracker.buffered(run)
        for e in range(1, epochs + 1):
            buf.log({f"m{i}": float(i) for i in range(10)}, step=e)
        buf.flush()
        tracker.log_metrics(run, {f"final{i}": float(i) for i in range(20)}, step=epochs)
        tracker.set_tags(run, {END: "0"})
        tracker.run(run)
        tracker.find(exp, {KIND: KIND_TRIAL}, ("FINISHED",))
        tracker.finish(run)
        trial = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"store": store, "reopen": reopen, "op": sorted(ops)[len(ops) // 2], "trial": trial}


#: the contention workload: small single-threaded array arithmetic in a Python loop, like a small
#: network's training step (dispatch overhead and vectorised kernels); one round per "go" line
_SPIN = """import sys, time
import numpy as np
a = np.random.default_rng(0).standard_normal((96, 96)).astype(np.float32)
print("ready", flush=True)
for line in sys.stdin:
    b = a.copy()
    t = time.perf_counter()
    for _ in range({n}):
        b = np.maximum(a @ b, 0.0)
        b /= np.abs(b).max() + 1.0
    print(time.perf_counter() - t, flush=True)
"""


def measure_contention(procs: int, reps: int = 5, work: int = 1000) -> float:
    """How much slower each of ``procs`` CPU-bound processes runs when they run at once than one
    alone, here and now (other users' load included): ``procs`` single-threaded processes
    (:data:`_SPIN`) run a fixed workload, one alone then all at once, alternately ``reps`` times;
    the median ratio of the median times, at least 1."""
    import statistics

    env = {**os.environ, **{v: "1" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    ps = [subprocess.Popen([sys.executable, "-c", _SPIN.format(n=work)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    try:
        for p in ps:
            if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise HarnessError("--estimate: the contention probe did not start")

        def round_(group: list[Any]) -> list[float]:
            for p in group:
                p.stdin.write("go\n")
                p.stdin.flush()
            return [float(p.stdout.readline()) for p in group]

        ratios = []
        for _ in range(reps):
            alone = round_(ps[:1])[0]
            ratios.append(statistics.median(round_(ps)) / alone)
    finally:
        for p in ps:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=10)
    return max(1.0, statistics.median(ratios))


def _store_is_new(uri: str) -> bool:
    """Whether opening ``uri`` would create the store (a SQLite file that does not exist or is empty)."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri[len("sqlite:///"):].split("?")[0])
    return not path.exists() or path.stat().st_size == 0


# --------------------------------------------------------------------------- the command


def load_splits(study: "StudyConfig") -> dict[str, "SplitData"]:
    """Every split's data, without downloading: a data set that is not there is one error line
    naming ``dataset.root`` (with ``download: true``, a note that the estimate does not fetch)."""
    from harness.data.splits import build_split

    out = {}
    for i, split in enumerate(study.splits):
        try:
            out[split.name] = build_split(split, study.dataset, f"splits[{i}]")
        except HarnessError as e:
            if not study.dataset.download:
                raise
            raise HarnessError(f"{e} (--estimate does not download: run `harness data download "
                               f"{study.dataset.name} --root {study.dataset.root}` first)") from None
    return out


def estimate_study(
    path: str | Path, workers: int | None = None, tracking_uri: str | None = None, overheads: bool = True,
    budget: float = BUDGET_S,
) -> Estimate:
    """Calibrate and plan study ``path`` on the local pool it would run on (``--workers`` bounds
    concurrency); ``overheads=False`` leaves the fixed costs out (no child process)."""
    fresh = "torch" not in sys.modules  # then the imports here are what the forkserver will do
    import_s = import_preload()
    t0 = time.perf_counter()
    from harness.config import load_study
    from harness.grid import expand, resolved_config
    from harness.scheduler import build_slots, describe_slots
    from harness.tracking import resolve_uri

    study = load_study(path)
    trials = expand(study)
    slots = build_slots(study.devices, study.trials_per_device)
    limit = min(len(slots), workers or len(slots))
    t_data = time.perf_counter()
    data = load_splits(study)
    data_s = time.perf_counter() - t_data
    setup_s = time.perf_counter() - t0
    device = slots[0].parent_device
    teachers, works = describe_work(study, data, trials, device)
    o = Overheads()
    if overheads:
        m = measure_mlflow(resolved_config(study, trials[0]) if trials else {}, study.train.epochs)
        store = m["store"] if _store_is_new(resolve_uri(tracking_uri)) else m["reopen"]
        procs = max(2, limit)
        o = Overheads(startup=import_s + setup_s + store + PARENT_OPS * m["op"],
                      pool_start=import_s if fresh else measure_pool_start(), worker_setup=m["reopen"] + data_s,
                      per_trial=m["trial"], op=m["op"], contention=measure_contention(procs), contention_procs=procs)
    threads = slots[0].threads if device == "cpu" else None
    cal = calibrate(study, data, trials, device, threads, budget)
    gpu = any(s.parent_device.startswith("cuda") for s in slots)
    est = plan(teachers, works, cal.rates, o, limit, study.trials_per_device if gpu else 1)
    est.device, est.pool, est.study = device, describe_slots(slots, limit), study.name
    est.calibration_seconds = cal.seconds
    return est


def format_duration(seconds: float) -> str:
    """``42s``, ``4m 10s``, ``3h 05m``, ``2d 04h``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _hours(h: float) -> str:
    """Hours with 3 decimals (1 from 10 h on), two significant digits below 0.01 h."""
    if h >= 10:
        return f"{h:.1f}"
    return f"{h:.3f}" if h >= 0.01 or h == 0 else f"{h:.2g}"


def render(est: Estimate) -> list[str]:
    """The estimate as markdown lines: the table (split, teachers, trials, device-hours), the
    total line, the device caveat and what is included."""
    lines = [f"estimate for study {est.study} on {est.pool} (calibrated on {est.device} in "
             f"{est.calibration_seconds:.0f}s, {len(est.rates)} combinations)", "",
             "| split | teachers (h) | trials (n) | trials (h) | device-hours |", "|---|---:|---:|---:|---:|"]
    for r in est.rows:
        cached = f" ({r.teachers_cached} of {r.teachers} cached)" if r.teachers_cached else ""
        lines.append(f"| {r.split} | {_hours(r.teacher_seconds / 3600)}{cached} | {r.trials} | "
                     f"{_hours(r.trial_seconds / 3600)} | {_hours(r.device_hours)} |")
    o = est.overheads
    lines += ["", f"total: {_hours(est.device_hours)} device-hours; estimated wall time "
                  f"{format_duration(est.wall_seconds)} (start-up {format_duration(o.startup)}, teachers "
                  f"{format_duration(est.teacher_stage_seconds)}, trials {format_duration(est.makespan_seconds)} "
                  f"on {est.slots} slot{'s' * (est.slots != 1)})"]
    if not est.device.startswith("cuda"):
        lines.append(f"estimated on {est.device}: a GPU run will differ")
    lines.append("includes start-up, teacher training with routing statistics and pool outputs (cached teachers "
                 "cost 0), every trial's training, validation, test passes, diagnostics, set-up and MLflow "
                 "requests; not the report, compilation, retries or trials already finished")
    return lines


def print_rates(est: Estimate) -> None:
    for combo, r in est.rates.items():
        extra = "stats" if combo.startswith("teacher ") else "diagnostics"
        print(f"  {combo}: train {r.train * 1e3:.3f} ms/img, eval {r.eval * 1e3:.3f} ms/img, "
              f"{extra} {r.extra * 1e3:.3f} ms/img" + (f", set-up {r.fixed:.2f}s" if r.fixed else ""))


def run_estimate(path: str | Path, workers: int | None = None, tracking_uri: str | None = None) -> int:
    """``harness run-study STUDY --estimate``: print the table; exit code 0."""
    est = estimate_study(path, workers, tracking_uri)
    lines = render(est)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown("\n".join(lines)))
    else:
        print("\n".join(lines))
    print("calibration (per image):")
    print_rates(est)
    return 0
