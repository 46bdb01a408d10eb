"""``crd``: Contrastive Representation Distillation (Tian, Krishnan, Isola, ICLR 2020) from several
teachers, plus the soft-target term of ``kd``. Specified in ``docs/methods.md`` (section "CRD").

For each teacher k, two embedding heads (the paper's ``Embed``: linear, then L2 normalisation)
map the student's and teacher k's penultimate features into one space of width d (128):
v_s^k = normalize(W_s^k f_s + b), v_k = normalize(W_k f_k + b). The student learns, per teacher,
to tell the teacher's embedding of the same image from those of other images, and vice versa.

``negatives: bank`` (default; the paper's NCE with a momentum memory, RepDistiller's
``ContrastMemory``/``ContrastLoss``): a memory M_s^k, M_k of one unit row per training image (row
= ``Batch.index``). For an anchor a_i (image id y_i) against a memory M of N rows:

    e_ij  = exp(<a_i, M_j> / t)                     t = nce_t = 0.07
    P_ij  = e_ij / Z,  Z = N * mean of e over the first batch's positives and negatives (then fixed)
    L_nce = -(1/B) sum_i [ log( P_i,y_i / (P_i,y_i + K/N + eps) )
                           + sum_{j in neg(i)} log( (K/N) / (P_ij + K/N + eps) ) ],   eps = 1e-7
    L_crd = sum_k [ L_nce(v_s^k vs M_k) + L_nce(v_k vs M_s^k) ]

neg(i): K = nce_k = 16,384 ids drawn uniformly from [0, N) with replacement (torch's global RNG,
which the trial seeds; a draw may hit y_i, as in the official uniform sampler), shared by both
directions, whatever N (also N <= K + 1, as the reference draws). ``small_pool: every_row`` is
the alternative for small pools: when N <= K + 1, every other row once instead (K = N - 1, no
sampling; a different loss: fewer, distinct negatives). The run's tag ``harness.crd_negatives``
says which form ran. After the
loss, in training mode and without gradient, the rows of the batch move:
M[y_i] <- normalize(m M[y_i] + (1 - m) v_i), m = nce_m = 0.5.

``negatives: batch`` (no memory, for data whose N x d banks do not fit): in-batch InfoNCE in both
directions, L = sum_k [ CE(V_s V_k^T / t, diag) + CE(V_k V_s^T / t, diag) ].

Total: L = w_kd L_kd + w_crd L_crd, L_kd = ``kd``'s T^2 KL to the concatenated (or routed) teacher
softmax at T = 1 (kd's default; RepDistiller uses 4); w_kd = 1, w_crd = 0.8 (RepDistiller's CRD+KD: ``-a 1 -b 0.8``, without its
cross-entropy term, which needs labels). L_crd trains the student's features and the heads only:
with w_kd = 0 (``-kd``) nothing trains the student's classifier.

Label-free: the official default draws each image's negatives from images of *other classes*
(``CIFAR100InstanceSample``, ``mode='exact'``), which reads labels; here they are uniform.
The number of training images N is not given to a method: each memory grows to the largest id
seen + 1 (ids are a permutation of 0..N-1, so it reaches N during the first epoch); new rows are
uniform in [-1/sqrt(d/3), 1/sqrt(d/3)] (the official initialisation). Z is estimated on the first
batch with N = that batch's largest id + 1.

Computation: all N similarities <a_i, M_j> (one [B, d] x [d, N] product), each weighted by how
often j was drawn; equal to the official gather of B x (K + 1) rows, with a [B, N] intermediate
instead of [B, K + 1, d]. Memory: 2 N d floats per teacher (CIFAR, N = 50,000: 49 MiB).
Precision (harness.precision): embeddings are normalised, and similarities, the NCE and InfoNCE
losses and the memory update computed, in float32 outside autocast.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from baselines.kd import kd_term, kd_training_params
from harness.methods.base import Batch, Method, Params, register
from harness.precision import float32
from harness.routing_schema import RoutingConfig
from harness.spaces import log_float
from harness.store import CRD_NEGATIVES

__all__ = ["CRD", "CRDParams", "ContrastMemory", "Embed", "info_nce", "momentum_update", "nce_loss", "NCE_EPS"]

#: the official ``ContrastLoss``'s eps in P / (P + K/N + eps)
NCE_EPS = 1e-7


def _check_rows(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, d], got shape {tuple(t.shape)}")


@float32
def info_nce(a: Tensor, b: Tensor, t: float) -> Tensor:
    """In-batch InfoNCE between paired unit embeddings, both directions summed::

        s_ij = <a_i, b_j> / t
        L = -(1/B) sum_i [ s_ii - log sum_j exp(s_ij) ] - (1/B) sum_i [ s_ii - log sum_j exp(s_ji) ]

    (cross-entropy of each row and each column of s with the diagonal as target). Row i of ``a``
    and of ``b`` are the same image; every other image of the batch is a negative.
    """
    _check_rows("a", a)
    _check_rows("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    s = a @ b.t() / t
    diag = s.diagonal()
    return -(diag - s.logsumexp(1)).mean() - (diag - s.logsumexp(0)).mean()


@float32
def nce_loss(
    anchor: Tensor, bank: Tensor, pos: Tensor, neg: Tensor | None, t: float, z: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """CRD's NCE loss (paper eq. 18; RepDistiller ``ContrastMemory`` + ``ContrastLoss``) of B
    anchors against a memory of N rows. Returns (loss, Z).

        e_ij = exp(<anchor_i, bank_j> / t),  P_ij = e_ij / Z,  c = K / N  (K noise samples, P_n = 1/N)
        L = -(1/B) sum_i [ log(P_i,pos_i / (P_i,pos_i + c + eps))
                           + sum_{k=1..K} log(c / (P_i,neg_ik + c + eps)) ],   eps = 1e-7

    Args:
        anchor: [B, d] embeddings (the gradient flows to them; the memory is a constant).
        bank: [N, d] memory rows.
        pos: [B] row of each anchor's positive (its own image id).
        neg: [B, K] rows of its negatives (repeats count as often as they occur), or None for
            every row but ``pos_i`` once (K = N - 1).
        t: temperature > 0.
        z: the normalisation constant; None or <= 0: estimate it from this batch as the official
            code does on its first batch, Z = N * mean of e over the B (K + 1) positive and
            negative entries (detached).

    Computed as one [B, N] similarity matrix weighted by the multiplicity of each row in ``neg``
    (an ``index_add``, deterministic on CUDA), not by gathering B (K + 1) rows of d.
    """
    _check_rows("anchor", anchor)
    _check_rows("bank", bank)
    b, n = anchor.shape[0], bank.shape[0]
    if anchor.shape[1] != bank.shape[1]:
        raise ValueError(f"anchor and bank widths differ: {anchor.shape[1]} and {bank.shape[1]}")
    if pos.shape != (b,):
        raise ValueError(f"pos must have shape [{b}], got {tuple(pos.shape)}")
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    bank = bank.detach()
    e = torch.exp(anchor @ bank.t() / t)  # [B, N]
    e_pos = torch.exp((anchor * bank[pos]).sum(1) / t)  # [B]
    if neg is None:
        k = n - 1
        counts = (torch.arange(n, device=pos.device)[None, :] != pos[:, None]).to(e.dtype)
    else:
        if neg.dim() != 2 or neg.shape[0] != b:
            raise ValueError(f"neg must have shape [{b}, K], got {tuple(neg.shape)}")
        k = neg.shape[1]
        flat = (torch.arange(b, device=neg.device)[:, None] * n + neg).flatten()
        counts = torch.zeros(b * n, dtype=e.dtype, device=e.device).index_add_(
            0, flat, torch.ones(flat.shape[0], dtype=e.dtype, device=e.device)).view(b, n)
    estimate = ((e_pos.sum() + (counts * e).sum()) / (b * (k + 1)) * n).detach()
    if z is None:
        z_t = estimate
    else:
        z_t = torch.as_tensor(z, dtype=e.dtype, device=e.device)
        z_t = torch.where(z_t > 0, z_t, estimate)  # no host sync: the estimate is used where Z is unset
    c = k / n
    p_pos, p = e_pos / z_t, e / z_t
    log_d1 = torch.log(p_pos / (p_pos + c + NCE_EPS))
    log_d0 = torch.log(c / (p + c + NCE_EPS))
    return -(log_d1.sum() + (counts * log_d0).sum()) / b, z_t


@float32
@torch.no_grad()
def momentum_update(bank: Tensor, ids: Tensor, v: Tensor, m: float) -> Tensor:
    """The memory after a batch (a new tensor; ``bank`` is left as it is)::

        M[ids_i] <- normalize(m * M[ids_i] + (1 - m) * v_i),   other rows unchanged.
    """
    _check_rows("bank", bank)
    _check_rows("v", v)
    rows = F.normalize(m * bank[ids] + (1.0 - m) * v.detach(), dim=1)
    return bank.index_copy(0, ids, rows.to(bank.dtype))


@float32
def _normalize(v: Tensor) -> Tensor:
    return F.normalize(v, dim=1)


class Embed(nn.Module):
    """The paper's embedding head: Linear(d_in, d) (under the trial's autocast), then L2
    normalisation (float32, outside autocast)."""

    def __init__(self, d_in: int, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d)

    def forward(self, f: Tensor) -> Tensor:
        return _normalize(self.linear(f.flatten(1)))


class ContrastMemory(nn.Module):
    """One teacher's momentum memory: ``student`` and ``teacher`` [N, d] (row = image id) and
    ``z`` = (Z of student anchors vs the teacher memory, Z of teacher anchors vs the student
    memory), -1 until estimated. Buffers: they move with ``.to(device)`` and are in the state
    dict; loading a state dict takes its number of rows (the memory grows lazily)."""

    BANKS = ("student", "teacher")

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("student", torch.zeros(0, d))
        self.register_buffer("teacher", torch.zeros(0, d))
        self.register_buffer("z", torch.full((2,), -1.0))

    def __len__(self) -> int:
        return int(self.student.shape[0])

    def grow(self, n: int) -> None:
        """At least ``n`` rows; new rows uniform in [-s, s], s = 1 / sqrt(d / 3) (unit norm on
        average, the official initialisation), drawn from torch's global RNG."""
        have = len(self)
        if n <= have:
            return
        for name in self.BANKS:
            old: Tensor = getattr(self, name)
            s = 1.0 / math.sqrt(old.shape[1] / 3)
            new = torch.rand(n - have, old.shape[1], dtype=old.dtype, device=old.device) * (2 * s) - s
            setattr(self, name, torch.cat([old, new]))

    def update(self, ids: Tensor, v_s: Tensor, v_t: Tensor, m: float, z: Tensor) -> None:
        """Momentum-update the rows ``ids`` with the batch's embeddings and keep Z (no gradient)."""
        self.student = momentum_update(self.student, ids, v_s, m)
        self.teacher = momentum_update(self.teacher, ids, v_t, m)
        self.z = z.detach().to(self.z.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self.BANKS:
            own: Tensor = getattr(self, name)
            new = state_dict.get(prefix + name)
            if isinstance(new, Tensor) and new.dim() == 2 and new.shape[1] == own.shape[1] and new.shape != own.shape:
                setattr(self, name, torch.empty(new.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CRDParams(Params):
    w_kd: float = Field(1.0, ge=0, description="weight of the soft-target term (RepDistiller CRD+KD: -a 1)")
    w_crd: float = Field(0.8, ge=0, description="weight of the contrastive term (RepDistiller: -b 0.8)")
    T: float = Field(1.0, gt=0, description="soft-target temperature of the kd term, as kd's (RepDistiller: 4)")
    routing: RoutingConfig = RoutingConfig()
    negatives: Literal["bank", "batch"] = Field(
        "bank", description="bank: NCE against a momentum memory of every image; batch: in-batch InfoNCE")
    feat_dim: int = Field(128, ge=1, description="embedding width d")
    nce_k: int = Field(16384, ge=1, description="negatives drawn per anchor from the memory")
    small_pool: Literal["draw", "every_row"] = Field(
        "draw", description="pools of at most nce_k + 1 images: draw nce_k negatives with replacement "
        "(the reference), or use every other row once (K = pool - 1)")
    nce_t: float = Field(0.07, gt=0, description="temperature of the similarities")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory update")


@register("crd")
class CRD(Method):
    """Contrastive representation distillation to every teacher's features, plus kd's soft targets."""

    ParamsModel = CRDParams
    terms = {"kd": "w_kd", "crd": "w_crd"}
    ablations = {"kd": "w_kd", "crd": "w_crd"}
    description = "CRD (Tian et al. 2020): contrastive (NCE, memory bank) distillation from each teacher + KD"
    #: the contrastive weight one decade either side of RepDistiller's, its temperature, and kd's
    #: temperature (w_kd is the anchor)
    search_space = {"w_crd": log_float(0.08, 8.0), "nce_t": log_float(0.02, 0.3), "T": log_float(0.5, 10.0)}
    params: CRDParams

    def __init__(self, student, teachers, params, split) -> None:
        super().__init__(student, teachers, params, split)
        d = params.feat_dim
        self.embed_s = nn.ModuleList(Embed(student.feature_dim, d) for _ in teachers.feature_dims)
        self.embed_t = nn.ModuleList(Embed(dk, d) for dk in teachers.feature_dims)
        #: per teacher: the student's and the teacher's memory (None with ``negatives: batch``)
        self.memory = (nn.ModuleList(ContrastMemory(d) for _ in teachers.feature_dims)
                       if params.negatives == "bank" else None)

    @classmethod
    def training_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return kd_training_params(params)  # the routing rule reaches training only through kd's term

    def run_tags(self) -> dict[str, str]:
        """Which negatives ran: ``drawn (K = nce_k)``, ``every other row (K = pool - 1)`` or ``batch``."""
        p = self.params
        if self.memory is None:
            return {CRD_NEGATIVES: "batch (in-batch InfoNCE)"}
        pool = len(self.memory[0])
        if p.small_pool == "every_row" and 0 < pool and pool - 1 <= p.nce_k:
            return {CRD_NEGATIVES: f"every other row (K = pool - 1 = {pool - 1})"}
        return {CRD_NEGATIVES: f"drawn with replacement (K = {p.nce_k}, pool {pool})"}

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        p = self.params
        z_s, f_s = self.student.forward_both(batch.x)
        out: dict[str, Tensor] = {}
        if self.active("kd"):
            out["kd"] = kd_term(self, batch, z_s, p.routing, p.T)
        if self.active("crd"):
            v_s = [e(f_s) for e in self.embed_s]
            v_t = [e(f) for e, f in zip(self.embed_t, batch.teacher_feats)]
            if self.memory is None:
                out["crd"] = torch.stack([info_nce(a, b, p.nce_t) for a, b in zip(v_s, v_t)]).sum()
            else:
                out["crd"] = self._bank_loss(v_s, v_t, batch.index)
        return out

    def _bank_loss(self, v_s: list[Tensor], v_t: list[Tensor], index: Tensor) -> Tensor:
        """sum_k NCE(v_s^k vs M_k) + NCE(v_k vs M_s^k); then the memories move (training only)."""
        p = self.params
        assert self.memory is not None
        n_seen = int(index.max()) + 1  # the loop's ids live on the CPU: no device sync
        ids = index.to(v_s[0].device)
        total = []
        for mem, a_s, a_t in zip(self.memory, v_s, v_t):
            mem.grow(n_seen)
            n = len(mem)
            every_row = p.small_pool == "every_row" and n - 1 <= p.nce_k
            neg = None if every_row else torch.randint(n, (len(ids), p.nce_k), device=ids.device)
            loss_s, z_s = nce_loss(a_s, mem.teacher, ids, neg, p.nce_t, mem.z[0])
            loss_t, z_t = nce_loss(a_t, mem.student, ids, neg, p.nce_t, mem.z[1])
            if self.training:
                mem.update(ids, a_s, a_t, p.nce_m, torch.stack([z_s, z_t]))
            total.append(loss_s + loss_t)
        return torch.stack(total).sum()
