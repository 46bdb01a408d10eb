"""``cfl`` (baselines/cfl.py) against its reference implementation, term by term.

The reference (VainF/CommonFeatureLearning: ``models/cfl.py`` ResBlock and CFL_ConvBlock,
``loss/loss.py`` CFLoss and soft_cross_entropy, ``loss/mmd.py`` calc_mmd and mmd_rbf2) is
re-implemented below from reading it: it is the specification. Our modules' weights are loaded
into it by name (strict: the same layers, shapes and no biases), and on one fixed batch our
``mmd``, ``recon`` and ``kd`` terms must equal its MMD part, its MSE part and its soft cross-
entropy minus the target's entropy (a constant: the same gradient), and the weighted totals must
give the student the same gradient. In float64: in float32 the kernel of bandwidth 0.001
(1 / (2 sigma^2) = 5e5) turns the ~1e-7 round-off of the squared distances, which the two
formulas round differently, into differences of ~1e-2 (``harness.losses.mmd2``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness import losses
from harness.config import TrainConfig
from harness.errors import HarnessError
from harness.methods.base import Batch, SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.train import method_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
SIZES, OFFSETS = (3, 2), (0, 3)
SIGMAS = [0.001, 0.01, 0.05, 0.1, 0.2, 1, 2]


# --------------------------------------------------------------------------- the reference


class RefResBlock(nn.Module):
    """models/cfl.py ResBlock (its BatchNorm lines are commented out there): conv3x3, ReLU,
    conv3x3, + residual (1x1 conv 'downsample' when the width changes), ReLU; no biases."""

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False)) if inplanes != planes else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefCFLConvBlock(nn.Module):
    """models/cfl.py CFL_ConvBlock(channel_s, channel_t, channel_h) and its forward(fs, ft)."""

    def __init__(self, channel_s: int, channel_t: list[int], h: int) -> None:
        super().__init__()
        self.align_t = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 2 * h, 1, bias=False), nn.ReLU()) for c in channel_t)
        self.align_s = nn.Sequential(nn.Conv2d(channel_s, 2 * h, 1, bias=False), nn.ReLU())
        self.extractor = nn.Sequential(RefResBlock(2 * h, h), RefResBlock(h, h), RefResBlock(h, h))
        self.dec_t = nn.ModuleList(nn.Sequential(nn.Conv2d(h, c, 3, 1, 1, bias=False), nn.ReLU(),
                                                 nn.Conv2d(c, c, 1, 1, 0, bias=False)) for c in channel_t)

    def forward(self, fs: Tensor, ft: list[Tensor]):
        ht = [self.extractor(a(f)) for a, f in zip(self.align_t, ft)]
        hs = self.extractor(self.align_s(fs))
        return (hs, ht), ([d(h) for d, h in zip(self.dec_t, ht)], ft)


def ref_calc_mmd(f1: Tensor, f2: Tensor) -> Tensor:
    """loss/mmd.py calc_mmd(normalized=True) with mmd_rbf2 and the CFLoss bandwidths."""
    x, y = F.normalize(f1.reshape(len(f1), -1), dim=1), F.normalize(f2.reshape(len(f2), -1), dim=1)
    xx, yy, zz = x @ x.t(), y @ y.t(), x @ y.t()
    rx, ry = xx.diag().unsqueeze(0).expand_as(xx), yy.diag().unsqueeze(0).expand_as(yy)
    xx2, yy2, xy2 = rx.t() + rx - 2 * xx, ry.t() + ry - 2 * yy, rx.t() + ry - 2 * zz
    k = l_ = p = 0.0
    for s in SIGMAS:
        a = 1.0 / (2 * s ** 2)
        k = k + torch.exp(-a * xx2.clamp(min=1e-12))
        l_ = l_ + torch.exp(-a * yy2.clamp(min=1e-12))
        p = p + torch.exp(-a * xy2.clamp(min=1e-12))
    n = len(x)
    return F.relu((k.sum() + l_.sum()) / (n * n) - 2.0 / (n * n) * p.sum())


def ref_cfloss(hs: Tensor, ht: list[Tensor], ft_: list[Tensor], ft: list[Tensor]) -> tuple[Tensor, Tensor]:
    """loss/loss.py CFLoss (beta = 1) returns mmd + beta * mse; here the two parts."""
    return sum(ref_calc_mmd(hs, h) for h in ht), sum(F.mse_loss(a, b) for a, b in zip(ft_, ft))


def ref_soft_ce(logits: Tensor, target: Tensor, T: float = 1.0) -> Tensor:
    """loss/loss.py soft_cross_entropy: mean_i sum_c -softmax(t/T) log_softmax(s/T), times T^2."""
    return (-F.softmax(target / T, 1) * F.log_softmax(logits / T, 1)).sum(1).mean() * T * T


# --------------------------------------------------------------------------- ours


def _cfl(student, teacher_nets, **params):
    cls = get_method("cfl")
    return cls(student, TeacherSet(teacher_nets), cls.parse_params(params, "methods.cfl"), SplitInfo(SIZES, OFFSETS))


def _conv_method(dtype=torch.float32, **params):
    torch.manual_seed(0)
    teachers = [build_model("cnn", SHAPE, 3, width=4), build_model("cnn", SHAPE, 2, width=6)]  # maps 8 and 12 ch
    student = build_model("cnn", SHAPE, sum(SIZES), width=3)  # map 6 ch, 2x2
    return _cfl(student, teachers, **{"c": 8, **params}).to(dtype)


def _batch(m, n: int = 12, dtype=torch.float32, shape=SHAPE) -> Batch:
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    tl, tf = m.teachers.outputs(x)
    return Batch(x=x, index=torch.arange(n), teacher_logits=tl, teacher_feats=tf)


def _block_state(m) -> dict[str, Tensor]:
    """Our CFL block's weights under the reference's names."""
    names = {"a_t": "align_t", "a_s": "align_s", "extractor": "extractor", "dec": "dec_t"}
    return {names[k.split(".")[0]] + k[k.index("."):]: v for k, v in m.state_dict().items() if k.split(".")[0] in names}


def _total(m, terms: dict[str, Tensor]) -> Tensor:
    w = m.weights()
    return sum(w[t] * v for t, v in terms.items())


def test_maps_terms_and_student_gradient_equal_the_reference():
    m = _conv_method(torch.float64)
    b = _batch(m, dtype=torch.float64)
    ref = RefCFLConvBlock(6, [8, 12], 8).double()
    ref.load_state_dict(_block_state(m), strict=True)  # same layers, shapes, no biases
    assert m.space == "maps" and m.weights() == {"kd": 1.0, "mmd": 10.0, "recon": 10.0}

    ours = m.loss_terms(b)
    g_ours = torch.autograd.grad(_total(m, ours), list(m.student.parameters()))

    fs = m.student.feature_map(b.x)
    ft = [t.feature_map(b.x) for t in m.teachers.nets]
    (hs, ht), (ft_, ft) = ref(fs, ft)
    mmd, mse = ref_cfloss(hs, ht, ft_, ft)
    target = torch.cat(b.teacher_logits, 1)
    ce = ref_soft_ce(m.student(b.x), target)
    entropy = -(F.softmax(target, 1) * F.log_softmax(target, 1)).sum(1).mean()
    assert mmd > 1e-3 and mse > 1e-3 and ce > entropy  # terms that can fail
    torch.testing.assert_close(ours["mmd"], mmd, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["recon"], mse, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["kd"], ce - entropy, atol=1e-5, rtol=0)
    # amal.py: loss = loss_ce + 10 * CFLoss; the student's gradient is ours
    g_ref = torch.autograd.grad(ce + 10 * (mmd + 1.0 * mse), list(m.student.parameters()))
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, atol=1e-7, rtol=1e-5)
    assert sum(g.abs().sum() for g in g_ours) > 0


def test_maps_gradients_reach_the_parts_each_term_acts_on():
    m = _conv_method()
    b = _batch(m)
    terms = m.loss_terms(b)
    blocks = {"a_s": m.a_s, "a_t": m.a_t, "extractor": m.extractor, "dec": m.dec, "backbone": m.student.body}
    reach = {"mmd": {"a_s", "a_t", "extractor", "backbone"}, "recon": {"a_t", "extractor", "dec"}}
    for term, expected in reach.items():
        m.zero_grad(set_to_none=True)
        terms[term].backward(retain_graph=True)
        got = {k for k, mod in blocks.items()
               if any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())}
        assert got == expected, term
        assert all(p.grad is None for p in m.teachers.parameters())


def test_one_student_pass_gives_map_and_logits_with_a_projection_after_the_pool():
    """The logits from the map equal student(x), and BatchNorm's running statistics move once
    per batch, as in one forward pass (also for a cnn with a Linear after the pooling)."""
    torch.manual_seed(0)
    student = build_model("cnn", SHAPE, sum(SIZES), width=3, feature_dim=5)
    m = _cfl(student, [build_model("cnn", SHAPE, 3, width=4), build_model("cnn", SHAPE, 2, width=6)], c=4)
    b = _batch(m)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    twin = build_model("cnn", SHAPE, sum(SIZES), width=3, feature_dim=5)
    twin.load_state_dict(start)
    logits = twin(b.x)  # one forward pass in train mode
    torch.testing.assert_close(student.head(m._tail[0](student.feature_map(b.x))), logits, atol=0, rtol=0)
    student.load_state_dict(start)  # undo that check's statistics
    terms = m.loss_terms(b)
    torch.testing.assert_close(terms["kd"], losses.soft_target_kl(torch.cat(b.teacher_logits, 1), logits, 1.0))
    for a, r in zip(student.buffers(), twin.buffers()):
        torch.testing.assert_close(a, r, atol=0, rtol=0)


def test_teacher_maps_of_another_size_are_average_pooled_to_the_students():
    """Student resnet18 on 8x8: 1x1 maps after three stride-2 stages; teacher cnn: 2x2, so the
    reconstruction target is the teacher map's mean over H, W (adaptive average pooling)."""
    torch.manual_seed(0)
    student = build_model("resnet18", SHAPE, sum(SIZES), width=2)
    t = [build_model("cnn", SHAPE, 3, width=4), build_model("resnet18", SHAPE, 2, width=2)]
    m = _cfl(student, t, c=4, space="maps").double()
    b = _batch(m, dtype=torch.float64)
    assert [tuple(n.feature_map(b.x).shape[1:]) for n in (student, *t)] == [(16, 1, 1), (8, 2, 2), (16, 1, 1)]
    f_t = [t[0].feature_map(b.x).mean((2, 3), keepdim=True), t[1].feature_map(b.x)]
    h_t = [m.extractor(a(f)) for a, f in zip(m.a_t, f_t)]
    recon = sum(((d(h) - f) ** 2).mean() for d, h, f in zip(m.dec, h_t, f_t))
    h_s = m.extractor(m.a_s(student.feature_map(b.x)))
    mmd = sum(losses.mmd2(h_s.flatten(1), h.flatten(1)) for h in h_t)
    terms = m.loss_terms(b)
    torch.testing.assert_close(terms["recon"], recon, atol=1e-10, rtol=0)
    torch.testing.assert_close(terms["mmd"], mmd, atol=1e-10, rtol=0)


def test_reference_rates_are_the_recipes_lr_mult_and_cover_every_trainable_parameter_once():
    """The reference's Adam groups (backbone 1x, head 10x, CFL block 10x) are the recipe's
    ``train.lr_mult: {head: 10, method: 10}``: cfl declares the default roles, the block is its own."""
    m = _conv_method()
    ref = TrainConfig(lr=0.002, optimizer="adam", weight_decay=1e-4, lr_mult={"head": 10, "method": 10})
    opt = method_optimizer(m, ref)
    assert [g["role"] for g in opt.param_groups] == ["body", "head", "method"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.002, 0.02, 0.02])
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    head = {id(p) for p in m.student.head.parameters()}
    assert ids[1] == head and ids[0] == {id(p) for p in m.student.parameters()} - head
    assert ids[2] == {id(p) for mod in (m.a_s, m.a_t, m.extractor, m.dec) for p in mod.parameters()}
    assert sum(map(len, ids)) == len(set().union(*ids)) == sum(1 for p in m.parameters() if p.requires_grad)
    sgd = method_optimizer(_conv_method(), TrainConfig(lr=0.1, optimizer="sgd", lr_mult={"head": 3, "method": 0.5}))
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.1, 0.3, 0.05])


def test_by_default_cfl_trains_every_part_at_train_lr_like_every_other_method():
    m = _conv_method()
    opt = method_optimizer(m, TrainConfig(lr=0.001))
    assert [g["lr"] for g in opt.param_groups] == [0.001] * 3
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in m.parameters() if p.requires_grad}


def test_roles_that_miss_or_repeat_a_parameter_are_refused():
    m = _conv_method()
    roles = m.param_roles()
    for bad in ({"body": roles["body"], "head": roles["head"]},
                {**roles, "method": roles["method"] + roles["head"]},
                {**roles, "block": []}):
        m.param_roles = lambda bad=bad: bad  # type: ignore[method-assign]
        with pytest.raises(ValueError, match="exactly once|unknown role 'block'"):
            method_optimizer(m, TrainConfig())


@pytest.mark.parametrize("name,role", [("lr_mult_head", "head"), ("lr_mult_cfl", "method")])
def test_the_former_rate_parameters_point_to_the_recipe(name, role):
    with pytest.raises(HarnessError, match=rf"^methods\.cfl\.{name}: .*train\.lr_mult\.{role} "):
        get_method("cfl").parse_params({name: 10.0}, "methods.cfl")


def test_pooled_variant_is_the_former_cfl_by_hand():
    """``space: pooled`` builds the former blocks in the former order (same initial weights for
    the same seed) and computes the former terms, written out here: pooled features, Linear
    adapters, MMD^2 from explicit pairwise distances, element-mean MSE, KL."""
    torch.manual_seed(1)
    student = build_model("cnn", SHAPE, sum(SIZES), width=3)
    teachers = [build_model("cnn", SHAPE, 3, width=4, feature_dim=10), build_model("mlp", SHAPE, 2, hidden=7)]
    state = torch.get_rng_state()
    m = _cfl(student, teachers, space="pooled", c=5)
    torch.set_rng_state(state)  # the former __init__: a_s, a_t, extractor, dec
    former = [nn.Linear(6, 5), nn.Linear(10, 5), nn.Linear(7, 5), nn.Linear(5, 5), nn.Linear(5, 5),
              nn.Linear(5, 10), nn.Linear(10, 10), nn.Linear(5, 7), nn.Linear(7, 7)]
    ours = [m.a_s[0], m.a_t[0][0], m.a_t[1][0], m.extractor[0], m.extractor[2], m.dec[0][0], m.dec[0][2],
            m.dec[1][0], m.dec[1][2]]
    for a, r in zip(ours, former):
        assert torch.equal(a.weight, r.weight) and torch.equal(a.bias, r.bias)
    m = m.double()
    b = _batch(m, dtype=torch.float64)

    def lin(layer: nn.Linear, v: Tensor) -> Tensor:
        return v @ layer.weight.T + layer.bias

    def E(v: Tensor) -> Tensor:
        return lin(m.extractor[2], lin(m.extractor[0], v).relu())

    def mmd(x: Tensor, y: Tensor) -> Tensor:
        x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
        k = lambda a, c: sum(torch.exp(-torch.cdist(a, c) ** 2 / (2 * s * s)) for s in SIGMAS).mean()  # noqa: E731
        return (k(x, x) + k(y, y) - 2 * k(x, y)).clamp_min(0)

    f_s = student.features(b.x)
    h_s = E(lin(m.a_s[0], f_s).relu())
    h_t = [E(lin(a[0], f).relu()) for a, f in zip(m.a_t, b.teacher_feats)]
    q = F.softmax(torch.cat(b.teacher_logits, 1), 1)
    expected = {
        "kd": (q * (q.log() - F.log_softmax(student(b.x), 1))).sum(1).mean(),
        "mmd": sum(mmd(h_s, h) for h in h_t),
        "recon": sum(((lin(d[2], lin(d[0], h).relu()) - f) ** 2).mean()
                     for d, h, f in zip(m.dec, h_t, b.teacher_feats)),
    }
    got = m.loss_terms(b)
    assert set(got) == set(expected) and all(v > 1e-4 for v in got.values())
    for t in expected:
        torch.testing.assert_close(got[t], expected[t], atol=1e-7, rtol=0, msg=t)


def test_maps_with_an_mlp_falls_back_to_pooled_and_says_so():
    torch.manual_seed(0)
    teachers = [build_model("cnn", SHAPE, 3, width=4), build_model("mlp", SHAPE, 2, hidden=7)]
    with pytest.warns(UserWarning, match=r"methods\.cfl\.space: maps needs conv feature maps, but teacher 1 \(MLP\)"):
        m = _cfl(build_model("cnn", SHAPE, sum(SIZES), width=3), teachers)
    assert m.params.space == "maps" and m.space == "pooled"
    assert m.run_tags() == {"harness.cfl_space": "pooled (fallback: teacher 1 (MLP) has no conv feature map)"}
    assert isinstance(m.a_s[0], nn.Linear) and set(m.loss_terms(_batch(m))) == {"kd", "mmd", "recon"}
    with pytest.warns(UserWarning, match=r"but the student \(MLP\) has no conv"):
        _cfl(build_model("mlp", SHAPE, sum(SIZES), hidden=7), teachers[:1])
    assert _conv_method().run_tags() == {"harness.cfl_space": "maps"}


def test_the_fallback_is_said_once_in_the_plan_from_the_configs_alone():
    """``CFL.plan_note``: the runner's one line per split (nets built on the meta device), and the
    trial's warning is a ``NotedWarning`` the console filter of the runner and its workers drops."""
    import warnings

    from harness.config import ModelSpec
    from harness.console import NotedWarning, quiet

    cfl = get_method("cfl")
    cnn, mlp = ModelSpec(arch="cnn", width=4), ModelSpec(arch="mlp", hidden=7)
    maps, pooled = cfl.parse_params({}, "methods.cfl"), cfl.parse_params({"space": "pooled"}, "methods.cfl")
    assert cfl.plan_note(maps, cnn, [cnn, mlp], SHAPE, "2x5") == \
        "cfl runs in the pooled space in split 2x5 (teacher 1 (MLP) has no conv feature map)"
    assert cfl.plan_note(maps, mlp, [mlp, mlp], SHAPE, "3way") == ("cfl runs in the pooled space in split 3way "
                                                                  "(the student (MLP), teacher 0 (MLP), teacher 1 "
                                                                  "(MLP) have no conv feature map)")
    assert cfl.plan_note(maps, cnn, [cnn, cnn], SHAPE, "2x5") is None
    assert cfl.plan_note(pooled, cnn, [cnn, mlp], SHAPE, "2x5") is None
    assert get_method("kd").plan_note(get_method("kd").parse_params({}, "methods.kd"), cnn, [mlp], SHAPE, "2x5") is None
    teachers = [build_model("cnn", SHAPE, 3, width=4), build_model("mlp", SHAPE, 2, hidden=7)]
    with pytest.warns(NotedWarning, match="teacher 1 \\(MLP\\)"):
        _cfl(build_model("cnn", SHAPE, sum(SIZES), width=3), teachers)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet()  # what the CLI and every worker call first
        _cfl(build_model("cnn", SHAPE, sum(SIZES), width=3), teachers)
    assert seen == []


def test_unknown_space_is_a_one_line_error_naming_the_field():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=r"^methods\.cfl\.space: Input should be 'maps' or 'pooled'"):
        get_method("cfl").parse_params({"space": "vectors"}, "methods.cfl")


@pytest.mark.parametrize("arch,opts,shape", [
    ("cnn", {"width": 3}, (6, 2, 2)), ("resnet8", {}, (64, 2, 2)), ("resnet18", {"width": 2}, (16, 1, 1)),
    ("wrn", {"depth": 10, "width": 1}, (64, 2, 2)), ("resnet8x4", {}, (256, 2, 2)),
])
def test_feature_map_is_the_map_whose_mean_is_the_pooled_features(arch, opts, shape):
    torch.manual_seed(0)
    net = build_model(arch, SHAPE, 4, **opts).eval()
    x = torch.rand(3, *SHAPE)
    fmap = net.feature_map(x)
    assert tuple(fmap.shape) == (3, *shape)
    torch.testing.assert_close(fmap.mean((2, 3)), net.features(x), atol=0, rtol=0)


def test_mlp_has_no_feature_map():
    assert build_model("mlp", SHAPE, 4, hidden=5).feature_map(torch.rand(2, *SHAPE)) is None
