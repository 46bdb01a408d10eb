"""The ``search:`` block of a study file: what ``harness tune`` searches and how.

A search space maps *parameter paths* of the study to distributions::

    search:
      trials: 16                      # per tuned method
      space:
        methods.cka.w_align: {type: float, low: 0.1, high: 10, log: true}
        methods.cka.tau:     {type: float, low: 0.05, high: 0.5, log: true}
        methods.cka.align:   {type: categorical, choices: [kl, cosine]}
        train.lr:            {type: float, low: 3.0e-4, high: 3.0e-3, log: true}

Paths are ``methods.<method>.<param>``, ``train.<field>`` or ``student.<option>``. Each tuned
method gets its own Optuna study; ``train.*`` and ``student.*`` are shared by every method of
a study file, so they may be searched only when one method is tuned. The objective is the mean,
over the search's splits and seeds, of the **validation** union accuracy (``val_last``: the
last epoch's, ``val_best``: the best epoch's); the test split is never evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from harness.errors import HarnessError

if TYPE_CHECKING:
    import optuna

    from harness.config import StudyConfig

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
    """The ``search:`` block (see the module docstring)."""

    space: dict[str, Distribution] = Field(min_length=1)
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


#: ``train`` fields that may be searched (``epochs`` is the pruner's step budget; the rest are
#: hardware switches that do not change what is learnt)
TUNABLE_TRAIN = ("batch_size", "optimizer", "lr", "weight_decay", "momentum", "scheduler", "augment")


def to_optuna(dist: FloatDist | IntDist | CategoricalDist) -> "optuna.distributions.BaseDistribution":
    """The Optuna distribution; ValueError (Optuna's message) when it is not valid."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, FloatDist):
        return FloatDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDist):
        return IntDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    return CategoricalDistribution(dist.choices)


def _endpoints(dist: FloatDist | IntDist | CategoricalDist) -> list[Any]:
    return list(dist.choices) if isinstance(dist, CategoricalDist) else [dist.low, dist.high]


def get_path(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a study's JSON form (None when absent)."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path of a study's JSON form in place (creating mappings on the way)."""
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_params(study: "StudyConfig", values: dict[str, Any], source: str = "search") -> "StudyConfig":
    """The study with these path values set (validated like a study file)."""
    from harness.config import parse_study

    data = study.model_dump(mode="json", exclude_none=True)
    for path, value in values.items():
        set_path(data, path, value)
    return parse_study(data, source)


class SearchPlan:
    """A validated search: the tuned methods, each with its own paths and Optuna distributions."""

    def __init__(self, study: "StudyConfig") -> None:
        if study.search is None:
            raise HarnessError("search: the study file has no search block (see README, 'Tuning')")
        self.study = study
        self.search: SearchConfig = study.search
        for path in self.search.space:
            head, _, rest = path.partition(".")
            if head not in ("methods", "train", "student") or not rest or (head == "methods" and "." not in rest):
                raise HarnessError(f"search.space.{path}: tunable paths are methods.<method>.<param>, "
                                   "train.<field> or student.<option>")
        self.methods = self._methods()
        self.paths: dict[str, list[str]] = {m: self._paths_of(m) for m in self.methods}
        self.distributions = {p: self._check_dist(p, d) for p, d in self.search.space.items()}
        self.splits = self._splits()
        self.seeds = list(self.search.seeds or study.seeds)
        for path in self.search.space:
            self._check_values(path)

    # -- validation -------------------------------------------------------------------------
    def _methods(self) -> list[str]:
        from harness.methods.base import get_method

        named = [p.split(".")[1] for p in self.search.space if p.startswith("methods.") and p.count(".") >= 2]
        methods = list(self.search.methods or dict.fromkeys(named))
        if not methods:
            raise HarnessError("search.methods: say which method to tune (the space names no methods.<method>.* path)")
        for i, m in enumerate(methods):
            if m not in self.study.methods:
                raise HarnessError(f"search.methods[{i}]: '{m}' is not one of the study's methods "
                                   f"({', '.join(self.study.methods)})")
            if not get_method(m).trains:
                raise HarnessError(f"search.methods[{i}]: '{m}' trains nothing; there is nothing to tune")
        if len(set(methods)) != len(methods):
            raise HarnessError("search.methods: a method is listed twice")
        return methods

    def _paths_of(self, method: str) -> list[str]:
        return [p for p in self.search.space if not p.startswith("methods.") or p.split(".")[1] == method]

    def _check_dist(self, path: str, dist: Any) -> Any:
        from harness.config import TrainConfig
        from harness.methods.base import get_method
        from harness.models import model_options

        where = f"search.space.{path}"
        head, _, rest = path.partition(".")
        if head == "methods":
            method, _, param = rest.partition(".")
            if method not in self.study.methods:
                raise HarnessError(f"{where}: method '{method}' is not one of the study's methods")
            if method not in self.methods:
                raise HarnessError(f"{where}: method '{method}' is not in search.methods")
            fields = get_method(method).ParamsModel.model_fields
            if param not in fields:
                raise HarnessError(f"{where}: '{method}' has no parameter '{param}' "
                                   f"(has: {', '.join(fields) or 'none'})")
        else:  # train or student (checked in __init__)
            if head == "train" and rest not in TUNABLE_TRAIN:
                why = ("is the pruner's step budget" if rest == "epochs" else "is not a train field"
                       if rest not in TrainConfig.model_fields else "does not change what is learnt")
                raise HarnessError(f"{where}: train.{rest} {why}; tunable: {', '.join(TUNABLE_TRAIN)}")
            if head == "student" and rest not in model_options(self.study.student.arch):
                raise HarnessError(f"{where}: '{rest}' is not an option of the student model "
                                   f"'{self.study.student.arch}'")
            if len(self.methods) > 1:
                raise HarnessError(f"{where}: {head}.* is shared by every method of the study; "
                                   "search it with one method at a time (search.methods)")
        try:
            return to_optuna(dist)
        except ValueError as e:
            raise HarnessError(f"{where}: {e}") from None

    def _splits(self) -> list[str]:
        names = [s.name for s in self.study.splits]
        chosen = list(self.search.splits or names)
        for i, s in enumerate(chosen):
            if s not in names:
                raise HarnessError(f"search.splits[{i}]: no split named '{s}' (splits: {', '.join(names)})")
        return chosen

    def _check_values(self, path: str) -> None:
        """Every endpoint / choice must give a valid study; the study's own value must fit a
        categorical (it is the default trial)."""
        dist = self.search.space[path]
        method = path.split(".")[1] if path.startswith("methods.") else self.methods[0]
        for value in _endpoints(dist):
            try:
                self.params_for(method, self.study_for(method, {path: value}))
            except HarnessError as e:
                msg = str(e).split(": ", 2)[-1]
                raise HarnessError(f"search.space.{path}: value {value!r}: {msg}") from None
        default = self.defaults(method)[path]
        if isinstance(dist, CategoricalDist) and default not in dist.choices:
            raise HarnessError(f"search.space.{path}: the study's own value {default!r} (the default trial) "
                               f"is not among the choices")

    # -- use --------------------------------------------------------------------------------
    def defaults(self, method: str) -> dict[str, Any]:
        """The study's own value of each of the method's paths (its default trial)."""
        data = self.study.model_dump(mode="json")
        out = {}
        for path in self.paths[method]:
            if path.startswith("methods."):
                out[path] = self.params_for(method, self.study)[path.split(".", 2)[2]]
            else:
                out[path] = get_path(data, path)
        return out

    def study_for(self, method: str, values: dict[str, Any]) -> "StudyConfig":
        """The study restricted to this method, with these values applied."""
        base = self.study.model_copy(update={"methods": {method: self.study.methods[method]}})
        return apply_params(base, values, f"search.space ({method})")

    def params_for(self, method: str, study: "StudyConfig") -> dict[str, Any]:
        """The method's resolved parameters in this study."""
        from harness.methods.base import get_method

        return get_method(method).parse_params(study.methods[method], f"methods.{method}").model_dump(mode="json")

    def units(self) -> list[tuple[int, int]]:
        """(split index, seed) of every training run behind one objective value, in order."""
        index = {s.name: i for i, s in enumerate(self.study.splits)}
        return [(index[s], seed) for s in self.splits for seed in self.seeds]

