"""Routing: claim scores against direct computations, standardisation on own data, ties, targets,
pseudo-labels (the one implementation of the spec's "Pseudo-labels") and their temperature T_pl;
scores in bounded row chunks, and in float32 whatever autocast says (``harness.precision``)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from sklearn.covariance import LedoitWolf

import harness.routing as routing
from harness.methods.base import SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.routing import (
    SCORES, STANDARDIZE, TARGETS, RoutingConfig, TeacherStats, claim_scores, fit_background, fit_stats, raw_score, route,
    standardize, target_logits,
)
from tests.reference import ref_pseudo_labels


class Linear2(torch.nn.Module):
    """A tiny 'teacher': features = x flattened (d=3), logits = W f."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float32)

    def forward_both(self, x):
        f = x.flatten(1)
        return f @ self.w.T, f


def _stats(means, precision, bank, k=1):
    n = len(SCORES)
    return TeacherStats(torch.tensor(means).float(), torch.tensor(precision).float(), F.normalize(torch.tensor(bank).float(), dim=1),
                        torch.zeros(n), torch.ones(n), torch.zeros(n, 0), k)


def test_logit_scores_by_hand():
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    f = torch.zeros(2, 1)
    assert torch.allclose(raw_score("max_logit", z, f, None), torch.tensor([2.0, 1.0]))
    assert torch.allclose(raw_score("energy", z, f, None), torch.tensor([math.log(math.e**2 + 1), math.log(2 * math.e)]))
    # confidence = log-odds of the max softmax: p = e^2 / (e^2 + 1) -> log(p / (1 - p)) = 2; p = 1/2 -> 0
    assert torch.allclose(raw_score("confidence", z, f, None), torch.tensor([2.0, 0.0]), atol=1e-6)
    p = math.e**2 / (math.e**2 + 1)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
    # entropy = -log(H / log n): the normalised entropy h ~ 0.53 gives -log h, the uniform row 0
    assert torch.allclose(raw_score("entropy", z, f, None), torch.tensor([-math.log(h), 0.0]), atol=1e-6)
    # three classes with T_pl = 2: p = softmax(z / 2), scores from the tempered probabilities
    z3 = torch.tensor([[3.0, 1.0, -1.0]])
    q = [math.exp(v / 2) for v in (3.0, 1.0, -1.0)]
    q = [v / sum(q) for v in q]
    hq = -sum(v * math.log(v) for v in q) / math.log(3)
    assert raw_score("confidence", z3, f[:1], None, T_pl=2.0).item() == pytest.approx(math.log(q[0] / (1 - q[0])), rel=1e-5)
    assert raw_score("entropy", z3, f[:1], None, T_pl=2.0).item() == pytest.approx(-math.log(hq), rel=1e-5)
    # one class: p_max = 1 and H = 0, so both scores are +inf (a one-class teacher is always sure)
    assert torch.equal(raw_score("entropy", torch.ones(3, 1), torch.zeros(3, 1), None), torch.full((3,), math.inf))
    assert torch.equal(raw_score("confidence", torch.ones(3, 1), torch.zeros(3, 1), None), torch.full((3,), math.inf))


def test_confidence_and_entropy_scores_match_float64_references_and_keep_resolving():
    # random logits from flat to sharp (margins up to ~20), against the plain formulas in float64
    g = torch.Generator().manual_seed(3)
    z = torch.randn(200, 4, generator=g, dtype=torch.float64) * torch.logspace(-1, 0.7, 200, dtype=torch.float64)[:, None]
    p = torch.softmax(z, 1)
    pm = p.max(1).values
    h = -(p * p.log()).sum(1) / math.log(4)
    f = torch.zeros(200, 1)
    conf, ent = raw_score("confidence", z, f, None), raw_score("entropy", z, f, None)
    assert conf.dtype == torch.float32
    assert torch.allclose(conf.double(), (pm / (1 - pm)).log(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(ent.double(), -h.log(), rtol=1e-5, atol=1e-5)
    # float32 inputs with top margins beyond saturation (from 20 on, p_max == 1.0 in float32): still ordered
    margins = torch.tensor([15.0, 20.0, 30.0, 60.0, 120.0, 400.0])
    zs = torch.stack([margins, torch.zeros(6), torch.full((6,), -1.0)], 1)
    for name in ("confidence", "entropy"):
        s = raw_score(name, zs, torch.zeros(6, 1), None)
        assert torch.isfinite(s).all() and (s.diff() > 0).all(), name
    # confidence ~ log-odds: for a dominant top class it is the margin minus log sum_{c != c*} e^{z_c - z_2nd}
    c = raw_score("confidence", zs, torch.zeros(6, 1), None)
    assert torch.allclose(c, margins - math.log(1 + math.exp(-1)), rtol=1e-6)


def test_mahalanobis_matches_direct_computation():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 4))
    a = rng.normal(size=(4, 4))
    prec = a @ a.T + np.eye(4)
    f = rng.normal(size=(5, 4))
    expected = [-min(math.sqrt((fi - m) @ prec @ (fi - m)) for m in means) for fi in f]
    got = raw_score("mahalanobis", torch.zeros(5, 3), torch.tensor(f).float(), _stats(means, prec, f))
    assert torch.allclose(got, torch.tensor(expected).float(), atol=1e-4)


def test_knn_is_distance_to_kth_neighbour_of_normalised_bank():
    bank = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    f = torch.tensor([[2.0, 0.0]])  # normalised (1, 0): distances 0, sqrt2, 2
    for k, d in [(1, 0.0), (2, math.sqrt(2)), (3, 2.0)]:
        assert raw_score("knn", torch.zeros(1, 2), f, _stats([[0.0, 0.0]], np.eye(2), bank, k)).item() == pytest.approx(-d, abs=1e-6)
    # exclude_self skips the zero distance of a bank point to itself
    st = _stats([[0.0, 0.0]], np.eye(2), bank, 1)
    assert raw_score("knn", torch.zeros(1, 2), f, st, exclude_self=True).item() == pytest.approx(-math.sqrt(2), abs=1e-6)


def test_fit_stats_uses_ledoit_wolf_and_own_data_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 1, 3, generator=g)
    y = torch.arange(60) % 2
    x_val = torch.randn(20, 1, 1, 3, generator=g)
    net = Linear2([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    st = fit_stats(net, x, y, x_val)
    f = x.flatten(1)
    means = torch.stack([f[y == c].mean(0) for c in (0, 1)])
    assert torch.allclose(st.means, means, atol=1e-6)
    lw = LedoitWolf().fit((f - means[y]).double().numpy())
    assert np.allclose(st.precision.numpy(), lw.precision_, atol=1e-4)
    ml = (f @ net.w.T).max(1).values
    i = SCORES.index("max_logit")
    assert st.z_mean[i].item() == pytest.approx(ml.mean().item(), abs=1e-5)
    assert st.z_std[i].item() == pytest.approx(ml.std().item(), abs=1e-5)
    assert st.bank.shape == (20, 3) and torch.allclose(st.bank.norm(dim=1), torch.ones(20))
    # z-standardised own training scores have mean 0 and std 1
    zs = standardize(raw_score("max_logit", f @ net.w.T, f, st), "max_logit", "z", st)
    assert zs.mean().item() == pytest.approx(0, abs=1e-5) and zs.std().item() == pytest.approx(1, abs=1e-5)
    # a one-class teacher: constant +inf confidence/entropy; finite statistics, standardised z = 0
    one = fit_stats(Linear2([[1.0, 0.0, 0.0]]), x, torch.zeros(60, dtype=torch.long), x_val)
    for s in ("confidence", "entropy"):
        i = SCORES.index(s)
        assert math.isinf(one.z_mean[i].item()) and math.isfinite(one.z_std[i].item())
        inf = raw_score(s, torch.zeros(4, 1), torch.zeros(4, 3), one)
        assert torch.equal(standardize(inf, s, "z", one), torch.zeros(4))
        assert torch.equal(standardize(inf, s, "percentile", one), torch.ones(4))
    # percentile: fraction of own validation scores <= s
    fv = x_val.flatten(1)
    vs = raw_score("max_logit", fv @ net.w.T, fv, st)
    pct = standardize(vs, "max_logit", "percentile", st)
    assert pct.max().item() == 1.0 and sorted(pct.tolist())[0] == pytest.approx(1 / 20)


def test_rmd_by_hand_in_one_dimension():
    """1-d features: Ledoit-Wolf shrinks a 1x1 covariance towards itself, so P = 1 / biased variance.
    Own data (one class) {0, 2}: mu = 1, P = 1; pool {-2, 0, 2}: mu_0 = 0, P_0 = 3/8.
    rmd(x) = 3/8 x^2 - (x - 1)^2: 3/8 at x = 1, -5/8 at x = 3, -1 at x = 0."""
    net = Linear2([[1.0]])
    st = fit_stats(net, torch.tensor([[0.0], [2.0]]), torch.zeros(2, dtype=torch.long), torch.tensor([[1.0]]),
                   background=fit_background(torch.tensor([[-2.0], [0.0], [2.0]])))
    assert st.bg_mean.tolist() == [0.0] and st.bg_precision.item() == pytest.approx(3 / 8)
    f = torch.tensor([[1.0], [3.0], [0.0]])
    assert torch.allclose(raw_score("rmd", f, f, st), torch.tensor([3 / 8, -5 / 8, -1.0]), atol=1e-6)
    # standardised on the teacher's own training images {0, 2}: rmd = -1 and 3/8 * 4 - 1 = 1/2
    i = SCORES.index("rmd")
    assert st.z_mean[i].item() == pytest.approx(-0.25) and st.z_std[i].item() == pytest.approx(1.5 / math.sqrt(2))
    assert st.val_sorted[i].tolist() == [pytest.approx(3 / 8)]  # the one validation image, x = 1


def test_rmd_matches_a_direct_computation_and_its_background_is_the_pool():
    """rmd = D_0 - min_c D_c with D_0 the squared Mahalanobis distance under Ledoit-Wolf fitted on
    the pool's features (sklearn, float64, directly) and D_c the class-conditional one."""
    g = torch.Generator().manual_seed(4)
    centres = 3 * torch.randn(3, 6, generator=g)
    y = torch.arange(90) % 3
    x = centres[y] + torch.randn(90, 6, generator=g)
    pool = torch.cat([x, 4 + 2 * torch.randn(200, 6, generator=g)])  # own images and others'
    net = Linear2(centres.tolist())
    st = fit_stats(net, x, y, x[:30], background=fit_background(pool))
    bg = LedoitWolf().fit(pool.double().numpy())
    assert np.allclose(st.bg_mean.numpy(), bg.location_, atol=1e-5)
    assert np.allclose(st.bg_precision.numpy(), bg.precision_, atol=1e-4)
    means = np.stack([x[y == c].double().numpy().mean(0) for c in range(3)])
    prec = LedoitWolf().fit(x.double().numpy() - means[y.numpy()]).precision_
    q = torch.randn(50, 6, generator=g).double().numpy() * 3
    d0 = np.einsum("nd,de,ne->n", q - bg.location_, bg.precision_, q - bg.location_)
    dc = np.stack([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], 1)
    got = raw_score("rmd", torch.zeros(50, 3), torch.from_numpy(q).float(), st).double().numpy()
    assert np.allclose(got, d0 - dc.min(1), rtol=1e-4, atol=1e-3)
    # the background is fitted on features alone: no label can reach it
    assert list(inspect.signature(fit_background).parameters) == ["pool_feats"]
    # without a background rmd cannot be scored (not silently replaced by something else)
    plain = fit_stats(net, x, y, x[:30])
    assert not plain.has_background and math.isnan(plain.z_mean[SCORES.index("rmd")].item())
    with pytest.raises(ValueError, match="rmd.*background fitted on the unlabelled pool"):
        raw_score("rmd", torch.zeros(2, 3), torch.zeros(2, 6), plain)


def test_standardisation_makes_differently_scaled_teachers_comparable():
    # teacher 1's logits are 10x larger: raw max_logit always claims for it; z-standardised does not
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(100, 2, generator=g), 10 * torch.randn(100, 3, generator=g)
    f = torch.zeros(100, 1)
    def st(z):
        s = TeacherStats(torch.zeros(1, 1), torch.eye(1), torch.zeros(1, 1), torch.zeros(len(SCORES)), torch.ones(len(SCORES)), torch.zeros(len(SCORES), 0))
        ml = z.max(1).values
        s.z_mean[1], s.z_std[1] = ml.mean(), ml.std()
        return s
    stats = [st(z0), st(z1)]
    raw = claim_scores([z0, z1], [f, f], stats, RoutingConfig.parse("max_logit/none"))
    zed = claim_scores([z0, z1], [f, f], stats, RoutingConfig.parse("max_logit/z"))
    assert (raw.argmax(1) == 1).float().mean() >= 0.85
    assert 0.3 < (zed.argmax(1) == 1).float().mean() < 0.7


def test_sum_of_scores_is_sum_of_standardised_scores():
    z = [torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 0.5, 0.0]])]
    f = [torch.zeros(1, 1)] * 2
    st = [TeacherStats(torch.zeros(1, 1), torch.eye(1), torch.zeros(1, 1), torch.arange(6.0), torch.full((6,), 2.0), torch.zeros(6, 0))] * 2
    both = claim_scores(z, f, st, RoutingConfig.parse("max_logit+energy/z"))
    ml = claim_scores(z, f, st, RoutingConfig.parse("max_logit/z"))
    en = claim_scores(z, f, st, RoutingConfig.parse("energy/z"))
    assert torch.allclose(both, ml + en)
    assert torch.allclose(ml, torch.tensor([[(3.0 - 1) / 2, (2.0 - 1) / 2]]))


@pytest.mark.parametrize("rule", ["confidence", "entropy"])
@pytest.mark.parametrize("T_pl", [1.0, 0.5, 3.0])
def test_route_agrees_with_reference_pseudo_labels_on_random_logits(rule, T_pl):
    # unsaturated logits (no float ties): the new scores keep the order of p_max / entropy exactly
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(300, 3, generator=g) * 2, torch.randn(300, 4, generator=g) * 3, torch.randn(300, 2, generator=g)]
    f = [torch.zeros(300, 1)] * 3
    y, k, conf = route(z, f, None, RoutingConfig(score=rule, T_pl=T_pl), (0, 3, 7))
    ry, rk, rconf = ref_pseudo_labels(z, (0, 3, 7), rule, T_pl)
    assert torch.equal(k, rk) and torch.equal(y, ry)
    assert torch.allclose(conf.double(), rconf, rtol=1e-5)
    assert len(set(k.tolist())) == 3 and y.dtype == torch.int64 and k.dtype == torch.int64


def test_confidence_and_entropy_disagree_where_the_spec_says():
    # A: 2 classes at offset 0; B: 3 classes at offset 2. Row 0: A is more confident (0.7 > 0.6) but
    # B has the lower normalised entropy (0.86 < 0.88); row 1: B wins on both (0.96 > 0.9).
    def logp(rows):
        return torch.tensor([[math.log(p) for p in r] for r in rows])
    za, zb = logp([[0.7, 0.3], [0.1, 0.9]]), logp([[0.6, 0.2, 0.2], [0.02, 0.02, 0.96]])
    f = [torch.zeros(2, 1)] * 2
    y, k, conf = route([za, zb], f, None, RoutingConfig(), (0, 2))
    assert k.tolist() == [0, 1] and y.tolist() == [0, 4] and conf.tolist() == pytest.approx([0.7, 0.96], rel=1e-6)
    y, k, conf = route([za, zb], f, None, RoutingConfig.parse("entropy"), (0, 2))
    assert k.tolist() == [1, 1] and y.tolist() == [2, 4] and conf.tolist() == pytest.approx([0.6, 0.96], rel=1e-6)


@pytest.mark.parametrize("rule", ["confidence", "entropy", "confidence/z", "entropy/z", "confidence/percentile"])
def test_more_confident_teacher_claims_whatever_the_order(rule):
    # top-logit margins 20 and 30: max softmax is exactly 1.0 for both in float32; the old code gave
    # every such image to teacher 0. The margin-30 teacher must claim, in both orders. Row 3, margins
    # 120 and 160: even the entropy of the probabilities underflows to 0 in float32.
    z20 = torch.tensor([[20.0, 0.0, -1.0], [0.0, 25.0, 5.0], [120.0, 0.0, 0.0]])  # margins 20, 20, 120
    z30 = torch.tensor([[-2.0, 28.0, 0.0], [35.0, 5.0, 4.0], [0.0, 160.0, 0.0]])  # margins 30, 30, 160
    f = [torch.zeros(3, 1)] * 2
    flat = TeacherStats(torch.zeros(1, 1), torch.eye(1), torch.zeros(1, 1), torch.zeros(len(SCORES)), torch.ones(len(SCORES)),
                        torch.linspace(-5, 40, 10).repeat(len(SCORES), 1))  # the same statistics for both teachers
    r = RoutingConfig.parse(rule)
    y, k, _ = route([z20, z30], f, [flat, flat], r, (0, 3))
    assert k.tolist() == [1, 1, 1] and y.tolist() == [4, 3, 4]
    y, k, _ = route([z30, z20], f, [flat, flat], r, (0, 3))
    assert k.tolist() == [0, 0, 0] and y.tolist() == [1, 0, 1]


def test_entropy_resolves_confident_teachers_with_the_same_margin():
    # same top margin 20 (p_max = 1.0 in float32 for both); B spreads its remaining mass over four
    # classes: normalised entropies (float64, by hand) A 6.2e-8 < B 1.1e-7, so A claims, in both orders
    za = torch.tensor([[20.0, 0.0]])
    zb = torch.tensor([[20.0, 0.0, 0.0, 0.0, 0.0]])
    e = math.exp(-20)
    ha = -sum(p * math.log(p) for p in (1 / (1 + e), e / (1 + e))) / math.log(2)
    hb = -sum(p * math.log(p) for p in [1 / (1 + 4 * e)] + [e / (1 + 4 * e)] * 4) / math.log(5)
    f = [torch.zeros(1, 1)] * 2
    assert route([za, zb], f, None, RoutingConfig.parse("entropy"), (0, 2))[1].item() == 0
    assert route([zb, za], f, None, RoutingConfig.parse("entropy"), (0, 5))[1].item() == 1
    s = claim_scores([za, zb], f, None, RoutingConfig.parse("entropy"))
    assert s[0].tolist() == pytest.approx([-math.log(ha), -math.log(hb)], rel=1e-5)


def test_percentile_ties_are_broken_by_the_z_standardised_score_not_the_order():
    # both teachers' scores are above all of their validation scores: percentile 1.0 for both.
    # z-standardised max_logit: teacher "hi" (5 - 0) / 1 = 5 beats teacher "lo" (9 - 6) / 1 = 3.
    def st(mean):
        s = TeacherStats(torch.zeros(1, 1), torch.eye(1), torch.zeros(1, 1), torch.zeros(len(SCORES)), torch.ones(len(SCORES)),
                         torch.zeros(len(SCORES), 4))
        s.z_mean[1] = mean
        return s
    hi, lo = torch.tensor([[5.0, 0.0]]), torch.tensor([[9.0, 0.0, 0.0]])
    f = [torch.zeros(1, 1)] * 2
    r = RoutingConfig.parse("max_logit/percentile")
    assert claim_scores([hi, lo], f, [st(0.0), st(6.0)], r).tolist() == [[1.0, 1.0]]
    assert route([hi, lo], f, [st(0.0), st(6.0)], r, (0, 2))[1].item() == 0
    assert route([lo, hi], f, [st(6.0), st(0.0)], r, (0, 3))[1].item() == 1


def test_remaining_ties_are_broken_by_energy_not_the_order():
    # max_logit ties at 1.0; the second teacher has the larger energy logsumexp(z)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.5]])
    f = [torch.zeros(1, 1)] * 2
    for rule in ("max_logit", "max_logit/none/routed"):
        assert route([a, b], f, None, RoutingConfig.parse(rule), (0, 2))[1].item() == 1
        assert route([b, a], f, None, RoutingConfig.parse(rule), (0, 2))[1].item() == 0
    # two one-class teachers (confidence +inf for both): the larger logit claims, in both orders
    one_lo, one_hi = torch.tensor([[0.2]]), torch.tensor([[3.0]])
    for rule in ("confidence", "entropy"):
        y, k, conf = route([one_lo, one_hi], f, None, RoutingConfig.parse(rule), (0, 1))
        assert k.item() == 1 and y.item() == 1 and conf.item() == 1.0
        assert route([one_hi, one_lo], f, None, RoutingConfig.parse(rule), (0, 1))[1].item() == 0
    # equal classes inside the claiming teacher: the first of them (argmax), offsets decide the id
    z = torch.tensor([[1.0, 3.0, 3.0]])
    assert route([z, z - 10], [torch.zeros(1, 1)] * 2, None, RoutingConfig(), (3, 0))[0].item() == 4


def test_large_logits_give_finite_scores_and_confidences():
    z1 = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    z2 = torch.tensor([[-50.0, 50.0, 0.0], [0.0, 0.0, 0.0]])
    f = [torch.zeros(2, 1)] * 2
    for rule in ("confidence", "entropy"):
        labels, teacher, conf = route([z1, z2], f, None, RoutingConfig.parse(rule), (0, 2))
        assert torch.all(torch.isfinite(conf)) and torch.all(torch.isfinite(claim_scores([z1, z2], f, None, RoutingConfig.parse(rule))))
        # row 0: margins 100 (teacher 0) and 50 (teacher 1); row 1: teacher 0 sure, teacher 1 uniform
        assert teacher.tolist() == [0, 0] and labels.tolist() == [0, 1]


def test_T_pl_changes_confidence_and_can_change_the_claimant():
    # A: two classes, fairly sharp; B: six classes with a larger top gap.
    # T_pl = 1: p_max A 0.881 > B 0.801; T_pl = 0.5: A 0.982 < B 0.988.
    za = torch.tensor([[2.0, 0.0]])
    zb = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    f = [torch.zeros(1, 1)] * 2
    for T_pl, claimant, c in ((1.0, 0, math.e**2 / (math.e**2 + 1)), (0.5, 1, math.e**6 / (math.e**6 + 5))):
        y, k, conf = route([za, zb], f, None, RoutingConfig(T_pl=T_pl), (0, 2))
        assert k.item() == claimant and y.item() == (0 if claimant == 0 else 2)
        assert conf.item() == pytest.approx(c, rel=1e-6)
    # entropy at T_pl: normalised entropies A 0.527 > B 0.458 at T_pl = 1 (B claims); at T_pl = 2,
    # A 0.840 < B 0.860 (A claims)
    for T_pl, claimant in ((1.0, 1), (2.0, 0)):
        assert route([za, zb], f, None, RoutingConfig(score="entropy", T_pl=T_pl), (0, 2))[1].item() == claimant
    # T_pl moves the confidence, never the class inside a teacher
    _, _, c2 = route([za], f[:1], None, RoutingConfig(T_pl=2.0), (0,))
    assert c2.item() == pytest.approx(math.e / (math.e + 1), rel=1e-6)


def test_T_pl_is_validated_and_left_out_of_the_default_rule():
    assert RoutingConfig().model_dump() == {"score": "confidence", "standardize": "none", "targets": "concat"}
    r = RoutingConfig.parse("entropy/none/routed@T_pl=2")
    assert r.T_pl == 2.0 and r.model_dump(mode="json")["T_pl"] == 2.0 and r.name == "entropy/none/routed@T_pl=2"
    assert RoutingConfig.model_validate(r.model_dump()) == r and RoutingConfig.parse(r.name) == r
    assert RoutingConfig.model_validate({"score": "confidence", "T_pl": 0.25}).name == "confidence/none/concat@T_pl=0.25"
    assert RoutingConfig.parse("max_logit/z@T_pl=0.5").T_pl == 0.5  # T_pl does not act on max_logit
    for bad in ({"T_pl": 0}, {"T_pl": -1.0}, "confidence/z@T_pl=2", {"score": "max_logit+entropy", "standardize": "percentile", "T_pl": 3},
                "confidence@T=2", "confidence@T_pl"):
        with pytest.raises(ValidationError) as e:
            RoutingConfig.model_validate(bad)
        assert "T_pl" in str(e.value)


def test_offsets_must_match_teachers_and_inputs_are_not_modified():
    z = [torch.randn(4, 3), torch.randn(4, 2)]
    saved = [t.clone() for t in z]
    with pytest.raises(ValueError, match="offsets"):
        route(z, [torch.zeros(4, 1)] * 2, None, RoutingConfig(), (0,))
    z[0].requires_grad_(True)
    y, k, conf = route(z, [torch.zeros(4, 1)] * 2, None, RoutingConfig(), (0, 3))
    assert not conf.requires_grad and all(torch.equal(a.detach(), b) for a, b in zip(z, saved))


def test_routed_targets_are_claiming_softmax_in_its_slice():
    z = [torch.tensor([[2.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 0.0]])]
    k = torch.tensor([0, 1])
    for T in (1.0, 4.0):
        p = F.softmax(target_logits(z, k, RoutingConfig.parse("confidence/none/routed"), T) / T, 1)
        assert torch.equal(p[0, 2:], torch.zeros(3)) and torch.equal(p[1, :2], torch.zeros(2))
        assert torch.allclose(p[0, :2], F.softmax(z[0][0] / T, 0)) and torch.allclose(p[1, 2:], F.softmax(z[1][1] / T, 0))
        # KL against the routed target: the zero slices add nothing (0 log 0 = 0), no inf or NaN
        zs = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
        tl = target_logits(z, k, RoutingConfig(targets="routed"), T)
        kl = (F.softmax(tl / T, 1) * (F.log_softmax(tl / T, 1) - F.log_softmax(zs / T, 1))).sum(1).mean()
        q0, q1 = F.softmax(z[0][0] / T, 0), F.softmax(z[1][1] / T, 0)
        ls = F.log_softmax(zs / T, 1)
        by_hand = ((q0 * (q0.log() - ls[0, :2])).sum() + (q1 * (q1.log() - ls[1, 2:])).sum()) / 2
        assert kl.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert torch.equal(target_logits(z, k, RoutingConfig(), 1.0), torch.cat(z, 1))


def test_rule_parsing_and_errors():
    r = RoutingConfig.parse("max_logit+mahalanobis/z/routed")
    assert r.scores == ("max_logit", "mahalanobis") and r.standardize == "z" and r.targets == "routed"
    assert r.name == "max_logit+mahalanobis/z/routed" and r.needs_stats
    assert not RoutingConfig.parse("energy").needs_stats and RoutingConfig.parse("energy/percentile").needs_stats
    for bad in ("maxlogit", "max_logit/zz", "max_logit/z/both", "a/b/c/d", "knn+knn"):
        with pytest.raises(ValidationError):
            RoutingConfig.parse(bad)


# --------------------------------------------------------------------------- chunks and precision

#: every score x standardisation x targets, sums of scores, a tempered rule
ALL_RULES = [f"{sc}/{h}/{t}" for sc in SCORES for h in STANDARDIZE for t in TARGETS] + [
    "max_logit+mahalanobis/z/routed", "energy+knn/percentile/concat", "confidence+mahalanobis/percentile/routed",
    "entropy/none/routed@T_pl=2",
]
SIZES3, OFFSETS3 = (3, 2, 4), (0, 3, 5)


@pytest.fixture(scope="module")
def close_calls():
    """Three teachers whose own data (32-d features = the inputs, logits = W f) overlap, fitted
    statistics (the background of ``rmd`` on the batch, the pool), and a batch of 512 images
    between them: many claims are close calls."""
    g = torch.Generator().manual_seed(7)
    nets, stats = [], []
    x = 2.0 * torch.randn(512, 32, generator=g)
    for n in SIZES3:
        centres = torch.randn(n, 32, generator=g)
        y = torch.arange(300) % n
        net = Linear2(centres.tolist())
        nets.append(net)
        stats.append(fit_stats(net, centres[y] + 1.5 * torch.randn(300, 32, generator=g), y,
                               centres[torch.arange(60) % n] + 1.5 * torch.randn(60, 32, generator=g),
                               background=fit_background(net.forward_both(x)[1])))
    outs = [net.forward_both(x) for net in nets]
    return nets, stats, [o[0] for o in outs], [o[1] for o in outs]


@pytest.mark.parametrize("name", ["mahalanobis", "knn", "rmd"])
@pytest.mark.parametrize("chunk", [1, 700, 5000])
def test_feature_scores_in_row_chunks_equal_the_whole_computation(close_calls, monkeypatch, name, chunk):
    """Chunks of ``CHUNK_ELEMENTS`` elements at most (one row at least) give the values of the
    whole [N, C, d] / [N, M] computation, up to the float32 rounding of reordered matrix products."""
    _, stats, logits, feats = close_calls
    st, f = stats[2], feats[2]
    if name == "mahalanobis":  # the formula on all rows at once: [N, C, d]
        diff = f[:, None, :] - st.means[None]
        whole = -torch.einsum("ncd,de,nce->nc", diff, st.precision, diff).clamp_min(0).min(1).values.sqrt()
    elif name == "rmd":  # [N, C, d] and the background's [N, d]
        diff, bg = f[:, None, :] - st.means[None], f - st.bg_mean
        whole = (torch.einsum("nd,de,ne->n", bg, st.bg_precision, bg)
                 - torch.einsum("ncd,de,nce->nc", diff, st.precision, diff).min(1).values)
    else:  # [N, M] distances to the normalised bank
        whole = -torch.cdist(F.normalize(f, dim=1), st.bank).topk(st.knn_k, dim=1, largest=False).values[:, -1]
    largest = []

    class Sizes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                largest.append(out.numel())
            return out

    monkeypatch.setattr(routing.scores, "CHUNK_ELEMENTS", chunk)
    with Sizes():
        got = raw_score(name, logits[2], f, st)
    assert torch.allclose(got, whole, rtol=1e-5, atol=1e-4)
    per_row = len(st.bank) if name == "knn" else st.means.numel()
    biggest_input = max(f.numel(), st.precision.numel(), st.bank.numel())
    assert max(largest) <= max(chunk, per_row, biggest_input)  # never [N, C, d] or [N, M]
    assert torch.equal(raw_score(name, logits[2][:0], f[:0], st), torch.zeros(0))


@pytest.mark.parametrize("rule", ALL_RULES)
def test_routing_under_bf16_autocast_equals_float32(close_calls, rule):
    """Claim scores run in float32 outside autocast: the same decisions, labels, confidences
    and targets under CPU bf16 autocast as without it. (Before, Mahalanobis under autocast
    changed 5-16 of these 512 claims.)"""
    _, stats, logits, feats = close_calls
    r = RoutingConfig.parse(rule)
    ref = route(logits, feats, stats, r, OFFSETS3)
    ref_scores = claim_scores(logits, feats, stats, r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = route(logits, feats, stats, r, OFFSETS3)
        got_scores = claim_scores(logits, feats, stats, r)
        got_target = target_logits(logits, got[1], r, 2.0)
    assert torch.equal(got_scores, ref_scores) and got_scores.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(got_target, target_logits(logits, ref[1], r, 2.0))
    assert len(set(ref[1].tolist())) > 1  # the rule routes to more than one teacher here


@pytest.mark.parametrize("rule", ALL_RULES)
def test_training_batches_under_autocast_route_as_the_float32_diagnostics(close_calls, rule):
    """``Method.route`` during training (batches of 64, under the loop's autocast) and in the
    diagnostics (all 512 images, float32) make the same claims with the same pseudo-labels and
    confidences."""
    nets, stats, logits, feats = close_calls
    cls = get_method("kd")
    method = cls(build_model("mlp", (1, 4, 8), sum(SIZES3), hidden=8), TeacherSet(nets, stats),
                 cls.parse_params({"routing": rule}, "methods.kd"), SplitInfo(SIZES3, OFFSETS3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batches = [method.route([z[i : i + 64] for z in logits], [f[i : i + 64] for f in feats]) for i in range(0, 512, 64)]
    trained = [torch.cat(parts) for parts in zip(*batches)]
    diagnosed = method.route(logits, feats)
    assert all(torch.equal(a, b) for a, b in zip(trained, diagnosed))
