"""``rkd``: Relational Knowledge Distillation (Park, Kim, Lu, Cho, CVPR 2019) from several teachers,
plus the soft-target term of ``kd``. Specified in ``docs/methods.md`` (section "RKD").

The student learns the *relations* between the images of a batch in each teacher's penultimate
feature space, not the features themselves, so teachers of any width can be matched:

    psi_D(e)_ij  = ||e_i - e_j|| / mu(e),   mu(e) = mean of the non-zero ||e_i - e_j|| of the batch
    psi_A(e)_jik = < (e_i - e_j) / ||e_i - e_j||, (e_k - e_j) / ||e_k - e_j|| >   (cosine at vertex j)
    L_dist  = sum_k Huber( psi_D(f_s), psi_D(f_k) )          mean over all N^2 ordered pairs (i, j)
    L_angle = sum_k Huber( psi_A(f_s), psi_A(f_k) )          mean over all N^3 triplets (j, i, k)
    L_kd    = T^2 mean_i KL( q(x_i) || softmax(z_s,i / T) )   (``kd``'s term: concat or routed target)
    L = w_kd L_kd + w_dist L_dist + w_angle L_angle,   w_dist = 25, w_angle = 50 (the paper's)

Huber = smooth L1 with threshold 1: h(x) = x^2 / 2 for |x| < 1, |x| - 1/2 otherwise. A difference
vector of length 0 (i = j, or two images with the same features) is the zero vector, so its
cosines are 0 on both sides; the means include those entries, as the official code's do
(lenscloth/RKD, ``metric/loss.py``). The teacher's relations are fixed targets (no gradient).

Several teachers: the batch mixes images of every task (the pool is unlabelled), and the
student's relations on that whole batch are compared with each teacher's on the same batch; a
teacher's features on another task's images are whatever it makes of them.

Precision (harness.precision): distances, cosines and Huber run in float32 outside autocast.
Memory: the angle term holds N x N x d differences and N^3 cosines per side (batch 128, d = 256:
16 MiB + 8 MiB).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from baselines.kd import kd_term, kd_training_params
from harness.methods.base import Batch, Method, Params, register
from harness.precision import float32
from harness.routing_schema import RoutingConfig
from harness.spaces import log_float

__all__ = ["RKD", "RKDParams", "angle_relation", "distance_relation", "huber", "rkd_angle", "rkd_distance"]


def _check_features(name: str, e: Tensor) -> None:
    if e.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, d], got shape {tuple(e.shape)}")


def _check_batch(f_s: Tensor, f_t: Tensor) -> None:
    _check_features("f_s", f_s)
    _check_features("f_t", f_t)
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"f_s and f_t must hold the same N images, got {f_s.shape[0]} and {f_t.shape[0]} rows")


@float32
def huber(a: Tensor, b: Tensor) -> Tensor:
    """Mean Huber (smooth L1, threshold 1) of ``a - b``: x^2 / 2 for |x| < 1, |x| - 1/2 otherwise."""
    return F.smooth_l1_loss(a, b, reduction="mean", beta=1.0)


#: the reference's floor on a distance between two images (RepDistiller ``RKDLoss.pdist``: squared
#: distances clamped at 1e-12 before the square root): duplicated images are 1e-6 apart, not 0
MIN_DISTANCE = 1e-6


@float32
def distance_relation(e: Tensor) -> Tensor:
    """psi_D: [N, d] -> [N, N], psi_D_ij = max(||e_i - e_j||, 1e-6) / mu for i != j, psi_D_ii = 0,
    mu = the mean of the N (N - 1) off-diagonal entries (before the division).

    As the reference (``pdist`` with ``eps = 1e-12`` on squared distances, then ``t_d[t_d > 0]``):
    two equal rows (duplicated images) are ``MIN_DISTANCE`` apart and count in mu; the clamp
    passes no gradient. Distances are norms of the differences themselves (not
    |a|^2 + |b|^2 - 2 a.b), so close points keep their digits and the diagonal is exactly 0.
    One row (no pair): psi_D = 0 (the reference's mean over no pair is NaN)."""
    _check_features("e", e)
    n = e.shape[0]
    d = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")
    if n < 2:
        return torch.zeros_like(d)
    off = ~torch.eye(n, dtype=torch.bool, device=e.device)
    d = torch.where(off, d.clamp_min(MIN_DISTANCE), torch.zeros_like(d))
    return d / (d.sum() / (n * (n - 1)))


@float32
def angle_relation(e: Tensor) -> Tensor:
    """psi_A: [N, d] -> [N, N, N], psi_A[j, i, k] = cos of the angle at e_j between e_i and e_k:
    < u_ji, u_jk > with u_ji = (e_i - e_j) / ||e_i - e_j||, and u_ji = 0 where e_i = e_j."""
    _check_features("e", e)
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # u[j, i] = unit(e_i - e_j)
    return torch.bmm(u, u.transpose(1, 2))


def rkd_distance(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Distance-wise RKD loss: Huber(psi_D(f_s), psi_D(f_t)), mean over all N^2 ordered pairs.

    ``f_s`` [N, d_s] and ``f_t`` [N, d_t] may differ in width; ``f_t``'s side is a fixed target.
    Invariant to scaling either side (mu), and to rotating or translating either side."""
    _check_batch(f_s, f_t)
    with torch.no_grad():
        target = distance_relation(f_t)
    return huber(distance_relation(f_s), target)


def rkd_angle(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Angle-wise RKD loss: Huber(psi_A(f_s), psi_A(f_t)), mean over all N^3 triplets.

    Widths may differ; ``f_t``'s side is a fixed target. Invariant to scaling, translating and
    rotating either side. Cosines lie in [-1, 1], so |difference| <= 2."""
    _check_batch(f_s, f_t)
    with torch.no_grad():
        target = angle_relation(f_t)
    return huber(angle_relation(f_s), target)


class RKDParams(Params):
    w_kd: float = Field(1.0, ge=0, description="weight of the soft-target term")
    w_dist: float = Field(25.0, ge=0, description="weight of the distance-wise term (paper: 25)")
    w_angle: float = Field(50.0, ge=0, description="weight of the angle-wise term (paper: 50)")
    T: float = Field(1.0, gt=0, description="soft-target temperature (as kd's)")
    routing: RoutingConfig = RoutingConfig()


@register("rkd")
class RKD(Method):
    """Relational KD from every teacher's feature space, plus kd's soft targets."""

    ParamsModel = RKDParams
    terms = {"kd": "w_kd", "dist": "w_dist", "angle": "w_angle"}
    ablations = {"kd": "w_kd", "dist": "w_dist", "angle": "w_angle"}
    description = "Relational KD (Park et al. 2019): distance + angle relations to each teacher + KD"
    #: the relation weights one decade either side of the paper's, and kd's temperature (w_kd is the anchor)
    search_space = {"w_dist": log_float(2.5, 250.0), "w_angle": log_float(5.0, 500.0), "T": log_float(0.5, 10.0)}
    params: RKDParams

    @classmethod
    def training_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return kd_training_params(params)  # the routing rule reaches training only through kd's term

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        p = self.params
        z_s, f_s = self.student.forward_both(batch.x)
        out: dict[str, Tensor] = {}
        if self.active("kd"):
            out["kd"] = kd_term(self, batch, z_s, p.routing, p.T)
        # the student's relations once, compared with each teacher's
        for term, relation in (("dist", distance_relation), ("angle", angle_relation)):
            if self.active(term):
                psi_s = relation(f_s)
                total = psi_s.new_zeros(())
                for f in batch.teacher_feats:  # one teacher's relations at a time (N^3 for angles)
                    with torch.no_grad():
                        psi_t = relation(f)
                    total = total + huber(psi_s, psi_t)
                out[term] = total
        return out
