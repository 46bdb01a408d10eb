"""Supervised cross-entropy on the true labels: how teachers are trained, and the ``scratch`` row.

    L_ce = mean_i -log softmax(z_s,i)[y_i]

It declares ``uses_labels = True``, so the training loop hands it the labels and every report
marks it as a method that saw labels.
"""

from __future__ import annotations

from torch import Tensor

from harness import losses
from harness.methods.base import Batch, Method


class SupervisedCE(Method):
    """Cross-entropy with the true labels (not registered; ``scratch`` in baselines subclasses it)."""

    terms = {"ce": None}
    uses_labels = True
    description = "supervised cross-entropy with the true labels"

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        assert batch.y is not None, "the training loop passes labels to methods with uses_labels"
        return {"ce": losses.cross_entropy(self.student(batch.x), batch.y)}
