"""Trial keys: every field that changes a number changes the key, and nothing else does;
variants that resolve to one configuration, and impossible routing banks, are study-file errors."""

from __future__ import annotations

import copy
from typing import Any, Iterator

import pytest

import harness.grid as grid
import harness.keys as key_module
from harness.config import StudyConfig, parse_study
from harness.errors import HarnessError
from harness.grid import expand
from harness.keys import trial_key
from harness.methods.base import get_method

BASE: dict[str, Any] = {
    "name": "keys",
    "dataset": {"name": "digits", "val_fraction": 0.1, "image_size": 8},
    "splits": [{"name": "a", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}],
    "teachers": [{"arch": "cnn", "width": 8, "epochs": 3}, {"arch": "mlp", "hidden": 32, "epochs": 3}],
    "student": {"arch": "cnn", "width": 8},
    "train": {"epochs": 2, "batch_size": 128},
    "methods": {"cka": {}, "kd": {}, "cfl": {}, "scratch": {}, "teachers": {}},
    "seeds": [0, 1],
    "devices": "cpu",
}


def _keys(data: dict[str, Any], precision: str | None = None) -> dict[tuple, str]:
    return {(t.split, t.method, t.variant, t.seed): t.key for t in expand(parse_study(data), precision)}


def _other(value: Any, field: str) -> Any:
    """A different valid value of the same field."""
    special = {"val_fraction": 0.2, "momentum": 0.5, "image_size": 16, "optimizer": "sgd", "scheduler": "cosine",
               "augment": ["crop"], "align": "cosine", "align_to": "claiming", "soft_target": "per_task",
               "intra_models": "all", "score": "max_logit", "standardize": "z", "targets": "routed",
               "conf_threshold": 0.5, "c": 64, "name": "mnist5k", "space": "pooled", "negatives": "batch"}
    if field in special and special[field] != value:
        return special[field]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.5
    raise AssertionError(f"no other value for {field}={value!r}")


def result_fields(study: StudyConfig) -> Iterator[tuple[str, Any]]:
    """(path, edit) for every leaf of the study that determines a trial's numbers."""
    data = study.model_dump(mode="json")
    for f in ("name", "val_fraction", "image_size"):
        yield f"dataset.{f}", ("dataset", f)
    for f, v in data["train"].items():
        if isinstance(v, dict):  # a nested field (lr_mult): each of its leaves
            for q in v:
                yield f"train.{f}.{q}", ("train", f, q)
        else:
            yield f"train.{f}", ("train", f)
    for f in data["student"]:
        if f != "arch":
            yield f"student.{f}", ("student", f)
    yield "student.arch", ("student", "arch")
    for i, t in enumerate(data["teachers"]):
        for f in t:
            yield f"teachers[{i}].{f}", ("teachers", i, f)
    yield "splits[0].tasks", ("splits", 0, "tasks")
    for m in BASE["methods"]:
        params = get_method(m).parse_params({}, m).model_dump(mode="json")
        for p, v in params.items():
            if isinstance(v, dict):
                for q in v:
                    yield f"methods.{m}.{p}.{q}", ("methods", m, p, q)
            else:
                yield f"methods.{m}.{p}", ("methods", m, p)


def _edit(data: dict[str, Any], path: tuple, study: StudyConfig) -> dict[str, Any]:
    out = copy.deepcopy(data)
    if path[0] == "methods":
        m = path[1]
        params = get_method(m).parse_params({}, m).model_dump(mode="json")
        if len(path) == 4:
            sub = dict(params[path[2]])
            sub[path[3]] = _other(sub[path[3]], path[3])
            out["methods"][m] = {path[2]: sub}
        else:
            out["methods"][m] = {path[2]: _other(params[path[2]], path[2])}
        return out
    if path == ("student", "arch"):
        out["student"] = {"arch": "mlp"}
        return out
    if path == ("splits", 0, "tasks"):
        out["splits"][0]["tasks"] = [[0, 1, 2, 3], [5, 6, 7, 8, 9]]
        return out
    full = study.model_dump(mode="json")
    if path[0] == "teachers":
        t = copy.deepcopy(full["teachers"][path[1]])
        t[path[2]] = "resnet8" if path[2] == "arch" else _other(t[path[2]], path[2])
        if path[2] == "arch":
            t = {k: v for k, v in t.items() if k not in ("width", "hidden")}
        out["teachers"][path[1]] = t
        return out
    if path[0] == "train" and len(path) == 3:
        sub = dict(full["train"][path[1]])
        sub[path[2]] = _other(sub[path[2]], path[2])
        out["train"] = {**out["train"], path[1]: sub}
        return out
    section, f = path
    current = full[section][f]
    out.setdefault(section, {})
    out[section] = {**out[section], f: _other(current, f)}
    return out


def _cases() -> list[tuple[str, tuple]]:
    return list(result_fields(parse_study(BASE)))


@pytest.mark.parametrize("name,path", _cases(), ids=[c[0] for c in _cases()])
def test_every_result_field_changes_the_key(name: str, path: tuple) -> None:
    study = parse_study(BASE)
    before = _keys(BASE)
    after = _keys(_edit(BASE, path, study))
    method = path[1] if path[0] == "methods" else None
    for k, key in before.items():
        if k not in after:
            continue
        if method is None or k[1] == method:
            assert after[k] != key, f"{name} did not change the key of {k}"
        else:
            assert after[k] == key, f"{name} changed the key of another method's trial {k}"


def test_the_cases_cover_every_train_field_and_method_parameter() -> None:
    names = {n for n, _ in _cases()}
    from harness.config import TrainConfig

    nested = {"lr_mult": ("head", "method")}
    assert {f"train.{f}" for f in TrainConfig.model_fields if f not in nested} <= names
    assert {f"train.{f}.{q}" for f, leaves in nested.items() for q in leaves} <= names
    assert {"methods.cka.w_intra", "methods.cka.tau", "methods.kd.T", "methods.cfl.w1",
            "methods.kd.routing.score"} <= names


@pytest.mark.parametrize("method", ["cka", "kd", "teachers"])
def test_the_pseudo_label_temperature_changes_the_key(method: str) -> None:
    base = _keys({**BASE, "methods": {method: {}}})
    hot = _keys({**BASE, "methods": {method: {"routing": {"score": "confidence", "T_pl": 2.0}}}})
    assert base.keys() == hot.keys() and all(base[k] != hot[k] for k in base)


def test_seed_precision_and_results_version_change_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _keys(BASE)
    assert keys[("a", "kd", "full", 0)] != keys[("a", "kd", "full", 1)]
    assert _keys(BASE, "bf16")[("a", "kd", "full", 0)] != _keys(BASE, "fp32")[("a", "kd", "full", 0)]
    monkeypatch.setattr(key_module, "RESULTS_VERSION", key_module.RESULTS_VERSION + 1)
    assert _keys(BASE)[("a", "kd", "full", 0)] != keys[("a", "kd", "full", 0)]


@pytest.mark.parametrize("field,value", [
    ("dataset", {**BASE["dataset"], "stream": True}),  # only how images are read
    ("dataset", {**BASE["dataset"], "download": True}),  # only whether the files are fetched first
    ("name", "another-name"),
    ("devices", "auto"),  # same precision on a machine without a GPU
    ("trials_per_device", 3),
    ("max_retries", 2),
    ("cache_dir", "/tmp/elsewhere"),
    ("search", {"space": {"methods.kd.T": {"type": "float", "low": 0.5, "high": 4.0}}, "trials": 3}),
    ("slurm", {"partition": "gpu", "gpus_per_task": 1, "time_min": 30, "setup": ["module load cuda"]}),
])
def test_fields_left_out_of_the_key_do_not_change_it(field: str, value: Any) -> None:
    if field == "devices":
        from harness.scheduler import visible_gpus

        if visible_gpus():
            pytest.skip("auto means CUDA here")
    if field == "dataset":  # stream is checked against the loader, not the key: compare keys only
        study = parse_study(BASE)
        flags = {k: v for k, v in value.items() if k in ("stream", "download")}
        moved = study.model_copy(update={"dataset": study.dataset.model_copy(update=flags)})
        assert trial_key(moved, 0, "kd", {}, 0) == trial_key(study, 0, "kd", {}, 0)
        return
    assert _keys({**BASE, field: value}) == _keys(BASE)


def test_precision_follows_the_devices_and_amp() -> None:
    assert grid.study_precision(parse_study(BASE)) == "fp32"  # devices: cpu
    assert {t.precision for t in expand(parse_study(BASE))} == {"fp32"}
    assert {t.precision for t in expand(parse_study(BASE), "bf16")} == {"bf16"}


def test_per_seed_teachers_change_the_key_per_seed_and_run_reference_rows_per_seed() -> None:
    fixed = {(t.method, t.seed): t for t in expand(parse_study(BASE))}
    per = {(t.method, t.seed): t for t in expand(parse_study({**BASE, "teacher_seeds": "per_seed"}))}
    assert ("teachers", 1) not in fixed and ("teachers", 1) in per
    # seed 1 trains on teachers of seed 1; seed 0's teachers are the study's own (seed 0): same trial
    assert per[("kd", 1)].key != fixed[("kd", 1)].key
    assert per[("kd", 0)].key == fixed[("kd", 0)].key
    study = parse_study({**BASE, "teacher_seeds": "per_seed"})
    assert [t.seed for t in study.teachers_for(study.splits[0], 1)] == [1, 1]


def test_an_ablation_equal_to_the_full_method_is_an_error() -> None:
    data = {**BASE, "methods": {"cka": {"w_intra": 0.0}}, "ablations": ["intra"]}
    with pytest.raises(HarnessError, match=r"methods\.cka: variants 'cka' and 'cka-intra' resolve to the same"):
        expand(parse_study(data))


def test_a_named_variant_equal_to_the_defaults_is_an_error() -> None:
    data = {**BASE, "methods": {"kd": {"T": 2.0}}, "variants": {"kd": {"same": {"T": 2.0}}}}
    with pytest.raises(HarnessError, match=r"variants 'kd' and 'kd:same' resolve to the same parameters"):
        expand(parse_study(data))
    two = {**BASE, "methods": {"kd": {}}, "variants": {"kd": {"a": {"T": 2.0}, "b": {"T": 2.0}}}}
    with pytest.raises(HarnessError, match=r"'kd:a' and 'kd:b'"):
        expand(parse_study(two))


def test_the_cli_rejects_duplicate_variants_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    import yaml

    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump({**BASE, "methods": {"cka": {"w_align": 0}}, "ablations": ["align"]}))
    assert main(["run-study", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'cka' and 'cka-align'" in err[0]
    assert not (tmp_path / "m.db").exists()


def test_a_routing_rule_that_trains_like_the_default_is_run_once_and_said_so(tmp_path, capsys) -> None:
    # with concat targets kd, crd and rkd train on the concatenated logits whatever the rule: the
    # rule changes only their diagnostics, so 'entropy/none/concat' would train exactly like the
    # default (confidence/none/concat) under a second key. cka routes its pseudo-labels with it
    # and the teachers row is evaluated under it: those keep the variant.
    import yaml

    from harness.cli import main
    from harness.grid import method_variants

    data = {**BASE, "methods": {"kd": {}, "crd": {}, "rkd": {}, "cka": {}, "teachers": {}},
            "routing": ["entropy/none/concat", "entropy/none/routed"]}
    notes: list[str] = []
    variants = {(m, v) for m, v, _ in method_variants(parse_study(data), notes)}
    for m in ("kd", "crd", "rkd"):
        assert (m, "entropy/none/concat") not in variants and (m, "entropy/none/routed") in variants
    assert {("cka", "entropy/none/concat"), ("teachers", "entropy/none/concat")} <= variants
    assert notes == [f"{m}:entropy/none/concat not run: it would train exactly like {m} (with its targets the rule "
                     f"changes only {m}'s diagnostics); the teachers row 'entropy/none/concat' shows the rule's "
                     "claiming accuracy" for m in ("kd", "crd", "rkd")]
    trials = expand(parse_study(data))
    keys = [t.key for t in trials]
    assert len(keys) == len(set(keys))
    assert sum(t.method == "kd" for t in trials) == 2 * len(BASE["seeds"])  # kd and kd:entropy/none/routed
    # the plan says it (dry run here; run-study prints the same notes before the trials start)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run-study", str(path), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    out = capsys.readouterr().out
    assert "note: kd:entropy/none/concat not run: it would train exactly like kd" in out


def test_written_variants_that_would_train_alike_are_refused() -> None:
    data = {**BASE, "methods": {"kd": {}}, "variants": {"kd": {"maha": {"routing": "mahalanobis/z/concat"}}}}
    with pytest.raises(HarnessError, match=r"^methods\.kd: variants 'kd' and 'kd:maha' would train exactly alike "
                       r"\(they differ only in routing, which does not change what kd trains"):
        expand(parse_study(data))
    routed = {**data, "variants": {"kd": {"maha": {"routing": "mahalanobis/z/routed"}}}}
    assert {t.variant for t in expand(parse_study(routed))} == {"full", "maha"}


@pytest.mark.parametrize("rule", ["knn/none/concat", "max_logit/percentile/routed", "confidence+knn/z/concat"])
def test_val_fraction_zero_with_a_validation_bank_rule_is_an_error(rule: str) -> None:
    # cka routes with the rule whatever its targets (kd with concat targets would not run it)
    data = {**BASE, "dataset": {**BASE["dataset"], "val_fraction": 0.0}, "methods": {"kd": {}, "cka": {}},
            "routing": [rule]}
    with pytest.raises(HarnessError, match=r"dataset\.val_fraction: 0 leaves no validation images.*(kd|cka):"):
        expand(parse_study(data))
    ok = {**data, "routing": ["mahalanobis/z/routed"]}
    assert expand(parse_study(ok))
