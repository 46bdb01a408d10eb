"""One small study end to end through the CLI, checked against the MLflow schema."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from harness.cli import main
from tests.conftest import isolated_dir, write_study


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    with isolated_dir(tmp):
        study = write_study(tmp / "tiny.yaml", methods={"cka": {}, "kd": {}, "scratch": {}, "teachers": {}},
                            ablations=["align"])
        code = main(["run-study", str(study), "--no-report", "--workers", "1"])
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        exp = client.get_experiment_by_name("tiny")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        yield code, client, runs, study, tmp


def _split():
    from harness.config import parse_study
    from harness.data.splits import build_split
    from tests.conftest import TINY

    study = parse_study(TINY)
    return build_split(study.splits[0], study.dataset)


def _trials(runs):
    return [r for r in runs if r.data.tags.get("harness.kind") == "trial"]


def test_every_trial_finished_with_schema_tags(ran):
    code, _, runs, _, _ = ran
    assert code == 0
    trials = _trials(runs)
    got = sorted((r.data.tags["harness.method"], r.data.tags["harness.variant"], r.data.tags["harness.seed"]) for r in trials)
    expected = sorted([(m, v, s) for m, v in [("cka", "full"), ("cka", "-align"), ("kd", "full"), ("scratch", "full")]
                       for s in ("0", "1")] + [("teachers", "full", "0")])
    assert got == expected
    for r in trials:
        assert r.info.status == "FINISHED"
        t = r.data.tags
        assert t["harness.study"] == "tiny" and t["harness.split"] == "2x5" and len(t["harness.trial_key"]) == 16
        assert t["harness.uses_labels"] == ("true" if t["harness.method"] == "scratch" else "false")
    assert len({r.data.tags["harness.trial_key"] for r in trials}) == len(trials)


def test_params_are_the_flattened_resolved_config(ran):
    _, _, runs, _, _ = ran
    cka = next(r for r in _trials(runs) if r.data.tags["harness.variant"] == "-align")
    p = cka.data.params
    assert p["params.w_align"] == "0.0" and p["params.w_intra"] == "0.1" and p["train.epochs"] == "2"
    assert p["student.arch"] == "cnn" and p["method"] == "cka" and p["seed"] in ("0", "1")


def test_per_epoch_and_final_metrics(ran):
    _, client, runs, _, _ = ran
    cka = next(r for r in _trials(runs) if r.data.tags["harness.method"] == "cka" and r.data.tags["harness.variant"] == "full")
    m = cka.data.metrics
    data = _split()
    n_test, n_train = len(data.parts["test"]), len(data.parts["train"])
    n_task = [int((data.parts["test"].t == k).sum()) for k in (0, 1)]
    # each accuracy is a count over the part it claims to measure (450 test, 1212 train images)
    for key, n in (("test/union_acc", n_test), ("test/union_acc_bestval", n_test), ("test/task_acc/0", n_task[0]),
                   ("test/task_acc/1", n_task[1]), ("diag/pseudo_label_acc", n_train),
                   ("diag/ensemble_union_acc", n_test), ("diag/oracle_pseudo_label_acc", n_train),
                   ("diag/oracle_ensemble_acc", n_test)):
        assert m[key] * n == pytest.approx(round(m[key] * n), abs=1e-3), key
    # the best epoch is the first epoch of the highest validation accuracy, and its value is logged
    val = [h.value for h in sorted(client.get_metric_history(cka.info.run_id, "val/union_acc"), key=lambda h: h.step)]
    assert m["best_epoch"] == 1 + val.index(max(val)) and m["val/union_acc_best"] == max(val)
    if m["best_epoch"] == len(val):  # the best model is the last one: both columns are one number
        assert m["test/union_acc_bestval"] == m["test/union_acc"]
    for key in ("loss/task", "loss/intra", "loss/inter", "loss/align", "loss/total", "val/union_acc",
                "epoch_seconds", "images_per_second"):
        hist = client.get_metric_history(cka.info.run_id, key)
        assert sorted(h.step for h in hist) == [1, 2], key
    abl = next(r for r in _trials(runs) if r.data.tags["harness.variant"] == "-align")
    assert client.get_metric_history(abl.info.run_id, "loss/align") == []
    ref = next(r for r in _trials(runs) if r.data.tags["harness.method"] == "teachers")
    assert ref.data.metrics["test/union_acc"] == pytest.approx(ref.data.metrics["diag/ensemble_union_acc"])


def test_teachers_trained_once_and_logged(ran):
    _, _, runs, _, tmp = ran
    teachers = [r for r in runs if r.data.tags.get("harness.kind") == "teacher"]
    assert sorted(r.data.tags["harness.task"] for r in teachers) == ["0", "1"]
    # each teacher's own-task test accuracy is the one the reference row measures with the cached weights
    ref = next(r for r in _trials(runs) if r.data.tags["harness.method"] == "teachers")
    for r in teachers:
        assert r.data.metrics["test/own_task_acc"] == pytest.approx(ref.data.metrics[f"test/task_acc/{r.data.tags['harness.task']}"])
    files = sorted(p.name for p in (tmp / "cache" / "teachers").glob("*.pt"))
    keys = sorted(r.data.tags["harness.teacher_key"] for r in teachers)
    assert [f for f in files if "-" not in f] == [f"{k}.pt" for k in keys]  # two checkpoints
    assert len([f for f in files if "-routing-" in f]) == 2  # their routing statistics
    assert len([f for f in files if f.startswith("outputs-")]) == 1  # one teacher-output cache per split


def test_every_number_names_the_weights_it_rests_on(ran):
    """Teacher runs and trial runs carry the digest of the teacher weights, which is the one stored
    with the checkpoint and the one its weights hash to."""
    import torch

    from harness.teachers import state_digest

    _, _, runs, _, tmp = ran
    teachers = sorted((r for r in runs if r.data.tags.get("harness.kind") == "teacher"),
                      key=lambda r: int(r.data.tags["harness.task"]))
    digests = [r.data.tags["harness.teacher_digest"] for r in teachers]
    for r, digest in zip(teachers, digests):
        blob = torch.load(tmp / "cache" / "teachers" / f"{r.data.tags['harness.teacher_key']}.pt", weights_only=True)
        assert blob["meta"]["digest"] == digest == state_digest(blob["state_dict"])
        assert r.data.tags["harness.teacher_seed"] == "0"
    assert len(set(digests)) == 2
    for r in _trials(runs):
        assert r.data.tags["harness.teacher_digests"] == ",".join(digests)
        assert r.data.tags["harness.teacher_keys"] == ",".join(t.data.tags["harness.teacher_key"] for t in teachers)


def test_rerun_skips_finished_trials(ran):
    _, client, runs, study, _ = ran
    assert main(["run-study", str(study), "--no-report", "--workers", "1"]) == 0
    exp = client.get_experiment_by_name("tiny")
    again = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'trial'", max_results=1000)
    assert len(again) == len(_trials(runs))
