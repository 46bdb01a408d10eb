"""The method interface and registry.

A method is an ``nn.Module`` that owns its extra parts (projectors, CFL blocks), is built from
(student, teachers, params, split info) and, on a batch, returns a dict of *named, unweighted*
loss terms. The training loop computes ``sum(weights[name] * term)`` and logs every term, so
ablations and logging need no special cases. A method never sees training labels unless it
declares ``uses_labels = True`` (then it is marked as supervised in every report).

Adding a method: one module with a ``Method`` subclass decorated with ``@register``, plus one
entry-point line in ``pyproject.toml`` (group ``harness.methods``), where CKA and the baselines
are listed too: this module imports no method.
"""

from __future__ import annotations

import importlib
import itertools
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from harness.errors import HarnessError
from harness.models import Net
from harness.registry import Registry
from harness.routing.rules import route
from harness.routing.stats import TeacherStats
from harness.routing_schema import RoutingConfig
from harness.spaces import Dist

if TYPE_CHECKING:
    from harness.config import ModelSpec


class Params(BaseModel):
    """Base of every method's parameter model: unknown parameters are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class SplitInfo:
    """What a method may know about the split: task sizes n_k and offsets o_k. No labels."""

    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)


@dataclass
class Batch:
    """One training batch.

    ``teacher_logits``/``teacher_feats`` are the frozen teachers' outputs on ``x`` (one tensor per
    teacher). ``y`` (union labels) is filled only for methods with ``uses_labels = True``.
    ``index`` holds opaque image ids (:func:`harness.train.opaque_ids`): stable per image across
    epochs, but carrying no information about which task an image belongs to.
    """

    x: Tensor
    index: Tensor
    teacher_logits: list[Tensor] = field(default_factory=list)
    teacher_feats: list[Tensor] = field(default_factory=list)
    y: Tensor | None = None


class TeacherSet(nn.Module):
    """The frozen teachers of one split (eval mode, no gradient), with their routing statistics.

    The statistics are submodules (buffers), so ``method.to(device)`` moves them with the nets:
    everything a trial routes with lives where the trial runs."""

    stats: nn.ModuleList | None

    def __init__(self, teachers: list[Net], stats: Sequence[TeacherStats] | None = None) -> None:
        super().__init__()
        self.nets = nn.ModuleList(teachers)
        if stats is not None and (len(stats) != len(teachers) or any(s is None for s in stats)):
            raise ValueError(f"routing statistics for {sum(s is not None for s in stats)} of {len(teachers)} teachers")
        #: routing statistics fitted on each teacher's own data (None until a rule needs them)
        self.stats = nn.ModuleList(stats) if stats is not None else None
        for p in self.nets.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TeacherSet":  # teachers stay in eval mode
        return super().train(False)

    @property
    def feature_dims(self) -> list[int]:
        return [t.feature_dim for t in self.nets]

    @torch.no_grad()
    def outputs(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(logits per teacher, penultimate features per teacher)."""
        pairs = [t.forward_both(x) for t in self.nets]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def __len__(self) -> int:
        return len(self.nets)


#: the roles of :meth:`Method.param_roles`, in the order of the optimiser's parameter groups
PARAM_ROLES = ("body", "head", "method")


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement :meth:`loss_terms`."""

    name: ClassVar[str] = ""
    ParamsModel: ClassVar[type[Params]] = Params
    #: term name -> name of the parameter holding its weight (None: weight 1).
    terms: ClassVar[dict[str, str | None]] = {}
    #: ablation component -> weight parameter set to 0 by the variant ``-<component>``.
    ablations: ClassVar[dict[str, str]] = {}
    uses_labels: ClassVar[bool] = False
    #: False for reference rows that only evaluate (no optimisation of a student).
    trains: ClassVar[bool] = True
    #: False when the result cannot depend on the seed (runs once per split, first seed).
    seeded: ClassVar[bool] = True
    description: ClassVar[str] = ""
    #: the parameters worth tuning, as the method's author would search them: name of a
    #: ``ParamsModel`` field -> distribution (:mod:`harness.spaces`; ranges include the default).
    #: ``search: {declared: true}`` searches it, with the recipe space (``harness.search.RECIPE_SPACES``)
    #: and the study's ``search.space`` entries on top; ``harness methods`` prints it.
    search_space: ClassVar[dict[str, Dist]] = {}

    def __init__(self, student: Net, teachers: TeacherSet, params: Params, split: SplitInfo) -> None:
        super().__init__()
        self.student = student
        self.teachers = teachers
        self.params = params
        self.split = split

    def weights(self) -> dict[str, float]:
        """Weight of every term the loop should sum; terms with weight 0 are not computed."""
        return {t: (1.0 if p is None else float(getattr(self.params, p))) for t, p in self.terms.items()}

    def active(self, term: str) -> bool:
        return self.weights().get(term, 0.0) != 0.0

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def run_tags(self) -> dict[str, str]:
        """Tags the trial records on its run (e.g. which form of the method really ran); none by
        default."""
        return {}

    @classmethod
    def plan_note(cls, params: Params, student: "ModelSpec", teachers: Sequence["ModelSpec"],
                  in_shape: tuple[int, int, int], split: str) -> str | None:
        """One line the runner prints once in its plan, before the trials of this method on
        ``split`` start (``note: ...``), from the study's configs alone: e.g. a form of the method
        that these nets force (cfl in the pooled space), which every trial would otherwise warn
        about. None (the default): nothing to say."""
        return None

    def param_roles(self) -> dict[str, list[nn.Parameter]]:
        """Which parameter plays which role, for the per-role learning rates of ``train.lr_mult``
        (:data:`PARAM_ROLES`; the loop, :func:`harness.train.method_optimizer`, sets the rates:
        ``body`` at ``train.lr``, ``head`` at ``lr * lr_mult.head``, ``method`` at
        ``lr * lr_mult.method``). A method declares roles, never rates.

        Default: ``head`` = the student's classifier (:meth:`harness.models.Net.head_parameters`),
        ``body`` = the rest of the student, ``method`` = every other parameter of the method that
        is neither the student's nor the frozen teachers' (projectors, the CFL block, CRD's
        embeddings). Override only where that is wrong for a method; each trainable parameter
        must be in exactly one role (the loop checks), frozen ones are left out by the loop."""
        head = self.student.head_parameters()
        seen = {id(p) for p in head}
        body = [p for p in self.student.parameters() if id(p) not in seen]
        seen |= {id(p) for p in body} | {id(p) for p in self.teachers.parameters()}
        return {"body": body, "head": head, "method": [p for p in self.parameters() if id(p) not in seen]}

    def predict(self, x: Tensor) -> Tensor:
        """Union logits used for evaluation (default: the student)."""
        return self.student(x)

    def routing_rule(self) -> RoutingConfig:
        """The method's routing rule (its ``routing`` parameter, else max-softmax confidence)."""
        rule = getattr(self.params, "routing", None)
        return rule if isinstance(rule, RoutingConfig) else RoutingConfig()

    @property
    def device(self) -> torch.device:
        """Where the method lives: the device of its first parameter or buffer (CPU if none)."""
        t = next(itertools.chain(self.parameters(), self.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    def route(self, logits: list[Tensor], feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(pseudo-labels, claiming teacher, confidence) under the method's routing rule, each [N].

        Routed where the method and its statistics live, in float32 outside autocast
        (:func:`harness.routing.route`): inputs elsewhere (the diagnostics' CPU copies) are moved
        there, and the results are returned on the inputs' device. So a batch routes the same
        during training (under the loop's autocast) as in the diagnostics."""
        dev = self.device
        home = logits[0].device if logits else dev
        labels, k_star, conf = route([z.to(dev) for z in logits], [f.to(dev) for f in feats], self.teachers.stats,
                                     self.routing_rule(), self.split.offsets)
        return labels.to(home), k_star.to(home), conf.to(home)

    @classmethod
    def training_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The part of resolved ``params`` (JSON form) that decides what is trained; default: all.
        Two variants of a method with equal training parameters train identically, so the grid
        runs one of them (:func:`harness.grid.method_variants`): e.g. ``kd`` with ``concat``
        targets, where the routing rule changes only the diagnostics."""
        return params

    @classmethod
    def parse_params(cls, params: dict[str, Any], field: str) -> Params:
        """Validate overrides; HarnessError naming ``field.<param>`` on a bad one."""
        try:
            return cls.ParamsModel.model_validate(params)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
            raise HarnessError(f"{field}.{loc}: {msg}") from None


METHODS: Registry[type[Method]] = Registry("method")
register = METHODS.register
_discovered = False


def discover() -> Registry[type[Method]]:
    """Import the modules named in ``$HARNESS_PLUGINS`` (comma-separated; for quick experiments
    and tests) and every module of the ``harness.methods`` entry-point group (the built-in
    ``harness.methods.cka`` and the baselines among them, like any plug-in), once; return the
    registry."""
    global _discovered
    if not _discovered:
        for mod in filter(None, (m.strip() for m in os.environ.get("HARNESS_PLUGINS", "").split(","))):
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise HarnessError(f"HARNESS_PLUGINS: cannot import {mod!r}: {e}") from None

        for ep in entry_points(group="harness.methods"):
            try:
                ep.load()
            except Exception as e:  # a broken plug-in must not hide the others
                raise HarnessError(f"entry point harness.methods:{ep.name} failed to load: {e}") from None
        _discovered = True
    return METHODS


def get_method(name: str) -> type[Method]:
    return discover().get(name)
