"""Methods: every term of every method against its loss function applied by hand to the same batch.

Each CKA variant (every parameter of ``CKAParams``), each CFL term and the KD term is compared
with ``torch.allclose`` to the spec's formula evaluated here from the same student, projectors
and teacher outputs; each parameter must change the term it acts on (a parameter that does
nothing fails), and each ablation removes exactly its term from the weighted total.

The references are written from ``cka-spec.md``: pseudo-labels of the default rule from a float64
softmax, soft targets as explicit KL sums, per-sample alignment as per-sample loops.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from harness import losses
from harness.errors import HarnessError
from harness.methods.base import Batch, SplitInfo, TeacherSet, discover, get_method
from harness.models import build_model
from harness.routing import RoutingConfig, fit_stats, route
from tests.reference import ref_pseudo_labels

SHAPE = (1, 8, 8)
SIZES, OFFSETS = (3, 2), (0, 3)
ATOL = 1e-6


@functools.lru_cache(maxsize=None)
def _teachers() -> TeacherSet:
    torch.manual_seed(0)
    # heterogeneous: different architectures and feature widths (24 vs 40)
    nets = [build_model("cnn", SHAPE, 3, width=4, feature_dim=24), build_model("mlp", SHAPE, 2, hidden=40)]
    with torch.no_grad():  # sharper heads than at initialisation, so that both teachers claim
        for n, scale in zip(nets, (20.0, 10.0)):  # images and the routing rules disagree
            n.head.weight.mul_(scale)
    g = torch.Generator().manual_seed(5)
    stats = [fit_stats(n.eval(), torch.rand(64, *SHAPE, generator=g), torch.arange(64) % c, torch.rand(16, *SHAPE, generator=g))
             for n, c in zip(nets, SIZES)]
    return TeacherSet(nets, stats)


def _method(name: str, **params):
    torch.manual_seed(1)
    cls = get_method(name)
    student = build_model("cnn", SHAPE, sum(SIZES), width=4)
    return cls(student, _teachers(), cls.parse_params(params, f"methods.{name}"), SplitInfo(SIZES, OFFSETS))


@functools.lru_cache(maxsize=None)
def _cached_batch(n: int, labels: bool) -> Batch:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, *SHAPE, generator=g)
    tl, tf = _teachers().outputs(x)
    y = torch.randint(0, sum(SIZES), (n,), generator=g) if labels else None
    return Batch(x=x, index=torch.arange(n), teacher_logits=tl, teacher_feats=tf, y=y)


def _batch(n: int = 24, labels: bool = False) -> Batch:
    return _cached_batch(n, labels)


def _total(m, terms: dict[str, Tensor]) -> Tensor:
    """The training loop's total: sum of weight * term (train.py)."""
    w = m.weights()
    return sum(w.get(t, 1.0) * v for t, v in terms.items())


# --------------------------------------------------------------------------- references


def _ref_pseudo(b: Batch, rule: RoutingConfig = RoutingConfig()) -> tuple[Tensor, Tensor, Tensor]:
    """(y^, k*, max_c p_k*(c)) of the spec: float64 softmax(z / T_pl) for confidence/entropy with
    no standardisation (routing.route, tested in test_routing, for the other rules)."""
    if rule.score not in ("confidence", "entropy") or rule.standardize != "none":
        return route(b.teacher_logits, b.teacher_feats, _teachers().stats, rule, OFFSETS)
    y, k, conf = ref_pseudo_labels(b.teacher_logits, OFFSETS, rule.score, rule.T_pl)
    return y, k, conf.float()


def _kl_by_hand(q: Tensor, z_s: Tensor, T: float) -> Tensor:
    """T^2 mean_i sum_c q_ic (log q_ic - log softmax(z_s,i / T)_c), terms with q = 0 left out."""
    log_p = F.log_softmax(z_s / T, 1)
    terms = torch.where(q > 0, q * (q.clamp_min(1e-300).log() - log_p), torch.zeros_like(log_p))
    return T * T * terms.sum(1).mean()


def _routed_probs(b: Batch, k_star: Tensor, T: float) -> Tensor:
    """q[i, S_k*] = softmax(z_k*,i / T), 0 elsewhere (spec, Routing: targets ``routed``)."""
    q = torch.zeros(len(k_star), sum(SIZES))
    for i, k in enumerate(k_star.tolist()):
        o, n = OFFSETS[k], SIZES[k]
        q[i, o : o + n] = torch.softmax(b.teacher_logits[k][i] / T, 0)
    return q


def _space(m, b: Batch) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Student logits and unit common-space vectors h_s, h_k = normalize(g(f)) of the whole batch."""
    z_s, f_s = m.student.forward_both(b.x)
    return z_s, F.normalize(m.g_s(f_s), dim=1), [F.normalize(g(f), dim=1) for g, f in zip(m.g_t, b.teacher_feats)]


def _cka_expected(m, b: Batch) -> dict[str, Tensor]:
    """Every CKA term from the spec ("The four loss components"), with the losses functions."""
    p = m.params
    z_s, h_s, h_t = _space(m, b)
    y, k_star, conf = _ref_pseudo(b, p.routing)
    out: dict[str, Tensor] = {}
    if p.w_task:
        if p.soft_target == "per_task":
            out["task"] = sum(
                _kl_by_hand(torch.softmax(z / p.T, 1), z_s[:, o : o + n], p.T) for z, o, n in zip(b.teacher_logits, OFFSETS, SIZES)
            )
        elif p.routing.targets == "routed":
            out["task"] = _kl_by_hand(_routed_probs(b, k_star, p.T), z_s, p.T)
        else:
            out["task"] = _kl_by_hand(torch.softmax(torch.cat(b.teacher_logits, 1) / p.T, 1), z_s, p.T)
    else:
        out["task_hard"] = F.cross_entropy(z_s, y)
    keep = conf >= p.conf_threshold
    hk, yk = h_s[keep], y[keep]
    if p.w_intra:
        intra = losses.supcon(hk, yk, p.tau)
        if p.intra_models == "all":
            intra = intra + sum(losses.supcon(h[keep], yk, p.tau) for h in h_t) / len(h_t)
        out["intra"] = intra
    if p.w_inter:
        out["inter"] = sum(losses.cross_supcon(hk, h[keep], yk, p.tau, p.symmetric) for h in h_t) / len(h_t)
    if p.w_align:
        if p.align == "relation":
            if p.align_to == "all":
                out["align"] = sum(losses.align_relation(h_s, h, p.tau_a) for h in h_t) / len(h_t)
            else:  # each claiming teacher's relation term on its own samples, weighted by their share
                out["align"] = sum(
                    losses.align_relation(h_s[k_star == k], h[k_star == k], p.tau_a) * (k_star == k).float().mean()
                    for k, h in enumerate(h_t)
                )
        else:
            def per_sample(i: int, k: int) -> Tensor:
                a, t = h_s[i], h_t[k][i]
                if p.align == "cosine":
                    return 1 - (a * t).sum() / (a.norm() * t.norm())
                pt = torch.softmax(t / p.tau_a, 0)
                return (pt * (pt.log() - F.log_softmax(a / p.tau_a, 0))).sum()

            ks = [[k] for k in k_star.tolist()] if p.align_to == "claiming" else [range(len(h_t))] * len(y)
            out["align"] = torch.stack([torch.stack([per_sample(i, k) for k in kk]).mean() for i, kk in enumerate(ks)]).mean()
    return out


def _assert_terms_equal(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(got) == set(expected)
    for t in got:
        assert got[t].dim() == 0
        assert torch.allclose(got[t], expected[t].to(got[t].dtype), rtol=1e-5, atol=ATOL), (t, got[t], expected[t])


# --------------------------------------------------------------------------- registry


def test_registry_lists_builtin_and_entry_point_methods():
    assert {"cka", "kd", "cfl", "scratch", "teachers"} <= set(discover().names())
    assert get_method("scratch").uses_labels and not get_method("kd").uses_labels
    assert not get_method("cka").uses_labels and not get_method("cfl").uses_labels


def test_the_batch_makes_the_rules_disagree():
    # the variant tests below can only see a routing parameter if it changes the claims on this batch
    b = _batch()
    y_c, k_c, conf = _ref_pseudo(b)
    y_e, _, _ = _ref_pseudo(b, RoutingConfig(score="entropy"))
    _, k_t, conf_t = _ref_pseudo(b, RoutingConfig(T_pl=0.5))
    y_m, _, _ = route(b.teacher_logits, b.teacher_feats, _teachers().stats, RoutingConfig.parse("max_logit+mahalanobis/z"), OFFSETS)
    assert len(set(k_c.tolist())) == 2 and (y_c != y_e).any() and (y_c != y_m).any() and (k_t != k_c).any()
    median = conf.median()
    assert ((conf >= median) != (conf_t >= median)).any()
    # the method's own routing is the spec's (float64) pseudo-labelling of the default rule
    m = _method("cka")
    y, k, c = m.route(b.teacher_logits, b.teacher_feats)
    assert torch.equal(y, y_c) and torch.equal(k, k_c) and torch.allclose(c, conf, rtol=1e-5)


# --------------------------------------------------------------------------- CKA

_MEDIAN = "median"  # conf_threshold placeholder: the batch's median default confidence

CKA_VARIANTS = [
    # (params, the terms that must differ from the default's [, params of the baseline instead])
    ({}, set()),
    ({"T": 2.5}, {"task"}),
    ({"soft_target": "per_task"}, {"task"}),
    ({"soft_target": "per_task", "T": 3.0}, {"task"}),
    ({"tau": 0.3}, {"intra", "inter"}),
    ({"tau_a": 0.3}, {"align"}),
    ({"intra_models": "all"}, {"intra"}),
    ({"symmetric": True}, {"inter"}),
    ({"align": "cosine"}, {"align"}),
    ({"align": "relation"}, {"align"}),
    ({"align": "relation", "tau_a": 0.5}, {"align"}),
    ({"align_to": "claiming"}, {"align"}),
    ({"align": "cosine", "align_to": "claiming"}, {"align"}),
    ({"align": "relation", "align_to": "claiming"}, {"align"}),
    ({"routing": "entropy"}, {"intra", "inter"}),
    ({"routing": "confidence/none/routed"}, {"task"}),
    ({"routing": "max_logit+mahalanobis/z/routed"}, {"task", "intra", "inter"}),
    ({"routing": "knn/percentile"}, {"intra", "inter"}),
    ({"routing": "max_logit+mahalanobis/z", "align_to": "claiming"}, {"intra", "inter", "align"}),
    ({"conf_threshold": _MEDIAN}, {"intra", "inter"}),
    ({"conf_threshold": _MEDIAN, "routing": {"score": "confidence", "T_pl": 0.5}}, {"intra", "inter"}, {"conf_threshold": _MEDIAN}),
    ({"routing": {"score": "confidence", "T_pl": 0.5}}, {"intra", "inter"}),
    ({"w_task": 0.0, "routing": "entropy"}, {"task_hard", "intra", "inter"}, {"w_task": 0.0}),
    ({"proj_hidden": 32, "proj_dim": 16}, {"intra", "inter", "align"}),
]


def _resolve(params: dict) -> dict:
    if params.get("conf_threshold") == _MEDIAN:
        params = {**params, "conf_threshold": float(_ref_pseudo(_batch())[2].median())}
    return params


@pytest.mark.parametrize("variant", CKA_VARIANTS, ids=[str(v[0]) for v in CKA_VARIANTS])
def test_cka_variant_terms_equal_the_loss_functions_by_hand(variant):
    params, changed, baseline = (*variant, {})[:3]
    b = _batch()
    m = _method("cka", **_resolve(params))
    got = m.loss_terms(b)
    _assert_terms_equal(got, _cka_expected(m, b))
    # the parameter acts: the terms it should move differ from the baseline's, the others do not
    base = _method("cka", **_resolve(baseline)).loss_terms(b)
    for t in set(got) & set(base):
        same = torch.allclose(got[t], base[t], rtol=1e-5, atol=ATOL)
        assert same != (t in changed), (t, got[t], base[t])


@pytest.mark.parametrize("params", [{}, {"intra_models": "all"}, {"symmetric": True}])
def test_cka_terms_equal_the_loss_functions_when_pseudo_labels_vary_within_a_teacher(params):
    """On the shared batch each teacher's claimed images carry one class, so a term that contrasts
    by claiming teacher instead of by pseudo-label would pass there; not on these logits."""
    b0 = _batch()
    g = torch.Generator().manual_seed(11)
    tl = [torch.randn(len(b0.x), n, generator=g) * 5 for n in SIZES]
    b = Batch(x=b0.x, index=b0.index, teacher_logits=tl, teacher_feats=b0.teacher_feats)
    y, k, _ = route(tl, b.teacher_feats, _teachers().stats, RoutingConfig(), OFFSETS)
    assert all(len(set(y[k == t].tolist())) > 1 for t in (0, 1))
    m = _method("cka", **params)
    _assert_terms_equal(m.loss_terms(b), _cka_expected(m, b))


@pytest.mark.parametrize("method", ["cka", "kd", "teachers"])
def test_T_pl_is_a_routing_parameter_with_a_one_line_error(method):
    cls = get_method(method)
    assert cls.parse_params({"routing": {"score": "entropy", "T_pl": 2}}, f"methods.{method}").routing.T_pl == 2.0
    assert cls.parse_params({}, f"methods.{method}").routing.T_pl == 1.0
    for bad, why in (({"T_pl": 0}, "greater than 0"), ("confidence/z@T_pl=2", "standardize: none")):
        with pytest.raises(HarnessError) as e:
            cls.parse_params({"routing": bad}, f"methods.{method}")
        assert str(e.value).startswith(f"methods.{method}.routing.T_pl: ") and why in str(e.value) and "\n" not in str(e.value)


def test_cka_default_terms_and_spec_weights():
    m = _method("cka")
    assert {k: v for k, v in m.weights().items() if v} == {"task": 1.0, "intra": 0.1, "inter": 0.1, "align": 1.0}
    assert m.g_s[0].out_features == 256 and m.g_s[-1].out_features == 128
    m2 = _method("cka", proj_hidden=32, proj_dim=16)
    assert m2.g_s[0].out_features == 32 and all(g[-1].out_features == 16 for g in [m2.g_s, *m2.g_t])
    assert [g[0].in_features for g in m2.g_t] == [24, 40]


@pytest.mark.parametrize("w", ["w_task", "w_intra", "w_inter", "w_align"])
def test_cka_weights_scale_only_their_term(w):
    b = _batch()
    base, m = _method("cka"), _method("cka", **{w: 0.37})
    t_base, t = base.loss_terms(b), m.loss_terms(b)
    term = w.removeprefix("w_")
    assert m.weights()[term] == 0.37 and set(t) == set(t_base)
    for k in t:
        assert torch.allclose(t[k], t_base[k], atol=ATOL)
    delta = (0.37 - base.weights()[term]) * t_base[term]
    assert torch.allclose(_total(m, t), _total(base, t_base) + delta, atol=ATOL)


@pytest.mark.parametrize("component", ["intra", "inter", "align", "task"])
def test_ablation_removes_exactly_that_term(component):
    full = _method("cka")
    abl_params = {get_method("cka").ablations[component]: 0.0}
    abl = _method("cka", **abl_params)
    b = _batch()
    t_full, t_abl = full.loss_terms(b), abl.loss_terms(b)
    added = {"task_hard"} if component == "task" else set()
    assert set(t_full) - set(t_abl) == {component} and set(t_abl) - set(t_full) == added
    for k in set(t_abl) & set(t_full):  # the other terms are unchanged (same weights, same batch)
        assert torch.allclose(t_abl[k], t_full[k], atol=ATOL)
    expected = _total(full, t_full) - full.weights()[component] * t_full[component]
    if component == "task":  # the head then learns from the hard pseudo-labels, weight 1 (spec)
        z_s = abl.student(b.x)
        assert torch.allclose(t_abl["task_hard"], F.cross_entropy(z_s, _ref_pseudo(b)[0]), atol=ATOL)
        expected = expected + t_abl["task_hard"]
    assert torch.allclose(_total(abl, t_abl), expected, atol=ATOL)


def test_cka_confidence_threshold_of_one_leaves_no_contrastive_term():
    b = _batch()
    m = _method("cka", conf_threshold=1.0)
    t = m.loss_terms(b)
    assert t["intra"].item() == 0.0 and t["inter"].item() == 0.0
    assert torch.allclose(t["align"], _method("cka").loss_terms(b)["align"], atol=ATOL)  # alignment keeps every sample


def test_cka_teacher_projectors_learn_through_intra_only_with_intra_models_all():
    b = _batch()
    for models, learns in (("student", False), ("all", True)):
        m = _method("cka", w_inter=0.0, w_align=0.0, intra_models=models)
        _total(m, m.loss_terms(b)).backward()
        assert m.g_s[0].weight.grad.abs().sum() > 0
        assert all((g[0].weight.grad is not None and g[0].weight.grad.abs().sum() > 0) == learns for g in m.g_t)
        assert all(p.grad is None for p in m.teachers.parameters())  # teachers stay frozen


# --------------------------------------------------------------------------- KD


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_is_t_squared_kl_to_the_concatenated_teachers(T):
    b = _batch()
    m = _method("kd", T=T)
    terms = m.loss_terms(b)
    assert set(terms) == {"kd"} and m.weights() == {"kd": 1.0}
    z_s = m.student(b.x)
    q = torch.softmax(torch.cat(b.teacher_logits, 1) / T, 1)
    by_hand = T * T * (q * (q.log() - F.log_softmax(z_s / T, 1))).sum(1).mean()
    assert torch.allclose(terms["kd"], by_hand, atol=ATOL)
    if T != 1.0:  # the T^2 factor is there (the KL alone is T^2 times smaller)
        assert not torch.allclose(terms["kd"], by_hand / (T * T), atol=ATOL)


@pytest.mark.parametrize("rule", ["confidence/none/routed", "max_logit+mahalanobis/z/routed", {"score": "confidence", "targets": "routed", "T_pl": 0.3}])
def test_kd_routed_target_is_the_claiming_teachers_softmax_in_its_slice(rule):
    b = _batch()
    m = _method("kd", T=2.0, routing=rule)
    _, k_star, _ = _ref_pseudo(b, m.params.routing)
    assert torch.allclose(m.loss_terms(b)["kd"], _kl_by_hand(_routed_probs(b, k_star, 2.0), m.student(b.x), 2.0), atol=ATOL)
    assert not torch.allclose(m.loss_terms(b)["kd"], _method("kd", T=2.0).loss_terms(b)["kd"], atol=ATOL)


def test_kd_weight_and_ablation():
    b = _batch()
    m = _method("kd", w_kd=0.25)
    assert m.weights() == {"kd": 0.25}
    assert torch.allclose(_total(m, m.loss_terms(b)), 0.25 * _method("kd").loss_terms(b)["kd"], atol=ATOL)


# --------------------------------------------------------------------------- CFL


def _cfl_expected(m, b: Batch) -> dict[str, Tensor]:
    """Spec, Baselines: KD_concat(T), sum_k MMD^2(H_s, H_k), sum_k MSE(dec_k(H_k), f_k)."""
    p = m.params
    z_s, f_s = m.student.forward_both(b.x)
    out: dict[str, Tensor] = {}
    if p.w0:
        out["kd"] = _kl_by_hand(torch.softmax(torch.cat(b.teacher_logits, 1) / p.T, 1), z_s, p.T)
    H_s = m.extractor(m.a_s(f_s))
    H = [m.extractor(a(f)) for a, f in zip(m.a_t, b.teacher_feats)]
    if p.w1:
        out["mmd"] = sum(losses.mmd2(H_s, h) for h in H)
    if p.w2:
        out["recon"] = sum(((d(h) - f) ** 2).mean() for d, h, f in zip(m.dec, H, b.teacher_feats))
    return out


CFL_VARIANTS = [({}, set()), ({"T": 4.0}, {"kd"}), ({"c": 32}, {"mmd", "recon"})]


@pytest.mark.parametrize("params,changed", CFL_VARIANTS, ids=[str(p) for p, _ in CFL_VARIANTS])
def test_cfl_terms_equal_the_loss_functions_by_hand(params, changed):
    b = _batch()
    m = _method("cfl", **params)
    got = m.loss_terms(b)
    _assert_terms_equal(got, _cfl_expected(m, b))
    assert all(v > 0 for v in got.values())
    base = _method("cfl").loss_terms(b)
    for t in got:
        assert torch.allclose(got[t], base[t], atol=ATOL) != (t in changed), t


def test_cfl_blocks_are_heterogeneous_and_of_width_c():
    m = _method("cfl", c=32)
    assert m.a_s[0].out_features == 32 and [a[0].in_features for a in m.a_t] == [24, 40]
    assert m.extractor[0].in_features == 32 and m.extractor[-1].out_features == 32
    assert [d[0].in_features for d in m.dec] == [32, 32] and [d[-1].out_features for d in m.dec] == [24, 40]
    b = _batch()
    _total(m, m.loss_terms(b)).backward()
    for part in (m.a_s[0], m.extractor[0], *[a[0] for a in m.a_t], *[d[0] for d in m.dec]):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teachers.parameters())


@pytest.mark.parametrize("w,term", [("w0", "kd"), ("w1", "mmd"), ("w2", "recon")])
def test_cfl_weight_ablation_removes_exactly_its_term(w, term):
    b = _batch()
    full, off, half = _method("cfl"), _method("cfl", **{w: 0.0}), _method("cfl", **{w: 0.5})
    assert full.weights() == {"kd": 1.0, "mmd": 10.0, "recon": 10.0} and half.weights()[term] == 0.5
    t_full, t_off = full.loss_terms(b), off.loss_terms(b)
    assert set(t_full) - set(t_off) == {term} and set(t_off) <= set(t_full)
    for k in t_off:
        assert torch.allclose(t_off[k], t_full[k], atol=ATOL)
    assert torch.allclose(_total(off, t_off), _total(full, t_full) - full.weights()[term] * t_full[term], atol=1e-5)
    t_half = half.loss_terms(b)
    assert torch.allclose(_total(half, t_half), _total(full, t_full) + (0.5 - full.weights()[term]) * t_full[term], atol=1e-5)


# --------------------------------------------------------------------------- scratch, teachers


def test_scratch_reads_labels():
    m = _method("scratch")
    b = _batch(labels=True)
    z = m.student(b.x)
    by_hand = -F.log_softmax(z, 1)[torch.arange(len(b.y)), b.y].mean()
    assert torch.allclose(m.loss_terms(b)["ce"], by_hand, atol=ATOL)


@pytest.mark.parametrize("rule", ["confidence", "entropy", "max_logit+mahalanobis/z"])
def test_teacher_reference_predict_routes_to_claiming_teacher(rule):
    m = _method("teachers", routing=rule)
    b = _batch(n=32)
    pred = m.predict(b.x)
    y, _, _ = _ref_pseudo(b, RoutingConfig.parse(rule))
    assert torch.equal(pred.argmax(1), y)  # union argmax = claiming teacher's class
    for k, (o, n) in enumerate(zip(OFFSETS, SIZES)):  # inside S_k: teacher k's own prediction
        assert torch.equal(pred[:, o : o + n].argmax(1), b.teacher_logits[k].argmax(1))
    assert not get_method("teachers").trains and not get_method("teachers").seeded
