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


@pytest.mark.parametrize("arch", ["cnn", "resnet8", "resnet18"])
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
        ("mlp", (8, 8), {}),
        ("mlp", (1, 0, 8), {}),
    ],
)
def test_bad_option_values_and_shapes(
    arch: str, shape: tuple[int, ...], opts: dict[str, object]
) -> None:
    with pytest.raises(HarnessError):
        build_model(arch, shape, 3, **opts)  # type: ignore[arg-type]


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
