"""``scratch``: the same student trained with the true union labels (cross-entropy).

The supervised reference that amalgamation tries to reach without labels; it sees labels.
Specified in ``docs/methods.md`` §10.
"""

from harness.methods.base import register
from harness.methods.supervised import SupervisedCE


@register("scratch")
class Scratch(SupervisedCE):
    """Supervised cross-entropy with the union labels (sees labels)."""

    description = "supervised student with the true union labels"
