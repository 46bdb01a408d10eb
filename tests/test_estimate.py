"""``harness run-study --estimate``: the arithmetic with injected numbers (hand-computed), one
calibration per distinct combination (a real calibration on digits), and the command itself
(table, total line, exit 0, nothing written; a bad study file is one line, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import parse_study
from harness.estimate import (
    Overheads, Rate, TeacherWork, TrialWork, calibrate, describe_work, format_duration, images_per_epoch, load_splits,
    lpt, plan, render, shared_makespan, teacher_seconds, trial_seconds,
)
from harness.grid import expand

pytestmark = pytest.mark.usefixtures("one_thread")


def _teacher(split: str = "a", cached: bool = False, **kw: int) -> TeacherWork:
    n = {"epochs": 2, "train_images": 100, "val_images": 10, "test_images": 20, "own_images": 110,
         "pool_images": 200, **kw}
    return TeacherWork(split, 0, f"key-{split}-{cached}", "T", cached=cached, **n)


def _trial(split: str = "a", combo: str = "S", trains: bool = True) -> TrialWork:
    return TrialWork(split, f"{split}/{combo}", combo, trains, epochs=3, train_images=200, val_images=10,
                     test_images=20, diag_images=220)


RATES = {"T": Rate(train=0.01, eval=0.001, extra=0.002),
         "S": Rate(train=0.002, eval=0.001, extra=0.0005, fixed=0.1),
         "R": Rate(eval=0.002, extra=0.0005, fixed=0.1)}


def test_images_per_epoch_drops_the_last_partial_batch():
    assert images_per_epoch(1212, 128) == 1152  # 9 full batches
    assert images_per_epoch(1280, 128) == 1280
    assert images_per_epoch(100, 128) == 100  # less than one batch: one batch of all


def test_teacher_seconds_by_hand_and_cached_teachers_cost_nothing():
    o = Overheads(op=0.05)
    # 2 epochs x (100 x 0.01 + 10 x 0.001) + 2 x 20 x 0.001 + 110 x 0.002 + 200 x 0.001 + (2 + 4) x 0.05
    assert teacher_seconds(_teacher(), RATES["T"], o) == pytest.approx(2.02 + 0.04 + 0.22 + 0.2 + 0.3)
    assert teacher_seconds(_teacher(cached=True), RATES["T"], o) == 0.0


def test_trial_seconds_by_hand():
    o = Overheads(per_trial=0.2)
    # 3 epochs x (200 x 0.002 + 10 x 0.001) + 2 x 20 x 0.001 + 220 x 0.0005 + 0.1 + 0.2
    assert trial_seconds(_trial(), RATES["S"], o) == pytest.approx(1.23 + 0.04 + 0.11 + 0.3)
    # an evaluating method: one test pass, no epochs
    assert trial_seconds(_trial(combo="R", trains=False), RATES["R"], o) == pytest.approx(0.04 + 0.11 + 0.3)


def test_lpt_longest_first_onto_the_least_loaded_slot():
    makespan, packed = lpt([3, 5, 2, 4, 1], 2)
    # 5 -> s0; 4 -> s1; 3 -> s1 (4 < 5); 2 -> s0 (5 < 7); 1 -> s0 (7 = 7: the lowest slot)
    assert packed == [[1, 2, 4], [3, 0]] and makespan == 8
    assert lpt([2, 2, 2], 5) == (2, [[0], [1], [2], [], []])
    assert lpt([], 3)[0] == 0


def test_shared_makespan_slows_slots_while_they_share_the_machine():
    assert shared_makespan([5, 3], Overheads().slowdown) == 5  # no contention: the longest
    two = Overheads(contention=2.0, contention_procs=2)
    assert shared_makespan([5, 3], two.slowdown) == 3 * 2 + 2 * 1  # both busy twice as slow, then one alone
    three = Overheads(contention=3.0, contention_procs=3)
    assert [three.slowdown(k) for k in (1, 2, 3)] == [1.0, 2.0, 3.0]  # linear between 1 and 3 processes
    assert shared_makespan([1, 2, 4], three.slowdown) == 1 * 3 + 1 * 2 + 2 * 1


def test_plan_rows_totals_and_wall_by_hand():
    teachers = [_teacher("a"), _teacher("a", cached=True), _teacher("b", epochs=1)]
    trials = [_trial("a"), _trial("a"), _trial("a", "R", trains=False), _trial("b")]
    o = Overheads(startup=5.0, pool_start=1.0, worker_setup=0.5, per_trial=0.2, op=0.05)
    est = plan(teachers, trials, RATES, o, slots=2)
    t_a, t_b = 2.78, 1 * 1.01 + 0.04 + 0.22 + 0.2 + 5 * 0.05  # teacher b: one epoch
    s, r = 1.68, 0.45  # a training trial, the evaluating one
    assert [row.split for row in est.rows] == ["a", "b"]
    a, b = est.rows
    assert (a.teachers, a.teachers_cached, a.trials) == (2, 1, 3) and (b.teachers, b.trials) == (1, 1)
    assert a.teacher_seconds == pytest.approx(t_a) and b.teacher_seconds == pytest.approx(t_b)
    assert a.trial_seconds == pytest.approx(2 * s + r) and b.trial_seconds == pytest.approx(s)
    assert a.device_hours == pytest.approx((t_a + 2 * s + r) / 3600)
    assert est.device_hours == pytest.approx((t_a + t_b + 3 * s + r) / 3600)
    assert est.teacher_stage_seconds == pytest.approx(t_a + t_b)
    # LPT of [1.68, 1.68, 0.45, 1.68] on 2 slots: 1.68 | 1.68, then 1.68 -> s0, 0.45 -> s1
    assert est.makespan_seconds == pytest.approx(2 * s)
    # start-up + max(teachers, pool start) + first worker's set-up + makespan
    assert est.wall_seconds == pytest.approx(5.0 + (t_a + t_b) + 0.5 + 2 * s)
    packed = plan(teachers, trials, RATES, o, slots=2, packing=4)  # 4 trials share a GPU
    assert packed.rows[0].device_hours == pytest.approx((t_a + (2 * s + r) / 4) / 3600)
    # the forkserver's imports outlast the teachers, both slowed down while they overlap
    slow = Overheads(startup=5.0, pool_start=10.0, worker_setup=0.5, per_trial=0.2, op=0.05, contention=2.0,
                     contention_procs=2)
    est = plan(teachers, trials, RATES, slow, slots=2)
    loads = sorted([2 * s, s + r])  # s0: two training trials; s1: one and the evaluating one
    stage = t_a + t_b
    assert est.wall_seconds == pytest.approx(5.0 + 2 * stage + (10.0 - stage) + 0.5
                                             + 2 * loads[0] + (loads[1] - loads[0]))
    lines = render(est)
    assert "| a | " in lines[4] and lines[-3].startswith("total: ") and "estimated on cpu" in lines[-2]


def test_format_duration():
    assert [format_duration(s) for s in (42, 250, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "42s", "4m 10s", "3h 05m", "2d 04h"]


STUDY = {
    "name": "est",
    "dataset": {"name": "digits", "val_fraction": 0.1},
    "splits": [{"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}],
    "teachers": [{"arch": "cnn", "width": 4, "epochs": 1}],
    "student": {"arch": "cnn", "width": 4},
    "train": {"epochs": 2, "batch_size": 64},
    "methods": {"kd": {}, "cka": {}},
    "ablations": ["intra"],
    "variants": {"kd": {"t4": {"T": 4.0}}},
    "seeds": [0, 1, 2],
    "devices": "cpu",
}


def test_each_combination_is_calibrated_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = parse_study({**STUDY, "cache_dir": str(tmp_path / "cache")})
    trials = expand(study)
    assert len(trials) == 12  # 2 methods x 2 variants x 3 seeds
    data = load_splits(study)
    cal = calibrate(study, data, trials, "cpu", threads=1, budget=0.2)
    # one teacher architecture (both tasks), one student per method: 3, not 2 + 12
    assert len(cal.runs) == len(set(cal.runs)) == 3
    assert sorted(r.split()[0] for r in cal.runs) == ["cka", "kd", "teacher"]
    for combo, rate in cal.rates.items():
        assert rate.train > 0 and rate.eval > 0 and rate.extra > 0, combo
        assert (rate.fixed > 0) == (not combo.startswith("teacher")), combo
    teachers, works = describe_work(study, data, trials, "cpu")
    n_pool = len(data["2x5"].parts["train"])
    assert [(t.task, t.cached, t.combo in cal.rates) for t in teachers] == [(0, False, True), (1, False, True)]
    assert len(works) == 12 and {w.combo for w in works} <= set(cal.rates)
    assert {w.train_images for w in works} == {images_per_epoch(n_pool, 64)}
    assert sum(t.train_images for t in teachers) <= n_pool
    assert list(tmp_path.iterdir()) == []  # no cache entry, no store: calibration networks are thrown away


@pytest.mark.slow  # the whole command, with its fixed-cost probes: ~15 s on a loaded 2-core machine
def test_cli_estimate_prints_the_table_and_writes_nothing(isolated, capsys):
    path = isolated / "est.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "methods": {"kd": {}, "teachers": {}}, "ablations": [],
                                    "variants": {}, "seeds": [0], "devices": "cpu"}))
    assert main(["run-study", str(path), "--estimate", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "| split | teachers (h) | trials (n) | trials (h) | device-hours |" in lines
    row = next(ln for ln in lines if ln.startswith("| 2x5 |"))
    assert row.split("|")[3].strip() == "2"  # kd and the teachers' reference row
    assert float(row.split("|")[2]) > 0 and float(row.split("|")[4]) > 0
    total = next(ln for ln in lines if ln.startswith("total: "))
    assert "device-hours; estimated wall time" in total and "on 1 slot)" in total
    assert "estimated on cpu: a GPU run will differ" in lines
    assert sorted(p.name for p in Path(isolated).iterdir()) == ["est.yaml"]  # no mlflow.db, cache, mlruns


def test_cli_estimate_bad_study_is_one_line_exit_2(isolated, capsys):
    path = isolated / "bad.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "train": {"lr": -1}}))
    assert main(["run-study", str(path), "--estimate"]) == 2
    err = capsys.readouterr().err
    assert err == f"harness: error: {path}: train.lr: Input should be greater than 0\n"
    assert main(["run-study", str(path), "--estimate", "--dry-run"]) == 2
    assert capsys.readouterr().err == "harness: error: --estimate and --dry-run: give one of them\n"
    missing = isolated / "cifar.yaml"
    missing.write_text(yaml.safe_dump({**STUDY, "dataset": {"name": "cifar100", "root": str(isolated / "data"),
                                                            "download": True}}))
    assert main(["run-study", str(missing), "--estimate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dataset.root: {isolated / 'data'} does not exist" in err
    assert "--estimate does not download" in err
    assert sorted(p.name for p in Path(isolated).iterdir()) == ["bad.yaml", "cifar.yaml"]
