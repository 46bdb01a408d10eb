"""A routing rule's schema: claim score(s), standardisation, targets, ``T_pl``, and its parser.

What the scores, standardisations and targets mean, and the routing itself, are in
:mod:`harness.routing` (which re-exports these names). This module imports only pydantic, so the
study schema (:mod:`harness.config`) checks a study's ``routing`` rules without torch and without
standing on the routing code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

#: scores that read softmax(z / T_pl)
TEMPERED = ("confidence", "entropy")
SCORES = ("confidence", "max_logit", "energy", "entropy", "mahalanobis", "knn", "rmd")
#: scores read from the teacher's features with fitted statistics
FEATURE_SCORES = ("mahalanobis", "knn", "rmd")
STANDARDIZE = ("none", "z", "percentile")
TARGETS = ("concat", "routed")


class RoutingConfig(BaseModel):
    """A routing rule: claim score(s), standardisation, targets. ``parse("a+b/z/routed")``
    (:mod:`harness.routing`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: str = "confidence"
    standardize: Literal["none", "z", "percentile"] = "none"
    targets: Literal["concat", "routed"] = "concat"
    T_pl: float = Field(1.0, gt=0, description="pseudo-label temperature: p_k = softmax(z_k / T_pl)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: object) -> object:
        if isinstance(v, str):
            rule, at, opt = v.partition("@")
            parts = rule.split("/")
            if not 1 <= len(parts) <= 3:
                raise ValueError(f"routing rule {v!r}: write score/standardize/targets[@T_pl=<value>]")
            out: dict[str, object] = dict(zip(("score", "standardize", "targets"), parts))
            if at:
                key, eq, val = opt.partition("=")
                if key != "T_pl" or not eq:
                    raise ValueError(f"routing rule {v!r}: only '@T_pl=<value>' may follow the rule")
                out["T_pl"] = val
            return out
        return v

    @field_validator("score")
    @classmethod
    def _known_scores(cls, v: str) -> str:
        parts = v.split("+")
        bad = [p for p in parts if p not in SCORES]
        if bad or len(set(parts)) != len(parts):
            raise ValueError(f"unknown or repeated claim score {bad[0] if bad else v!r} (choose from: {', '.join(SCORES)})")
        return v

    @field_validator("T_pl")
    @classmethod
    def _T_pl_with_fitted_stats(cls, v: float, info: ValidationInfo) -> float:
        scores = str(info.data.get("score", "")).split("+")
        if v != 1.0 and info.data.get("standardize", "none") != "none" and any(s in TEMPERED for s in scores):
            raise PydanticCustomError("T_pl", "T_pl != 1 needs standardize: none with a confidence or entropy "
                                      "score (statistics are fitted at T_pl = 1)")
        return v

    @model_serializer(mode="wrap")
    def _omit_default_T_pl(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Leave ``T_pl`` out at its default, so rules (and trial keys) read as before it existed."""
        d = handler(self)
        if self.T_pl == 1.0:
            d.pop("T_pl", None)
        return d

    @property
    def scores(self) -> tuple[str, ...]:
        return tuple(self.score.split("+"))

    @property
    def name(self) -> str:
        """``score/standardize/targets`` (plus ``@T_pl=<v>`` when T_pl is not 1)."""
        base = f"{self.score}/{self.standardize}/{self.targets}"
        if self.T_pl == 1.0:
            return base
        t = f"{self.T_pl:g}"
        return f"{base}@T_pl={t if float(t) == self.T_pl else repr(self.T_pl)}"

    @property
    def needs_stats(self) -> bool:
        """Whether the rule needs statistics fitted on the teachers' own data."""
        return self.standardize != "none" or any(s in FEATURE_SCORES for s in self.scores)

    @classmethod
    def parse(cls, text: str) -> RoutingConfig:
        """``"score[+score]/standardize/targets[@T_pl=<value>]"`` (all but the score optional)."""
        return cls.model_validate(text)
