"""``cfl``: Common Feature Learning (Luo et al., IJCAI 2019), specified in ``docs/methods.md`` §9.

    a_k = Linear(d_k, c) + ReLU, a_s = Linear(d_s, c) + ReLU, E = Linear(c, c) -> ReLU -> Linear(c, c),
    dec_k = Linear(c, d_k) -> ReLU -> Linear(d_k, d_k), H_s = E(a_s(f_s)), H_k = E(a_k(f_k));
    L = w0 * KD_concat(T) + w1 * sum_k MMD^2(H_s, H_k) + w2 * sum_k MSE(dec_k(H_k), f_k)

Precision (harness.precision): the blocks a, E, dec run under the trial's autocast; KD and MMD^2
run in float32 outside it (harness.losses), MSE in float32 by autocast's own op lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from harness import losses
from harness.methods.base import Batch, Method, Params, register


class CFLParams(Params):
    w0: float = Field(1.0, ge=0, description="weight of the KD term")
    w1: float = Field(10.0, ge=0, description="weight of the MMD term")
    w2: float = Field(10.0, ge=0, description="weight of the reconstruction term")
    T: float = Field(1.0, gt=0)
    c: int = Field(128, ge=1, description="common feature width")


@register("cfl")
class CFL(Method):
    """Feature alignment in a shared space learnt with MMD and reconstruction, plus KD."""

    ParamsModel = CFLParams
    terms = {"kd": "w0", "mmd": "w1", "recon": "w2"}
    description = "Common Feature Learning (Luo et al. 2019): MMD + reconstruction + KD"
    params: CFLParams

    def __init__(self, student, teachers, params, split) -> None:
        super().__init__(student, teachers, params, split)
        c = params.c
        self.a_s = nn.Sequential(nn.Linear(student.feature_dim, c), nn.ReLU())
        self.a_t = nn.ModuleList(nn.Sequential(nn.Linear(d, c), nn.ReLU()) for d in teachers.feature_dims)
        self.extractor = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        self.dec = nn.ModuleList(
            nn.Sequential(nn.Linear(c, d), nn.ReLU(), nn.Linear(d, d)) for d in teachers.feature_dims
        )

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
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
