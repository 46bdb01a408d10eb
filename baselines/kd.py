"""``kd``: KL-only multi-teacher amalgamation onto the concatenated label space (Hinton et al. 2015;
as in the KA toolkits). Specified in ``docs/methods.md`` §8.

    L_kd = T^2 * mean_i KL( softmax(concat_k z_k,i / T) || softmax(z_s,i / T) )

With ``routing: {targets: routed}`` the target is instead the claiming teacher's softmax placed in
its own slice (``harness.routing``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from harness import losses
from harness.methods.base import Batch, Method, Params, register
from harness.routing import RoutingConfig, target_logits


class KDParams(Params):
    T: float = Field(1.0, gt=0, description="soft-target temperature")
    w_kd: float = Field(1.0, ge=0)
    routing: RoutingConfig = RoutingConfig()


@register("kd")
class KD(Method):
    """Multi-teacher KD onto the concatenated teachers' logits."""

    ParamsModel = KDParams
    terms = {"kd": "w_kd"}
    description = "KL-only amalgamation onto concatenated teacher logits"
    params: KDParams

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        z_s = self.student(batch.x)
        rule = self.params.routing
        if rule.targets == "concat":
            target = torch.cat(batch.teacher_logits, dim=1)
        else:
            _, k_star, _ = self.route(batch.teacher_logits, batch.teacher_feats)
            target = target_logits(batch.teacher_logits, k_star, rule, self.params.T)
        return {"kd": losses.soft_target_kl(target, z_s, self.params.T)}
