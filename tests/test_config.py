"""Study schema: good files load, every bad file gives one line naming the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.config import dump_study, load_study, parse_study
from harness.errors import HarnessError
from harness.grid import build_splits, expand
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_committed_studies_load_and_expand():
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        study = load_study(path)
        assert expand(study), path


def test_digits_study_matches_issue_fields():
    s = load_study(ROOT / "studies/digits.yaml")
    assert s.name == "digits" and s.dataset.name == "digits" and s.dataset.val_fraction == 0.1
    assert s.splits[0].tasks == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [t.arch for t in s.teachers] == ["cnn", "mlp"] and s.teachers[0].options() == {"width": 32}
    assert s.train.optimizer == "adam" and s.train.lr == 0.001 and s.seeds == [0, 1, 2]
    assert set(s.methods) == {"cka", "kd", "cfl", "crd", "rkd", "scratch", "teachers"}
    assert s.ablations == ["intra", "inter", "align", "task"] and s.devices == "auto"


def test_dump_roundtrip():
    s = parse_study(copy.deepcopy(TINY))
    assert parse_study(yaml.safe_load(dump_study(s))) == s


def _err(mutate) -> str:
    data = copy.deepcopy(TINY)
    mutate(data)
    with pytest.raises(HarnessError) as e:
        study = parse_study(data, "s.yaml")
        expand(study)
        build_splits(study)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.update(bogus=1), "s.yaml: bogus: unknown field"),
        (lambda d: d["train"].update(lr=-1), "s.yaml: train.lr: Input should be greater than 0"),
        (lambda d: d["train"].update(optimizer="rmsprop"), "s.yaml: train.optimizer:"),
        (lambda d: d["dataset"].update(val_fraction=1.5), "s.yaml: dataset.val_fraction:"),
        (lambda d: d.update(seeds=[]), "s.yaml: seeds:"),
        (lambda d: d.update(seeds=[1, 1]), "s.yaml: seeds: seeds must be unique"),
        (lambda d: d["splits"][0].update(tasks=[[0, 1], [1, 2]]), "s.yaml: splits[0]: class 1 is in task 0 and task 1"),
        (lambda d: d["splits"][0].update(tasks=[[0, 1], []]), "s.yaml: splits[0]"),
        (lambda d: d["splits"][0].update(tasks=[[0, 1]]), "s.yaml: splits[0].tasks:"),
        (lambda d: d["splits"][0].update(tasks=[[0, 1], [2, 12]]), "splits[0].tasks[1]: class 12 is out of range"),
        (lambda d: d.update(methods={"nope": {}}), "unknown method 'nope'"),
        (lambda d: d["methods"].update(kd={"TT": 2}), "methods.kd.TT: unknown parameter"),
        (lambda d: d["methods"].update(kd={"T": -2}), "methods.kd.T: Input should be greater than 0"),
        (lambda d: d["student"].update(widht=3), "student.widht: unknown option for model 'cnn'"),
        (lambda d: d["student"].update(arch="vgg"), "unknown model 'vgg'"),
        # option values too, when the study is loaded (not when a teacher starts hours later)
        (lambda d: d.update(student={"arch": "wrn", "depth": 41}), "student: model option 'depth' of wrn must be 6n+4"),
        (lambda d: d["teachers"][0].update(width=0), "teachers[0]: model option 'width' must be a positive integer"),
        (lambda d: d["teachers"].append({"arch": "mlp"}), "teachers: 3 entries but split '2x5' has 2 tasks"),
        (lambda d: d["splits"][0].update(teachers=[{"arch": "mlp"}] * 3), "splits[0].teachers: 3 entries but split"),
        (lambda d: d["splits"][0].update(teachers=[{"arch": "mlp", "hiden": 3}]), "splits[0].teachers[0].hiden: unknown option"),
        (lambda d: d.pop("teachers"), "teachers: required (split '2x5' has no teachers of its own)"),
        (lambda d: d.update(ablations=["intra"]), "ablations[0]: 'intra' is not a component of any method"),
        (lambda d: d.update(ablations=["intra+"]), "s.yaml: ablations:"),
        (lambda d: d["dataset"].update(name="cifar10"), "dataset.root: required for dataset 'cifar10'"),
        (lambda d: d["dataset"].update(name="npz", root="/does/not/exist.npz"), "/does/not/exist.npz"),
        (lambda d: d.update(routing=["max_logit/zz"]), "s.yaml: routing: 'max_logit/zz': Input should be 'none', 'z' or 'percentile'"),
        (lambda d: d.update(routing=["maxlogit"]), "s.yaml: routing: 'maxlogit': unknown or repeated claim score"),
        (lambda d: d.update(methods={"scratch": {}}, routing=["energy"]), "routing: no method in the study has a routing parameter"),
        (lambda d: d.update(variants={"cka": {"x": {}}}), "variants.cka: method is not in the study's methods"),
        (lambda d: d.update(variants={"kd": {"hot": {"T": 0}}}), "variants.kd.hot.T:"),
        (lambda d: d["splits"][0].pop("tasks"), "s.yaml: splits[0]: tasks or partition: required"),
        (lambda d: d["splits"][0].update(partition={"k": 2}), "s.yaml: splits[0]: tasks and partition: give one of them, not both"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 1}), "s.yaml: splits[0].partition.k: Input should be greater than or equal to 2"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 11}, teachers=[{"arch": "mlp"}]),
         "splits[0].partition.k: 11 tasks from the 10 classes of data set 'digits' (k must be at most the number of classes)"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 3, "classes": [0, 1]}, teachers=[{"arch": "mlp"}]),
         "splits[0].partition.k: 3 tasks from the 2 classes of partition.classes"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 2, "classes": [0, 12]}, teachers=[{"arch": "mlp"}]),
         "splits[0].partition.classes: class 12 is out of range for data set 'digits' (classes 0..9)"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 2, "seed": 3}),
         "s.yaml: splits[0].partition.seed: only meaningful with order: random"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 2, "classes": [1, 1, 2]}),
         "s.yaml: splits[0].partition.classes: a class is listed twice"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 2, "classes": []}),
         "s.yaml: splits[0].partition.classes: empty: list the classes to partition"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 2, "classes": [-1, 3]}),
         "s.yaml: splits[0].partition.classes: class ids must be >= 0"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 2, "order": "shuffled"}),
         "s.yaml: splits[0].partition.order: Input should be 'contiguous' or 'random'"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 2, "K": 3}), "s.yaml: splits[0].partition.K: unknown field"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 3}), "teachers: 2 entries but split '2x5' has 3 tasks"),
        (lambda d: d["splits"][0].update(tasks=None, partition={"k": 3}, teachers=[{"arch": "mlp"}] * 2),
         "splits[0].teachers: 2 entries but split '2x5' has 3 tasks"),
    ],
)
def test_bad_study_one_line_naming_field(mutate, expected):
    assert expected in _err(mutate)


def test_multi_task_form_parses():
    data = copy.deepcopy(TINY)
    data["dataset"]["image_size"] = 16
    data["splits"] = [{"name": "d+m", "tasks": [{"dataset": "digits"}, {"dataset": "mnist5k", "classes": [0, 1]}]}]
    s = parse_study(data)
    assert s.splits[0].tasks[1].classes == [0, 1]


def test_load_study_errors(tmp_path):
    with pytest.raises(HarnessError, match="study file not found"):
        load_study(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(HarnessError, match=r"bad.yaml: not valid YAML \(line"):
        load_study(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(HarnessError, match="must be a YAML mapping"):
        load_study(bad)


def test_cli_bad_study_exit_2_nothing_created(tmp_path):
    data = copy.deepcopy(TINY)
    data["methods"] = {"kd": {"temperature": 3}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HARNESS_CACHE": str(tmp_path / "cache")}
    import os

    env = {**os.environ, **env}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run-study", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "harness: error: methods.kd.temperature: unknown parameter"
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no mlflow.db, no cache


def test_routing_axis_adds_one_variant_per_rule_to_routing_methods():
    data = copy.deepcopy(TINY)
    data["methods"] = {"kd": {}, "scratch": {}, "teachers": {}}
    data["routing"] = ["confidence/none/concat", "max_logit/z/routed", "max_logit+mahalanobis/z/routed"]
    trials = expand(parse_study(data))
    variants = sorted({(t.method, t.variant) for t in trials})
    assert variants == sorted([
        ("kd", "full"), ("kd", "max_logit/z/routed"), ("kd", "max_logit+mahalanobis/z/routed"),
        ("teachers", "full"), ("teachers", "max_logit/z/routed"), ("teachers", "max_logit+mahalanobis/z/routed"),
        ("scratch", "full"),
    ])  # confidence/none/concat is every method's default: the "full" row
    kd = next(t for t in trials if t.variant == "max_logit/z/routed" and t.method == "kd")
    assert kd.params["routing"] == {"score": "max_logit", "standardize": "z", "targets": "routed"}
    assert len({t.key for t in trials}) == len(trials)


def test_teachers_share_the_student_recipe_fields():
    data = copy.deepcopy(TINY)
    data["teachers"] = [{"arch": "cnn", "width": 8, "optimizer": "sgd", "momentum": 0.5, "scheduler": "cosine"}]
    t = parse_study(data).teachers[0]
    assert (t.momentum, t.scheduler, t.options()) == (0.5, "cosine", {"width": 8})
    data["teachers"] = [{"arch": "cnn", "batch_size": 1}]
    with pytest.raises(HarnessError, match=r"teachers\[0\]\.batch_size: Input should be greater than or equal to 2"):
        parse_study(data, "s.yaml")


@pytest.mark.parametrize("tasks,message", [
    ([[0, 1], {"dataset": "digits", "classes": [1, 5]}], "class 1 of digits is in task 0 and task 1"),
    ([[0, 1], {"dataset": "digits"}], "the whole of digits is in task 0 and task 1"),
    ([{"dataset": "digits"}, [3, 4]], "class 3 of digits is in task 0 and task 1"),
    ([{"dataset": "mnist5k"}, {"dataset": "mnist5k", "classes": [2]}], "class 2 of mnist5k is in task 0 and task 1"),
])
def test_tasks_of_one_source_must_be_disjoint_whatever_their_form(tasks, message):
    data = {**copy.deepcopy(TINY), "splits": [{"name": "mix", "tasks": tasks}]}
    with pytest.raises(HarnessError, match=rf"^study: splits\[0\]\.tasks: {message}: tasks must be disjoint"):
        parse_study(data)


def test_tasks_of_other_sources_or_other_roots_may_share_class_ids():
    ok = [[[0, 1], {"dataset": "mnist5k", "classes": [0, 1]}],
          [{"dataset": "digits"}, {"dataset": "mnist5k"}],
          [{"dataset": "npz", "root": "a.npz"}, {"dataset": "npz", "root": "b.npz"}]]
    for tasks in ok:
        parse_study({**copy.deepcopy(TINY), "splits": [{"name": "mix", "tasks": tasks}]})


@pytest.mark.parametrize("given,ops", [(True, ("crop", "flip")), (False, ()), (["crop"], ("crop",)),
                                       (["flip", "crop"], ("crop", "flip")), ("crop", ("crop",))])
def test_augment_takes_a_list_of_ops_or_a_bool(given, ops):
    s = parse_study({**copy.deepcopy(TINY), "train": {"augment": given}})
    assert s.train.augment == ops
    assert parse_study(yaml.safe_load(dump_study(s))).train.augment == ops


@pytest.mark.parametrize("given,message", [(["rotate"], r"train\.augment\[0\]: Input should be 'crop' or 'flip'"),
                                           (["crop", "crop"], r"train\.augment: Value error, an augmentation is listed twice|train\.augment: an augmentation is listed twice")])
def test_augment_rejects_unknown_or_repeated_ops(given, message):
    with pytest.raises(HarnessError, match=message):
        parse_study({**copy.deepcopy(TINY), "train": {"augment": given}})


def test_a_tasks_split_dumps_exactly_as_before_partition_existed():
    """Trial keys hash ``split.model_dump``: no new keys for explicit ``tasks`` splits."""
    s = parse_study(copy.deepcopy(TINY))
    before = {"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "teachers": None}
    assert s.splits[0].model_dump(mode="json") == before
    assert s.model_dump(mode="json")["splits"] == [before]
    mixed = {"name": "m", "tasks": [[0], {"dataset": "mnist5k", "classes": [1]}], "teachers": [{"arch": "mlp"}]}
    dumped = parse_study({**copy.deepcopy(TINY), "splits": [mixed]}).splits[0].model_dump(mode="json")
    assert list(dumped) == ["name", "tasks", "teachers"] and "partition" not in str(dumped)


def test_a_partition_split_dumps_its_spec_and_round_trips():
    data = {**copy.deepcopy(TINY), "teachers": [{"arch": "mlp", "hidden": 16}],
            "splits": [{"name": "k5", "partition": {"k": 5, "seed": 7, "order": "random", "classes": [3, 1, 2, 0, 4]}}]}
    s = parse_study(data)
    assert s.splits[0].model_dump(mode="json") == {
        "name": "k5", "partition": {"k": 5, "order": "random", "seed": 7, "classes": [0, 1, 2, 3, 4]}, "teachers": None}
    assert s.splits[0].tasks is None and s.splits[0].n_tasks == 5
    assert parse_study(yaml.safe_load(dump_study(s))) == s


def test_partition_keys_follow_the_spec_and_tasks_keys_do_not_move():
    def keys(split: dict) -> dict:
        data = {**copy.deepcopy(TINY), "teachers": [{"arch": "mlp", "hidden": 16}], "splits": [split]}
        return {(t.method, t.seed): t.key for t in expand(parse_study(data), "fp32")}

    k2 = keys({"name": "s", "partition": {"k": 2}})
    assert k2 == keys({"name": "s", "partition": {"k": 2, "order": "contiguous", "seed": 0}})  # defaults spelt out
    for other in ({"k": 5}, {"k": 2, "order": "random"}, {"k": 2, "classes": list(range(8))}):
        moved = keys({"name": "s", "partition": other})
        assert all(moved[t] != k2[t] for t in k2), other
    r0, r1 = keys({"name": "s", "partition": {"k": 2, "order": "random"}}), keys(
        {"name": "s", "partition": {"k": 2, "order": "random", "seed": 1}})
    assert all(r0[t] != r1[t] for t in r0)


DIGITS_PARTITIONS = """
name: digits-k
dataset: {name: digits, val_fraction: 0.1}
splits:
  - {name: k3, partition: {k: 3}}
  - {name: k5r, partition: {k: 5, seed: 0, order: random}}
  - name: half-k2
    partition: {k: 2, classes: [0, 1, 2, 3, 4]}
    teachers: [{arch: mlp, hidden: 16}, {arch: cnn, width: 8}]
teachers: [{arch: cnn, width: 8, epochs: 1}]
student: {arch: cnn, width: 8}
methods: {kd: {}, teachers: {}}
"""


def test_digits_study_with_partition_splits_parses_and_builds(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text(DIGITS_PARTITIONS)
    study = load_study(path)
    assert [s.n_tasks for s in study.splits] == [3, 5, 2]
    assert [len(study.teachers_for(s)) for s in study.splits] == [3, 5, 2]
    assert [t.arch for t in study.teachers_for(study.splits[2])] == ["mlp", "cnn"]
    trials = expand(study)
    assert len({t.key for t in trials}) == len(trials) == 3 * 2
    built = build_splits(study)
    assert [list(t.classes) for t in built["k3"].tasks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    k5 = [list(t.classes) for t in built["k5r"].tasks]
    assert len(k5) == 5 and all(len(t) == 2 for t in k5) and sorted(sum(k5, [])) == list(range(10))
    assert k5 != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [list(t.classes) for t in built["half-k2"].tasks] == [[0, 1, 2], [3, 4]]
    assert built["half-k2"].num_classes == 5 and set(built["half-k2"].parts["test"].y.tolist()) == set(range(5))


def test_impossible_partition_k_is_one_line(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text(DIGITS_PARTITIONS.replace("{k: 5, seed: 0, order: random}", "{k: 11}"))
    study = load_study(path)
    with pytest.raises(HarnessError) as e:
        build_splits(study)
    assert str(e.value) == (
        "splits[1].partition.k: 11 tasks from the 10 classes of data set 'digits' (k must be at most the number of classes)"
    )


# ---------------------------------------------------------------- the slurm: block (--backend slurm)


def test_slurm_block_parses_dumps_and_command_line_wins():
    from harness.config import slurm_config

    s = parse_study({**copy.deepcopy(TINY), "slurm": {"partition": "gpu", "gpus_per_task": 1, "mem_gb": 16,
                                                      "setup": ["module load cuda"], "extra": {"qos": "high"}}})
    assert s.slurm.partition == "gpu" and s.slurm.cpus_per_task == 1 and s.slurm.time_min == 60
    assert parse_study(yaml.safe_load(dump_study(s))) == s
    assert "slurm" not in yaml.safe_load(dump_study(parse_study(copy.deepcopy(TINY))))  # no block: dumps as before
    cfg = slurm_config(s, {"partition": "a100", "time_min": 30, "extra": {"account": "lab", "qos": "low"}})
    assert (cfg.partition, cfg.time_min, cfg.gpus_per_task, cfg.mem_gb) == ("a100", 30, 1, 16.0)
    assert cfg.extra == {"qos": "low", "account": "lab"} and cfg.setup == ["module load cuda"]
    assert slurm_config(parse_study(copy.deepcopy(TINY))).array_parallelism == 64  # no block: the defaults
    assert expand(s) == expand(parse_study(copy.deepcopy(TINY)))  # never part of a trial key


@pytest.mark.parametrize("block, expected", [
    ({"mem_gb": 0}, "slurm.mem_gb: Input should be greater than 0"),
    ({"cpus_per_task": 0}, "slurm.cpus_per_task: Input should be greater than or equal to 1"),
    ({"gpus": 1}, "slurm.gpus: unknown field"),
    ({"partition": "gpu a100"}, "slurm.partition: 'gpu a100' is not a partition name"),
    ({"setup": ["module load x\nrm -rf /"]}, "slurm.setup: line 0 holds a line break"),
    ({"extra": {"job_name": "x"}}, "slurm.extra: job_name: set by the harness itself; remove it"),
    ({"extra": {"time": "10"}}, "slurm.extra: time: give it as slurm.time_min"),
    ({"extra": {"exclusive": False}}, "slurm.extra: exclusive: false is no sbatch option"),
    ({"extra": {"--qos": "x"}}, "slurm.extra: '--qos' is not an sbatch option name"),
])
def test_bad_slurm_block_one_line_naming_the_field(block, expected):
    with pytest.raises(HarnessError) as e:
        parse_study({**copy.deepcopy(TINY), "slurm": block}, "s.yaml")
    assert str(e.value).startswith(f"s.yaml: {expected}") and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, expected", [
    (["--backend", "slurm", "--slurm-mem-gb", "0"], "--slurm-mem-gb: Input should be greater than 0"),
    (["--backend", "slurm", "--slurm-time-min", "0"], "--slurm-time-min: Input should be greater than or equal to 1"),
    (["--backend", "slurm", "--slurm-extra", "qos"], "--slurm-extra: expected KEY=VALUE, got 'qos'"),
    (["--backend", "slurm", "--slurm-extra", "array=0-3"], "--slurm-extra: array: set by the harness itself"),
    (["--slurm-partition", "gpu"], "--slurm-partition needs --backend slurm"),
    (["--detach"], "--detach needs --backend slurm"),
])
def test_bad_slurm_option_exit_2_before_anything_is_created(tmp_path, monkeypatch, capsys, argv, expected):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**copy.deepcopy(TINY), "slurm": {"mem_gb": 4}}))
    capsys.readouterr()
    assert main(["run-study", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"harness: error: {expected}") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no store, no cache, no job folder
