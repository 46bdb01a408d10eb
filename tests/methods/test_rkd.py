"""``rkd`` (baselines/rkd.py): the relational losses against values written out by hand and a
loop-by-loop reference, their invariances, where gradients go, the method's terms, ablations and
routing, and a few epochs through the real training loop."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from baselines.rkd import angle_relation, distance_relation, huber, rkd_angle, rkd_distance
from harness import losses
from harness.cli import main
from harness.config import DatasetConfig, SplitConfig, StudyConfig, TrainConfig
from harness.data.splits import build_split
from harness.errors import HarnessError
from harness.grid import method_variants
from harness.methods.base import Batch, SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.train import fit
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
SHAPE = (1, 8, 8)
SIZES, OFFSETS = (3, 2), (0, 3)
#: student and teacher of the hand-computed cases: right triangles 3-4-5 and 1-1-sqrt(2)
S3 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=D)
T3 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D)


def _h(x: float) -> float:
    """Huber with threshold 1, written out."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rotation(d: int, seed: int) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=D))
    return q


def _points(n: int, d: int, seed: int) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=D)


# --------------------------------------------------------------------------- the pure functions


def test_huber_is_quadratic_below_one_and_linear_above():
    x = torch.tensor([0.5, -0.5, 1.0, 2.0, -3.0], dtype=D)
    assert huber(x, torch.zeros_like(x)).item() == pytest.approx((0.125 + 0.125 + 0.5 + 1.5 + 2.5) / 5, abs=1e-15)
    # the two branches meet at 1 (value 1/2, slope 1) and differ elsewhere: x^2/2 at 3 would be 4.5
    assert huber(torch.tensor([3.0], dtype=D), torch.zeros(1, dtype=D)).item() == 2.5
    assert huber(torch.tensor([0.2], dtype=D), torch.tensor([-0.2], dtype=D)).item() == pytest.approx(0.08, abs=1e-15)
    x = torch.tensor([0.999, 1.001], dtype=D, requires_grad=True)
    huber(x, torch.zeros_like(x)).backward()
    assert torch.allclose(x.grad, torch.tensor([0.999, 1.0], dtype=D) / 2)


def test_distance_relation_by_hand():
    # 3-4-5: non-zero distances 3, 4, 5 (each twice), mu = 4
    psi = distance_relation(S3)
    assert torch.allclose(psi, torch.tensor([[0, 0.75, 1.0], [0.75, 0, 1.25], [1.0, 1.25, 0]], dtype=D), atol=1e-15)
    # 1-1-sqrt2: mu = (2 + sqrt2) / 3
    c = 3 / (2 + math.sqrt(2))
    assert torch.allclose(distance_relation(T3), torch.tensor([[0, c, c], [c, 0, c * math.sqrt(2)], [c, c * math.sqrt(2), 0]], dtype=D))
    # a duplicated point is 1e-6 from its twin, as in the reference, and counts in mu:
    # (0,0) twice: distances 3, 4, 5, 3, 4, 1e-6 (each twice) -> mu = (19 + 1e-6) / 6
    dup = torch.cat([S3, S3[:1]])
    psi = distance_relation(dup)
    mu = (19 + 1e-6) / 6
    assert psi[0, 3].item() == pytest.approx(1e-6 / mu, rel=1e-12) and psi[3, 3].item() == 0.0
    assert psi[1, 2].item() == pytest.approx(5 / mu, rel=1e-14) and psi[3, 1].item() == pytest.approx(3 / mu, rel=1e-14)


def _reference_pdist_relation(e: torch.Tensor) -> torch.Tensor:
    """RepDistiller's ``RKDLoss`` distance relation, transcribed: ``pdist(e, squared=False)``
    (squared distances from |a|^2 + |b|^2 - 2 a.b clamped at eps = 1e-12, square root, diagonal
    set to 0), divided by the mean of its positive entries."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=1e-12).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res / res[res > 0].mean()


def test_distance_relation_equals_the_reference_with_duplicated_rows():
    g = torch.Generator().manual_seed(8)
    e = torch.randn(7, 5, generator=g, dtype=D)
    for rows in (e, torch.cat([e, e[:2], e[3:4]]), e[:1].expand(4, -1)):  # none, three, all rows duplicated
        assert torch.allclose(distance_relation(rows), _reference_pdist_relation(rows), rtol=1e-9, atol=1e-12)


def test_distance_loss_by_hand():
    c = 3 / (2 + math.sqrt(2))
    diffs = [0.75 - c, 1.0 - c, 1.25 - c * math.sqrt(2)]  # pairs (0,1), (0,2), (1,2); all below 1
    expected = 2 * sum(_h(x) for x in diffs) / 9  # each pair twice, 9 ordered pairs (diagonal: 0 - 0)
    assert rkd_distance(S3, T3).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.003481, abs=1e-6)  # diffs -0.12868, 0.12132, 0.00736


def test_distance_loss_crosses_the_huber_switch():
    # 1-d points: teacher [0, 0, 0, 1] (three duplicated pairs at the 1e-6 floor: mu_t = (3 + 3e-6) / 6),
    # student [0, 10, 20, 10.5] (mu = 60.5 / 6)
    t = torch.tensor([[0.0], [0.0], [0.0], [1.0]], dtype=D)
    s = torch.tensor([[0.0], [10.0], [20.0], [10.5]], dtype=D)
    mu, mu_t = 60.5 / 6, (3 + 3e-6) / 6
    pairs = {(0, 1): (10, 1e-6), (0, 2): (20, 1e-6), (1, 2): (10, 1e-6), (0, 3): (10.5, 1), (1, 3): (0.5, 1), (2, 3): (9.5, 1)}
    diffs = [ds / mu - dt / mu_t for ds, dt in pairs.values()]
    assert max(abs(x) for x in diffs) > 1 > min(abs(x) for x in diffs)  # both branches are used
    assert rkd_distance(s, t).item() == pytest.approx(2 * sum(_h(x) for x in diffs) / 16, rel=1e-12)


def test_angle_relation_and_loss_by_hand():
    a = angle_relation(S3)
    # vertex 0: right angle; vertex 1 (3,0): (-3,0).(-3,4) / (3 * 5) = 0.6; vertex 2 (0,4): (0,-4).(3,-4) / (4 * 5) = 0.8
    assert a[0, 1, 2].item() == pytest.approx(0.0, abs=1e-15) and a[1, 0, 2].item() == pytest.approx(0.6)
    assert a[2, 0, 1].item() == pytest.approx(0.8) and torch.allclose(a, a.transpose(1, 2))
    assert [a[j, i, i].item() for j, i in ((0, 1), (1, 2), (2, 0))] == pytest.approx([1.0, 1.0, 1.0])  # same ray
    assert all((a[j, j, :] == 0).all() and (a[j, :, j] == 0).all() for j in range(3))  # no ray from e_j to itself
    t = angle_relation(T3)
    assert t[1, 0, 2].item() == pytest.approx(1 / math.sqrt(2)) and t[2, 0, 1].item() == pytest.approx(1 / math.sqrt(2))
    # the loss: 2 triplets at vertex 1 and 2 at vertex 2 differ, the other 23 of 27 agree
    expected = (2 * _h(0.6 - 1 / math.sqrt(2)) + 2 * _h(0.8 - 1 / math.sqrt(2))) / 27
    assert rkd_angle(S3, T3).item() == pytest.approx(expected, rel=1e-12)


def _ref_relations(e: Tensor) -> tuple[Tensor, Tensor]:
    """psi_D and psi_A by loops over i, j, k (the paper's definitions, float64)."""
    n = len(e)
    d = torch.zeros(n, n, dtype=D)
    for i in range(n):
        for j in range(n):
            d[i, j] = (e[i] - e[j]).norm()
    mu = d[d > 0].mean()
    a = torch.zeros(n, n, n, dtype=D)
    for j in range(n):
        for i in range(n):
            for k in range(n):
                if i != j and k != j:
                    u, v = e[i] - e[j], e[k] - e[j]
                    a[j, i, k] = (u @ v) / (u.norm() * v.norm())
    return d / mu, a


def test_relations_equal_the_loop_reference():
    e = _points(6, 4, 0)
    psi_d, psi_a = _ref_relations(e)
    assert torch.allclose(distance_relation(e), psi_d, atol=1e-12)
    assert torch.allclose(angle_relation(e), psi_a, atol=1e-12)
    t = _points(6, 9, 1)
    ref_t = _ref_relations(t)
    assert rkd_distance(e, t).item() == pytest.approx(F.smooth_l1_loss(psi_d, ref_t[0]).item(), rel=1e-10)
    assert rkd_angle(e, t).item() == pytest.approx(F.smooth_l1_loss(psi_a, ref_t[1]).item(), rel=1e-10)


def test_invariances():
    s, t = _points(10, 5, 2), _points(10, 7, 3)
    dist, ang = rkd_distance(s, t), rkd_angle(s, t)
    assert dist > 1e-3 and ang > 1e-3
    shift_s, shift_t = _points(1, 5, 4) * 10, _points(1, 7, 5) * 10
    moved = [
        (s * 7.3, t), (s, t * 0.01),                      # scale (mu)
        (s @ _rotation(5, 6), t), (s, t @ _rotation(7, 7)),  # rotation
        (s + shift_s, t), (s, t + shift_t),                # translation
        (3 * s @ _rotation(5, 8) + shift_s, 0.2 * t @ _rotation(7, 9) - shift_t),
    ]
    for a, b in moved:
        assert rkd_distance(a, b).item() == pytest.approx(dist.item(), rel=1e-10)
        assert rkd_angle(a, b).item() == pytest.approx(ang.item(), rel=1e-10)
    # not invariant to what changes the shape: stretching one axis
    stretch = s * torch.tensor([1, 1, 1, 1, 5.0], dtype=D)
    assert abs(rkd_distance(stretch, t) - dist) > 1e-3 and abs(rkd_angle(stretch, t) - ang) > 1e-3


def test_different_widths_same_shape_give_zero():
    s = _points(8, 5, 10)
    embed = _rotation(12, 11)[:5]  # an isometry of R^5 into R^12
    t = 4.0 * s @ embed + 1.5
    assert rkd_distance(s, t).item() == pytest.approx(0.0, abs=1e-14)
    assert rkd_angle(s, t).item() == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match="same N"):
        rkd_distance(s, t[:7])
    with pytest.raises(ValueError, match="2-D"):
        rkd_angle(s[0], t[0])


def test_gradients_reach_the_student_only_and_stay_finite_on_duplicates():
    s = _points(6, 4, 12).requires_grad_()
    t = _points(6, 3, 13).requires_grad_()
    (rkd_distance(s, t) + rkd_angle(s, t)).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    # two equal rows on each side (duplicate images): zero-length differences, finite gradients
    s2 = torch.cat([s.detach()[:5], s.detach()[:1]]).requires_grad_()
    t2 = torch.cat([t.detach()[:5], t.detach()[:1]])
    (rkd_distance(s2, t2) + rkd_angle(s2, t2)).backward()
    assert torch.isfinite(s2.grad).all() and s2.grad.abs().sum() > 0
    # degenerate batches, no NaN: one image (no pair: 0); four equal student rows (psi_s = 0)
    one = s.detach()[:1]
    assert rkd_distance(one, t.detach()[:1]).item() == 0.0 and rkd_angle(one, t.detach()[:1]).item() == 0.0
    flat, t4 = one.expand(4, -1), t.detach()[:4]
    psi_flat = 1 - torch.eye(4, dtype=D)  # every pair at the 1e-6 floor, mu = 1e-6 (the reference's)
    assert torch.allclose(distance_relation(flat), psi_flat)
    assert rkd_distance(flat, t4).item() == pytest.approx(huber(psi_flat, distance_relation(t4)).item())
    assert rkd_angle(flat, t4).item() == pytest.approx(huber(torch.zeros(4, 4, 4, dtype=D), angle_relation(t4)).item())


def test_relations_run_in_float32_under_autocast():
    s, t = _points(8, 4, 14).float(), _points(8, 6, 15).float()
    ref = rkd_distance(s, t), rkd_angle(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rkd_distance(s.bfloat16(), t.bfloat16()), rkd_angle(s.bfloat16(), t.bfloat16())
        assert distance_relation(s.bfloat16()).dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in low)
    # only the inputs' rounding to bf16 differs (8 bits of mantissa), not the arithmetic
    for a, b in zip(ref, low):
        assert torch.allclose(a, b, rtol=0.05), (a, b)


# --------------------------------------------------------------------------- the method


@functools.lru_cache(maxsize=None)
def _teachers() -> TeacherSet:
    torch.manual_seed(0)  # heterogeneous: feature widths 24 and 40
    nets = [build_model("cnn", SHAPE, 3, width=4, feature_dim=24), build_model("mlp", SHAPE, 2, hidden=40)]
    with torch.no_grad():
        for n, scale in zip(nets, (20.0, 10.0)):  # sharp enough that both teachers claim images
            n.head.weight.mul_(scale)
    return TeacherSet(nets)


def _method(name: str = "rkd", **params):
    torch.manual_seed(1)
    cls = get_method(name)
    student = build_model("cnn", SHAPE, sum(SIZES), width=4)
    return cls(student, _teachers(), cls.parse_params(params, f"methods.{name}"), SplitInfo(SIZES, OFFSETS))


@functools.lru_cache(maxsize=None)
def _batch(n: int = 16) -> Batch:
    x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(2))
    tl, tf = _teachers().outputs(x)
    return Batch(x=x, index=torch.arange(n), teacher_logits=tl, teacher_feats=tf)


def _total(m, terms: dict[str, Tensor]) -> Tensor:
    w = m.weights()
    return sum(w[t] * v for t, v in terms.items())


def test_rkd_terms_are_kd_plus_the_relations_summed_over_teachers():
    b, m = _batch(), _method(T=3.0)
    assert m.weights() == {"kd": 1.0, "dist": 25.0, "angle": 50.0} and not m.uses_labels
    got = m.loss_terms(b)
    z_s, f_s = m.student.forward_both(b.x)
    assert [f.shape[1] for f in b.teacher_feats] == [24, 40] and f_s.shape[1] == m.student.feature_dim
    expected = {
        "kd": losses.soft_target_kl(torch.cat(b.teacher_logits, 1), z_s, 3.0),
        "dist": sum(rkd_distance(f_s, f) for f in b.teacher_feats),
        "angle": sum(rkd_angle(f_s, f) for f in b.teacher_feats),
    }
    assert set(got) == set(expected)
    for k in got:
        assert torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-7), k
    # each teacher contributes: the sum is not one teacher's term
    for f in b.teacher_feats:
        assert rkd_distance(f_s, f) < got["dist"] - 1e-4 and rkd_angle(f_s, f) < got["angle"] - 1e-4
    # the kd term is kd's own, at the same T and init
    assert torch.allclose(got["kd"], _method("kd", T=3.0).loss_terms(b)["kd"], atol=1e-7)


@pytest.mark.parametrize("rule", ["confidence/none/routed", {"score": "entropy", "targets": "routed", "T_pl": 0.5}])
def test_rkd_routed_target_is_kds(rule):
    b = _batch()
    got = _method(T=2.0, routing=rule).loss_terms(b)["kd"]
    assert torch.allclose(got, _method("kd", T=2.0, routing=rule).loss_terms(b)["kd"], atol=1e-7)
    assert not torch.allclose(got, _method(T=2.0).loss_terms(b)["kd"], atol=1e-4)  # routing matters


@pytest.mark.parametrize("component", ["kd", "dist", "angle"])
def test_rkd_ablation_removes_exactly_its_term(component):
    b = _batch()
    w = get_method("rkd").ablations[component]
    full, off = _method(), _method(**{w: 0.0})
    t_full, t_off = full.loss_terms(b), off.loss_terms(b)
    assert set(t_full) - set(t_off) == {component} and set(t_off) < set(t_full)
    for k in t_off:
        assert torch.allclose(t_off[k], t_full[k], atol=1e-7)
    assert torch.allclose(_total(off, t_off), _total(full, t_full) - full.weights()[component] * t_full[component], atol=1e-5)


def test_rkd_without_relations_is_kd():
    b = _batch()
    m = _method(w_dist=0.0, w_angle=0.0)
    t = m.loss_terms(b)
    assert set(t) == {"kd"} and torch.equal(t["kd"], _method("kd").loss_terms(b)["kd"])


def test_rkd_gradients_reach_the_student_only():
    m = _method(w_kd=0.0)  # the relational terms alone
    _total(m, m.loss_terms(_batch())).backward()
    body = [p for n, p in m.student.named_parameters() if not n.startswith("head.")]
    assert all(p.grad is not None for p in body) and sum(p.grad.abs().sum() for p in body) > 0
    assert all(p.grad is None for p in m.student.head.parameters())  # relations live in the features
    assert all(p.grad is None for p in m.teachers.parameters())


def test_rkd_parameters_and_ablations_in_a_study():
    study = StudyConfig.model_validate({**TINY, "methods": {"rkd": {"T": 2.0}, "kd": {}}, "ablations": ["dist", "angle", "dist+angle"]})
    got = {(m, v): p for m, v, p in method_variants(study)}
    assert set(got) == {("rkd", "full"), ("rkd", "-dist"), ("rkd", "-angle"), ("rkd", "-dist-angle"), ("kd", "full")}
    assert (got["rkd", "-dist"]["w_dist"], got["rkd", "-dist"]["w_angle"], got["rkd", "-dist"]["T"]) == (0.0, 50.0, 2.0)
    assert (got["rkd", "-dist-angle"]["w_dist"], got["rkd", "-dist-angle"]["w_angle"]) == (0.0, 0.0)
    with pytest.raises(HarnessError, match=r"^methods\.rkd\.w_angle: "):
        get_method("rkd").parse_params({"w_angle": -1}, "methods.rkd")
    with pytest.raises(HarnessError, match=r"^methods\.rkd\.w_dst: unknown parameter$"):
        get_method("rkd").parse_params({"w_dst": 1}, "methods.rkd")


def test_cli_lists_rkd_with_terms_and_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("\nrkd: ") + 1 :].split("\n")[:4]
    assert block[1] == "  loss terms: kd (weight w_kd), dist (weight w_dist), angle (weight w_angle)"
    assert block[2] == "  ablations:  -kd sets w_kd=0, -dist sets w_dist=0, -angle sets w_angle=0"
    assert block[3].startswith("  parameters: w_kd=1.0, w_dist=25.0, w_angle=50.0, T=1.0, routing=")


# --------------------------------------------------------------------------- the real loop


@functools.lru_cache(maxsize=None)
def _digits():
    return build_split(SplitConfig(name="s", tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]), DatasetConfig(name="digits"))


@pytest.mark.parametrize("routing", ["confidence/none/concat", "confidence/none/routed"])
def test_rkd_trains_through_the_loop_and_learns_the_teachers_relations(routing):
    data = _digits()
    torch.manual_seed(0)
    teachers = TeacherSet([build_model("mlp", data.in_shape, n, hidden=16) for n in data.sizes])
    torch.manual_seed(3)
    cls = get_method("rkd")
    m = cls(build_model("cnn", data.in_shape, data.num_classes, width=4), teachers,
            cls.parse_params({"routing": routing}, "methods.rkd"), SplitInfo(tuple(data.sizes), tuple(data.offsets)))
    x = data.parts["val"].x[:64]
    tl, tf = teachers.outputs(x)
    held = Batch(x=x, index=torch.arange(64), teacher_logits=tl, teacher_feats=tf)

    def relational() -> float:
        m.eval()
        with torch.no_grad():
            t = m.loss_terms(held)
        return float(25 * t["dist"] + 50 * t["angle"])

    before = relational()
    res = fit(m, data, TrainConfig(epochs=2, batch_size=64, lr=0.01), seed=0)
    after = relational()
    assert len(res.history) == 2
    for h in res.history:
        assert {"loss/kd", "loss/dist", "loss/angle", "loss/total"} <= set(h)
        assert all(math.isfinite(h[k]) for k in ("loss/kd", "loss/dist", "loss/angle", "loss/total"))
        assert h["loss/total"] == pytest.approx(h["loss/kd"] + 25 * h["loss/dist"] + 50 * h["loss/angle"], rel=1e-5)
    assert after < 0.8 * before, (before, after)  # the student's relations moved towards the teachers'
    assert 0.0 <= res.final["test/union_acc"] <= 1.0
