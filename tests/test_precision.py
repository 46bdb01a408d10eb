"""The precision policy (harness.precision) in the losses: bf16 autocast vs float32, on the CPU.

CPU bf16 autocast does to matmuls what CUDA autocast does on a GPU, so these tests prove on a
CPU-only machine what a GPU trial with ``amp: true`` computes:

- every loss function of ``harness.losses``, called under autocast on bf16 activations, computes
  exactly what it computes in float32 on the same values (value and gradient);
- every loss term of CFL, KD, scratch and CKA (with variants), on a fixed digits batch of 128
  images with feature widths 64-256, has under bf16 autocast a gradient of cosine >= 0.99 and norm
  within 10% of the float32 one, w.r.t. the student's parameters and w.r.t. the method's own
  parameters (heads), wherever the term reaches them. Before the policy, CFL's MMD had here a
  gradient of ~1,000x the float32 norm under autocast (cosine 0.96 on the student, 0.72 on the
  heads; value 6.6 vs 5.4), and mmd2's gradient on its bf16 inputs had cosine 0.05 with float32.

The student is an MLP. A student with BatchNorm (the ``cnn``) adds its own bf16 forward rounding,
amplified by BatchNorm's mean subtraction, to every term that goes through its features (measured:
cosine ~0.989 for CKA's L_intra with or without the policy): that is bf16 training of that network,
not the precision of a loss, so it would blur what these tests measure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from harness import losses
from harness.data.datasets import load_digits
from harness.methods.base import Batch, Method, SplitInfo, TeacherSet, get_method
from harness.models import Net, build_model

SHAPE = (1, 8, 8)
SIZES, OFFSETS = (5, 5), (0, 5)
N = 128  # images in the batch


pytestmark = pytest.mark.usefixtures("one_thread")


def _bf16() -> AbstractContextManager[None]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _data() -> tuple[Tensor, Tensor]:
    d = load_digits()
    return d.x_train, d.y_train


@functools.lru_cache(maxsize=None)
def _teachers() -> TeacherSet:
    """Two teachers of different widths (64 and 256 features) trained briefly on digits 0-4 and
    5-9, so that their logits and features look like a teacher's, not like noise."""
    x, y = _data()
    torch.manual_seed(0)
    nets: list[Net] = [build_model("mlp", SHAPE, 5, hidden=w) for w in (64, 256)]
    g = torch.Generator().manual_seed(3)
    for k, net in enumerate(nets):
        mine = (y // 5) == k
        xk, yk = x[mine], y[mine] - 5 * k
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(40):
            i = torch.randint(0, len(xk), (64,), generator=g)
            loss = F.cross_entropy(net(xk[i]), yk[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return TeacherSet(nets)


@functools.lru_cache(maxsize=None)
def _batch(labels: bool) -> Batch:
    """The first 128 training images; teacher outputs in float32, outside autocast, as in the
    training loop (harness.train runs the teachers before entering autocast)."""
    x, y = _data()
    xb = x[:N]
    tl, tf = _teachers().outputs(xb)
    return Batch(xb, torch.arange(N), tl, tf, y[:N] if labels else None)


def _method(name: str, params: dict) -> Method:
    torch.manual_seed(1)
    cls = get_method(name)
    student = build_model("mlp", SHAPE, sum(SIZES), hidden=128)
    p = cls.parse_params(params, f"methods.{name}")
    return cls(student, _teachers(), p, SplitInfo(SIZES, OFFSETS)).train()


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


# --------------------------------------------------------------------------- loss functions


def _bf16_activations() -> dict[str, Tensor]:
    """What autocast hands to a loss: bf16 unit vectors of two projections (128 x 128) and bf16
    student logits; float32 teacher logits (teachers run outside autocast) and labels."""
    x, y = _data()
    torch.manual_seed(4)
    net = build_model("mlp", SHAPE, 10, hidden=128)
    proj_s, proj_t = torch.nn.Linear(128, 128), torch.nn.Linear(128, 128)
    with torch.no_grad(), _bf16():
        f = net.features(x[:N])
        h_s = F.normalize(proj_s(f), dim=1)
        h_t = F.normalize(proj_t(f) + 0.5 * proj_s(f), dim=1)  # correlated with h_s, as in training
        z_s = net.head(f)
    assert h_s.dtype == z_s.dtype == torch.bfloat16
    z_t = torch.cat(_teachers().outputs(x[:N])[0], dim=1)
    return {"h_s": h_s, "h_t": h_t, "z_s": z_s, "z_t": z_t, "y": y[:N], "y5": y[:N] % 5}


LOSS_CALLS: dict[str, tuple[Callable[..., Tensor], tuple[str, ...], dict]] = {
    "supcon": (losses.supcon, ("h_s", "y5"), {"tau": 0.05}),
    "cross_supcon": (losses.cross_supcon, ("h_s", "h_t", "y5"), {"tau": 0.1}),
    "cross_supcon_symmetric": (losses.cross_supcon, ("h_s", "h_t", "y5"), {"symmetric": True}),
    "align_kl": (losses.align_kl, ("h_s", "h_t"), {"tau": 0.1}),
    "align_cosine": (losses.align_cosine, ("h_s", "h_t"), {}),
    "align_relation": (losses.align_relation, ("h_s", "h_t"), {"tau": 0.1}),
    "soft_target_kl": (losses.soft_target_kl, ("z_t", "z_s"), {"T": 4.0}),
    "cross_entropy": (losses.cross_entropy, ("z_s", "y"), {}),
    "mmd2": (losses.mmd2, ("h_s", "h_t"), {}),
}


@pytest.mark.parametrize("name", sorted(LOSS_CALLS))
def test_loss_under_autocast_is_the_float32_loss_of_the_same_values(name: str) -> None:
    fn, arg_names, kwargs = LOSS_CALLS[name]
    acts = _bf16_activations()
    # under autocast: the bf16 activations themselves
    floating = [acts[a].is_floating_point() for a in arg_names]
    args = [acts[a].detach().clone().requires_grad_(f) for a, f in zip(arg_names, floating)]
    with _bf16():
        value = fn(*args, **kwargs)
    value.backward()
    # reference: the same values in float32, no autocast
    ref_args = [acts[a].detach().float().requires_grad_() if f else acts[a]
                for a, f in zip(arg_names, floating)]
    ref = fn(*ref_args, **kwargs)
    ref.backward()

    assert float(ref.detach()) > 0  # a loss with something to say (not a degenerate zero)
    for a, r in zip(args, ref_args):
        if a.is_floating_point():
            assert a.grad is not None and r.grad is not None
            assert r.grad.abs().sum() > 0
            # the gradient reaching a bf16 activation is the float32 one, rounded once to bf16
            cos = _cosine(a.grad.flatten(), r.grad.flatten())
            assert torch.equal(a.grad, r.grad.to(a.dtype)), f"gradient cosine {cos:.4f} vs float32"
    assert float(value.detach()) == float(ref.detach())
    assert value.dtype == torch.float32


def test_every_public_loss_follows_the_policy() -> None:
    """Each loss of harness.losses is wrapped (and listed in LOSS_CALLS above); in float32 and in
    float64 the wrapper is a no-op: same dtype, same bits as the undecorated function."""
    assert {fn.__name__ for fn, _, _ in LOSS_CALLS.values()} == set(losses.__all__)
    acts = _bf16_activations()
    for name in losses.__all__:
        fn = getattr(losses, name)
        assert hasattr(fn, "__wrapped__"), f"losses.{name} does not run under the precision policy"
        _, arg_names, kwargs = next(c for c in LOSS_CALLS.values() if c[0] is fn)
        for dtype in (torch.float32, torch.float64):
            args = [acts[a].to(dtype) if acts[a].is_floating_point() else acts[a]
                    for a in arg_names]
            out, bare = fn(*args, **kwargs), fn.__wrapped__(*args, **kwargs)
            assert out.dtype == dtype, (name, dtype)
            assert torch.equal(out, bare), (name, dtype)


# --------------------------------------------------------------------------- methods

METHOD_CASES = [
    ("cfl", {}),
    ("kd", {}),
    ("kd", {"routing": {"targets": "routed"}}),
    ("scratch", {}),
    ("cka", {}),
    ("cka", {"align": "cosine", "symmetric": True, "intra_models": "all"}),
    ("cka", {"align": "relation", "w_task": 0, "tau": 0.05}),
    ("cka", {"soft_target": "per_task", "align_to": "claiming", "conf_threshold": 0.5}),
]


def _term_grads(m: Method, batch: Batch, amp: bool) -> dict[str, tuple[float, Tensor, Tensor]]:
    """term -> (value, gradient on the student's parameters, gradient on the method's own)."""
    with _bf16() if amp else torch.autocast("cpu", enabled=False):
        terms = m.loss_terms(batch)
    student_ids = {id(p) for p in m.student.parameters()}
    params = [p for p in m.parameters() if p.requires_grad]
    out = {}
    for name, value in terms.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat = [(id(p), (torch.zeros_like(p) if g is None else g).flatten().float())
                for p, g in zip(params, grads)]
        g_student = torch.cat([g for i, g in flat if i in student_ids])
        g_own = torch.cat([g for i, g in flat if i not in student_ids] or [torch.zeros(1)])
        out[name] = (float(value.detach()), g_student, g_own)
    return out


@pytest.mark.parametrize(("name", "params"), METHOD_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}"
                              for n, p in METHOD_CASES])
def test_method_terms_under_bf16_autocast_match_float32(name: str, params: dict) -> None:
    m = _method(name, params)
    batch = _batch(m.uses_labels)
    fp32 = _term_grads(m, batch, amp=False)
    bf16 = _term_grads(m, batch, amp=True)
    assert set(fp32) == set(bf16) and fp32
    for term, (v32, *g32) in fp32.items():
        v16, *g16 = bf16[term]
        checked = 0
        for part, a, b in zip(("student", "heads"), g32, g16):
            if float(a.norm()) == 0.0:  # the term does not reach these parameters
                continue
            checked += 1
            cos, ratio = _cosine(a, b), float(b.norm() / a.norm())
            assert cos >= 0.99, f"{name} {term}: gradient on the {part}, cosine {cos:.4f}"
            assert 0.9 <= ratio <= 1.1, f"{name} {term}: {part} gradient norm ratio {ratio:.3g}"
        assert checked, f"{name} {term}: no gradient on any parameter"
        assert v16 == pytest.approx(v32, rel=0.01), f"{name} {term}: value {v16} vs {v32}"
