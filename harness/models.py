"""Model registry: every model keeps its penultimate features and its classification head apart.

``Net.features(x)`` gives ``[N, feature_dim]`` (after the last nonlinearity / pooling) and
``Net.head`` is one ``nn.Linear(feature_dim, num_classes)``, so teachers of different
architectures and feature widths can be combined by amalgamation methods. The conv nets also give
``Net.feature_map(x)``, the last convolutional map ``[N, C, H, W]`` before global pooling (``None``
for nets without one: ``mlp``).

Models: ``mlp``, ``cnn``, ``resnet8``, ``resnet20``, ``resnet18``, ``wrn`` (WRN-depth-width),
``resnet8x4``, ``resnet32x4`` (the CIFAR distillation architectures of RepDistiller/CRD).

    model = build_model("resnet20", (3, 32, 32), 10, width_mult=2)
    logits, feats = model.forward_both(x)      # feats: [N, 128]
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from harness.errors import HarnessError
from harness.registry import Registry

__all__ = ["MODELS", "Net", "build_model", "model_options"]

MODELS: Registry = Registry("model")


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HarnessError(f"model option {name!r} must be a positive integer, got {value!r}")
    return value


def _check_dropout(value: object) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0.0 <= value < 1.0:  # type: ignore[operator]
        raise HarnessError(f"model option 'dropout' must be in [0, 1), got {value!r}")
    return float(value)  # type: ignore[arg-type]


class Net(nn.Module):
    """Base: ``forward(x) = head(features(x))``; subclasses build a body, then call ``_finish``."""

    feature_dim: int
    head: nn.Linear

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        bad = [s for s in in_shape if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if len(in_shape) != 3 or bad:
            raise HarnessError(
                f"model in_shape must be three positive integers (C, H, W), got {in_shape!r}"
            )
        self.in_shape: tuple[int, int, int] = tuple(in_shape)  # type: ignore[assignment]
        self.num_classes = _check_positive("num_classes", num_classes)

    def _finish(self, feature_dim: int) -> None:
        """Attach the head and initialise: kaiming for convs, unit/zero for norms."""
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, self.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[N, feature_dim]``."""
        raise NotImplementedError

    def feature_map(self, x: Tensor) -> Tensor | None:
        """The last convolutional feature map ``[N, C, H, W]``, the input of the global pooling, so
        that ``features(x) == flatten(mean_{H,W} feature_map(x))`` for the conv nets without a
        projection after the pooling. ``None`` for a net without a spatial map (``mlp``; the
        default for a plug-in net that does not override this)."""
        return None

    def head_parameters(self) -> list[nn.Parameter]:
        """The classifier's parameters (``head``: weight and bias): the ``head`` role of
        ``train.lr_mult``; every other parameter of the net is its body."""
        return list(self.head.parameters())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, features)`` from a single pass."""
        f = self.features(x)
        return self.head(f), f


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


@MODELS.register("mlp")
class MLP(Net):
    """flatten -> [Linear -> ReLU (-> Dropout)] x depth -> head; feature_dim = hidden."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, *,
                 hidden: int = 256, depth: int = 2, dropout: float = 0.0) -> None:
        super().__init__(in_shape, num_classes)
        hidden, depth = _check_positive("hidden", hidden), _check_positive("depth", depth)
        dropout = _check_dropout(dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_shape[0] * in_shape[1] * in_shape[2]
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self._finish(hidden)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def feature_map(self, x: Tensor) -> None:
        """None: an MLP has no spatial feature map (methods that need one fall back or refuse)."""
        return None


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions, [N, C, H, W] -> [N, C, 1, 1]: ``AdaptiveAvgPool2d(1)``
    without its CUDA backward, which raises under ``torch.use_deterministic_algorithms(True)``
    (``train.deterministic``). Bitwise the same values and gradients on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def _until_pool(body: nn.Sequential, x: Tensor) -> Tensor:
    """``body``'s modules up to (without) its global pooling: the last conv map ``[N, C, H, W]``."""
    for m in body:
        if isinstance(m, GlobalAvgPool):
            return x
        x = m(x)
    raise RuntimeError("body has no GlobalAvgPool")


@MODELS.register("cnn")
class CNN(Net):
    """conv3x3(C,w) BN ReLU, maxpool2, conv3x3(w,2w) BN ReLU, maxpool2, conv3x3(2w,2w) BN ReLU,
    global avg pool, flatten [, Linear(2w, feature_dim) ReLU]; feature_dim = 2w unless set.
    w = width. Any input >= 8x8 (two poolings give the last conv a receptive field of 18 px)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, *,
                 width: int = 32, feature_dim: int | None = None) -> None:
        super().__init__(in_shape, num_classes)
        w = _check_positive("width", width)
        layers: list[nn.Module] = [
            *_conv_bn(in_shape[0], w), nn.MaxPool2d(2), *_conv_bn(w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 2 * w), GlobalAvgPool(), nn.Flatten(),
        ]
        if feature_dim is not None:
            feature_dim = _check_positive("feature_dim", feature_dim)
            layers += [nn.Linear(2 * w, feature_dim), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self._finish(2 * w if feature_dim is None else feature_dim)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def feature_map(self, x: Tensor) -> Tensor:
        return _until_pool(self.body, x)


class BasicBlock(nn.Module):
    """Two conv3x3-BN, residual add, ReLU; 1x1 conv + BN projection when shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ResNet(Net):
    """Stem conv3x3(C, stem) BN ReLU (no max-pool; stem = widths[0] unless given), stages of
    BasicBlocks (first stage stride 1, later stride 2), global avg pool, flatten;
    feature_dim = widths[-1]."""

    def _build(self, widths: list[int], blocks: int, stem: int | None = None) -> None:
        c_in = widths[0] if stem is None else stem
        layers: list[nn.Module] = _conv_bn(self.in_shape[0], c_in)
        for i, c_out in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        layers += [GlobalAvgPool(), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self._finish(widths[-1])

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def feature_map(self, x: Tensor) -> Tensor:
        return _until_pool(self.body, x)


class _CifarResNet(_ResNet):
    """CIFAR ResNet-(6n+2) (He et al. 2016): stem conv3x3 -> 16k, 3 stages of n BasicBlocks with
    widths (16, 32, 64)*k and strides (1, 2, 2), projection shortcuts, global avg pool;
    k = width_mult, feature_dim = 64*k. Any input >= 8x8."""

    blocks: int = 1

    def __init__(
        self, in_shape: tuple[int, int, int], num_classes: int, *, width_mult: int = 1
    ) -> None:
        super().__init__(in_shape, num_classes)
        k = _check_positive("width_mult", width_mult)
        self._build([16 * k, 32 * k, 64 * k], self.blocks)


@MODELS.register("resnet8")
class ResNet8(_CifarResNet):
    """ResNet-8: the CIFAR layout above, n = 1 block per stage; feature_dim = 64*width_mult."""

    blocks = 1


@MODELS.register("resnet20")
class ResNet20(_CifarResNet):
    """ResNet-20: the CIFAR layout above, n = 3 blocks per stage; feature_dim = 64*width_mult."""

    blocks = 3


@MODELS.register("resnet18")
class ResNet18(_ResNet):
    """ResNet-18 for small images: stem conv3x3(C, w) BN ReLU (no max-pool), 4 stages of 2
    BasicBlocks with widths (w, 2w, 4w, 8w) and strides (1, 2, 2, 2), global avg pool;
    w = width (64 standard), feature_dim = 8*width."""

    def __init__(
        self, in_shape: tuple[int, int, int], num_classes: int, *, width: int = 64
    ) -> None:
        super().__init__(in_shape, num_classes)
        w = _check_positive("width", width)
        self._build([w, 2 * w, 4 * w, 8 * w], 2)


class _KDResNet(_ResNet):
    """CIFAR ResNet of the distillation literature (RepDistiller/CRD ``models/resnet.py``,
    ``resnet8x4``/``resnet32x4``): stem conv3x3(C, 32) BN ReLU, 3 stages of n = (depth-2)/6
    BasicBlocks with widths (64, 128, 256) and strides (1, 2, 2), 1x1 projection shortcuts where
    the shape changes (so also stage 1's first block, 32 -> 64), global avg pool;
    feature_dim = 256. No options. Any input size (stride-2 convs keep >= 1x1)."""

    depth: int = 8

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__(in_shape, num_classes)
        self._build([64, 128, 256], (self.depth - 2) // 6, stem=32)


@MODELS.register("resnet8x4")
class ResNet8x4(_KDResNet):
    """resnet8x4: the layout above with depth 8 (1 block per stage); 1,233,540 parameters for
    100 classes (RepDistiller's CIFAR-100 student)."""

    depth = 8


@MODELS.register("resnet32x4")
class ResNet32x4(_KDResNet):
    """resnet32x4: the layout above with depth 32 (5 blocks per stage); 7,433,860 parameters
    for 100 classes (RepDistiller's CIFAR-100 teacher)."""

    depth = 32


class WideBasicBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis 2016): a = ReLU(BN(x));
    out = conv3x3(ReLU(BN(conv3x3_stride(a))) [-> dropout]); returns out + x when the shape is
    kept, else out + conv1x1_stride(a) (the projection sees the activated input, as in the
    reference WRN code)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.bn1(x))
        out = self.conv2(self.drop(torch.relu(self.bn2(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


@MODELS.register("wrn")
class WideResNet(Net):
    """WRN-depth-width (Zagoruyko & Komodakis 2016; the RepDistiller/CRD ``models/wrn.py``
    layout): stem conv3x3(C, 16), 3 groups of n = (depth-4)/6 pre-activation WideBasicBlocks
    with widths (16, 32, 64)*width and strides (1, 2, 2), final BN ReLU, global avg pool;
    feature_dim = 64*width. depth = 6n+4 (10, 16, 22, 28, 40, ...); dropout between a block's
    convs. WRN-40-2: 2,255,156 and WRN-16-2: 703,284 parameters for 100 classes. Any input
    size (stride-2 convs keep >= 1x1)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, *,
                 depth: int = 16, width: int = 2, dropout: float = 0.0) -> None:
        super().__init__(in_shape, num_classes)
        depth, k = _check_positive("depth", depth), _check_positive("width", width)
        if depth < 10 or (depth - 4) % 6:
            raise HarnessError(f"model option 'depth' of wrn must be 6n+4 with n >= 1 "
                               f"(10, 16, 22, 28, 40, ...), got {depth}")
        dropout = _check_dropout(dropout)
        n = (depth - 4) // 6
        layers: list[nn.Module] = [nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)]
        c_in = 16
        for i, c_out in enumerate([16 * k, 32 * k, 64 * k]):
            for j in range(n):
                layers.append(WideBasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1, dropout))
                c_in = c_out
        layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), GlobalAvgPool(), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self._finish(c_in)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def feature_map(self, x: Tensor) -> Tensor:
        return _until_pool(self.body, x)


def _option_params(arch: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(MODELS.get(arch)).parameters
    return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def model_options(arch: str) -> dict[str, object]:
    """Option name -> default for ``arch`` (HarnessError on an unknown arch)."""
    return {n: p.default for n, p in _option_params(arch).items()}


def build_model(
    arch: str, in_shape: tuple[int, int, int], num_classes: int, **kwargs: object
) -> Net:
    """Build ``arch`` for inputs of shape ``in_shape = (C, H, W)``; ``kwargs`` are arch options.

    Raises HarnessError on an unknown arch (listing the choices) or an unknown option
    (naming it and the options the arch accepts).
    """
    options = _option_params(arch)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        accepts = ", ".join(options) or "none"
        raise HarnessError(f"unknown option {unknown[0]!r} for model {arch!r} (accepts: {accepts})")
    return MODELS.get(arch)(tuple(in_shape), num_classes, **kwargs)
