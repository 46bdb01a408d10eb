"""The estimate's calibration: one short timing per distinct combination, with real
(random-initialised) networks on the study's real data, through the functions a real run calls
(see :mod:`harness.estimate`). torch is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from harness.estimate.arithmetic import Rate
from harness.estimate.work import student_combo, teacher_combo

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

    from harness.data.source import image_source
    from harness.train import make_optimizer, teacher_outputs, train_epoch

    bs = cfg.batch_size
    sub = _cycled(part, (WARMUP_BATCHES + TIMED_BATCHES) * bs)
    x = image_source(sub.x, device, channels_last=True).images  # as fit() holds the training part
    y = sub.y.to(device) if method.uses_labels else None
    cache = None
    if not cfg.augment:
        logits, feats = teacher_outputs(method.teachers, x, device=device)
        cache = ([t.to(device) for t in logits], [t.to(device) for t in feats])
    opt = make_optimizer(method.parameters(), cfg)
    gen = torch.Generator().manual_seed(0)

    def run(a: int, b: int) -> float:
        c = None if cache is None else ([t[a:b] for t in cache[0]], [t[a:b] for t in cache[1]])
        part_ab = image_source(x[a:b], device, channels_last=True)
        return _timed(lambda: train_epoch(method, opt, part_ab, None if y is None else y[a:b], c, cfg, gen), device)

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
