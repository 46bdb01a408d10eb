"""The one training/evaluation loop every method uses. It never asks which method it runs.

Per epoch: seeded permutation of the training images, batches as index slices,
``loss = sum_t w_t * term_t`` over the method's terms, one optimiser step per batch; then the
validation union accuracy selects the best epoch. Training labels reach the method only when it
declares ``uses_labels``.

The loop reads one batch source (:class:`harness.data.source.ImageSource`), whatever holds the
images: in memory, a tensor on the trial's device sliced as ``x[idx]``; streamed
(``dataset.stream``), the same index batches decoded by a DataLoader (workers, prefetching, pinned
memory on CUDA). Evaluation and teacher outputs read every part in order in the same chunks
(:func:`harness.data.stream.in_chunks`), so nothing here asks where the images are.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.config import TrainConfig
from harness.data.splits import PartData, SplitData
from harness.data.source import ImageSource, image_source
from harness.data.stream import LazyImages, images_device, in_chunks, on_device
from harness.methods.base import PARAM_ROLES, Batch, Method


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite: the trial fails with this as its reason."""


class EarlyStop(Exception):
    """Raised by an epoch callback to end training on purpose (e.g. a tuning pruner)."""


@dataclass
class FitResult:
    """Per-epoch history and final metrics (``test/*`` last epoch and ``*_best`` at best val)."""

    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None
    #: whether training and evaluation ran with every determinism flag really set (:func:`determinism`)
    deterministic: bool = False


EpochCallback = Callable[[int, dict[str, float]], None]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (small data) or SGD with momentum (CIFAR scale), weight decay from the config.

    ``params``: tensors (one group at ``cfg.lr``), or parameter-group dicts (``{"params": [...],
    "lr": ...}``; a group without ``lr`` gets ``cfg.lr``). Frozen tensors are left out, and so is
    a group left empty by that."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in groups if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def method_optimizer(method: Method, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The trial's optimiser: one parameter group per role of the method's
    :meth:`~harness.methods.base.Method.param_roles` (in :data:`PARAM_ROLES` order, empty ones
    left out, each group tagged ``"role"``), at ``lr_body = cfg.lr``, ``lr_head = cfg.lr *
    cfg.lr_mult.head``, ``lr_method = cfg.lr * cfg.lr_mult.method``; weight decay and momentum
    from ``cfg`` for every group. ValueError when the roles name an unknown role or do not hold
    each trainable parameter exactly once."""
    roles = method.param_roles()
    unknown = sorted(set(roles) - set(PARAM_ROLES))
    if unknown:
        raise ValueError(f"{type(method).__name__}.param_roles: unknown role {unknown[0]!r} "
                         f"(roles: {', '.join(PARAM_ROLES)})")
    mult = {"body": 1.0, "head": cfg.lr_mult.head, "method": cfg.lr_mult.method}
    groups = [{"params": list(roles.get(r, ())), "lr": cfg.lr * mult[r], "role": r} for r in PARAM_ROLES]
    listed = [id(p) for g in groups for p in g["params"] if p.requires_grad]
    if len(listed) != len(set(listed)) or set(listed) != {id(p) for p in method.parameters() if p.requires_grad}:
        raise ValueError(f"{type(method).__name__}.param_roles must hold each trainable parameter exactly once")
    return make_optimizer(groups, cfg)


def augment(x: Tensor, generator: torch.Generator, ops: tuple[str, ...] = ("crop", "flip")) -> Tensor:
    """Random crop with zero padding (H/8) if ``"crop"`` in ``ops``, horizontal flip with
    probability 1/2 if ``"flip"``; vectorised, on x's device, draws from ``generator`` only."""
    n, c, h, w = x.shape
    if not ops:
        return x
    pad = max(1, h // 8) if "crop" in ops else 0
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    if pad:
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator).to(x.device)
    else:
        dy = dx = torch.zeros(n, 1, dtype=torch.long, device=x.device)
    if "flip" in ops:
        flip = (torch.rand(n, 1, generator=generator) < 0.5).to(x.device)
    else:
        flip = torch.zeros(n, 1, dtype=torch.bool, device=x.device)
    rows = dy + torch.arange(h, device=x.device)  # [n, h]
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = dx + torch.where(flip, cols.flip(1), cols)  # [n, w]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


#: chunk size of every in-order pass (evaluation, teacher outputs, routing statistics)
EVAL_BATCH = 1024


@torch.no_grad()
def predict_all(
    fn: Callable[[Tensor], Tensor], x: Tensor | LazyImages, batch_size: int = EVAL_BATCH,
    device: str | torch.device | None = None,
) -> Tensor:
    """``fn`` on all of ``x`` in chunks; a lazy ``x`` is decoded chunk by chunk onto ``device``."""
    outs = [fn(xb) for xb in in_chunks(x, batch_size, device)]
    if outs:
        return torch.cat(outs)
    return torch.zeros(0, device=images_device(x, device))


@torch.no_grad()
def evaluate(
    fn: Callable[[Tensor], Tensor], part: PartData, sizes: list[int], offsets: list[int], device: str | torch.device
) -> dict[str, float]:
    """Union accuracy (argmax over all n logits) and per-task accuracy (argmax inside S_k)."""
    if len(part) == 0:
        return {}
    logits = predict_all(fn, on_device(part.x, device), device=device).cpu()
    out = {"union_acc": (logits.argmax(1) == part.y).float().mean().item()}
    for k, (o, n) in enumerate(zip(offsets, sizes)):
        m = part.t == k
        if m.any():
            pred = logits[m][:, o : o + n].argmax(1) + o
            out[f"task_acc/{k}"] = (pred == part.y[m]).float().mean().item()
    return out


TeacherOutputs = tuple[list[Tensor], list[Tensor]]


def teacher_outputs(
    teachers: torch.nn.Module, x: Tensor | LazyImages, bs: int = EVAL_BATCH, device: str | torch.device | None = None
) -> TeacherOutputs:
    """Frozen teachers' (logits, features) on all of x, computed once (inference mode).

    A lazy ``x`` is decoded chunk by chunk onto ``device`` (default: the teachers' device)."""
    if len(teachers) == 0:  # type: ignore[arg-type]
        return [], []
    with torch.inference_mode():
        dev = device if device is not None else next(teachers.parameters()).device
        chunks = [teachers.outputs(xb) for xb in in_chunks(x, bs, dev)]  # type: ignore[operator]
    k = len(chunks[0][0])
    logits = [torch.cat([c[0][j] for c in chunks]) for j in range(k)]
    feats = [torch.cat([c[1][j] for c in chunks]) for j in range(k)]
    return logits, feats


def _state(method: Method) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


#: seed of the fixed shuffle that turns positions in the training part into opaque image ids
ID_SEED = 20231017


def opaque_ids(n: int) -> Tensor:
    """Image ids for ``Batch.index``: id of position i = ``perm[i]`` for one fixed seeded
    permutation of ``range(n)``. Stable across epochs, seeds and methods (an id names one image,
    e.g. for a memory bank), but the training part is laid out task by task, so raw positions
    would tell a method which teacher's task an image belongs to; shuffled ids do not."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(ID_SEED))


def batch_indices(perm: Tensor, batch_size: int) -> list[Tensor]:
    """The epoch's batches: consecutive slices of ``perm``; the last partial batch is dropped
    (BatchNorm), unless there is less than one batch, then the one batch is all of ``perm``."""
    n = len(perm)
    if n < batch_size:
        return [perm]
    return [perm[b * batch_size : (b + 1) * batch_size] for b in range(n // batch_size)]


def train_epoch(
    method: Method, opt: torch.optim.Optimizer, source: ImageSource, y: Tensor | None,
    cache: TeacherOutputs | None, cfg: TrainConfig, gen: torch.Generator,
) -> dict[str, float]:
    """One pass over the training images; returns the mean of every term and of the total.

    ``source`` gives each batch's images and indices on its device
    (:class:`harness.data.source.ImageSource`: slices of a tensor, or decoded from disk)."""
    method.train()
    n = len(source)
    ids = opaque_ids(n)
    perm = torch.randperm(n, generator=gen)
    batches = batch_indices(perm, cfg.batch_size)
    n_batches = len(batches)
    device, images = source.device, source.take(batches)
    weights = method.weights()
    sums: dict[str, float] = {}
    try:
        for b, (xb, idx_d) in enumerate(images):  # the whole pass (a persistent loader's workers stay up)
            idx = batches[b]
            if cfg.augment:
                xb = augment(xb, gen, cfg.augment)
            if cache is not None:
                tl, tf = [c[idx_d] for c in cache[0]], [c[idx_d] for c in cache[1]]
            else:
                tl, tf = method.teachers.outputs(xb) if len(method.teachers) else ([], [])
            batch = Batch(xb, ids[idx], tl, tf, y[idx_d] if y is not None else None)
            with _autocast(device, cfg):
                terms = method.loss_terms(batch)
                total = sum(weights.get(t, 1.0) * v for t, v in terms.items())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            # one device->host transfer per batch for all terms (not one per term)
            names = list(terms) + ["total"]
            vals = torch.stack([v.detach().float() for v in terms.values()] + [total.detach().float()]).tolist()
            for t, val in zip(names, vals):
                if not math.isfinite(val):
                    raise NonFiniteLossError(f"loss/{t} is {val} at batch {b}")
                sums[t] = sums.get(t, 0.0) + val
    finally:
        images.close()  # type: ignore[attr-defined]  (a pass stopped early stops its loader's workers now)
    return {f"loss/{t}": s / n_batches for t, s in sums.items()}


def effective_precision(cfg: TrainConfig, device: str | torch.device) -> str:
    """``bf16`` when the loop really autocasts (``train.amp`` on a CUDA device with bf16), else
    ``fp32`` (IEEE float32: the loop turns TF32 off, :func:`no_tf32`). Part of the trial key: the
    same study trains to other numbers at another precision."""
    dev = torch.device(device)
    if dev.type != "cuda" or not cfg.amp:
        return "fp32"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _autocast(device: torch.device, cfg: TrainConfig):
    """bf16 autocast when :func:`effective_precision` says so; a no-op elsewhere."""
    enabled = effective_precision(cfg, device) == "bf16"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled) if enabled else contextlib.nullcontext()


def no_tf32() -> None:
    """``fp32`` means IEEE float32: TF32 off for cuBLAS matmuls and cuDNN convolutions (torch
    turns it on for convolutions by default). A CPU trial and a GPU trial with the same key (the
    key says ``fp32``) then do the same arithmetic up to summation order; a GPU that should be fast
    trains in ``bf16`` (``train.amp``), which the key names. Independent of ``train.deterministic``,
    which fixes the order of operations, not their precision."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def tf32_flags() -> dict[str, bool]:
    """Whether TF32 is allowed now, read back from torch (what :func:`no_tf32` set)."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def gpu_setup(method: Method, cfg: TrainConfig, device: torch.device) -> None:
    """No TF32 (:func:`no_tf32`), channels_last and optional torch.compile (cudnn flags:
    :func:`determinism`): what :func:`fit` does to a method on its device before the first step,
    and the estimate's calibration does the same (:mod:`harness.estimate.calibration`)."""
    no_tf32()  # on every device: the flags are global, and a CPU trial reads them back the same
    if cfg.compile:  # compiles the feature extractor in place; the state dict keeps its keys
        method.student.features = torch.compile(method.student.features)  # type: ignore[method-assign]
    if device.type != "cuda":
        return
    method.student.to(memory_format=torch.channels_last)
    torch.cuda.reset_peak_memory_stats(device)


#: cuBLAS reads this variable when the process creates its first cuBLAS workspace; ``:4096:8``
#: (or ``:16:8``) makes CUDA matmuls reproducible. It must be in the environment before CUDA
#: starts: workers get it from the runner (:func:`deterministic_env`), before they import CUDA.
CUBLAS_WORKSPACE_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def deterministic_env(deterministic: bool) -> dict[str, str]:
    """The environment a worker needs before CUDA starts: ``{CUBLAS_WORKSPACE_CONFIG: :4096:8}``
    for deterministic training (a deterministic value already set here is kept), else nothing."""
    if not deterministic:
        return {}
    have = os.environ.get(CUBLAS_WORKSPACE_VAR, "")
    return {CUBLAS_WORKSPACE_VAR: have if have in _CUBLAS_DETERMINISTIC else CUBLAS_WORKSPACE}


def ensure_cublas_workspace() -> bool:
    """Set :data:`CUBLAS_WORKSPACE_VAR` here unless it is already deterministic; True when it holds
    for every cuBLAS call of this process (it was set before CUDA started, or is set now before)."""
    if os.environ.get(CUBLAS_WORKSPACE_VAR, "") in _CUBLAS_DETERMINISTIC:
        return True
    late = torch.cuda.is_initialized()
    os.environ.update(deterministic_env(True))
    return not late


def determinism_flags() -> dict[str, bool]:
    """What this process really has set: the flags a deterministic trial needs, read back."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cublas_workspace": os.environ.get(CUBLAS_WORKSPACE_VAR, "") in _CUBLAS_DETERMINISTIC}


@contextlib.contextmanager
def determinism(on: bool, device: str | torch.device) -> Iterator[bool]:
    """Inside: ``on`` sets ``torch.use_deterministic_algorithms(True)``, cudnn.deterministic and no
    cudnn autotuning, on every device (no op of the harness raises on the CPU for want of a
    deterministic kernel), and on CUDA the cuBLAS workspace variable (a warning when CUDA had
    started before it was set: its matmuls may then not reproduce). ``off`` turns them off and lets
    cudnn autotune on CUDA. The previous flags come back on exit. Yields whether the code inside
    runs deterministically, read back from what is really set."""
    dev = torch.device(device)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cublas_in_time = True
    if on and dev.type == "cuda":
        cublas_in_time = ensure_cublas_workspace()
        if not cublas_in_time:
            warnings.warn(f"{CUBLAS_WORKSPACE_VAR} was set after CUDA started in this process: its matmuls may not "
                          "reproduce (set it before the first CUDA call, as the runner does for its workers)",
                          stacklevel=3)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on and dev.type == "cuda"
    try:
        flags = determinism_flags()
        cublas = dev.type != "cuda" or (flags["cublas_workspace"] and cublas_in_time)
        yield (on and flags["deterministic_algorithms"] and flags["cudnn_deterministic"]
               and not flags["cudnn_benchmark"] and cublas)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def fit(
    method: Method, data: SplitData, cfg: TrainConfig, seed: int,
    device: str | torch.device = "cpu", on_epoch: EpochCallback | None = None,
    cached_outputs: TeacherOutputs | None = None,
) -> FitResult:
    """Train ``method`` on ``data`` for ``cfg.epochs`` epochs; evaluate last and best-val models.

    Without augmentation the frozen teachers' outputs on the training images are computed once
    (or taken from ``cached_outputs``, e.g. the on-disk cache) instead of every batch. A streamed
    (lazy) training part is read through one DataLoader whose workers live for all epochs.
    ``cfg.deterministic`` holds for the whole call (:func:`determinism`); on CUDA every epoch logs
    the trial's peak GPU memory so far (``gpu_peak_mb``, see :func:`gpu_memory_metrics`).
    """
    with determinism(cfg.deterministic, device) as deterministic:
        res = _fit(method, data, cfg, seed, torch.device(device), on_epoch, cached_outputs)
    res.deterministic = deterministic
    return res


def gpu_memory_metrics(device: str | torch.device) -> dict[str, float]:
    """Peak GPU memory of this process since the last reset, in MiB: ``gpu_peak_mb`` = what torch's
    caching allocator held (``max_memory_reserved``: the memory no other process could use, the
    figure that decides how many trials fit on one GPU), and ``cuda_max_allocated_mb`` = what
    tensors used (``max_memory_allocated``, the older metric, kept). Empty off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return {}
    return {"gpu_peak_mb": torch.cuda.max_memory_reserved(dev) / 2**20,
            "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(dev) / 2**20}


def _fit(
    method: Method, data: SplitData, cfg: TrainConfig, seed: int, device: torch.device,
    on_epoch: EpochCallback | None, cached_outputs: TeacherOutputs | None,
) -> FitResult:
    method.to(device)
    gpu_setup(method, cfg, device)
    res = FitResult()
    sizes, offsets = data.sizes, data.offsets
    source: ImageSource | None = None
    try:
        if method.trains:
            train = data.parts["train"]
            n_batches = len(batch_indices(torch.arange(len(train.x)), cfg.batch_size))
            source = image_source(train.x, device, channels_last=True, persistent=True, batches_per_pass=n_batches)
            x = source.images
            y = train.y.to(device) if method.uses_labels else None  # unlabelled means unlabelled
            cache = None
            if not cfg.augment:
                cache = cached_outputs or teacher_outputs(method.teachers, x, device=device)
                cache = ([t.to(device) for t in cache[0]], [t.to(device) for t in cache[1]])
            opt = method_optimizer(method, cfg)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs) if cfg.scheduler == "cosine" else None
            gen = torch.Generator().manual_seed(seed)
            best = -1.0
            for epoch in range(1, cfg.epochs + 1):
                t0 = time.perf_counter()
                metrics = train_epoch(method, opt, source, y, cache, cfg, gen)
                train_s = time.perf_counter() - t0
                if sched is not None:
                    sched.step()
                method.eval()
                val = evaluate(method.predict, data.parts["val"], sizes, offsets, device)
                metrics.update({f"val/{k}": v for k, v in val.items()})
                metrics["epoch_seconds"] = time.perf_counter() - t0
                metrics["images_per_second"] = len(x) / max(train_s, 1e-9)
                metrics.update(gpu_memory_metrics(device))
                score = val.get("union_acc", float(epoch))  # no val part: the last epoch is the best
                if score > best:
                    best, res.best_epoch, res.best_state = score, epoch, _state(method)
                res.history.append(metrics)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
    finally:
        if source is not None:
            source.close()  # stop the training part's workers before the test pass starts its own
    method.eval()
    last = evaluate(method.predict, data.parts["test"], sizes, offsets, device)
    best_m = last
    if res.best_state is not None and res.best_epoch != len(res.history):
        last_state = _state(method)
        method.load_state_dict(res.best_state)
        best_m = evaluate(method.predict, data.parts["test"], sizes, offsets, device)
        method.load_state_dict(last_state)
    res.final = {f"test/{k}": v for k, v in last.items()}
    res.final.update({f"test/{k.replace('_acc', '_acc_best')}": v for k, v in best_m.items()})
    if res.history and "val/union_acc" in res.history[0]:
        res.final["val/union_acc_best"] = res.history[res.best_epoch - 1]["val/union_acc"]
    res.final["best_epoch"] = float(res.best_epoch)
    return res
