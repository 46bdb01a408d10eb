"""Routing: claim scores against direct computations, standardisation on own data, ties, targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from sklearn.covariance import LedoitWolf

from harness import losses
from harness.routing import (
    SCORES, RoutingConfig, TeacherStats, claim_scores, fit_stats, raw_score, route, standardize, target_logits,
)


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
    assert torch.allclose(raw_score("confidence", z, f, None), torch.tensor([math.e**2 / (math.e**2 + 1), 0.5]))
    p = math.e**2 / (math.e**2 + 1)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
    assert torch.allclose(raw_score("entropy", z, f, None), torch.tensor([-h, -1.0]), atol=1e-6)
    assert torch.equal(raw_score("entropy", torch.ones(3, 1), torch.zeros(3, 1), None), torch.zeros(3))


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
    # percentile: fraction of own validation scores <= s
    fv = x_val.flatten(1)
    vs = raw_score("max_logit", fv @ net.w.T, fv, st)
    pct = standardize(vs, "max_logit", "percentile", st)
    assert pct.max().item() == 1.0 and sorted(pct.tolist())[0] == pytest.approx(1 / 20)


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


def test_confidence_route_equals_pseudo_labels_and_ties_go_to_first():
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(50, 3, generator=g), torch.randn(50, 4, generator=g)]
    f = [torch.zeros(50, 1)] * 2
    got = route(z, f, None, RoutingConfig(), (0, 3))
    exp = losses.pseudo_labels(z, (0, 3))
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1]) and torch.allclose(got[2], exp[2])
    tie = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])]
    labels, k, _ = route(tie, [torch.zeros(1, 1)] * 2, None, RoutingConfig.parse("max_logit"), (0, 2))
    assert k.item() == 0 and labels.item() == 0


def test_routed_targets_are_claiming_softmax_in_its_slice():
    z = [torch.tensor([[2.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 0.0]])]
    k = torch.tensor([0, 1])
    for T in (1.0, 4.0):
        p = F.softmax(target_logits(z, k, RoutingConfig.parse("confidence/none/routed"), T) / T, 1)
        assert torch.equal(p[0, 2:], torch.zeros(3)) and torch.equal(p[1, :2], torch.zeros(2))
        assert torch.allclose(p[0, :2], F.softmax(z[0][0] / T, 0)) and torch.allclose(p[1, 2:], F.softmax(z[1][1] / T, 0))
        kl = losses.soft_target_kl(target_logits(z, k, RoutingConfig(targets="routed"), T), torch.randn(2, 5), T)
        assert torch.isfinite(kl)
    assert torch.equal(target_logits(z, k, RoutingConfig(), 1.0), torch.cat(z, 1))


def test_rule_parsing_and_errors():
    r = RoutingConfig.parse("max_logit+mahalanobis/z/routed")
    assert r.scores == ("max_logit", "mahalanobis") and r.standardize == "z" and r.targets == "routed"
    assert r.name == "max_logit+mahalanobis/z/routed" and r.needs_stats
    assert not RoutingConfig.parse("energy").needs_stats and RoutingConfig.parse("energy/percentile").needs_stats
    for bad in ("maxlogit", "max_logit/zz", "max_logit/z/both", "a/b/c/d", "knn+knn"):
        with pytest.raises(ValidationError):
            RoutingConfig.parse(bad)
