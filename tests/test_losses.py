"""Tests for harness.losses: hand values, invariances, limits, gradients, stability.

Reference values are computed here with plain ``math`` loops over Python lists (never with the
torch ops under test), from the formulas in shared/design/cka-spec.md.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.losses import (
    align_cosine,
    align_kl,
    align_relation,
    cross_supcon,
    mmd2,
    soft_target_kl,
    supcon,
)

# --------------------------------------------------------------------------- plain-python refs


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def ref_supcon(h: list[list[float]], y: list[int], tau: float) -> float:
    n = len(h)
    losses = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(math.exp(_dot(h[i], h[a]) / tau) for a in range(n) if a != i)
        total = 0.0
        for p in pos:
            total += math.log(math.exp(_dot(h[i], h[p]) / tau) / denom)
        losses.append(-total / len(pos))
    return sum(losses) / len(losses) if losses else 0.0


def ref_cross_supcon(
    hs: list[list[float]], ht: list[list[float]], y: list[int], tau: float
) -> float:
    n = len(hs)
    losses = []
    for i in range(n):
        q_set = [j for j in range(n) if y[j] == y[i]]
        denom = sum(math.exp(_dot(hs[i], ht[j]) / tau) for j in range(n))
        total = sum(math.log(math.exp(_dot(hs[i], ht[q]) / tau) / denom) for q in q_set)
        losses.append(-total / len(q_set))
    return sum(losses) / n


def ref_align_kl(hs: list[list[float]], ht: list[list[float]], tau: float) -> float:
    vals = [
        _kl(_softmax([x / tau for x in t]), _softmax([x / tau for x in s])) for s, t in zip(hs, ht)
    ]
    return sum(vals) / len(vals)


def ref_align_cosine(hs: list[list[float]], ht: list[list[float]]) -> float:
    vals = [1 - _dot(s, t) / math.sqrt(_dot(s, s) * _dot(t, t)) for s, t in zip(hs, ht)]
    return sum(vals) / len(vals)


def ref_align_relation(hs: list[list[float]], ht: list[list[float]], tau: float) -> float:
    n = len(hs)
    vals = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        rt = _softmax([_dot(ht[i], ht[j]) / tau for j in others])
        rs = _softmax([_dot(hs[i], hs[j]) / tau for j in others])
        vals.append(_kl(rt, rs))
    return sum(vals) / n


def ref_soft_target_kl(zt: list[list[float]], zs: list[list[float]], T: float) -> float:
    vals = [_kl(_softmax([x / T for x in t]), _softmax([x / T for x in s])) for t, s in zip(zt, zs)]
    return T * T * sum(vals) / len(vals)


def ref_mmd2(x: list[list[float]], y: list[list[float]], sigmas: tuple[float, ...]) -> float:
    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(_dot(v, v))
        return [a / n for a in v]

    def k(a: list[float], b: list[float]) -> float:
        d2 = sum((u - v) ** 2 for u, v in zip(a, b))
        return sum(math.exp(-d2 / (2 * s * s)) for s in sigmas)

    def mean_k(a: list[list[float]], b: list[list[float]]) -> float:
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    xu, yu = [unit(v) for v in x], [unit(v) for v in y]
    return max(0.0, mean_k(xu, xu) + mean_k(yu, yu) - 2 * mean_k(xu, yu))


# --------------------------------------------------------------------------- fixtures / helpers


def _unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _lists(t: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in t]


Y4 = [0, 1, 0, 1]
Y4_MIXED = [2, 2, 2, 5]  # one class of three, one singleton


# --------------------------------------------------------------------------- hand values


def test_supcon_closed_form_excludes_anchors_without_positives() -> None:
    # Anchor 0: positive 1 (dot 0), negative 2 (dot -1) -> log(1 + e^-1).
    # Anchor 1: positive 0 (dot 0), negative 2 (dot 0) -> log 2.  Anchor 2: no positive -> out.
    h = _t([[1, 0], [0, 1], [-1, 0]])
    y = torch.tensor([0, 0, 1])
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2  # mean over 2 anchors, not 3
    assert supcon(h, y, tau=1.0).item() == pytest.approx(expected, rel=1e-12)


def test_supcon_two_samples_same_label_is_zero() -> None:
    # Denominator holds only the positive itself: -log(1) = 0 whatever the vectors.
    h = _t([[0.6, 0.8], [1.0, 0.0]])
    assert supcon(h, torch.tensor([3, 3]), tau=0.1).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("labels", [Y4, Y4_MIXED, [0, 0, 0, 0]])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_matches_reference(labels: list[int], tau: float) -> None:
    h = _unit(4, 3, seed=1)
    got = supcon(h, torch.tensor(labels), tau=tau).item()
    assert got == pytest.approx(ref_supcon(_lists(h), labels, tau), rel=1e-10)


def test_cross_supcon_closed_form() -> None:
    # h_s = h_t = e1, e2, labels distinct, tau = 1: each anchor -log(e / (e + 1)).
    h = _t([[1, 0], [0, 1]])
    expected = math.log(1 + math.exp(-1))
    assert cross_supcon(h, h, torch.tensor([0, 1]), tau=1.0).item() == pytest.approx(expected)
    # Same label: Q(i) = {0, 1}: -(1/2)(log(e/(e+1)) + log(1/(e+1))) for each anchor.
    expected_same = -0.5 * (math.log(math.e / (math.e + 1)) + math.log(1 / (math.e + 1)))
    got = cross_supcon(h, h, torch.tensor([4, 4]), tau=1.0).item()
    assert got == pytest.approx(expected_same)


@pytest.mark.parametrize("labels", [Y4, Y4_MIXED, [0, 1, 2, 3]])
def test_cross_supcon_matches_reference(labels: list[int]) -> None:
    hs, ht = _unit(4, 3, seed=2), _unit(4, 3, seed=3)
    y = torch.tensor(labels)
    fwd = ref_cross_supcon(_lists(hs), _lists(ht), labels, 0.2)
    bwd = ref_cross_supcon(_lists(ht), _lists(hs), labels, 0.2)
    assert cross_supcon(hs, ht, y, tau=0.2).item() == pytest.approx(fwd, rel=1e-10)
    sym = cross_supcon(hs, ht, y, tau=0.2, symmetric=True).item()
    assert sym == pytest.approx((fwd + bwd) / 2, rel=1e-10)
    # the teacher-anchored direction is really computed: ``symmetric`` changes the value
    assert sym != pytest.approx(cross_supcon(hs, ht, y, tau=0.2).item(), rel=1e-6)


def test_align_kl_closed_form() -> None:
    # p_t = softmax(0, 1), p_s = softmax(1, 0): KL = (e - 1)/(e + 1) = tanh(1/2).
    got = align_kl(_t([[1, 0]]), _t([[0, 1]]), tau=1.0).item()
    assert got == pytest.approx(math.tanh(0.5), rel=1e-12)


def test_align_kl_matches_reference_and_direction() -> None:
    hs, ht = _unit(3, 3, seed=4), _unit(3, 3, seed=5)
    assert align_kl(hs, ht, tau=0.3).item() == pytest.approx(
        ref_align_kl(_lists(hs), _lists(ht), 0.3), rel=1e-10
    )
    # KL(teacher || student), not the reverse.
    assert align_kl(hs, ht, tau=0.3).item() != pytest.approx(align_kl(ht, hs, tau=0.3).item())


def test_align_cosine_closed_form_and_normalises() -> None:
    hs = _t([[1, 0], [3, 4], [1, 1]])
    ht = _t([[0, 2], [6, 8], [1, 0]])
    expected = (1 + 0 + (1 - 1 / math.sqrt(2))) / 3
    assert align_cosine(hs, ht).item() == pytest.approx(expected, rel=1e-12)
    hs2, ht2 = _unit(4, 3, seed=6) * 3.0, _unit(4, 3, seed=7) * 0.2
    assert align_cosine(hs2, ht2).item() == pytest.approx(
        ref_align_cosine(_lists(hs2), _lists(ht2)), rel=1e-10
    )


def test_align_relation_closed_form_masks_diagonal() -> None:
    # Teacher: rows e1, e2, -e1; student: e1, e1, e2 (tau = 1).
    ht = _t([[1, 0], [0, 1], [-1, 0]])
    hs = _t([[1, 0], [1, 0], [0, 1]])
    # Off-diagonal similarities per row (order: the two other samples):
    # teacher rows: [0, -1], [0, 0], [-1, 0]; student rows: [1, 0], [1, 0], [0, 0].
    rt = [_softmax([0, -1]), _softmax([0, 0]), _softmax([-1, 0])]
    rs = [_softmax([1, 0]), _softmax([1, 0]), _softmax([0, 0])]
    expected = sum(_kl(a, b) for a, b in zip(rt, rs)) / 3
    assert align_relation(hs, ht, tau=1.0).item() == pytest.approx(expected, rel=1e-12)
    # Not the value with the diagonal kept inside the softmax.
    keep = [_softmax([1, 0, -1]), _softmax([0, 1, 0]), _softmax([-1, 0, 1])]
    keep_s = [_softmax([1, 1, 0]), _softmax([1, 1, 0]), _softmax([0, 0, 1])]
    with_diag = sum(_kl(a, b) for a, b in zip(keep, keep_s)) / 3
    assert align_relation(hs, ht, tau=1.0).item() != pytest.approx(with_diag, rel=1e-3)


def test_align_relation_matches_reference() -> None:
    hs, ht = _unit(4, 3, seed=8), _unit(4, 3, seed=9)
    assert align_relation(hs, ht, tau=0.25).item() == pytest.approx(
        ref_align_relation(_lists(hs), _lists(ht), 0.25), rel=1e-10
    )


def test_soft_target_kl_closed_form() -> None:
    zt = _t([[0, math.log(3)]])  # p_t = (1/4, 3/4)
    zs = _t([[0, 0]])  # p_s = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert soft_target_kl(zt, zs).item() == pytest.approx(expected, rel=1e-12)
    # T = 2: p_t = (1, sqrt 3)/(1 + sqrt 3), times T^2 = 4.
    a = 1 / (1 + math.sqrt(3))
    expected_t2 = 4 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    assert soft_target_kl(zt, zs, T=2.0).item() == pytest.approx(expected_t2, rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_soft_target_kl_matches_explicit_t2_kl(T: float) -> None:
    g = torch.Generator().manual_seed(10)
    zt = torch.randn(3, 4, generator=g, dtype=torch.float64) * 3
    zs = torch.randn(3, 4, generator=g, dtype=torch.float64) * 3
    got = soft_target_kl(zt, zs, T=T).item()
    assert got == pytest.approx(ref_soft_target_kl(_lists(zt), _lists(zs), T), rel=1e-10)
    # The T^2 factor is there: dividing it out leaves the plain KL of the tempered softmaxes.
    plain = ref_soft_target_kl(_lists(zt / T), _lists(zs / T), 1.0)
    assert got / (T * T) == pytest.approx(plain, rel=1e-10)


def test_mmd2_closed_form_and_normalises() -> None:
    # Unit e1 vs e2, one sigma = 1: Kxx = Kyy = 1, Kxy = exp(-2/2) -> 2 - 2/e.
    expected = 2 - 2 / math.e
    assert mmd2(_t([[1, 0]]), _t([[0, 1]]), sigmas=(1.0,)).item() == pytest.approx(expected)
    # Rows are L2-normalised first, so scaling them changes nothing.
    assert mmd2(_t([[2, 0]]), _t([[0, 3]]), sigmas=(1.0,)).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "sigmas", [(0.5,), (0.1, 1.0, 2.0), (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)]
)
def test_mmd2_matches_reference(sigmas: tuple[float, ...]) -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64) + 1.0  # M != N is allowed
    got = mmd2(x, y, sigmas=sigmas).item()
    assert got == pytest.approx(ref_mmd2(_lists(x), _lists(y), sigmas), rel=1e-9)
    assert got > 0


def test_mmd2_clamps_negative_squared_distance_roundoff() -> None:
    # x = [a], y = [-a], one tiny sigma: K(a,-a) = exp(-4/(2 sigma^2)) = 0, so
    # MMD^2 = K(a,a) + K(-a,-a) <= 2, since no kernel value can exceed 1. In float32,
    # |a|^2 + |a|^2 - 2 a.a rounds below 0 for a good share of rows; unclamped, exp(+) > 1.
    g = torch.Generator().manual_seed(14)
    rows = torch.randn(40, 16, generator=g)
    for a in rows:
        value = mmd2(a[None], -a[None], sigmas=(0.001,)).item()
        assert value <= 2.0  # (>= 0 holds by the clamp)


def test_mmd2_self_distance_is_exactly_zero_and_float32_agrees_with_float64_on_relu_features() -> None:
    # ReLU features as a trunk gives them (many exact zeros, norms far from 1). The narrowest
    # kernel (2 sigma^2 = 2e-6) sees a self-distance of 1e-7 as exp(-0.05): norms computed apart
    # from the Gram matrix biased the float32 MMD about 0.8% low and its gradient 1.5%.
    g = torch.Generator().manual_seed(21)
    x64 = torch.relu(torch.randn(32, 64, generator=g, dtype=torch.float64) * 3.0)
    y64 = torch.relu(torch.randn(24, 64, generator=g, dtype=torch.float64) * 3.0 + 0.2)
    x32, y32 = x64.float().requires_grad_(), y64.float()
    x64 = x64.clone().requires_grad_()
    want, got = mmd2(x64, y64), mmd2(x32, y32)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (g64,), (g32,) = torch.autograd.grad(want, x64), torch.autograd.grad(got, x32)
    assert (g32.double() - g64).norm() / g64.norm() < 1e-5
    # each block's diagonal: K(a, a) = len(sigmas) exactly, so MMD of a set to itself is exactly 0
    assert mmd2(x32.detach(), x32.detach()).item() == 0.0


def test_mmd2_default_sigmas_are_the_spec_list() -> None:
    x, y = _unit(3, 3, seed=12), _unit(3, 3, seed=13)
    spec = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0)
    assert mmd2(x, y).item() == pytest.approx(ref_mmd2(_lists(x), _lists(y), spec), rel=1e-9)


# --------------------------------------------------------------------------- invariances


def _perm(n: int, seed: int) -> torch.Tensor:
    p = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(p, torch.arange(n))
    return p


N_INV = 8
Y_INV = torch.tensor([0, 0, 1, 2, 1, 0, 3, 2])  # label 3 has no positive for supcon


@pytest.mark.parametrize(
    "name",
    ["supcon", "cross_supcon", "cross_supcon_sym", "align_kl", "align_cosine", "align_relation",
     "soft_target_kl", "mmd2"],
)
def test_batch_permutation_invariance(name: str) -> None:
    hs, ht = _unit(N_INV, 4, seed=20), _unit(N_INV, 4, seed=21)
    fns = {
        "supcon": lambda a, b, y: supcon(a, y),
        "cross_supcon": lambda a, b, y: cross_supcon(a, b, y),
        "cross_supcon_sym": lambda a, b, y: cross_supcon(a, b, y, symmetric=True),
        "align_kl": lambda a, b, y: align_kl(a, b),
        "align_cosine": lambda a, b, y: align_cosine(a, b),
        "align_relation": lambda a, b, y: align_relation(a, b),
        "soft_target_kl": lambda a, b, y: soft_target_kl(5 * b, 5 * a, T=2.0),
        "mmd2": lambda a, b, y: mmd2(a, b + 0.5, sigmas=(0.2, 1.0)),
    }
    fn = fns[name]
    p = _perm(N_INV, seed=22)
    base = fn(hs, ht, Y_INV)
    assert base.item() > 1e-6  # non-trivial value
    assert fn(hs[p], ht[p], Y_INV[p]).item() == pytest.approx(base.item(), rel=1e-10)
    # Permuting only one side breaks the pairing (except for mmd2, a set-to-set distance);
    # supcon has a single side, so there the labels are left in place.
    q = _perm(N_INV, seed=23)
    shuffled = fn(hs[q], ht, Y_INV if name == "supcon" else Y_INV[q]).item()
    if name == "mmd2":
        assert shuffled == pytest.approx(base.item(), rel=1e-10)
    else:
        assert shuffled != pytest.approx(base.item(), rel=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_label_relabelling_invariance(symmetric: bool) -> None:
    hs, ht = _unit(N_INV, 4, seed=24), _unit(N_INV, 4, seed=25)
    mapping = torch.tensor([7, 3, 11, 0])  # a permutation of label ids onto other ids
    y2 = mapping[Y_INV]
    assert supcon(hs, y2).item() == pytest.approx(supcon(hs, Y_INV).item(), rel=1e-12)
    a = cross_supcon(hs, ht, Y_INV, symmetric=symmetric).item()
    assert cross_supcon(hs, ht, y2, symmetric=symmetric).item() == pytest.approx(a, rel=1e-12)
    # A partition change (merging two labels) does change the value.
    merged = torch.where(Y_INV == 3, torch.tensor(0), Y_INV)
    assert supcon(hs, merged).item() != pytest.approx(supcon(hs, Y_INV).item())


def test_symmetric_is_average_of_directions() -> None:
    hs, ht = _unit(6, 5, seed=26), _unit(6, 5, seed=27)
    y = torch.tensor([0, 1, 1, 2, 0, 2])
    fwd, bwd = cross_supcon(hs, ht, y), cross_supcon(ht, hs, y)
    sym = cross_supcon(hs, ht, y, symmetric=True).item()
    assert sym == pytest.approx(0.5 * (fwd.item() + bwd.item()), rel=1e-12)
    assert sym != pytest.approx(fwd.item(), rel=1e-6)  # not just the student-anchored direction


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alignment_losses_vanish_on_identical_inputs(dtype: torch.dtype) -> None:
    h = _unit(5, 4, seed=30, dtype=dtype)
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(31), dtype=dtype) * 10
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    assert align_kl(h, h.clone()).item() == pytest.approx(0.0, abs=atol)
    assert align_cosine(h, h.clone()).item() == pytest.approx(0.0, abs=atol)
    assert align_cosine(h, 3 * h).item() == pytest.approx(0.0, abs=atol)
    assert align_relation(h, h.clone()).item() == pytest.approx(0.0, abs=atol)
    assert soft_target_kl(z, z.clone(), T=3.0).item() == pytest.approx(0.0, abs=atol)
    assert mmd2(h, h.clone()).item() == pytest.approx(0.0, abs=atol)
    # ... and are positive once the inputs differ.
    other = _unit(5, 4, seed=32, dtype=dtype)
    for fn in (align_kl, align_cosine, align_relation, mmd2):
        assert fn(other, h).item() > 1e-3


def test_soft_target_kl_is_shift_invariant_per_row() -> None:
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    shift = torch.tensor([[1.0], [-3.0], [10.0], [0.5]], dtype=torch.float64)
    assert soft_target_kl(z, z + shift).item() == pytest.approx(0.0, abs=1e-12)


def test_single_sample_edge_cases() -> None:
    h = _unit(1, 3, seed=34).requires_grad_(True)
    loss = supcon(h, torch.tensor([0])) + align_relation(h, h)
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad is not None and torch.all(h.grad == 0)


# --------------------------------------------------------------------------- gradients


def _gc(fn, *inputs: torch.Tensor) -> bool:
    ins = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    return torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_supcon() -> None:
    y = torch.tensor([0, 1, 0, 1, 2])  # label 2 has no positive
    assert _gc(lambda h: supcon(h, y, tau=0.2), _unit(5, 3, seed=40))


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_cross_supcon(symmetric: bool) -> None:
    y = torch.tensor([0, 1, 0, 1, 2])
    assert _gc(
        lambda a, b: cross_supcon(a, b, y, tau=0.2, symmetric=symmetric),
        _unit(5, 3, seed=41),
        _unit(5, 3, seed=42),
    )


def test_gradcheck_alignment_and_kd() -> None:
    a, b = _unit(4, 3, seed=43), _unit(4, 3, seed=44)
    assert _gc(lambda s, t: align_kl(s, t, tau=0.2), a, b)
    assert _gc(align_cosine, a * 2, b * 0.5)
    assert _gc(lambda s, t: align_relation(s, t, tau=0.2), a, b)
    g = torch.Generator().manual_seed(45)
    zt = torch.randn(3, 4, generator=g, dtype=torch.float64)
    zs = torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert _gc(lambda t, s: soft_target_kl(t, s, T=2.0), zt, zs)


def test_gradcheck_mmd2() -> None:
    g = torch.Generator().manual_seed(46)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64) + 0.7
    assert mmd2(x, y, sigmas=(0.3, 1.0, 2.0)).item() > 1e-3  # away from the max(0, .) clamp
    assert _gc(lambda a, b: mmd2(a, b, sigmas=(0.3, 1.0, 2.0)), x, y)


# --------------------------------------------------------------------------- stability


def _all_losses(hs: torch.Tensor, ht: torch.Tensor, zt: torch.Tensor, zs: torch.Tensor,
                y: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    return {
        "supcon": supcon(hs, y, tau=tau),
        "cross": cross_supcon(hs, ht, y, tau=tau),
        "cross_sym": cross_supcon(hs, ht, y, tau=tau, symmetric=True),
        "align_kl": align_kl(hs, ht, tau=tau),
        "align_cosine": align_cosine(hs, ht),
        "align_relation": align_relation(hs, ht, tau=tau),
        "kd": soft_target_kl(zt, zs, T=1.0),
        "mmd2": mmd2(hs, ht),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_at_low_tau_and_large_logits(dtype: torch.dtype) -> None:
    n = 16
    hs = _unit(n, 8, seed=50, dtype=dtype)
    ht = _unit(n, 8, seed=51, dtype=dtype)
    # Make it harsh: duplicated and antipodal rows across labels.
    hs = torch.cat([hs[:12], hs[:2], -hs[2:4]])
    hs.requires_grad_(True)
    ht.requires_grad_(True)
    g = torch.Generator().manual_seed(52)
    signs = torch.randint(0, 2, (n, 10), generator=g).to(dtype) * 2 - 1
    zt = (50 * signs).requires_grad_(True)
    zs = (-50 * signs).requires_grad_(True)
    y = torch.randint(0, 4, (n,), generator=g)
    losses = _all_losses(hs, ht, zt, zs, y, tau=0.05)
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    for t in (hs, ht, zt, zs):
        assert t.grad is not None and torch.all(torch.isfinite(t.grad))
    # Opposite ±50 logits: the loss is huge but exact (about 100 per mismatched logit pair).
    assert losses["kd"].item() > 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_supcon_extreme_value_is_exact_where_naive_log_softmax_underflows(
    dtype: torch.dtype,
) -> None:
    # Anchor 0: positive at -e1 (dot -1), negative at +e1 (dot +1); with a = 1/tau the naive
    # probability e^-2a underflows to 0 (log -> -inf) for a = 100 in float32 and a = 500 in
    # float64; the exact anchor loss is 2a + log1p(e^-2a).
    tau = 0.01 if dtype == torch.float32 else 0.002
    a = 1 / tau
    h = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 0, 1])
    expected = (2 * a + math.log1p(math.exp(-2 * a)) + math.log(2)) / 2
    loss = supcon(h, y, tau=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(torch.isfinite(h.grad))


# --------------------------------------------------------------------------- supcon, no positives


def test_supcon_no_positives_returns_connected_zero() -> None:
    h = _unit(4, 3, seed=60).requires_grad_(True)
    loss = supcon(h, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert h.grad is not None and torch.all(h.grad == 0)


def test_supcon_anchors_without_positives_still_act_as_negatives() -> None:
    # Moving the positive-less sample 2 changes the loss of the other anchors' denominators.
    y = torch.tensor([0, 0, 1])
    h1 = _t([[1, 0], [0, 1], [-1, 0]])
    h2 = _t([[1, 0], [0, 1], [0.6, 0.8]])
    assert supcon(h1, y, tau=0.5).item() != pytest.approx(supcon(h2, y, tau=0.5).item())
    assert supcon(h2, y, tau=0.5).item() == pytest.approx(
        ref_supcon(_lists(h2), [0, 0, 1], 0.5), rel=1e-12
    )


# --------------------------------------------------------------------------- purity


def test_functions_do_not_modify_inputs() -> None:
    hs, ht = _unit(4, 3, seed=70), _unit(4, 3, seed=71)
    y = torch.tensor([0, 0, 1, 1])
    zs, zt = hs * 10, ht * 10
    saved = [t.clone() for t in (hs, ht, y, zs, zt)]
    _all_losses(hs, ht, zt, zs, y, tau=0.1)
    for before, after in zip(saved, (hs, ht, y, zs, zt)):
        assert torch.equal(before, after)


def test_bad_temperature_is_rejected() -> None:
    h = _unit(3, 3, seed=72)
    with pytest.raises(ValueError, match="tau"):
        supcon(h, torch.tensor([0, 0, 1]), tau=0.0)
    with pytest.raises(ValueError, match="T"):
        soft_target_kl(h, h, T=-1.0)
