"""Tests for harness.models: shapes, head/feature split, options, gradients, determinism."""

from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.models import MODELS, Net, build_model, model_options

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
# Small options keep the suite fast; feature_dim documents the expected width for each.
SMALL = {
    "mlp": ({"hidden": 24}, 24),
    "cnn": ({"width": 6}, 12),
    "resnet8": ({"width_mult": 1}, 64),
    "resnet20": ({"width_mult": 1}, 64),
    "resnet18": ({"width": 4}, 32),
    "wrn": ({"depth": 10, "width": 1}, 64),
    "resnet8x4": ({}, 256),  # fixed architectures: no options
    "resnet32x4": ({}, 256),
}
NUM_CLASSES = 7


def test_every_registered_arch_is_covered() -> None:
    assert sorted(MODELS.names()) == sorted(SMALL)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", sorted(SMALL))
def test_shapes_and_head_feature_split(arch: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    opts, feature_dim = SMALL[arch]
    model = build_model(arch, shape, NUM_CLASSES, **opts).eval()
    assert isinstance(model, Net)
    assert model.feature_dim == feature_dim
    assert isinstance(model.head, torch.nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (feature_dim, NUM_CLASSES)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        both_logits, both_feats = model.forward_both(x)
        from_feats = model.head(feats)
    assert feats.shape == (3, feature_dim)
    assert logits.shape == (3, NUM_CLASSES)
    assert torch.equal(logits, from_feats)
    assert torch.equal(both_logits, logits)
    assert torch.equal(both_feats, feats)
    assert torch.isfinite(logits).all()
    # Inputs are distinguishable: features are not a constant (e.g. everything pooled away).
    assert not torch.allclose(feats[0], feats[1])


@pytest.mark.parametrize("arch", ["cnn", "resnet8", "resnet18", "wrn", "resnet8x4"])
def test_features_are_post_relu(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), 3, **SMALL[arch][0]).eval()
    with torch.no_grad():
        assert (model.features(torch.randn(4, 1, 8, 8)) >= 0).all()


def test_full_size_resnet18_default_width() -> None:
    model = build_model("resnet18", (3, 32, 32), 10)
    assert model.feature_dim == 512
    assert model.head.in_features == 512
    n_params = sum(p.numel() for p in model.parameters())
    assert 11_000_000 < n_params < 11_300_000  # ResNet-18 with a 10-way head is ~11.2M


def test_resnet_depths() -> None:
    def convs(m: torch.nn.Module) -> int:
        return sum(isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3) for c in m.modules())

    # 3x3 convs + the linear head give the nominal depth (projection shortcuts are 1x1).
    assert convs(build_model("resnet8", (3, 32, 32), 10)) + 1 == 8
    assert convs(build_model("resnet20", (3, 32, 32), 10)) + 1 == 20
    assert convs(build_model("resnet18", (3, 32, 32), 10, width=4)) + 1 == 18
    assert convs(build_model("resnet8x4", (3, 32, 32), 10)) + 1 == 8
    assert convs(build_model("resnet32x4", (3, 32, 32), 10)) + 1 == 32


@pytest.mark.parametrize(
    "arch, opts, feature_dim",
    [
        ("mlp", {"hidden": 40}, 40),
        ("mlp", {"hidden": 40, "depth": 4}, 40),
        ("cnn", {"width": 5}, 10),
        ("cnn", {"width": 5, "feature_dim": 33}, 33),
        ("resnet8", {"width_mult": 2}, 128),
        ("resnet20", {"width_mult": 2}, 128),
        ("resnet18", {"width": 3}, 24),
        ("wrn", {"depth": 10, "width": 3}, 192),
        ("wrn", {"depth": 16, "width": 1}, 64),
    ],
)
def test_options_change_feature_dim(arch: str, opts: dict[str, object], feature_dim: int) -> None:
    model = build_model(arch, (1, 8, 8), 4, **opts).eval()
    assert model.feature_dim == feature_dim
    with torch.no_grad():
        assert model.features(torch.randn(2, 1, 8, 8)).shape == (2, feature_dim)


def test_mlp_depth_counts_hidden_layers() -> None:
    for depth in (1, 2, 5):
        model = build_model("mlp", (1, 8, 8), 3, hidden=16, depth=depth)
        n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert n_linear == depth + 1  # hidden layers + head


def test_mlp_dropout_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 3, hidden=64, dropout=0.5)
    x = torch.randn(4, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_model_options_defaults() -> None:
    assert model_options("mlp") == {"hidden": 256, "depth": 2, "dropout": 0.0}
    assert model_options("cnn") == {"width": 32, "feature_dim": None}
    assert model_options("resnet8") == {"width_mult": 1}
    assert model_options("resnet20") == {"width_mult": 1}
    assert model_options("resnet18") == {"width": 64}
    assert model_options("wrn") == {"depth": 16, "width": 2, "dropout": 0.0}
    assert model_options("resnet8x4") == {}
    assert model_options("resnet32x4") == {}
    assert build_model("mlp", (1, 8, 8), 3).feature_dim == 256
    assert build_model("cnn", (1, 8, 8), 3).feature_dim == 64


def test_unknown_option_names_it_and_the_accepted_ones() -> None:
    with pytest.raises(HarnessError) as info:
        build_model("cnn", (1, 8, 8), 3, widht=8)
    msg = str(info.value)
    assert "widht" in msg and "width" in msg and "feature_dim" in msg and "cnn" in msg
    assert "\n" not in msg


def test_unknown_arch_lists_choices() -> None:
    for call in (lambda: build_model("vgg", (1, 8, 8), 3), lambda: model_options("vgg")):
        with pytest.raises(HarnessError) as info:
            call()
        msg = str(info.value)
        assert "vgg" in msg
        assert all(name in msg for name in SMALL)


@pytest.mark.parametrize(
    "arch, shape, opts",
    [
        ("mlp", (1, 8, 8), {"hidden": 0}),
        ("mlp", (1, 8, 8), {"dropout": 1.0}),
        ("cnn", (1, 8, 8), {"width": 2.5}),
        ("resnet8", (1, 8, 8), {"width_mult": 0}),
        ("wrn", (1, 8, 8), {"width": 0}),
        ("wrn", (1, 8, 8), {"width": 1.5}),
        ("wrn", (1, 8, 8), {"depth": 0}),
        ("wrn", (1, 8, 8), {"dropout": -0.1}),
        ("wrn", (1, 8, 8), {"dropout": 1.0}),
        ("resnet8x4", (1, 8, 8), {"width": 2}),  # no options at all
        ("mlp", (8, 8), {}),
        ("mlp", (1, 0, 8), {}),
    ],
)
def test_bad_option_values_and_shapes(
    arch: str, shape: tuple[int, ...], opts: dict[str, object]
) -> None:
    with pytest.raises(HarnessError):
        build_model(arch, shape, 3, **opts)  # type: ignore[arg-type]


def test_unknown_option_of_an_optionless_model_says_it_accepts_none() -> None:
    expected = r"unknown option 'width' for model 'resnet32x4' \(accepts: none\)"
    with pytest.raises(HarnessError, match=expected):
        build_model("resnet32x4", (3, 32, 32), 10, width=2)


# --- the CIFAR distillation architectures (RepDistiller / CRD, Tian et al. 2020) -------------

#: Parameter counts for 100 classes, as quoted for the CIFAR-100 models of RepDistiller (CRD,
#: Tian et al. 2020) in the KD literature: WRN-40-2 2.26M, WRN-16-2 0.70M, resnet32x4 7.43M,
#: resnet8x4 1.23M. The exact integers were counted on RepDistiller's models/wrn.py and
#: models/resnet.py (wrn_40_2, wrn_16_2, resnet32x4, resnet8x4 with num_classes=100) and agree
#: with the closed forms below; our models loaded with the reference's weights gave the same
#: outputs (max abs difference <= 1.2e-5, checked once by hand, not in this suite).
PUBLISHED = [
    ("wrn", {"depth": 40, "width": 2}, 2_255_156, 128),
    ("wrn", {"depth": 16, "width": 2}, 703_284, 128),
    ("resnet32x4", {}, 7_433_860, 256),
    ("resnet8x4", {}, 1_233_540, 256),
]


def wrn_param_count(depth: int, width: int, c: int, classes: int) -> int:
    """Closed form of WRN-depth-width: stem conv3x3(c,16); per block (a -> b) BN(a) 2a,
    conv 9ab, BN(b) 2b, conv 9b^2, plus a 1x1 projection ab when a != b; final BN; Linear."""
    n, (w1, w2, w3) = (depth - 4) // 6, (16 * width, 32 * width, 64 * width)

    def block(a: int, b: int) -> int:
        return 2 * a + 9 * a * b + 2 * b + 9 * b * b + (a * b if a != b else 0)

    groups = sum(block(a, b) + (n - 1) * block(b, b) for a, b in ((16, w1), (w1, w2), (w2, w3)))
    return 9 * c * 16 + groups + 2 * w3 + w3 * classes + classes


def kd_resnet_param_count(depth: int, c: int, classes: int) -> int:
    """Closed form of RepDistiller's resnet{depth}x4: stem conv3x3(c,32) + BN; per block
    (a -> b) conv 9ab, BN 2b, conv 9b^2, BN 2b, plus a 1x1 conv + BN ab + 2b when a != b."""
    n = (depth - 2) // 6

    def block(a: int, b: int) -> int:
        return 9 * a * b + 9 * b * b + 4 * b + (a * b + 2 * b if a != b else 0)

    stages = sum(block(a, b) + (n - 1) * block(b, b) for a, b in ((32, 64), (64, 128), (128, 256)))
    return 9 * c * 32 + 64 + stages + 256 * classes + classes


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, opts, count, feature_dim", PUBLISHED,
                         ids=["wrn-40-2", "wrn-16-2", "resnet32x4", "resnet8x4"])
def test_published_parameter_counts_and_forward_both(
    arch: str, opts: dict[str, int], count: int, feature_dim: int
) -> None:
    torch.manual_seed(0)
    model = build_model(arch, (3, 32, 32), 100, **opts).eval()
    assert n_params(model) == count
    formula = (wrn_param_count(opts["depth"], opts["width"], 3, 100) if arch == "wrn"
               else kd_resnet_param_count(int(arch[6:-2]), 3, 100))
    assert formula == count
    assert model.feature_dim == feature_dim
    assert (model.head.in_features, model.head.out_features) == (feature_dim, 100)
    with torch.no_grad():
        logits, feats = model.forward_both(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100) and feats.shape == (2, feature_dim)


@pytest.mark.parametrize(
    "depth, width, shape, classes",
    [(10, 1, (1, 28, 28), 10), (22, 1, (3, 8, 8), 7), (10, 3, (4, 16, 16), 5)],
)
def test_wrn_parameter_count_follows_the_closed_form(
    depth: int, width: int, shape: tuple[int, int, int], classes: int
) -> None:
    model = build_model("wrn", shape, classes, depth=depth, width=width)
    assert n_params(model) == wrn_param_count(depth, width, shape[0], classes)


def test_kd_resnets_take_any_channel_count() -> None:
    # only the stem conv and the head depend on the input channels and the classes
    assert n_params(build_model("resnet8x4", (1, 28, 28), 10)) == kd_resnet_param_count(8, 1, 10)
    assert n_params(build_model("resnet32x4", (1, 28, 28), 10)) == kd_resnet_param_count(32, 1, 10)


def test_wrn_layout_is_pre_activation_with_projections_only_where_shape_changes() -> None:
    def count(model: torch.nn.Module, kind: type, k: int | None = None) -> int:
        return sum(isinstance(m, kind) and (k is None or m.kernel_size == (k, k))
                   for m in model.modules())

    for depth, width, projections in [(16, 2, 3), (16, 1, 2), (40, 2, 3)]:
        n = (depth - 4) // 6
        model = build_model("wrn", (3, 32, 32), 10, depth=depth, width=width)
        assert count(model, torch.nn.Conv2d, 3) == 6 * n + 1  # stem + 2 per block
        # width 1: group 1 keeps 16 channels at stride 1, so its first block needs no projection
        assert count(model, torch.nn.Conv2d, 1) == projections
        assert count(model, torch.nn.BatchNorm2d) == 6 * n + 1  # 2 per block + the final BN
        first = model.body[0]
        assert isinstance(first, torch.nn.Conv2d) and first.out_channels == 16  # stem: conv only


@pytest.mark.parametrize("depth", [4, 12, 41, 5])
def test_wrn_bad_depth_is_one_clear_line(depth: int) -> None:
    with pytest.raises(HarnessError) as info:
        build_model("wrn", (3, 32, 32), 10, depth=depth, width=2)
    msg = str(info.value)
    assert "'depth'" in msg and "wrn" in msg and "6n+4" in msg and str(depth) in msg
    assert "\n" not in msg


def test_wrn_dropout_active_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = build_model("wrn", (3, 8, 8), 3, depth=10, width=1, dropout=0.3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 3  # one per block
    x = torch.randn(4, 3, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = build_model("wrn", (3, 8, 8), 3, depth=10, width=1)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())


@pytest.mark.parametrize("arch", ["wrn", "resnet8x4", "resnet32x4"])
@pytest.mark.parametrize("shape", [(3, 1, 1), (1, 3, 5), (3, 8, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kd_architectures_accept_tiny_images(arch: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    opts, feature_dim = SMALL[arch]
    model = build_model(arch, shape, 4, **opts)
    model.train()(torch.randn(4, *shape))  # training works too (BN sees 4 values per channel)
    with torch.no_grad():
        logits, feats = model.eval().forward_both(torch.randn(2, *shape))
    assert logits.shape == (2, 4) and feats.shape == (2, feature_dim)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_gradients_reach_every_parameter(arch: str) -> None:
    torch.manual_seed(0)
    opts = dict(SMALL[arch][0])
    if arch == "cnn":
        opts["feature_dim"] = 9  # cover the optional projection too
    if arch == "mlp":
        opts["dropout"] = 0.1
    model = build_model(arch, (3, 8, 8), 5, **opts).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_eval_mode_is_deterministic_and_batch_independent(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, (1, 8, 8), 3, **SMALL[arch][0])
    model.train()(torch.randn(8, 1, 8, 8))  # move BN running stats away from their init
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, model(x))
        # eval uses running stats: a sample's output does not depend on the rest of the batch
        assert torch.allclose(out[:1], model(x[:1]), atol=1e-5)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_same_seed_same_parameters(arch: str) -> None:
    def make(seed: int) -> Net:
        torch.manual_seed(seed)
        return build_model(arch, (3, 8, 8), 4, **SMALL[arch][0])

    a, b, c = make(1), make(1), make(2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_convs_use_kaiming_init() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10, width=16)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    convs = [c for c in convs if c.weight.numel() >= 2000]  # enough weights for a stable std
    assert len(convs) > 10
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        # kaiming normal (fan_out, relu gain): std = sqrt(2 / fan_out);
        # PyTorch's default init would be ~2.5x smaller for these convs.
        assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)


#: modules whose CUDA kernels raise under torch.use_deterministic_algorithms(True) (torch's list)
NONDETERMINISTIC = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d, torch.nn.AdaptiveMaxPool2d,
                    torch.nn.AvgPool3d, torch.nn.FractionalMaxPool2d, torch.nn.FractionalMaxPool3d,
                    torch.nn.MaxUnpool1d, torch.nn.MaxUnpool2d, torch.nn.MaxUnpool3d, torch.nn.ReflectionPad1d,
                    torch.nn.ReflectionPad2d, torch.nn.ReflectionPad3d)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_no_model_uses_an_op_that_deterministic_mode_forbids_on_cuda(arch: str) -> None:
    opts, _ = SMALL[arch]
    model = build_model(arch, (3, 32, 32), NUM_CLASSES, **opts)
    bad = [type(m).__name__ for m in model.modules() if isinstance(m, NONDETERMINISTIC)]
    assert not bad, f"{arch} uses {bad}: its backward raises with train.deterministic on a GPU"


def test_global_average_pool_equals_adaptive_pool_bitwise() -> None:
    from harness.models import GlobalAvgPool

    x = torch.randn(4, 8, 7, 5, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    a, b = GlobalAvgPool()(x), torch.nn.AdaptiveAvgPool2d(1)(y)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert torch.equal(x.grad, y.grad)
