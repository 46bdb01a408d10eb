"""The schema of a study's ``search:`` block: what ``harness tune`` searches and how.

The study schema (:mod:`harness.config`) validates the block with these models; what the block
means, and the plan that checks it against the study's methods and runs it, are in
:mod:`harness.search` (which re-exports these names). Like :mod:`harness.spaces`, this module
imports only pydantic and the ground floor, so the study schema stands below the tuner.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from harness.spaces import Distribution


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplerConfig(BaseModel):
    """Optuna sampler: ``tpe`` (default) or ``random``, seeded; other keys go to its constructor."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["tpe", "random", "qmc"] = "tpe"
    seed: int = 0


class PrunerConfig(BaseModel):
    """Optuna pruner, fed the running objective after every epoch of every seed; other keys go to
    its constructor (``median`` default: ``n_startup_trials: 4``, ``n_warmup_steps``: half the
    epochs of one seed)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["median", "percentile", "successive_halving", "hyperband", "threshold", "none"] = "median"


class SearchConfig(_Strict):
    """The ``search:`` block (see :mod:`harness.search`)."""

    #: tune each method over the space it declares (``Method.search_space``) and, with ``recipe``,
    #: the recipe space (:data:`harness.search.RECIPE_SPACES`); ``space`` entries then replace a
    #: declared path's distribution or add a path, and ``space`` may be left out
    declared: bool = False
    #: with ``declared``: add the recipe space (``train.*``), searched by each tuned method for
    #: itself (several methods: one tuned study file each); false: the methods' own parameters only
    recipe: bool = True
    #: required (at least one path) unless ``declared``
    space: dict[str, Distribution] = Field(None, validate_default=True)  # type: ignore[assignment]
    #: the methods to tune (default: every method named in a ``methods.<method>.*`` path)
    methods: list[str] | None = Field(None, min_length=1)
    trials: int = Field(20, ge=1)
    #: the seeds and splits each configuration is trained on (default: the study's)
    seeds: list[int] | None = Field(None, min_length=1)
    splits: list[str] | None = Field(None, min_length=1)
    objective: Literal["val_last", "val_best"] = "val_last"
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    #: reruns of a configuration whose worker died (an interrupted or stale one is always rerun)
    retries: int = Field(1, ge=0)

    @field_validator("space", mode="before")
    @classmethod
    def _space_given(cls, v: Any, info: ValidationInfo) -> Any:
        declared = info.data.get("declared", False)
        if v is None:
            if not declared:
                raise ValueError("Field required (or search.declared: true, the methods' declared spaces)")
            return {}
        if isinstance(v, dict) and not v and not declared:
            raise ValueError("Dictionary should have at least 1 item (or search.declared: true, the methods' "
                             "declared spaces)")
        return v

    @field_validator("recipe")
    @classmethod
    def _recipe_needs_declared(cls, v: bool, info: ValidationInfo) -> bool:
        if not v and not info.data.get("declared", False):
            raise ValueError("false only applies with search.declared: true")
        return v
