"""The ``search:`` block of a study file: what ``harness tune`` searches and how.

A search space maps *parameter paths* of the study to distributions::

    search:
      trials: 16                      # per tuned method
      space:
        methods.cka.w_align: {type: float, low: 0.1, high: 10, log: true}
        methods.cka.tau:     {type: float, low: 0.05, high: 0.5, log: true}
        methods.cka.align:   {type: categorical, choices: [kl, cosine]}
        train.lr:            {type: float, low: 3.0e-4, high: 3.0e-3, log: true}

Paths are ``methods.<method>.<param>``, ``train.<field>`` (nested fields dotted:
``train.lr_mult.head``) or ``student.<option>``. Each tuned method gets its own Optuna study,
which searches ``train.*`` and ``student.*`` paths for that method alone: with several tuned
methods and such paths, the tuned values are one study file per method
(:attr:`SearchPlan.per_method`). The objective is the mean,
over the search's splits and seeds, of the **validation** union accuracy (``val_last``: the
last epoch's, ``val_best``: the best epoch's); the test split is never evaluated.

Declared spaces: every method declares the space its author would search next to its parameter
model (``Method.search_space``, :mod:`harness.spaces`), and :data:`RECIPE_SPACES` the recipe's.
``search: {declared: true, methods: [kd]}`` searches ``kd``'s declared space plus the recipe space
(:func:`declared_space`); entries of ``space`` then replace a declared path's distribution or add
a path. Like any ``train.*`` path, each tuned method searches the recipe space for itself
(``recipe: false``: the methods' own parameters only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.config import StudyConfig, TrainConfig, parse_study
from harness.errors import HarnessError
from harness.search_schema import (  # noqa: F401  (the block's schema lives in harness.search_schema: re-exported)
    PrunerConfig,
    SamplerConfig,
    SearchConfig,
)
from harness.spaces import (  # noqa: F401  (the distributions live in harness.spaces: re-exported)
    CategoricalDist,
    Dist,
    Distribution,
    FloatDist,
    IntDist,
    Scalar,
    endpoints,
    log_float,
)

if TYPE_CHECKING:
    import optuna


#: ``train`` fields that may be searched, nested ones as dotted paths (``epochs`` is the pruner's
#: step budget; the rest are hardware switches that do not change what is learnt)
TUNABLE_TRAIN = ("batch_size", "optimizer", "lr", "weight_decay", "momentum", "scheduler", "augment",
                 "lr_mult.head", "lr_mult.method")

#: The recipe space of ``search.declared``, per optimiser (the study's ``train.optimizer``): the
#: same for every method, so each gets the same budget over the same recipe; one order of
#: magnitude either side of the usual rate (Adam 1e-3, SGD 0.05), and the classifier head's
#: rate multiplier (``train.lr_mult.head``; CFL's reference uses 10).
RECIPE_SPACES: dict[str, dict[str, Dist]] = {
    "adam": {"train.lr": log_float(1e-4, 1e-2), "train.lr_mult.head": log_float(1.0, 30.0)},
    "sgd": {"train.lr": log_float(5e-3, 0.5), "train.lr_mult.head": log_float(1.0, 30.0)},
}
#: the Adam recipe space (the studies' default optimiser)
RECIPE_SPACE = RECIPE_SPACES["adam"]


def declared_space(method: str, recipe: bool = True, optimizer: str = "adam") -> dict[str, Dist]:
    """The search space ``method`` declares (``Method.search_space``), as study paths
    ``methods.<method>.<param>``, followed, with ``recipe``, by the recipe space of ``optimizer``
    (``train.*`` paths, :data:`RECIPE_SPACES`). Empty for a method that trains nothing."""
    from harness.methods.base import get_method

    cls = get_method(method)
    if not cls.trains:
        return {}
    fields = cls.ParamsModel.model_fields
    for param in cls.search_space:
        if param not in fields:  # a method's own mistake: name the declaration
            raise HarnessError(f"{cls.__name__}.search_space: '{method}' has no parameter '{param}' "
                               f"(has: {', '.join(fields) or 'none'})")
    out: dict[str, Dist] = {f"methods.{method}.{p}": d for p, d in cls.search_space.items()}
    if recipe:
        if optimizer not in RECIPE_SPACES:
            raise HarnessError(f"no recipe space for optimizer '{optimizer}' (have: {', '.join(RECIPE_SPACES)})")
        out.update(RECIPE_SPACES[optimizer])
    return out


def to_optuna(dist: FloatDist | IntDist | CategoricalDist) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution; ValueError (Optuna's message) when it is not valid."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, FloatDist):
        return FloatDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDist):
        return IntDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
    return CategoricalDistribution(dist.choices)


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


def apply_params(study: StudyConfig, values: dict[str, Any], source: str = "search") -> StudyConfig:
    """The study with these path values set (validated like a study file)."""
    data = study.model_dump(mode="json", exclude_none=True)
    for path, value in values.items():
        set_path(data, path, value)
    return parse_study(data, source)


class SearchPlan:
    """A validated search: the tuned methods, each with its own paths and Optuna distributions."""

    def __init__(self, study: StudyConfig) -> None:
        if study.search is None:
            raise HarnessError("search: the study file has no search block (see docs/tuning.md)")
        self.study = study
        self.search: SearchConfig = study.search
        for path in self.search.space:
            head, _, rest = path.partition(".")
            if head not in ("methods", "train", "student") or not rest or (head == "methods" and "." not in rest):
                raise HarnessError(f"search.space.{path}: tunable paths are methods.<method>.<param>, "
                                   "train.<field> or student.<option>")
        self.methods = self._methods()
        #: what is searched, path -> distribution: ``search.space`` as written, or with
        #: ``search.declared`` each tuned method's declared space (and the recipe's), with the
        #: entries of ``search.space`` replacing or adding paths
        self.space: dict[str, Dist] = self._space()
        self.paths: dict[str, list[str]] = {m: self._paths_of(m) for m in self.methods}
        self.distributions = {p: self._checked_dist(p, d) for p, d in self.space.items()}
        self.splits = self._splits()
        self.seeds = list(self.search.seeds or study.seeds)
        for path in self.space:
            self._check_values(path)

    # -- validation -------------------------------------------------------------------------
    def _methods(self) -> list[str]:
        from harness.methods.base import get_method

        named = [p.split(".")[1] for p in self.search.space if p.startswith("methods.") and p.count(".") >= 2]
        methods = list(self.search.methods or dict.fromkeys(named))
        if not methods:
            raise HarnessError("search.methods: say which method to tune (the space names no methods.<method>.* path)"
                               if self.search.space else "search.methods: say which method to tune (search.declared: "
                               "true searches each listed method's declared space)")
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
        return [p for p in self.space if not p.startswith("methods.") or p.split(".")[1] == method]

    def _space(self) -> dict[str, Dist]:
        written: dict[str, Dist] = dict(self.search.space)
        if not self.search.declared:
            return written
        recipe = self.search.recipe
        space: dict[str, Dist] = {}
        for m in self.methods:
            space.update(declared_space(m, recipe, self.study.train.optimizer))
        space.update(written)  # a declared path keeps its place with the written distribution
        for i, m in enumerate(self.methods):
            if not any(not p.startswith("methods.") or p.split(".")[1] == m for p in space):
                raise HarnessError(f"search.methods[{i}]: '{m}' declares no search space of its own and "
                                   "search.space names none of its parameters: nothing to tune")
        return space

    def _where(self, path: str) -> str:
        """How an error names a path: the study file's entry, or the declaration it came from."""
        if path in self.search.space:
            return f"search.space.{path}"
        if path.startswith("methods."):
            from harness.methods.base import get_method

            method = path.split(".")[1]
            return f"search.declared: {path} (declared by {get_method(method).__name__}.search_space)"
        return f"search.declared: {path} (the recipe space, harness.search.RECIPE_SPACES)"

    def _checked_dist(self, path: str, dist: Any) -> Any:
        try:
            return self._check_dist(path, dist)
        except HarnessError as e:
            if path in self.search.space:
                raise
            raise HarnessError(str(e).replace(f"search.space.{path}", self._where(path), 1)) from None

    def _check_dist(self, path: str, dist: Any) -> Any:
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
                nested = [f"train.{t}" for t in TUNABLE_TRAIN if t.startswith(f"{rest}.")]
                if rest == "epochs":
                    why = "is the pruner's step budget"
                elif nested:
                    why = f"is a mapping: search {' or '.join(nested)}"
                elif rest in TrainConfig.model_fields:
                    why = "does not change what is learnt"
                else:
                    why = "is not a train field"
                raise HarnessError(f"{where}: train.{rest} {why}; tunable: {', '.join(TUNABLE_TRAIN)}")
            if head == "student" and rest not in model_options(self.study.student.arch):
                raise HarnessError(f"{where}: '{rest}' is not an option of the student model "
                                   f"'{self.study.student.arch}'")
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
        dist = self.space[path]
        where = self._where(path)
        method = path.split(".")[1] if path.startswith("methods.") else self.methods[0]
        for value in endpoints(dist):
            try:
                self.params_for(method, self.study_for(method, {path: value}))
            except HarnessError as e:
                msg = str(e).split(": ", 2)[-1]
                raise HarnessError(f"{where}: value {value!r}: {msg}") from None
        default = self.defaults(method)[path]
        if isinstance(dist, CategoricalDist) and default not in dist.choices:
            raise HarnessError(f"{where}: the study's own value {default!r} (the default trial) "
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

    def study_for(self, method: str, values: dict[str, Any]) -> StudyConfig:
        """The study restricted to this method, with these values applied."""
        base = self.study.model_copy(update={"methods": {method: self.study.methods[method]}})
        return apply_params(base, values, f"search.space ({method})")

    def params_for(self, method: str, study: StudyConfig) -> dict[str, Any]:
        """The method's resolved parameters in this study."""
        from harness.methods.base import get_method

        return get_method(method).parse_params(study.methods[method], f"methods.{method}").model_dump(mode="json")

    @property
    def per_method(self) -> bool:
        """True when several methods each search a ``train.*``/``student.*`` path: each method's
        Optuna study tunes its own recipe, so the tuned values are one study file per method."""
        return len(self.methods) > 1 and any(not p.startswith("methods.") for p in self.space)

    def units(self) -> list[tuple[int, int]]:
        """(split index, seed) of every training run behind one objective value, in order."""
        index = {s.name: i for i, s in enumerate(self.study.splits)}
        return [(index[s], seed) for s in self.splits for seed in self.seeds]

