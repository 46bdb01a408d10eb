"""CKA: Contrastive Knowledge Amalgamation (Gao, Fu, Liu, Han, arXiv 2307.14781).

Specified in ``docs/methods.md`` §7 (formulas, variants, what reconstructs the paper and what
is our addition); every **variant** there is a parameter here.

    L = w_task L_task + w_intra L_intra + w_inter L_inter + w_align L_align

- L_intra = SupCon(h_s, y^)            (+ mean_k SupCon(h_k, y^) with ``intra_models: all``)
- L_inter = mean_k CrossSupCon(h_s, h_k, y^)      (``symmetric``: both directions averaged)
- L_align = mean_{k,i} KL(softmax(h_k,i / tau_a) || softmax(h_s,i / tau_a))
            (``align: cosine|relation``; ``align_to: claiming`` uses only teacher k*(x_i))
- L_task  = T^2 mean_i KL(softmax(concat_k z_k,i / T) || softmax(z_s,i / T))
            (``soft_target: per_task``: sum_k of the same on each teacher's slice S_k)

h = normalize(g(f)) with projectors g: Linear(d_in, 256) -> BN -> ReLU -> Linear(256, 128).
y^ are pseudo-labels from the frozen teachers (no ground truth), claimed under the ``routing``
rule (default: highest max-softmax confidence; the spec's lowest-entropy variant is
``routing: entropy``; ``targets: routed`` also routes L_task's target; the pseudo-label
temperature of p_k = softmax(z_k / T_pl) is ``routing: {score: ..., T_pl: ...}``, default 1).
``conf_threshold`` keeps, for L_intra and L_inter only, the samples whose claiming teacher's
max_c p_k*(c) >= the threshold; L_align and L_task use every sample. With w_task = 0 (the
``-task`` ablation) the head is trained by cross-entropy on y^ instead, logged as ``task_hard``.

Precision (harness.precision): the projectors g run under the trial's autocast; every loss term
runs in float32 outside it (harness.losses).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from harness import losses
from harness.methods.base import Batch, Method, Params, register
from harness.routing.rules import target_logits
from harness.routing_schema import RoutingConfig
from harness.spaces import log_float


class CKAParams(Params):
    w_task: float = Field(1.0, ge=0)
    w_intra: float = Field(0.1, ge=0)
    w_inter: float = Field(0.1, ge=0)
    w_align: float = Field(1.0, ge=0)
    tau: float = Field(0.1, gt=0, description="contrastive temperature")
    tau_a: float = Field(0.1, gt=0, description="alignment temperature")
    T: float = Field(1.0, gt=0, description="soft-target temperature")
    routing: RoutingConfig = Field(RoutingConfig(), description="claiming rule, targets and T_pl (harness.routing)")
    conf_threshold: float = Field(0.0, ge=0, le=1)
    intra_models: Literal["student", "all"] = "student"
    symmetric: bool = False
    align: Literal["kl", "cosine", "relation"] = "kl"
    align_to: Literal["all", "claiming"] = "all"
    soft_target: Literal["concat", "per_task"] = "concat"
    proj_hidden: int = Field(256, ge=1)
    proj_dim: int = Field(128, ge=2)


def projector(d_in: int, d_h: int, d: int) -> nn.Sequential:
    """g: Linear(d_in, d_h) -> BatchNorm -> ReLU -> Linear(d_h, d) (spec, common space)."""
    return nn.Sequential(nn.Linear(d_in, d_h), nn.BatchNorm1d(d_h), nn.ReLU(inplace=True), nn.Linear(d_h, d))


@register("cka")
class CKA(Method):
    """Contrastive knowledge amalgamation: intra/inter contrast, common-space alignment, soft targets."""

    ParamsModel = CKAParams
    terms = {"task": "w_task", "intra": "w_intra", "inter": "w_inter", "align": "w_align", "task_hard": None}
    ablations = {"task": "w_task", "intra": "w_intra", "inter": "w_inter", "align": "w_align"}
    description = "CKA (Gao et al. 2023): contrastive + alignment + soft-target amalgamation"
    #: w_task is the anchor (fixed at 1: scaling every weight is the learning rate's job); the
    #: other weights one decade either side, the contrastive temperatures a factor 5
    search_space = {
        "w_intra": log_float(0.01, 1.0), "w_inter": log_float(0.01, 1.0), "w_align": log_float(0.1, 10.0),
        "tau": log_float(0.02, 0.5), "tau_a": log_float(0.02, 0.5), "T": log_float(0.5, 10.0),
    }
    params: CKAParams

    def __init__(self, student, teachers, params, split) -> None:
        super().__init__(student, teachers, params, split)
        p = params
        self.g_s = projector(student.feature_dim, p.proj_hidden, p.proj_dim)
        self.g_t = nn.ModuleList(projector(d, p.proj_hidden, p.proj_dim) for d in teachers.feature_dims)

    def weights(self) -> dict[str, float]:
        w = super().weights()
        w["task_hard"] = 1.0 if self.params.w_task == 0 else 0.0
        return w

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        p = self.params
        z_s, f_s = self.student.forward_both(batch.x)
        zt, ft = batch.teacher_logits, batch.teacher_feats
        y, k_star, conf = self.route(zt, batch.teacher_feats)
        out: dict[str, Tensor] = {}
        if self.active("task"):
            if p.soft_target == "concat":
                out["task"] = losses.soft_target_kl(target_logits(zt, k_star, p.routing, p.T), z_s, p.T)
            else:
                out["task"] = sum(
                    losses.soft_target_kl(z, z_s[:, o : o + n], p.T)
                    for z, o, n in zip(zt, self.split.offsets, self.split.sizes)
                )
        if self.active("task_hard"):
            out["task_hard"] = losses.cross_entropy(z_s, y)
        need_space = any(self.active(t) for t in ("intra", "inter", "align"))
        if not need_space:
            return out
        h_s = F.normalize(self.g_s(f_s), dim=1)
        h_t = [F.normalize(g(f), dim=1) for g, f in zip(self.g_t, ft)]
        keep = conf >= p.conf_threshold
        if int(keep.sum()) < 2:  # nothing confident enough to contrast in this batch
            zero = h_s.sum() * 0 + sum(h.sum() * 0 for h in h_t)
            out.update({t: zero for t in ("intra", "inter") if self.active(t)})
        elif self.active("intra"):
            intra = losses.supcon(h_s[keep], y[keep], p.tau)
            if p.intra_models == "all":
                intra = intra + torch.stack([losses.supcon(h[keep], y[keep], p.tau) for h in h_t]).mean()
            out["intra"] = intra
        if self.active("inter") and "inter" not in out:
            out["inter"] = torch.stack(
                [losses.cross_supcon(h_s[keep], h[keep], y[keep], p.tau, p.symmetric) for h in h_t]
            ).mean()
        if self.active("align"):
            out["align"] = self._align(h_s, h_t, k_star)
        return out

    def _align(self, h_s: Tensor, h_t: list[Tensor], k_star: Tensor) -> Tensor:
        p = self.params
        fn = {
            "kl": lambda a, b: losses.align_kl(a, b, p.tau_a),
            "cosine": losses.align_cosine,
            "relation": lambda a, b: losses.align_relation(a, b, p.tau_a),
        }[p.align]
        if p.align_to == "all":
            return torch.stack([fn(h_s, h) for h in h_t]).mean()
        # claiming teacher only: per-sample mean over the batch of the k*(x_i) term
        n = h_s.shape[0]
        total = h_s.sum() * 0
        for k, h in enumerate(h_t):
            m = k_star == k
            if int(m.sum()) > (1 if p.align == "relation" else 0):
                total = total + fn(h_s[m], h[m]) * m.sum() / n
        return total
