"""One trial in this process: the seed decides the student's initialisation and the batch order,
and nothing else does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.config import parse_study
from harness.grid import expand
from harness.methods.base import Batch, Method, register
from harness.tracking import Tracker
from harness.trial import run_trial

from tests.conftest import TINY

#: what each trial of ``test_seed_probe`` saw: (seed, initial student state, ids of its batches)
SEEN: list[tuple[int, dict[str, torch.Tensor], list[torch.Tensor]]] = []
STORE: dict = {}


@register("test_seed_probe")
class SeedProbe(Method):
    description = "test: records the student's initial weights and the batch order"
    terms = {"kd": None}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.initial = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        self.ids: list[torch.Tensor] = []
        SEEN.append((-1, self.initial, self.ids))

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.ids.append(batch.index.clone())
        z = self.student(batch.x)
        return {"kd": torch.nn.functional.kl_div(
            z.log_softmax(1), torch.cat(batch.teacher_logits, 1).softmax(1), reduction="batchmean")}


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list]:
    from tests.conftest import isolated_dir

    tmp: Path = tmp_path_factory.mktemp("seeds")
    with isolated_dir(tmp):
        study = parse_study({**TINY, "methods": {"test_seed_probe": {}}, "seeds": [0, 1],
                             "train": {"epochs": 1, "batch_size": 256}})
        trials = {t.seed: t for t in expand(study)}
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
        exp = tracker.experiment(study.name)
        STORE.update(tracker=tracker, experiment=exp)
        out: dict[int, list] = {}
        for seed in (0, 1, 0):
            SEEN.clear()
            final = run_trial(study, trials[seed], tracker, exp)
            out.setdefault(seed, []).append((SEEN[0][1], SEEN[0][2], final))
        return out


def test_the_same_seed_gives_the_same_initialisation_batches_and_numbers(probes: dict[int, list]) -> None:
    (init_a, ids_a, final_a), (init_b, ids_b, final_b) = probes[0]
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    assert len(ids_a) == len(ids_b) > 1 and all(torch.equal(a, b) for a, b in zip(ids_a, ids_b))
    assert final_a["test/union_acc"] == final_b["test/union_acc"]


def test_another_seed_gives_another_initialisation_and_batch_order(probes: dict[int, list]) -> None:
    (init_0, ids_0, _), = probes[0][:1]
    (init_1, ids_1, _), = probes[1]
    weights = [k for k in init_0 if init_0[k].is_floating_point() and init_0[k].numel() > 1 and init_0[k].std() > 0]
    assert weights and all(not torch.equal(init_0[k], init_1[k]) for k in weights)
    assert not torch.equal(ids_0[0], ids_1[0])
    # an epoch visits each image at most once (the last partial batch is dropped), in another order
    for ids in (ids_0, ids_1):
        flat = torch.cat(ids).tolist()
        assert len(set(flat)) == len(flat)


def test_a_trial_keyed_for_another_precision_fails_before_training(isolated: Path) -> None:
    import dataclasses

    from harness.trial import PrecisionMismatch

    study = parse_study({**TINY, "methods": {"kd": {}}, "seeds": [0]})
    (trial,) = expand(study)
    assert trial.precision == "fp32"  # no GPU: fp32 whatever train.amp says
    tracker = Tracker(f"sqlite:///{isolated}/mlflow.db")
    exp = tracker.experiment(study.name)
    bf16 = dataclasses.replace(trial, precision="bf16")
    with pytest.raises(PrecisionMismatch, match="key is for bf16, but on cpu the trial would train in fp32"):
        run_trial(study, bf16, tracker, exp)
    (run,) = tracker.find(exp, {"harness.kind": "trial"}, ("FAILED",))
    assert "PrecisionMismatch" in run.data.tags["harness.failure"]
    assert not (isolated / "cache").exists()  # failed before any teacher was trained
    assert run.data.params["precision"] == "bf16"


def test_the_trial_run_records_its_precision_and_results_version(probes: dict[int, list]) -> None:
    from harness.keys import RESULTS_VERSION

    tracker, exp = STORE["tracker"], STORE["experiment"]
    runs = tracker.find(exp, {"harness.kind": "trial"}, ("FINISHED",))
    assert len(runs) == 2  # seeds 0 and 1 (the second run of seed 0 ended KILLED as a duplicate)
    for run in runs:
        assert run.data.tags["harness.precision"] == "fp32"
        assert run.data.params["precision"] == "fp32"
        assert run.data.params["results_version"] == str(RESULTS_VERSION)


def test_a_method_records_what_really_ran_as_run_tags(isolated: Path) -> None:
    """TINY's teacher 1 is an MLP (no conv feature map): cfl's default `maps` falls back to the
    pooled form, and the trial run says so (``Method.run_tags``)."""
    study = parse_study({**TINY, "methods": {"cfl": {}}, "seeds": [0], "train": {"epochs": 1, "batch_size": 256}})
    (trial,) = expand(study)
    tracker = Tracker(f"sqlite:///{isolated}/mlflow.db")
    exp = tracker.experiment(study.name)
    with pytest.warns(UserWarning, match="methods.cfl.space"):
        run_trial(study, trial, tracker, exp)
    (run,) = tracker.find(exp, {"harness.kind": "trial"}, ("FINISHED",))
    assert run.data.tags["harness.cfl_space"] == "pooled (fallback: teacher 1 (MLP) has no conv feature map)"


def test_teacher_runs_log_own_task_names_under_a_stage_made_once_per_invocation(probes: dict[int, list]) -> None:
    from harness.teachers import TeacherRecord
    from harness.trial import TeacherStage, log_teacher, teacher_metrics

    history = [{"val/union_acc": 0.5, "val/task_acc/0": 0.5, "loss/ce": 1.0},
               {"val/union_acc": 0.7, "val/task_acc/0": 0.7, "loss/ce": 0.5}]
    metrics = {"test/union_acc_best": 0.9, "test/union_acc": 0.8, "val/union_acc_best": 0.7, "best_epoch": 2.0}
    spec = {"teacher": {"arch": "mlp", "hidden": None}}
    rec = TeacherRecord(1, "tk", spec, None, False, metrics, history, digest="d1", seed=0)  # type: ignore[arg-type]
    per_epoch, final = teacher_metrics(rec)
    assert per_epoch == [{"val/own_task_acc": 0.5, "loss/ce": 1.0}, {"val/own_task_acc": 0.7, "loss/ce": 0.5}]
    assert final == {"test/own_task_acc": 0.9, "test/own_task_acc_last": 0.8, "val/own_task_acc_best": 0.7,
                     "best_epoch": 2.0}
    tracker, exp = STORE["tracker"], STORE["experiment"]
    study_run = tracker.start(exp, "study", {"harness.kind": "study"})
    first = TeacherStage(tracker, exp, study_run, {})
    log_teacher(tracker, exp, "tiny", "2x5", rec, first)
    log_teacher(tracker, exp, "tiny", "2x5", rec, first)  # logged already: skipped
    first.finish()
    second = TeacherStage(tracker, exp, study_run, {})  # a resumed study: nothing new to log, no stage run
    log_teacher(tracker, exp, "tiny", "2x5", rec, second)
    second.finish()
    assert second.run_id is None and first.run_id is not None
    (run,) = tracker.find(exp, {"harness.teacher_key": "tk"})
    assert run.info.run_name == "teacher 1 · 2x5" and run.data.tags["mlflow.parentRunId"] == first.run_id
    assert run.data.params["teacher.hidden"] == "null" and run.data.tags["harness.run"] == "2x5/teacher1"
    assert set(run.data.metrics) == {"val/own_task_acc", "loss/ce", *final}
    stage = tracker.run(first.run_id)
    assert stage.info.status == "FINISHED" and stage.info.run_name == "teacher training"
    assert stage.data.tags["harness.kind"] == "teacher_stage" and stage.data.tags["mlflow.parentRunId"] == study_run


def test_the_default_variant_of_a_routing_study_is_named_by_its_rule() -> None:
    from harness.trial import default_routing

    study = parse_study({**TINY, "methods": {"kd": {}, "scratch": {}}, "routing": ["confidence/none/routed"]})
    got = {(t.method, t.variant): default_routing(study, t) for t in expand(study) if t.seed == 0}
    assert got == {("kd", "full"): "confidence/none/concat", ("kd", "confidence/none/routed"): None,
                   ("scratch", "full"): None}
    plain = parse_study({**TINY, "methods": {"kd": {}}})
    assert {default_routing(plain, t) for t in expand(plain)} == {None}  # no routing axis: just ``kd``
