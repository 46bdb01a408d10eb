"""Methods: term dicts, ablations, variants, heterogeneous teachers, label-free structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import losses
from harness.methods.base import Batch, SplitInfo, TeacherSet, discover, get_method
from harness.models import build_model
from harness.routing import fit_stats

SHAPE = (1, 8, 8)
SIZES, OFFSETS = (3, 2), (0, 3)


def _teachers():
    torch.manual_seed(0)
    # heterogeneous: different architectures and feature widths (24 vs 40)
    nets = [build_model("cnn", SHAPE, 3, width=4, feature_dim=24), build_model("mlp", SHAPE, 2, hidden=40)]
    g = torch.Generator().manual_seed(5)
    stats = [fit_stats(n.eval(), torch.rand(64, *SHAPE, generator=g), torch.arange(64) % c, torch.rand(16, *SHAPE, generator=g))
             for n, c in zip(nets, SIZES)]
    return TeacherSet(nets, stats)


def _method(name: str, **params):
    torch.manual_seed(1)
    cls = get_method(name)
    student = build_model("cnn", SHAPE, sum(SIZES), width=4)
    return cls(student, _teachers(), cls.parse_params(params, f"methods.{name}"), SplitInfo(SIZES, OFFSETS))


def _batch(m, n=16, labels=False):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, *SHAPE, generator=g)
    tl, tf = m.teachers.outputs(x)
    y = torch.randint(0, sum(SIZES), (n,), generator=g) if labels else None
    return Batch(x, torch.arange(n), tl, tf, y)


def _total(m, terms):
    w = m.weights()
    return sum(w[t] * v for t, v in terms.items())


def test_registry_lists_builtin_and_entry_point_methods():
    assert {"cka", "kd", "cfl", "scratch", "teachers"} <= set(discover().names())
    assert get_method("scratch").uses_labels and not get_method("kd").uses_labels
    assert not get_method("cka").uses_labels and not get_method("cfl").uses_labels


def test_cka_full_has_four_terms_with_spec_default_weights():
    m = _method("cka")
    terms = m.loss_terms(_batch(m))
    assert set(terms) == {"task", "intra", "inter", "align"}
    assert {k: v for k, v in m.weights().items() if v} == {"task": 1.0, "intra": 0.1, "inter": 0.1, "align": 1.0}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())


@pytest.mark.parametrize("component", ["intra", "inter", "align"])
def test_ablation_removes_exactly_that_term(component):
    full = _method("cka")
    abl = _method("cka", **{f"w_{component}": 0.0})
    b = _batch(full)
    t_full, t_abl = full.loss_terms(b), abl.loss_terms(b)
    assert set(t_full) - set(t_abl) == {component} and set(t_abl) - set(t_full) == set()
    for k in t_abl:  # the other terms are unchanged (same weights, same batch)
        assert torch.allclose(t_abl[k], t_full[k])
    assert torch.allclose(_total(full, t_full) - full.weights()[component] * t_full[component], _total(abl, t_abl))


def test_task_ablation_switches_head_to_hard_pseudo_labels():
    m = _method("cka", w_task=0.0)
    b = _batch(m)
    terms = m.loss_terms(b)
    assert set(terms) == {"task_hard", "intra", "inter", "align"} and m.weights()["task_hard"] == 1.0
    y, _, _ = losses.pseudo_labels(b.teacher_logits, OFFSETS)
    assert torch.allclose(terms["task_hard"], F.cross_entropy(m.student(b.x), y))
    assert _method("cka").weights()["task_hard"] == 0.0


def test_cka_task_term_is_concat_soft_target_and_per_task_variant():
    m = _method("cka", T=2.0)
    b = _batch(m)
    z_s = m.student(b.x)
    assert torch.allclose(m.loss_terms(b)["task"], losses.soft_target_kl(torch.cat(b.teacher_logits, 1), z_s, 2.0))
    p = _method("cka", T=2.0, soft_target="per_task")
    expected = losses.soft_target_kl(b.teacher_logits[0], z_s[:, :3], 2.0) + losses.soft_target_kl(
        b.teacher_logits[1], z_s[:, 3:], 2.0
    )
    assert torch.allclose(p.loss_terms(b)["task"], expected)


@pytest.mark.parametrize(
    "variant",
    [
        {"align": "cosine"}, {"align": "relation"}, {"align_to": "claiming"}, {"align": "relation", "align_to": "claiming"},
        {"intra_models": "all"}, {"symmetric": True}, {"routing": "entropy"}, {"routing": "max_logit+mahalanobis/z/routed"}, {"routing": "knn/percentile"}, {"conf_threshold": 0.6},
    ],
)
def test_every_variant_gives_finite_terms_and_trains_projectors(variant):
    m = _method("cka", **variant)
    terms = m.loss_terms(_batch(m))
    total = _total(m, terms)
    assert torch.isfinite(total)
    total.backward()
    assert m.g_s[0].weight.grad is not None and m.g_s[0].weight.grad.abs().sum() > 0
    assert all(g[0].weight.grad is not None for g in m.g_t)  # teacher projectors learn through inter/align
    assert all(p.grad is None for p in m.teachers.parameters())  # teachers stay frozen


def test_align_claiming_uses_only_the_claiming_teacher():
    m = _method("cka", align_to="claiming", w_intra=0, w_inter=0, w_task=0)
    b = _batch(m)
    _, k_star, _ = losses.pseudo_labels(b.teacher_logits, OFFSETS)
    m.train()
    torch.manual_seed(0)
    got = m.loss_terms(b)["align"]
    h_s = F.normalize(m.g_s(m.student.features(b.x)), dim=1)
    h_t = [F.normalize(g(f), dim=1) for g, f in zip(m.g_t, b.teacher_feats)]
    per = [
        (F.softmax(h_t[k][i] / 0.1, 0) * (F.log_softmax(h_t[k][i] / 0.1, 0) - F.log_softmax(h_s[i] / 0.1, 0))).sum()
        for i, k in enumerate(k_star.tolist())
    ]
    assert torch.allclose(got, torch.stack(per).mean(), atol=1e-5)


def test_kd_equals_concat_soft_target():
    m = _method("kd", T=3.0)
    b = _batch(m)
    terms = m.loss_terms(b)
    assert set(terms) == {"kd"}
    assert torch.allclose(terms["kd"], losses.soft_target_kl(torch.cat(b.teacher_logits, 1), m.student(b.x), 3.0))


def test_cfl_terms_weights_and_heterogeneous_blocks():
    m = _method("cfl")
    assert m.weights() == {"kd": 1.0, "mmd": 10.0, "recon": 10.0}
    assert [d[-1].out_features for d in m.dec] == [24, 40]
    terms = m.loss_terms(_batch(m))
    assert set(terms) == {"kd", "mmd", "recon"} and all(v >= 0 for v in terms.values())
    _total(m, terms).backward()
    assert m.a_s[0].weight.grad is not None and m.extractor[0].weight.grad is not None
    off = _method("cfl", w1=0.0)
    assert set(off.loss_terms(_batch(off))) == {"kd", "recon"}


def test_scratch_reads_labels():
    m = _method("scratch")
    b = _batch(m, labels=True)
    assert torch.allclose(m.loss_terms(b)["ce"], F.cross_entropy(m.student(b.x), b.y))


def test_teacher_reference_predict_routes_to_claiming_teacher():
    m = _method("teachers")
    b = _batch(m, n=32)
    pred = m.predict(b.x)
    y, k_star, _ = losses.pseudo_labels(b.teacher_logits, OFFSETS)
    assert torch.equal(pred.argmax(1), y)  # union argmax = claiming teacher's class
    for k, (o, n) in enumerate(zip(OFFSETS, SIZES)):  # inside S_k: teacher k's own prediction
        assert torch.equal(pred[:, o : o + n].argmax(1), b.teacher_logits[k].argmax(1))
    assert not get_method("teachers").trains and not get_method("teachers").seeded
