"""``cfl``: Common Feature Learning (Luo et al., IJCAI 2019), specified in ``docs/methods.md`` §9.

``space: maps`` (default; the reference implementation VainF/CommonFeatureLearning, ``CFL_ConvBlock``
and ``CFLoss``) works on the last conv feature maps F_s = student.feature_map(x) and
F_k = teacher_k.feature_map(x) (frozen, no grad; resized to F_s's H x W by adaptive average
pooling when the sizes differ), h = ``c``::

    a_k = conv1x1(C_k, 2h) ReLU, a_s = conv1x1(C_s, 2h) ReLU          (no bias)
    E = ResBlock(2h, h) ResBlock(h, h) ResBlock(h, h)                  (no BN, no bias)
        ResBlock(i, o): ReLU(conv3x3(ReLU(conv3x3(x))) + (x, or conv1x1(x) when i != o))
    dec_k = conv3x3(h, C_k) ReLU conv1x1(C_k, C_k)                     (no bias)
    H_s = E(a_s(F_s)), H_k = E(a_k(F_k))
    L = w0 * KD_concat(T) + w1 * sum_k MMD^2(flat H_s, flat H_k) + w2 * sum_k MSE(dec_k(H_k), F_k)

with MMD^2 of ``harness.losses.mmd2`` on the L2-normalised flattened maps [N, h*H*W]. The
reference's KD is a soft cross-entropy, which is our KL plus the (constant) entropy of the target:
same gradient. Learning rates are the recipe's (``train.lr_mult``), as for every method: the CFL
block (adapters, extractor, decoders) is what cfl owns (role ``method``, the default
:meth:`~harness.methods.base.Method.param_roles`); the reference's rates (student backbone 1x,
head 10x, CFL block 10x) are ``train: {lr_mult: {head: 10, method: 10}}``.

``space: pooled`` is the former computation on pooled penultimate vectors f (any architecture;
KamalEngine's ``CFL_FCBlock``): a = Linear(d, c) ReLU, E = Linear(c, c) ReLU Linear(c, c),
dec_k = Linear(c, d_k) ReLU Linear(d_k, d_k), same L. ``maps`` with a net that has no feature map
(``mlp``) falls back to ``pooled`` with a warning; ``CFL.space`` and ``run_tags()`` say which ran.
The runner says it once per split in its plan (:meth:`CFL.plan_note`) and its workers do not
repeat the warning (:class:`harness.console.NotedWarning`).

Precision (harness.precision): the blocks a, E, dec run under the trial's autocast; KD and MMD^2
run in float32 outside it (harness.losses), MSE in float32 by autocast's own op lists.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from harness import losses
from harness.console import NotedWarning
from harness.errors import HarnessError
from harness.methods.base import Batch, Method, Params, register
from harness.models import GlobalAvgPool, Net, build_model
from harness.spaces import log_float
from harness.store import CFL_SPACE

if TYPE_CHECKING:
    from harness.config import ModelSpec


class CFLParams(Params):
    w0: float = Field(1.0, ge=0, description="weight of the KD term")
    w1: float = Field(10.0, ge=0, description="weight of the MMD term")
    w2: float = Field(10.0, ge=0, description="weight of the reconstruction term")
    T: float = Field(1.0, gt=0)
    c: int = Field(128, ge=1, description="common width (maps: channels h; adapters give 2h)")
    space: Literal["maps", "pooled"] = Field("maps", description="conv feature maps or pooled vectors")


class ResBlock(nn.Module):
    """The reference's extractor block without BN: ReLU(conv3x3(ReLU(conv3x3(x))) + shortcut(x)),
    shortcut = identity, or conv1x1 when the width changes; no biases."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False)) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def map_channels(net: Net) -> int | None:
    """Channels C of ``net.feature_map`` (one zero image, eval mode, no grad), None without a map."""
    dev = next(net.parameters()).device
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            fmap = net.feature_map(torch.zeros(1, *net.in_shape, device=dev))
    finally:
        net.train(was)
    return None if fmap is None else int(fmap.shape[1])


def pool_tail(net: Net) -> nn.Sequential | None:
    """The part of ``net.features`` after its feature map (global pooling, flatten, [projection]),
    so that ``net.head(pool_tail(net)(net.feature_map(x))) == net(x)`` in one pass; None if the
    net's ``body`` has no :class:`GlobalAvgPool`."""
    body = getattr(net, "body", None)
    if isinstance(body, nn.Sequential):
        for i, m in enumerate(body):
            if isinstance(m, GlobalAvgPool):
                return body[i:]
    return None


def missing_maps(student: Net, teachers: Sequence[Net]) -> str:
    """Why ``space: maps`` cannot run on these nets (``teacher 1 (MLP) has no conv feature map``),
    "" when it can: the student and every teacher need a feature map (:func:`map_channels`), the
    student also the pooling after it (:func:`pool_tail`)."""
    names = ["the student"] + [f"teacher {k}" for k in range(len(teachers))]
    lacking = [f"{n} ({type(net).__name__})" for n, net in zip(names, (student, *teachers))
               if map_channels(net) is None or (net is student and pool_tail(student) is None)]
    if not lacking:
        return ""
    return f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no conv feature map"


def resize_map(f: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """A teacher map brought to the student's H x W: adaptive average pooling (exact region means
    when shrinking, replication when growing); unchanged when the sizes agree."""
    return f if tuple(f.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(f, tuple(size))


@register("cfl")
class CFL(Method):
    """Feature alignment in a shared space learnt with MMD and reconstruction, plus KD."""

    ParamsModel = CFLParams
    terms = {"kd": "w0", "mmd": "w1", "recon": "w2"}
    description = "Common Feature Learning (Luo et al. 2019): MMD + reconstruction + KD"
    #: the MMD and reconstruction weights one decade either side of the reference's, and the
    #: temperature (w0, the KD term, is the anchor)
    search_space = {"w1": log_float(1.0, 100.0), "w2": log_float(1.0, 100.0), "T": log_float(0.5, 10.0)}
    params: CFLParams

    def __init__(self, student, teachers, params, split) -> None:
        super().__init__(student, teachers, params, split)
        c = params.c
        #: the space that really runs: ``params.space``, or ``pooled`` after a fallback
        self.space: str = params.space
        self.fallback: str = ""
        if params.space == "maps":
            self._tail = (pool_tail(student),)  # a tuple: the student's own modules, not registered twice
            self.fallback = missing_maps(student, teachers.nets)
            if self.fallback:  # the runner's plan said it once (plan_note); its workers ignore NotedWarning
                self.space = "pooled"
                warnings.warn(f"methods.cfl.space: maps needs conv feature maps, but {self.fallback}: "
                              "cfl runs in the pooled space", NotedWarning, stacklevel=2)
        if self.space == "maps":
            c_s, *c_t = [map_channels(n) for n in (student, *teachers.nets)]
            self.a_t = nn.ModuleList(
                nn.Sequential(nn.Conv2d(ch, 2 * c, 1, bias=False), nn.ReLU()) for ch in c_t
            )
            self.a_s = nn.Sequential(nn.Conv2d(c_s, 2 * c, 1, bias=False), nn.ReLU())
            self.extractor = nn.Sequential(ResBlock(2 * c, c), ResBlock(c, c), ResBlock(c, c))
            self.dec = nn.ModuleList(
                nn.Sequential(nn.Conv2d(c, ch, 3, 1, 1, bias=False), nn.ReLU(),
                              nn.Conv2d(ch, ch, 1, bias=False))
                for ch in c_t
            )
        else:  # the former (pooled) blocks, built in the former order: same initial weights per seed
            self.a_s = nn.Sequential(nn.Linear(student.feature_dim, c), nn.ReLU())
            self.a_t = nn.ModuleList(
                nn.Sequential(nn.Linear(d, c), nn.ReLU()) for d in teachers.feature_dims
            )
            self.extractor = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
            self.dec = nn.ModuleList(
                nn.Sequential(nn.Linear(c, d), nn.ReLU(), nn.Linear(d, d)) for d in teachers.feature_dims
            )

    @classmethod
    def plan_note(cls, params: Params, student: "ModelSpec", teachers: Sequence["ModelSpec"],
                  in_shape: tuple[int, int, int], split: str) -> str | None:
        """``cfl runs in the pooled space in split 2x5 (teacher 1 (MLP) has no conv feature map)``
        when ``space: maps`` will fall back (:func:`missing_maps` on the nets built on the meta
        device: no memory, no weights); None otherwise."""
        if getattr(params, "space", "maps") != "maps":
            return None
        try:
            with torch.device("meta"):
                nets = [build_model(m.arch, in_shape, 2, **m.options()) for m in (student, *teachers)]
            why = missing_maps(nets[0], nets[1:])
        except Exception:  # a net that cannot run on the meta device: the trial's run tags say what ran
            return None
        return f"cfl runs in the pooled space in split {split} ({why})" if why else None

    @classmethod
    def parse_params(cls, params: dict[str, Any], field: str) -> Params:
        """As every method's, with a pointer for the former rate parameters (now the recipe's)."""
        for name, role in (("lr_mult_head", "head"), ("lr_mult_cfl", "method")):
            if name in params:
                raise HarnessError(f"{field}.{name}: learning rates are the recipe's now: give train.lr_mult.{role} "
                                   "(the reference's rates: train: {lr_mult: {head: 10, method: 10}})")
        return super().parse_params(params, field)

    def run_tags(self) -> dict[str, str]:
        """What a trial should record: the space that ran (and why, after a fallback)."""
        return {CFL_SPACE: self.space + (f" (fallback: {self.fallback})" if self.fallback else "")}

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        return self._maps_terms(batch) if self.space == "maps" else self._pooled_terms(batch)

    def _maps_terms(self, batch: Batch) -> dict[str, Tensor]:
        p = self.params
        f_s = self.student.feature_map(batch.x)
        z_s = self.student.head(self._tail[0](f_s))  # one student pass gives the map and the logits
        out: dict[str, Tensor] = {}
        if self.active("kd"):
            out["kd"] = losses.soft_target_kl(torch.cat(batch.teacher_logits, dim=1), z_s, p.T)
        if self.active("mmd") or self.active("recon"):
            with torch.no_grad():
                f_t = [resize_map(t.feature_map(batch.x), f_s.shape[-2:]) for t in self.teachers.nets]
            h_t = [self.extractor(a(f)) for a, f in zip(self.a_t, f_t)]
            if self.active("mmd"):
                h_s = self.extractor(self.a_s(f_s)).flatten(1)
                out["mmd"] = sum(losses.mmd2(h_s, h.flatten(1)) for h in h_t)
            if self.active("recon"):
                out["recon"] = sum(F.mse_loss(d(h), f) for d, h, f in zip(self.dec, h_t, f_t))
        return out

    def _pooled_terms(self, batch: Batch) -> dict[str, Tensor]:
        p = self.params
        z_s, f_s = self.student.forward_both(batch.x)
        out: dict[str, Tensor] = {}
        if self.active("kd"):
            out["kd"] = losses.soft_target_kl(torch.cat(batch.teacher_logits, dim=1), z_s, p.T)
        if self.active("mmd") or self.active("recon"):
            h_t = [self.extractor(a(f)) for a, f in zip(self.a_t, batch.teacher_feats)]
            if self.active("mmd"):
                h_s = self.extractor(self.a_s(f_s))
                out["mmd"] = sum(losses.mmd2(h_s, h) for h in h_t)
            if self.active("recon"):
                out["recon"] = sum(F.mse_loss(d(h), f) for d, h, f in zip(self.dec, h_t, batch.teacher_feats))
        return out
