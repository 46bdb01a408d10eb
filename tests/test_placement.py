"""Placement by construction: everything a trial computes with lives on the trial's device.

A CPU-only machine has one real device, so these tests give the trial a second one. Under
:func:`virtual_device` (a ``TorchFunctionMode``) ``t.to("meta")``, ``module.to("meta")`` and
factories called with ``device="meta"`` give :class:`OnDevice` tensors: real CPU tensors that
compute as usual but report ``meta`` as their device. Then, as on a GPU:

- every torch call whose tensor arguments live on more than one device fails, naming the call
  (0-dim CPU tensors excepted, as CUDA kernels accept them; ``copy_`` may cross devices);
- ``.numpy()`` of a tensor on the device fails; ``.cpu()`` / ``.to("cpu")`` copies it back.

A tensor that ``method.to(device)`` does not move (a plain attribute, a dataclass field), or one
created without an explicit device, stays a plain CPU tensor, so the first operation that meets
the trial's tensors fails. Every method runs through the real training loop
(:func:`harness.train.fit`: training batches, optimiser steps, validation, test) and the trial's
diagnostics under every routing rule, with the teachers' routing statistics read from the cache
format (``weights_only=True``) onto the CPU, where a real trial loads them.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from harness.config import TrainConfig
from harness.data.splits import PartData, SplitData, TaskInfo
from harness.methods.base import SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.routing import SCORES, STANDARDIZE, TARGETS, RoutingConfig, TeacherStats, fit_background, fit_stats
from harness.train import fit
from harness.trial import diagnostics

#: the trial's device: a label only, the tensors that report it are CPU tensors
DEVICE = torch.device("meta")


class PlacementError(AssertionError):
    """Tensors of two devices met in one torch call."""


class OnDevice(Tensor):
    """A CPU tensor that, under :class:`VirtualDevice`, reports :data:`DEVICE` as its device."""


def _device(t: Tensor) -> torch.device:
    return DEVICE if isinstance(t, OnDevice) else t.device


def _flat_tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat_tensors(o)


def _cpu_scalar(t: Tensor) -> bool:
    return not isinstance(t, OnDevice) and t.dim() == 0 and t.device.type == "cpu"


class VirtualDevice(TorchFunctionMode):
    """Simulates a second device (module docstring); counts the torch calls it checked."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func == Tensor.device.__get__:
            return DEVICE if isinstance(args[0], OnDevice) else func(*args)
        if func == Tensor.grad.__get__:  # autograd's gradients are plain tensors: on the device of their leaf
            g = func(*args)
            return g.as_subclass(OnDevice) if g is not None and isinstance(args[0], OnDevice) else g
        if func in (Tensor.numpy, Tensor.__array__) and isinstance(args[0], OnDevice):
            raise PlacementError("numpy() of a tensor on the device (call .cpu() first)")
        if func in (Tensor.to, Tensor.cpu):
            return self._to(func, args, kwargs)
        if func in (torch._has_compatible_shallow_copy_type, Tensor.copy_):  # metadata; copies may cross devices
            return func(*args, **kwargs)
        if kwargs.get("device") is not None and torch.device(kwargs["device"]) == DEVICE:  # a factory
            return func(*args, **{**kwargs, "device": "cpu"}).as_subclass(OnDevice)
        self.calls += 1
        tensors = list(_flat_tensors((args, kwargs)))
        devices = {_device(t) for t in tensors if not _cpu_scalar(t)}
        if len(devices) > 1:
            what = ", ".join(f"{_device(t)} {tuple(t.shape)}" for t in tensors)
            raise PlacementError(f"{getattr(func, '__qualname__', func)} mixes devices: {what}")
        return func(*args, **kwargs)

    @staticmethod
    def _to(func: Any, args: tuple, kwargs: dict) -> Tensor:
        src = args[0]
        if func is Tensor.cpu:
            dev, dtype = torch.device("cpu"), None
        else:
            dev, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        if dev is None:  # dtype or memory format only: stays where it is
            return func(*args, **kwargs)
        out = src.to(dtype=dtype) if dtype is not None else src
        if torch.device(dev) == DEVICE:
            return out if isinstance(src, OnDevice) else out.clone().as_subclass(OnDevice)
        if torch.device(dev).type == "cpu":
            return out.clone().as_subclass(Tensor) if isinstance(src, OnDevice) else out
        raise PlacementError(f"to({dev}) in a test on {DEVICE}")


@contextlib.contextmanager
def virtual_device() -> Iterator[VirtualDevice]:
    """:class:`VirtualDevice`, with ``module.to`` replacing parameters (so that they become
    :class:`OnDevice` tensors) instead of assigning ``.data``."""
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with VirtualDevice() as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)


# --------------------------------------------------------------------------- the mechanism itself


def test_the_virtual_device_catches_what_a_gpu_would():
    with virtual_device() as mode:
        a = torch.ones(3).to(DEVICE)
        assert a.device == DEVICE and torch.zeros(2, device=a.device).device == DEVICE
        assert (a * torch.tensor(2.0)).sum().item() == 6.0  # a CPU scalar is fine, as on CUDA
        with pytest.raises(PlacementError, match="mixes devices"):
            a + torch.ones(3)  # created without a device
        with pytest.raises(PlacementError, match="numpy"):
            a.numpy()
        b = a.cpu()
        assert b.device.type == "cpu" and not isinstance(b, OnDevice) and b.numpy().sum() == 3.0
        m = torch.nn.Linear(3, 2)
        m.plain = torch.ones(3)  # not a buffer: module.to leaves it behind
        m.to(DEVICE)
        assert m.weight.device == DEVICE and isinstance(m.weight, torch.nn.Parameter)
        assert m.plain.device.type == "cpu"
        with pytest.raises(PlacementError, match="sub"):
            m(a) - m.plain[:2]
        m(a).sum().backward()
        assert m.weight.grad.device == DEVICE
        assert mode.calls > 0


# --------------------------------------------------------------------------- every method x every rule

TASKS = ((0, 1, 2), (3, 4), (5,))  # heterogeneous teachers, one of them with a single class
SIZES = tuple(len(t) for t in TASKS)
OFFSETS = (0, 3, 5)
SHAPE = (1, 8, 8)
RULES = [f"{s}/{h}/{t}" for s in SCORES for h in STANDARDIZE for t in TARGETS] + [
    "max_logit+mahalanobis/z/routed", "energy+knn/percentile/concat", "entropy/none/routed@T_pl=2",
]
ROUTING_METHODS = ("cka", "kd", "teachers")
CASES = [(m, r) for m in ROUTING_METHODS for r in RULES] + [("cfl", None), ("scratch", None)]


@functools.lru_cache(maxsize=None)
def _split() -> SplitData:
    """A tiny three-task split of random 8x8 images: 32 training, 12 validation, 12 test images."""
    g = torch.Generator().manual_seed(0)
    parts = {}
    for name, n in (("train", 32), ("val", 12), ("test", 12)):
        t = torch.arange(n) % len(TASKS)
        y = torch.tensor([OFFSETS[k] + i % SIZES[k] for i, k in enumerate(t.tolist())])
        parts[name] = PartData(torch.rand(n, *SHAPE, generator=g), y, t)
    tasks = [TaskInfo("random", None, c, tuple(map(str, c))) for c in TASKS]
    return SplitData("tiny", tasks, parts)


def _nets() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    nets = [build_model("mlp", SHAPE, n, hidden=h) for n, h in zip(SIZES, (24, 40, 16))]
    with torch.no_grad():  # sharp heads, so that the teachers' claims differ between rules
        for n in nets:
            n.head.weight.mul_(10.0)
    return [n.eval() for n in nets]


@functools.lru_cache(maxsize=None)
def _stats_files() -> list[bytes]:
    """Each teacher's routing statistics in the on-disk cache format (``TeacherStats.to_dict``)."""
    data, files = _split(), []
    for k, net in enumerate(_nets()):
        x, y = data.task_part(k, "train")
        xv, _ = data.task_part(k, "val")
        buf = io.BytesIO()
        with torch.no_grad():  # the background of ``rmd`` on the pool, the split's training images
            background = fit_background(net.features(data.parts["train"].x))
        torch.save(fit_stats(net, x, y, xv, background=background).to_dict(), buf)
        files.append(buf.getvalue())
    return files


def _teachers() -> TeacherSet:
    """Fresh teachers on the CPU with their statistics loaded as a trial loads them."""
    stats = [TeacherStats.from_dict(torch.load(io.BytesIO(b), map_location="cpu", weights_only=True))
             for b in _stats_files()]
    return TeacherSet(_nets(), stats)


def _method(name: str, rule: str | None):
    cls = get_method(name)
    params = {} if rule is None else {"routing": RoutingConfig.parse(rule).model_dump()}
    teachers = _teachers()
    torch.manual_seed(1)
    student = build_model("mlp", SHAPE, sum(SIZES), hidden=32)
    return cls(student, teachers, cls.parse_params(params, f"methods.{name}"), SplitInfo(SIZES, OFFSETS)), teachers


def _tensors(obj: Any, seen: set[int] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Every tensor reachable from ``obj`` through attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield "", obj
    elif isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            yield from ((f"[{i}]{p}", t) for p, t in _tensors(o, seen))
    elif isinstance(obj, dict):
        for k, o in obj.items():
            yield from ((f"[{k!r}]{p}", t) for p, t in _tensors(o, seen))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, o in vars(obj).items():
            yield from ((f".{k}{p}", t) for p, t in _tensors(o, seen))


@pytest.mark.parametrize("name", ["cka", "kd", "cfl", "scratch", "teachers"])
def test_method_to_moves_every_tensor_of_the_method(name):
    """Whatever a method holds (weights, projectors, teachers, routing statistics) moves with
    ``method.to``: no tensor reachable from it stays on the CPU."""
    method, _ = _method(name, "max_logit+mahalanobis/percentile/routed" if name in ROUTING_METHODS else None)
    with virtual_device():
        method.to(DEVICE)
        left = [path for path, t in _tensors(method) if t.device != DEVICE]
    assert left == []


pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(method, rule: str | None) -> dict[str, float]:
    """Two training batches (teacher outputs cached, or computed per batch on augmented images for
    the ``routed`` rules), the validation and test passes; the final metrics."""
    augment = ["crop", "flip"] if rule is None or rule.endswith("routed") else []
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-3, augment=augment)
    res = fit(method, _split(), cfg, seed=0, device=DEVICE)
    assert len(res.history) == int(method.trains) and 0 <= res.final["test/union_acc"] <= 1
    return res.final


@pytest.mark.parametrize("name,rule", CASES, ids=[f"{m}-{r}" for m, r in CASES])
def test_every_method_and_rule_trains_and_routes_on_the_trial_device(name, rule):
    method, teachers = _method(name, rule)
    with virtual_device() as mode:
        _fit(method, rule)
        logits, feats = teachers.outputs(_split().parts["test"].x.to(DEVICE))
        on_device = method.route(logits, feats)
        assert all(t.device == DEVICE for t in on_device)
        # CPU copies (as the diagnostics hold them) are routed on the device, the result comes back
        from_cpu = method.route([z.cpu() for z in logits], [f.cpu() for f in feats])
        assert all(t.device.type == "cpu" for t in from_cpu)
    assert mode.calls > 100  # the mode saw the trial's work
    assert all(torch.equal(a.cpu(), b) for a, b in zip(on_device, from_cpu))


@pytest.mark.parametrize("name", ["cka", "kd", "cfl", "scratch", "teachers"])
def test_the_diagnostics_run_on_the_trial_device(name):
    rule = "knn+mahalanobis/percentile/routed" if name in ROUTING_METHODS else None
    method, teachers = _method(name, rule)
    with virtual_device():
        _fit(method, rule)
        diag = diagnostics(method, teachers, _split(), DEVICE)
        labels, _, _ = method.route(*teachers.outputs(_split().parts["test"].x.to(DEVICE)))
        labels = labels.cpu()
    # the ensemble accuracy of the diagnostics is that of the routing done here, on the device
    y = _split().parts["test"].y
    assert diag["diag/ensemble_union_acc"] == pytest.approx((labels == y).float().mean().item())
