"""``teachers``: reference rows, no training (``docs/methods.md`` §11).

- per-task accuracy: each teacher on its own task's test images (argmax inside S_k);
- union accuracy: the claiming-teacher ensemble, every test image routed to k*(x)
  under the ``routing`` rule (``harness.routing``; default: max-softmax confidence).
"""

from __future__ import annotations

import torch
from torch import Tensor

from harness.methods.base import Batch, Method, Params, register
from harness.routing.rules import target_logits
from harness.routing_schema import RoutingConfig


class TeacherRefParams(Params):
    routing: RoutingConfig = RoutingConfig()


@register("teachers")
class TeacherReference(Method):
    """Evaluates the frozen teachers: own-task accuracies and the claiming ensemble."""

    ParamsModel = TeacherRefParams
    trains = False
    seeded = False
    description = "reference rows: teachers on their own tasks and the claiming-teacher ensemble"
    params: TeacherRefParams

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:  # never called: trains = False
        return {}

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Slice S_k holds teacher k's log-probabilities; slices of non-claiming teachers are
        shifted down, so the argmax inside S_k is teacher k's own prediction and the global
        argmax is the claiming teacher's prediction."""
        logits, feats = self.teachers.outputs(x)
        _, k_star, _ = self.route(logits, feats)
        log_probs = [torch.log_softmax(z.float(), dim=1) for z in logits]
        return target_logits(log_probs, k_star, RoutingConfig(targets="routed"))
