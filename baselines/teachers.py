"""``teachers``: reference rows, no training.

- per-task accuracy: each teacher on its own task's test images (argmax inside S_k);
- union accuracy: the claiming-teacher ensemble, every test image routed to k*(x)
  (``pl_rule`` as in ``harness.losses.pseudo_labels``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from harness import losses
from harness.methods.base import Batch, Method, Params, register


class TeacherRefParams(Params):
    pl_rule: Literal["confidence", "entropy"] = "confidence"
    T_pl: float = Field(1.0, gt=0)


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
        logits, _ = self.teachers.outputs(x)
        _, k_star, _ = losses.pseudo_labels(logits, self.split.offsets, T=self.params.T_pl, rule=self.params.pl_rule)
        cols = []
        for k, z in enumerate(logits):
            lp = torch.log_softmax(z.float(), dim=1)
            shift = torch.where(k_star == k, 0.0, -1e6).unsqueeze(1)
            cols.append(lp + shift)
        return torch.cat(cols, dim=1)
