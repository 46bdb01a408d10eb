"""Search-space distributions: what one tunable value may take (``harness tune``).

Used by a study's ``search:`` block (:mod:`harness.search`) and by the spaces methods declare next
to their parameter model (``Method.search_space``). This module imports only pydantic, so method
modules can import it without pulling in the study configuration.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

Scalar = Union[None, bool, int, float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatDist(_Strict):
    """A float in [low, high], log-uniform with ``log``, on a grid with ``step``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None


class IntDist(_Strict):
    """An integer in [low, high] (both included), log-uniform with ``log``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1


class CategoricalDist(_Strict):
    """One of ``choices`` (YAML scalars: strings, numbers, booleans, null)."""

    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)


Distribution = Annotated[Union[FloatDist, IntDist, CategoricalDist], Field(discriminator="type")]
#: any of the three (a plain union, for annotations outside pydantic models)
Dist = Union[FloatDist, IntDist, CategoricalDist]


def log_float(low: float, high: float) -> FloatDist:
    """A log-uniform float in [low, high] (the usual form of a weight or a temperature)."""
    return FloatDist(type="float", low=low, high=high, log=True)


def endpoints(dist: Dist) -> list[Any]:
    """The values a distribution's range is checked with: its two ends, or every choice."""
    return list(dist.choices) if isinstance(dist, CategoricalDist) else [dist.low, dist.high]


def contains(dist: Dist, value: Any) -> bool:
    """Whether ``value`` is one the distribution can take (grids ignored)."""
    if isinstance(dist, CategoricalDist):
        return value in dist.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dist.low <= value <= dist.high


def describe(dist: Dist) -> str:
    """One phrase: ``float log [0.5, 10]``, ``int [8, 32] step 8``, ``categorical [kl, cosine]``."""
    if isinstance(dist, CategoricalDist):
        return "categorical [" + ", ".join(str(c) for c in dist.choices) + "]"
    scale = " log" if dist.log else ""
    grid = dist.step if isinstance(dist, FloatDist) else (dist.step if dist.step != 1 else None)
    step = f" step {grid:g}" if grid is not None else ""
    return f"{dist.type}{scale} [{dist.low:g}, {dist.high:g}]{step}"
