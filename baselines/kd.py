"""``kd``: KL-only multi-teacher amalgamation onto the concatenated label space (Hinton et al. 2015;
as in the KA toolkits). Specified in ``docs/methods.md`` §8.

    L_kd = T^2 * mean_i KL( softmax(concat_k z_k,i / T) || softmax(z_s,i / T) )

With ``routing: {targets: routed}`` the target is instead the claiming teacher's softmax placed in
its own slice (``harness.routing``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from harness import losses
from harness.methods.base import Batch, Method, Params, register
from harness.routing.rules import target_logits
from harness.routing_schema import RoutingConfig
from harness.spaces import log_float


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
    #: the temperature only: w_kd weighs the single term, so it is the learning rate's job
    search_space = {"T": log_float(0.5, 10.0)}
    params: KDParams

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        return {"kd": kd_term(self, batch, self.student(batch.x), self.params.routing, self.params.T)}

    @classmethod
    def training_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return kd_training_params(params)


def kd_training_params(params: dict[str, Any]) -> dict[str, Any]:
    """A KD-based method's parameters with the routing rule reduced to what training reads: with
    ``concat`` targets the target is the concatenated logits whatever the rule (the rule then
    only changes the diagnostics: pseudo-label accuracy, probe), so every such rule is one."""
    rule = params.get("routing")
    if isinstance(rule, dict) and rule.get("targets") == "concat":
        return {**params, "routing": {"targets": "concat"}}
    return params


def kd_term(method: Method, batch: Batch, z_s: Tensor, rule: RoutingConfig, T: float) -> Tensor:
    """L_kd of ``z_s`` against the rule's target: the concatenated teacher logits (``concat``) or
    the claiming teacher's slice (``routed``, routed by ``method``). The soft-target term of every
    KD-based baseline (``kd``, ``crd``, ``rkd``), written once."""
    if rule.targets == "concat":
        target = torch.cat(batch.teacher_logits, dim=1)
    else:
        _, k_star, _ = method.route(batch.teacher_logits, batch.teacher_feats)
        target = target_logits(batch.teacher_logits, k_star, rule, T)
    return losses.soft_target_kl(target, z_s, T)
