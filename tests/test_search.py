"""The ``search:`` block: parsing, one-line errors, defaults, applying values, the tuned study."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
import yaml

from harness.cli import main
from harness.config import load_study, parse_study
from harness.data.splits import build_split
from harness.errors import HarnessError
from harness.grid import expand
from harness.search import SearchPlan, apply_params, get_path, set_path, to_optuna
from harness.tune import make_pruner, make_sampler, tuned_study, validation_only
from tests.conftest import TINY, write_study

SPACE = {
    "methods.cka.w_align": {"type": "float", "low": 0.1, "high": 10, "log": True},
    "methods.cka.align": {"type": "categorical", "choices": ["kl", "cosine"]},
    "methods.kd.T": {"type": "float", "low": 0.5, "high": 4.0},
}


def study_with(search: dict, **top: object):
    return parse_study({**TINY, "methods": {"cka": {"w_align": 2.0}, "kd": {}, "scratch": {}, "teachers": {}},
                        **top, "search": search}, "s.yaml")


def plan_error(search: dict, **top: object) -> str:
    with pytest.raises(HarnessError) as e:
        SearchPlan(study_with(search, **top))
    return str(e.value)


def test_space_parses_into_optuna_distributions_per_method():
    plan = SearchPlan(study_with({"space": SPACE, "trials": 7}))
    assert plan.methods == ["cka", "kd"]
    assert plan.paths == {"cka": ["methods.cka.w_align", "methods.cka.align"], "kd": ["methods.kd.T"]}
    d = plan.distributions["methods.cka.w_align"]
    assert isinstance(d, optuna.distributions.FloatDistribution) and d.log and (d.low, d.high) == (0.1, 10.0)
    assert plan.distributions["methods.cka.align"].choices == ("kl", "cosine")
    assert plan.search.trials == 7 and plan.search.objective == "val_last"
    assert plan.seeds == [0, 1] and plan.splits == ["2x5"] and plan.units() == [(0, 0), (0, 1)]


def test_defaults_are_the_studys_own_values():
    cka = {k: v for k, v in SPACE.items() if k.startswith("methods.cka")}
    plan = SearchPlan(study_with({"space": {**cka, "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2,
                                                                "log": True}}, "methods": ["cka"]}))
    # w_align set in the study, align and lr from the method's and the recipe's defaults
    assert plan.defaults("cka") == {"methods.cka.w_align": 2.0, "methods.cka.align": "kl", "train.lr": 0.001}


def test_study_for_applies_values_and_keeps_only_the_method():
    plan = SearchPlan(study_with({"space": SPACE}))
    s = plan.study_for("cka", {"methods.cka.w_align": 0.5, "methods.cka.align": "cosine"})
    assert list(s.methods) == ["cka"] and s.methods["cka"] == {"w_align": 0.5, "align": "cosine"}
    params = plan.params_for("cka", s)
    assert params["w_align"] == 0.5 and params["align"] == "cosine" and params["w_intra"] == 0.1


def test_seeds_and_splits_of_the_search():
    two = [{"name": "a", "tasks": [[0, 1], [2, 3]]}, {"name": "b", "tasks": [[4, 5], [6, 7]]}]
    plan = SearchPlan(study_with({"space": SPACE, "seeds": [3], "splits": ["b", "a"]}, splits=two))
    assert plan.units() == [(1, 3), (0, 3)]


@pytest.mark.parametrize("search, message", [
    ({"space": {"foo.bar": {"type": "float", "low": 0, "high": 1}}},
     "search.space.foo.bar: tunable paths are methods.<method>.<param>, train.<field> or student.<option>"),
    ({"space": {"methods.kd.nope": {"type": "float", "low": 0, "high": 1}}},
     "search.space.methods.kd.nope: 'kd' has no parameter 'nope' (has: T, w_kd, routing)"),
    ({"space": {"methods.cfl.w1": {"type": "float", "low": 0, "high": 1}}},
     "search.methods[0]: 'cfl' is not one of the study's methods"),
    ({"space": {"methods.kd.T": {"type": "float", "low": 2, "high": 1}}},
     "search.space.methods.kd.T: `low <= high` must hold, but got (low=2.0, high=1.0)"),
    ({"space": {"methods.kd.T": {"type": "float", "low": 0, "high": 1, "log": True}}},
     "search.space.methods.kd.T: `low > 0` must hold for `log=True`"),
    ({"space": {"methods.kd.T": {"type": "float", "low": 0.0, "high": 1}}},
     "search.space.methods.kd.T: value 0.0: Input should be greater than 0"),
    ({"space": {"methods.cka.align": {"type": "categorical", "choices": ["cosine", "relation"]}}},
     "search.space.methods.cka.align: the study's own value 'kl' (the default trial) is not among the choices"),
    ({"space": {"methods.cka.align": {"type": "categorical", "choices": ["kl", "nope"]}}},
     "search.space.methods.cka.align: value 'nope':"),
    ({"space": {"train.epochs": {"type": "int", "low": 1, "high": 5}}, "methods": ["kd"]},
     "search.space.train.epochs: train.epochs is the pruner's step budget"),
    ({"space": {"student.depth": {"type": "int", "low": 1, "high": 3}}, "methods": ["kd"]},
     "search.space.student.depth: 'depth' is not an option of the student model 'cnn'"),
    ({"space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}},
     "search.methods: say which method to tune"),
    ({"space": SPACE, "methods": ["teachers"]}, "search.methods[0]: 'teachers' trains nothing"),
    ({"space": {"methods.kd.T": {"type": "float", "low": 0.5, "high": 1}}, "methods": ["cka"]},
     "search.space.methods.kd.T: method 'kd' is not in search.methods"),
    ({"space": SPACE, "splits": ["nope"]}, "search.splits[0]: no split named 'nope' (splits: 2x5)"),
])
def test_plan_errors_are_one_line_naming_the_field(search, message):
    text = plan_error(search)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize("search, message", [
    ({"space": {}}, "s.yaml: search.space: Dictionary should have at least 1 item"),
    ({"space": {"methods.kd.T": {"type": "uniform", "low": 0, "high": 1}}}, "s.yaml: search.space.methods.kd.T: "),
    ({"space": SPACE, "trials": 0}, "s.yaml: search.trials: Input should be greater than or equal to 1"),
    ({"space": SPACE, "objective": "test"}, "s.yaml: search.objective: Input should be 'val_last' or 'val_best'"),
    ({"space": SPACE, "pruner": {"type": "magic"}}, "s.yaml: search.pruner.type: Input should be"),
    ({"space": SPACE, "budget": 3}, "s.yaml: search.budget: unknown field"),
])
def test_schema_errors(search, message):
    with pytest.raises(HarnessError) as e:
        study_with(search)
    assert str(e.value).startswith(message), str(e.value)


def test_sampler_and_pruner_options_are_checked():
    from harness.search import PrunerConfig, SamplerConfig

    with pytest.raises(HarnessError, match=r"^search.pruner: median: .*n_warmup"):
        make_pruner(PrunerConfig(type="median", n_warmup=3), 10)
    with pytest.raises(HarnessError, match=r"^search.sampler: tpe: "):
        make_sampler(SamplerConfig(type="tpe", n_startup=3), 0)
    p = make_pruner(PrunerConfig(), 10)
    assert isinstance(p, optuna.pruners.MedianPruner)
    assert (p._n_startup_trials, p._n_warmup_steps) == (4, 5)  # harness defaults: 4 trials, half a seed
    assert isinstance(make_pruner(PrunerConfig(type="none"), 10), optuna.pruners.NopPruner)
    s = make_sampler(SamplerConfig(type="tpe", seed=3, n_startup_trials=2), 3)
    assert isinstance(s, optuna.samplers.TPESampler) and s._n_startup_trials == 2


def test_bad_search_through_the_cli_exits_2_and_creates_nothing(isolated, capsys):
    path = write_study(isolated / "s.yaml", search={"space": {"methods.kd.T": {"type": "float", "low": 3,
                                                                               "high": 1}}})
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: search.space.methods.kd.T: `low <= high` must hold") and "\n" not in err
    assert not (isolated / "mlflow.db").exists() and not (isolated / "results").exists()
    # a pruner option error is caught before anything is created too
    path = write_study(isolated / "s.yaml", search={"space": {"methods.kd.T": {"type": "float", "low": 1,
                                                                               "high": 3}},
                                                    "pruner": {"type": "median", "bogus": 1}})
    assert main(["tune", str(path)]) == 2
    assert "search.pruner: median:" in capsys.readouterr().err
    assert not (isolated / "mlflow.db").exists() and not (isolated / "results").exists()


def test_tune_without_search_block(isolated, capsys):
    assert main(["tune", str(write_study(isolated / "s.yaml"))]) == 2
    assert "search: the study file has no search block" in capsys.readouterr().err


def test_run_study_accepts_a_study_with_a_search_block(isolated, capsys):
    path = write_study(isolated / "s.yaml", search={"space": {"methods.kd.T": {"type": "float", "low": 1, "high": 3}}})
    assert main(["run-study", str(path), "--dry-run"]) == 0
    assert "trials" in capsys.readouterr().out


def test_paths_get_and_set():
    d: dict = {"methods": {"kd": {}}, "train": {"lr": 0.1}}
    set_path(d, "methods.kd.T", 2.0)
    set_path(d, "student.width", 4)
    assert d == {"methods": {"kd": {"T": 2.0}}, "train": {"lr": 0.1}, "student": {"width": 4}}
    assert get_path(d, "train.lr") == 0.1 and get_path(d, "train.nope") is None


def test_apply_params_validates_like_a_study_file():
    s = study_with({"space": SPACE})
    assert apply_params(s, {"train.lr": 0.01}).train.lr == 0.01
    with pytest.raises(HarnessError, match=r"train.lr: Input should be greater than 0"):
        apply_params(s, {"train.lr": -1.0})


def test_to_optuna_int_and_step():
    from harness.search import IntDist

    d = to_optuna(IntDist(type="int", low=2, high=10, step=2))
    assert isinstance(d, optuna.distributions.IntDistribution) and d.step == 2


class _Frozen:
    def __init__(self, params: dict) -> None:
        self.params = params


def test_tuned_study_is_a_runnable_study_with_the_best_values(isolated):
    study = study_with({"space": SPACE})
    plan = SearchPlan(study)
    tuned = tuned_study(plan, {"cka": _Frozen({"methods.cka.w_align": 0.3, "methods.cka.align": "cosine"}),
                               "kd": _Frozen({"methods.kd.T": 2.5})})
    assert tuned.name == "tiny-tuned" and tuned.search is None
    assert tuned.methods["cka"] == {"w_align": 0.3, "align": "cosine"} and tuned.methods["kd"] == {"T": 2.5}
    assert tuned.methods["scratch"] == {} and tuned.seeds == study.seeds  # the rest of the study as it was
    from harness.config import dump_study

    text = dump_study(tuned)
    assert "search" not in yaml.safe_load(text)
    (isolated / "t.yaml").write_text(text)
    reloaded = load_study(isolated / "t.yaml")
    kd = next(t for t in expand(reloaded) if t.method == "kd")
    assert kd.params["T"] == 2.5


def test_validation_only_removes_every_test_image():
    study = study_with({"space": SPACE})
    data = build_split(study.splits[0], study.dataset)
    v = validation_only(data)
    assert len(data.parts["test"]) > 0 and len(v.parts["test"]) == 0
    assert v.parts["test"].x.shape[1:] == data.parts["test"].x.shape[1:]
    assert torch.equal(v.parts["train"].x, data.parts["train"].x) and torch.equal(v.parts["val"].y, data.parts["val"].y)
    assert not math.isnan(len(v.parts["val"]))
