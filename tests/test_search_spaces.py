"""Search spaces declared by the methods (``Method.search_space``), the recipe space, and the
``search: {declared: true}`` block that searches them."""

from __future__ import annotations

import optuna
import pytest
import yaml

from harness.cli import main
from harness.config import TrainConfig, dump_study, load_study, parse_study
from harness.errors import HarnessError
from harness.methods.base import discover, get_method
from harness.search import RECIPE_SPACE, RECIPE_SPACES, SearchPlan, declared_space, to_optuna
from harness.spaces import CategoricalDist, FloatDist, IntDist, contains, describe, endpoints
from harness.tune import storage_for
from tests.conftest import TINY, write_study

#: the built-in methods that train a student (``teachers`` only evaluates)
TRAINABLE = ["cka", "kd", "rkd", "cfl", "crd", "scratch"]
#: what each built-in method declares (the docs' table; the ranges themselves are checked below)
DECLARED = {
    "cka": ["w_intra", "w_inter", "w_align", "tau", "tau_a", "T"],
    "kd": ["T"],
    "rkd": ["w_dist", "w_angle", "T"],
    "cfl": ["w1", "w2", "T"],
    "crd": ["w_crd", "nce_t", "T"],
    "scratch": [],
}


def study_with(search: dict, methods: dict | None = None, **top: object):
    methods = methods or {m: {} for m in [*TRAINABLE, "teachers"]}
    return parse_study({**TINY, "methods": methods, **top, "search": search}, "s.yaml")


def plan_error(search: dict, **kw: object) -> str:
    with pytest.raises(HarnessError) as e:
        SearchPlan(study_with(search, **kw))
    text = str(e.value)
    assert "\n" not in text
    return text


# -- the declarations ----------------------------------------------------------------------------
def test_builtin_declarations():
    assert {m: list(get_method(m).search_space) for m in TRAINABLE} == DECLARED
    assert get_method("teachers").search_space == {}


def _check_declaration(name: str) -> None:
    cls = get_method(name)
    fields = cls.ParamsModel.model_fields
    default = cls.ParamsModel()
    for param, dist in cls.search_space.items():
        assert param in fields, f"{name}.{param} is not a parameter"
        assert param != "routing", "routing rules are not in the declared spaces"
        assert isinstance(dist, (FloatDist, IntDist, CategoricalDist))
        to_optuna(dist)  # a valid Optuna distribution
        for value in endpoints(dist):  # every endpoint / choice is a valid parameter value
            assert getattr(cls.parse_params({param: value}, f"methods.{name}"), param) == value
        assert contains(dist, getattr(default, param)), (
            f"{name}.{param}: default {getattr(default, param)!r} outside {describe(dist)}")


@pytest.mark.parametrize("name", TRAINABLE)
def test_declared_space_is_made_of_real_parameters_with_the_default_inside(name):
    _check_declaration(name)


def test_every_registered_trainable_method_declares_a_valid_space():
    """Every built-in one (the test plug-ins other test modules register may require parameters
    and declare nothing)."""
    names = [n for n in discover().names()
             if discover().get(n).trains and discover().get(n).__module__.startswith(("harness.", "baselines."))]
    assert set(TRAINABLE) <= set(names)
    for name in names:
        _check_declaration(name)


def test_weights_and_temperatures_span_about_two_decades_on_a_log_scale():
    for name in TRAINABLE:
        for param, dist in get_method(name).search_space.items():
            assert isinstance(dist, FloatDist) and dist.log and dist.low > 0, f"{name}.{param}"
            assert 10 <= dist.high / dist.low <= 100, f"{name}.{param}: {describe(dist)}"


def test_the_recipe_space_holds_the_default_recipe():
    train = TrainConfig()
    assert RECIPE_SPACE is RECIPE_SPACES["adam"] and set(RECIPE_SPACES) == {"adam", "sgd"}
    for space in RECIPE_SPACES.values():
        assert list(space) == ["train.lr", "train.lr_mult.head"]
        assert contains(space["train.lr_mult.head"], train.lr_mult.head)
    assert contains(RECIPE_SPACES["adam"]["train.lr"], train.lr)  # Adam at 1e-3
    assert contains(RECIPE_SPACES["sgd"]["train.lr"], 0.05)  # the CIFAR studies' SGD rate


def test_declared_space_gives_study_paths():
    assert list(declared_space("kd")) == ["methods.kd.T", "train.lr", "train.lr_mult.head"]
    assert declared_space("kd")["methods.kd.T"] == get_method("kd").search_space["T"]
    assert declared_space("kd", recipe=False) == {"methods.kd.T": get_method("kd").search_space["T"]}
    assert declared_space("rkd", optimizer="sgd")["train.lr"] == RECIPE_SPACES["sgd"]["train.lr"]
    assert declared_space("scratch") == RECIPE_SPACE and declared_space("scratch", recipe=False) == {}
    assert declared_space("teachers") == {}
    assert list(declared_space("cka", recipe=False)) == [f"methods.cka.{p}" for p in DECLARED["cka"]]


def test_describe():
    assert describe(get_method("kd").search_space["T"]) == "float log [0.5, 10]"
    assert describe(IntDist(type="int", low=8, high=32, step=8)) == "int [8, 32] step 8"
    assert describe(CategoricalDist(type="categorical", choices=["kl", "cosine"])) == "categorical [kl, cosine]"


# -- search: {declared: true} ----------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINABLE)
def test_plan_accepts_every_declared_endpoint(name):
    """SearchPlan validates every endpoint of every declared path as a whole study."""
    plan = SearchPlan(study_with({"declared": True, "methods": [name]}))
    declared = declared_space(name)
    assert plan.space == declared and plan.paths[name] == list(declared)
    assert plan.distributions == {p: to_optuna(d) for p, d in declared.items()}
    assert plan.defaults(name) == {p: (getattr(get_method(name).ParamsModel(), p.split(".")[2])
                                       if p.startswith("methods.") else {"train.lr": 1e-3,
                                                                         "train.lr_mult.head": 1.0}[p])
                                   for p in declared}


def test_sgd_study_gets_the_sgd_recipe_space():
    plan = SearchPlan(study_with({"declared": True, "methods": ["cka"]},
                                 train={"epochs": 2, "optimizer": "sgd", "lr": 0.05}))
    assert plan.space["train.lr"] == RECIPE_SPACES["sgd"]["train.lr"]
    assert plan.defaults("cka")["train.lr"] == 0.05


def test_declared_search_in_a_study_file(tmp_path):
    path = write_study(tmp_path / "s.yaml", search={"declared": True, "trials": 2, "methods": ["kd"]})
    study = load_study(path)
    assert study.search.declared and study.search.space == {}
    plan = SearchPlan(study)
    assert plan.methods == ["kd"]
    assert plan.distributions == {
        "methods.kd.T": optuna.distributions.FloatDistribution(0.5, 10.0, log=True),
        "train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "train.lr_mult.head": optuna.distributions.FloatDistribution(1.0, 30.0, log=True),
    }
    # a study written back (the tuned study's header, the Optuna study attributes) loads again
    (tmp_path / "again.yaml").write_text(dump_study(study))
    assert load_study(tmp_path / "again.yaml").search == study.search


def test_space_entries_narrow_and_extend_the_declared_space():
    narrow = {"type": "float", "low": 1.0, "high": 4.0, "log": True}
    wd = {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}
    plan = SearchPlan(study_with({"declared": True, "methods": ["kd"],
                                  "space": {"methods.kd.T": narrow, "train.weight_decay": wd}}))
    assert plan.paths["kd"] == ["methods.kd.T", "train.lr", "train.lr_mult.head", "train.weight_decay"]
    assert plan.distributions["methods.kd.T"] == optuna.distributions.FloatDistribution(1.0, 4.0, log=True)
    assert plan.distributions["train.lr"] == to_optuna(RECIPE_SPACE["train.lr"])
    assert plan.distributions["train.weight_decay"] == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    # a parameter the method does not declare can be added too
    plan = SearchPlan(study_with({"declared": True, "methods": ["cka"],
                                  "space": {"methods.cka.align": {"type": "categorical", "choices": ["kl", "cosine"]}}}))
    assert plan.paths["cka"][-1] == "methods.cka.align" and len(plan.paths["cka"]) == len(DECLARED["cka"]) + 3


def test_a_bad_override_is_one_line_naming_its_entry():
    text = plan_error({"declared": True, "methods": ["kd"],
                       "space": {"methods.kd.nope": {"type": "float", "low": 1, "high": 2}}})
    assert text.startswith("search.space.methods.kd.nope: 'kd' has no parameter 'nope'"), text
    text = plan_error({"declared": True, "methods": ["kd"],
                       "space": {"methods.kd.T": {"type": "float", "low": 0, "high": 2}}})
    assert text.startswith("search.space.methods.kd.T: value 0.0: Input should be greater than 0"), text
    text = plan_error({"declared": True, "methods": ["kd"],
                       "space": {"methods.cka.tau": {"type": "float", "low": 0.1, "high": 0.2}}})
    assert text.startswith("search.space.methods.cka.tau: method 'cka' is not in search.methods"), text


def test_several_methods_search_their_own_parameters_and_each_its_own_recipe():
    plan = SearchPlan(study_with({"declared": True, "methods": ["kd", "rkd"]}))
    recipe = list(declared_space("scratch"))  # the recipe paths only
    assert recipe and all(p.startswith("train.") for p in recipe)
    assert {m: set(p) for m, p in plan.paths.items()} == {
        "kd": {"methods.kd.T", *recipe}, "rkd": {*(f"methods.rkd.{p}" for p in DECLARED["rkd"]), *recipe}}
    assert plan.per_method  # each method's Optuna study tunes its own recipe: one tuned file per method
    plan = SearchPlan(study_with({"declared": True, "recipe": False, "methods": ["kd", "rkd"]}))
    assert plan.paths == {"kd": ["methods.kd.T"], "rkd": [f"methods.rkd.{p}" for p in DECLARED["rkd"]]}
    assert not plan.per_method
    # a train.* entry with several methods: a path of each method's own search
    plan = SearchPlan(study_with({"declared": True, "recipe": False, "methods": ["kd", "rkd"],
                                  "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}))
    assert "train.lr" in plan.paths["kd"] and "train.lr" in plan.paths["rkd"] and plan.per_method
    text = plan_error({"declared": True, "recipe": False, "methods": ["kd", "scratch"]})
    assert text.startswith("search.methods[1]: 'scratch' declares no search space of its own"), text


def test_declared_needs_the_methods_named():
    assert plan_error({"declared": True}).startswith("search.methods: say which method to tune")
    # methods named by space entries count
    plan = SearchPlan(study_with({"declared": True, "space": {"methods.kd.T": {"type": "float", "low": 1,
                                                                               "high": 2}}}))
    assert plan.methods == ["kd"] and plan.space["methods.kd.T"].high == 2


@pytest.mark.parametrize("search, message", [
    ({"trials": 2}, "s.yaml: search.space: Field required"),
    ({"space": {}}, "s.yaml: search.space: Dictionary should have at least 1 item"),
    ({"recipe": False, "space": {"methods.kd.T": {"type": "float", "low": 1, "high": 2}}},
     "s.yaml: search.recipe: false only applies with search.declared: true"),
])
def test_schema_without_declared_is_unchanged(search, message):
    with pytest.raises(HarnessError) as e:
        study_with(search)
    assert str(e.value).startswith(message), str(e.value)


def test_the_docs_table_matches_the_declarations():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs/methods.md").read_text()
    section = text[text.index("### Declared search spaces"):text.index("*Provenance*: the spaces")]
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)`[^|]*\| \[([\d.e-]+), ([\d.e-]+)\] \| (\w+) \| ([\d.]+) \|$",
                      section, re.M)
    documented = {(m, p): (float(lo), float(hi), scale == "log", float(d)) for m, p, lo, hi, scale, d in rows}
    declared = {(m, p): (d.low, d.high, d.log, getattr(get_method(m).ParamsModel(), p))
                for m in TRAINABLE for p, d in get_method(m).search_space.items()}
    assert documented == declared


# -- harness methods -------------------------------------------------------------------------------
def test_harness_methods_lists_each_declared_space(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" ") and ":" in line:
            current = line.split(":")[0].split(" ")[0]
        blocks.setdefault(current, []).append(line)
    kd = "\n".join(blocks["kd"])
    assert "  search space: T: float log [0.5, 10] (default 1.0) + the recipe space" in kd
    assert "w_dist: float log [2.5, 250] (default 25.0)" in "\n".join(blocks["rkd"])
    assert "  search space: the recipe space" in "\n".join(blocks["scratch"])
    assert "search space" not in "\n".join(blocks["teachers"])
    assert "adam: train.lr: float log [0.0001, 0.01], train.lr_mult.head: float log [1, 30]" in out


# -- harness tune with declared spaces ---------------------------------------------------------------
@pytest.mark.slow
def test_tune_searches_inside_the_declared_space(isolated):
    study = write_study(isolated / "tiny.yaml", train={"epochs": 1, "batch_size": 128}, seeds=[0],
                        search={"declared": True, "trials": 2, "methods": ["kd"],
                                "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}})
    assert main(["tune", str(study), "--no-report", "--workers", "1"]) == 0
    storage = storage_for(str(isolated / "results/tiny/tune.journal"))
    trials = optuna.load_study(study_name="tiny/kd", storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 2
    space = declared_space("kd")
    assert trials[0].params == {"methods.kd.T": 1.0, "train.lr": 1e-3, "train.lr_mult.head": 1.0}  # the default
    for t in trials:
        assert set(t.params) == set(space)
        assert all(contains(space[p], v) for p, v in t.params.items()), t.params
        assert t.distributions == {p: to_optuna(d) for p, d in space.items()}
    tuned = yaml.safe_load((isolated / "tiny.tuned.yaml").read_text())
    assert "search" not in tuned and "lr_mult" in tuned["train"]
