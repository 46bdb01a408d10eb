"""Transfer sets (``splits[i].transfer``): the label-free student's pool is another data set.

Digits teachers with an MNIST-5k pool resized to 8x8 and the reverse (MNIST-5k teachers, a digits
pool upsampled to 28x28): the pool's size, shape and missing labels; the teachers' outputs on it
and the ``rmd`` background fitted on them; the teachers' own statistics unchanged; which batches
a label-free method and a labelled one train on; trial keys; bad input; one study end to end.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from harness import losses
from harness.cli import main
from harness.config import DatasetConfig, SplitConfig, TeacherConfig, TransferConfig, dump_study, parse_study
from harness.data.datasets import load_dataset
from harness.data.splits import POOL_SEED, attach_pool, build_split, load_pool
from harness.errors import HarnessError
from harness.grid import expand
from harness.methods.base import Batch, Method, TeacherSet, register
from harness.routing import SCORES, fit_background
from harness.teachers import cached_outputs, get_teachers, outputs_path
from harness.tracking import Tracker
from harness.train import opaque_ids, teacher_outputs
from harness.trial import run_trial
from tests.conftest import TINY, isolated_dir

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS, MNIST = DatasetConfig(name="digits"), DatasetConfig(name="mnist5k")
TASKS = [[0, 1, 2], [3, 4]]
MLP = TeacherConfig(arch="mlp", hidden=16, epochs=1, batch_size=64, lr=0.01)
#: training-part sizes (val_fraction 0.1 held out): digits 1,347 -> 1,212; MNIST-5k 4,000 -> 3,600
N_TRAIN = {"digits": 1212, "mnist5k": 3600}


def _split(tasks=TASKS, **transfer) -> SplitConfig:
    return SplitConfig(name="s", tasks=tasks, **({"transfer": transfer} if transfer else {}))


def _rows(x: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in x.contiguous()]


# ----------------------------------------------------------------------------- the pool


@pytest.mark.parametrize("dataset,transfer,fraction,shape", [
    (DIGITS, "mnist5k", 0.1, (1, 8, 8)),     # 28x28 -> 8x8
    (MNIST, "digits", 0.5, (1, 28, 28)),     # 8x8 -> 28x28
])
def test_the_pool_is_a_fixed_unlabelled_fraction_of_the_transfer_training_part(dataset, transfer, fraction, shape):
    plain = build_split(_split(), dataset)
    data = build_split(_split(dataset=transfer, fraction=fraction), dataset)
    assert plain.pool is None and plain.pool_part is plain.parts["train"] and plain.pool_label == "train"
    assert data.pool_label == f"transfer:{transfer}:{fraction:g}" and data.in_shape == plain.in_shape == shape
    pool = data.pool_part
    assert pool is data.pool and len(pool) == round(fraction * N_TRAIN[transfer]) and pool.x.shape[1:] == shape
    assert (pool.y == -1).all() and (pool.t == -1).all()  # nothing downstream can read a label
    for part in ("train", "val", "test"):  # the split's own parts are untouched
        assert torch.equal(data.parts[part].x, plain.parts[part].x)
        assert torch.equal(data.parts[part].y, plain.parts[part].y)
    # the whole training part, resized like dataset.image_size does, in the data set's order ...
    whole = load_pool(TransferConfig(dataset=transfer), dataset, shape)
    resized = load_dataset(transfer, image_size=shape[-1]).x_train
    assert len(whole) == N_TRAIN[transfer] and set(_rows(whole.x)) <= set(_rows(resized))  # val held out
    # ... of which the fraction is the fixed seeded subset: no label decides it
    idx = np.sort(np.random.default_rng(POOL_SEED).permutation(len(whole))[: len(pool)])
    assert POOL_SEED == 0 and torch.equal(pool.x, whole.x[torch.from_numpy(idx)])
    assert torch.equal(build_split(_split(dataset=transfer, fraction=fraction), dataset).pool.x, pool.x)


def test_classes_restrict_the_transfer_set_before_the_fraction():
    full = load_pool(TransferConfig(dataset="mnist5k"), DIGITS, (1, 8, 8))
    some = load_pool(TransferConfig(dataset="mnist5k", classes=[7, 3]), DIGITS, (1, 8, 8))
    half = load_pool(TransferConfig(dataset="mnist5k", classes=[3, 7], fraction=0.5), DIGITS, (1, 8, 8))
    ref = load_dataset("mnist5k")
    share = float(((ref.y_train == 3) | (ref.y_train == 7)).float().mean())
    assert abs(len(some) / len(full) - share) < 0.02 and len(half) == round(0.5 * len(some))
    assert set(_rows(half.x)) <= set(_rows(some.x)) and (some.y == -1).all()


def _write_npz(path: Path, x_train: np.ndarray, n_classes: int = 4) -> Path:
    n = len(x_train)
    np.savez(path, x_train=x_train, y_train=np.arange(n) % n_classes, x_test=x_train[:8],
             y_test=np.arange(8) % n_classes)
    return path


def test_channels_are_converted_one_to_three_by_repetition_and_three_to_one_by_the_mean(tmp_path):
    rgb = _write_npz(tmp_path / "rgb.npz", np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    grey = load_pool(TransferConfig(dataset="npz", root=str(rgb)), DIGITS, (1, 8, 8))
    colour = load_pool(TransferConfig(dataset="npz", root=str(rgb)), DIGITS, (3, 8, 8))
    assert grey.x.shape == (36, 1, 8, 8) and colour.x.shape == (36, 3, 8, 8)
    assert torch.allclose(grey.x, colour.x.mean(1, keepdim=True))
    rgb_study = DatasetConfig(name="npz", root=str(rgb))
    data = build_split(SplitConfig(name="rgb", tasks=[[0, 1], [2, 3]], transfer={"dataset": "digits"}), rgb_study)
    one = load_pool(TransferConfig(dataset="digits"), DIGITS, (1, 8, 8))
    assert data.pool.x.shape == (N_TRAIN["digits"], 3, 8, 8)
    assert all(torch.equal(data.pool.x[:, c], one.x[:, 0]) for c in range(3))
    two = _write_npz(tmp_path / "two.npz", np.zeros((40, 2, 8, 8), dtype=np.uint8))
    with pytest.raises(HarnessError, match=r"^splits\[3\]\.transfer\.dataset: 'npz' has 2-channel images but the "
                                           r"split's have 1 \(only 1 -> 3 and 3 -> 1 channels are converted\)$"):
        load_pool(TransferConfig(dataset="npz", root=str(two)), DIGITS, (1, 8, 8), "splits[3]")


def test_the_pool_comes_back_when_a_copy_of_the_split_dropped_it():
    cfg = _split(dataset="mnist5k", fraction=0.1)
    data = build_split(cfg, DIGITS)
    bare = type(data)(data.name, data.tasks, data.parts)  # e.g. tuning's copy without the test part
    again = attach_pool(bare, cfg, DIGITS)
    assert again.transfer == cfg.transfer and torch.equal(again.pool.x, data.pool.x)
    assert attach_pool(data, cfg, DIGITS) is data and attach_pool(bare, _split(), DIGITS) is bare


def test_a_label_free_student_trains_on_the_pool_a_labelled_one_on_the_training_part():
    data = build_split(_split(dataset="mnist5k", fraction=0.1), DIGITS)
    free, labelled = data.student_view(False), data.student_view(True)
    assert free.parts["train"] is data.pool and labelled is data
    assert all(free.parts[p] is data.parts[p] for p in ("val", "test")) and free.in_shape == data.in_shape


# ----------------------------------------------------------------------------- teachers


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    """Digits and MNIST-5k teachers with and without a transfer set, in one cache."""
    cache = str(tmp_path_factory.mktemp("transfer-cache"))
    out = {}
    for name, dataset, tasks, transfer in (
        ("digits", DIGITS, TASKS, {"dataset": "mnist5k", "fraction": 0.1}),
        ("mnist5k", MNIST, [[0, 1], [2, 3]], {"dataset": "digits", "fraction": 0.5}),
    ):
        plain, data = build_split(_split(tasks), dataset), build_split(_split(tasks, **transfer), dataset)
        out[name] = (cache, plain, get_teachers(plain, dataset, [MLP, MLP], cache),
                     data, get_teachers(data, dataset, [MLP, MLP], cache))
        out[name + "/other"] = build_split(_split(tasks, **{**transfer, "fraction": 0.2}), dataset)
    return out


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_cached_outputs_are_the_teachers_outputs_on_the_pool(teachers, name):
    cache, plain, plain_recs, data, recs = teachers[name]
    assert all(r.cached for r in recs) and [r.key for r in recs] == [r.key for r in plain_recs]  # same teachers
    logits, feats = cached_outputs(recs, data, cache)
    direct = teacher_outputs(TeacherSet([r.net for r in recs]), data.pool.x)
    assert all(len(z) == len(data.pool) for z in logits)
    assert all(torch.allclose(a, b) for a, b in zip(logits + feats, direct[0] + direct[1]))
    # the key names the transfer set; the labelled training part's outputs are the plain split's file
    assert outputs_path(recs, data, cache) != outputs_path(plain_recs, plain, cache)
    assert outputs_path(recs, data, cache, "train") == outputs_path(plain_recs, plain, cache)
    train_logits, _ = cached_outputs(recs, data, cache, "train")
    assert len(train_logits[0]) == len(data.parts["train"])
    assert outputs_path(recs, teachers[name + "/other"], cache) != outputs_path(recs, data, cache)  # fraction 0.2


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_the_rmd_background_is_fitted_on_the_pool_and_own_statistics_are_unchanged(teachers, name):
    cache, plain, plain_recs, data, recs = teachers[name]
    _, feats = cached_outputs(recs, data, cache)
    keep = [i for i, s in enumerate(SCORES) if s != "rmd"]  # rmd's standardisation reads the background
    for rec, own, f in zip(recs, plain_recs, feats):
        mu, prec = fit_background(f)
        assert torch.allclose(rec.stats.bg_mean, mu) and torch.allclose(rec.stats.bg_precision, prec)
        assert not torch.allclose(rec.stats.bg_mean, own.stats.bg_mean)  # not the training images'
        for t in ("means", "precision", "bank"):
            assert torch.equal(getattr(rec.stats, t), getattr(own.stats, t)), t
        for t in ("z_mean", "z_std", "val_sorted"):
            assert torch.equal(getattr(rec.stats, t)[keep], getattr(own.stats, t)[keep]), t


# ----------------------------------------------------------------------------- trials


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One folder, MLflow store and teacher cache for this module's trials."""
    tmp = tmp_path_factory.mktemp("transfer-trials")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with isolated_dir(tmp):
        Tracker(uri)  # creates the store's tables once
    return {"dir": tmp, "uri": uri}


@pytest.fixture(scope="module")
def study_run(store) -> dict:
    """A tiny study with a transfer set (digits teachers, 5% of MNIST-5k) through ``run_study``."""
    from mlflow.tracking import MlflowClient

    from harness.runner import run_study
    from tests.conftest import write_study

    tmp, uri = store["dir"], store["uri"]
    with isolated_dir(tmp):
        split = {"name": "2x5-mnist", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
                 "transfer": {"dataset": "mnist5k", "fraction": 0.05}}
        path = write_study(tmp / "ood.yaml", name="ood", splits=[split], methods={"kd": {}, "scratch": {}},
                           teachers=[{"arch": "mlp", "hidden": 16, "epochs": 1}],
                           seeds=[0], train={"epochs": 1, "batch_size": 64})
        code = run_study(path, uri, workers=1, report=False, live=False)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ood")
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("harness.kind") == "trial"]
        yield {"code": code, "runs": {r.data.tags["harness.method"]: r for r in runs}}


#: what the spies saw: method -> list of (x, ids, teacher logits, y) per batch, and predicted inputs
SEEN: dict[str, dict[str, list]] = {}


class _Spy(Method):
    terms = {"loss": None}
    spy = ""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        SEEN[self.spy] = {"batches": [], "predicted": []}

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        SEEN[self.spy]["batches"].append((batch.x.clone(), batch.index.clone(),
                                          [t.clone() for t in batch.teacher_logits], batch.y))
        z = self.student(batch.x)
        if batch.y is not None:
            return {"loss": F.cross_entropy(z, batch.y)}
        return {"loss": losses.soft_target_kl(torch.cat(batch.teacher_logits, 1), z, 1.0)}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        SEEN[self.spy]["predicted"].append(x.clone())
        return super().predict(x)


@register("test_pool_spy")
class PoolSpy(_Spy):
    description = "test: label-free, records its batches"
    spy = "test_pool_spy"


@register("test_pool_spy_labels")
class LabelledSpy(_Spy):
    description = "test: uses labels, records its batches"
    spy = "test_pool_spy_labels"
    uses_labels = True


@pytest.fixture(scope="module")
def spied(store) -> dict:
    """The spies' trials, run here in this process."""
    with isolated_dir(store["dir"]):
        study = parse_study({**TINY, "splits": [{"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]],
                                                 "transfer": {"dataset": "mnist5k", "fraction": 0.1}}],
                             "teachers": [MLP.model_dump()],
                             "methods": {"test_pool_spy": {}, "test_pool_spy_labels": {}},
                             "seeds": [0], "train": {"epochs": 1, "batch_size": 64}})
        tracker = Tracker(store["uri"])
        exp = tracker.experiment(study.name)
        finals = {t.method: run_trial(study, t, tracker, exp) for t in expand(study)}
        data = build_split(study.splits[0], study.dataset)
        recs = get_teachers(data, study.dataset, study.teachers_for(study.splits[0]), study.cache_dir)
        yield {"data": data, "finals": finals, "pool_logits": cached_outputs(recs, data)[0]}


@pytest.mark.parametrize("method", ["test_pool_spy", "test_pool_spy_labels"])
def test_batches_come_from_the_pool_or_the_labelled_part_and_evaluation_from_the_split(spied, method):
    data = spied["data"]
    labelled = method == "test_pool_spy_labels"
    part = data.parts["train"] if labelled else data.pool
    position = torch.argsort(opaque_ids(len(part)))  # image id -> row of the part
    batches = SEEN[method]["batches"]
    assert sum(len(b[0]) for b in batches) == len(part) // 64 * 64  # one epoch over that part
    for x, ids, logits, y in batches:
        rows = position[ids]
        assert torch.equal(x, part.x[rows])
        if labelled:
            assert torch.equal(y, part.y[rows])
        else:
            assert y is None
            assert all(torch.allclose(z, cached[rows]) for z, cached in zip(logits, spied["pool_logits"]))
    # validation after the epoch, then the test part: the split's own images, never the pool
    predicted = torch.cat(SEEN[method]["predicted"])
    assert torch.equal(predicted, torch.cat([data.parts["val"].x, data.parts["test"].x]))
    final = spied["finals"][method]
    assert final["pool_size"] == len(part) and "diag/ensemble_union_acc" in final
    assert "diag/oracle_ensemble_acc" in final and "diag/probe_acc" in final
    assert "diag/pseudo_label_acc" not in final and "diag/oracle_pseudo_label_acc" not in final


# ----------------------------------------------------------------------------- keys and bad input


def _keys(transfer: dict | None) -> set[str]:
    split = {"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    data = {**TINY, "splits": [{**split, **({"transfer": transfer} if transfer else {})}]}
    return {t.key for t in expand(parse_study(data))}


def test_the_transfer_set_enters_the_trial_key_and_a_split_without_one_dumps_as_before():
    study = parse_study(TINY)
    assert study.splits[0].model_dump(mode="json") == {
        "name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "teachers": None}  # no transfer: null
    plain = _keys(None)
    base = {"dataset": "mnist5k", "fraction": 0.5}
    keyed = _keys(base)
    assert len(plain) == len(keyed) == 5 and not plain & keyed
    for change in ({"fraction": 0.25}, {"dataset": "digits"}, {"classes": [5, 6, 7]}, {"root": "elsewhere"}):
        other = _keys({**base, **change})
        assert not other & keyed and not other & plain, change
    assert _keys({**base, "classes": [7, 6, 5]}) == _keys({**base, "classes": [5, 6, 7]})  # a set of classes
    with_transfer = parse_study({**TINY, "splits": [{"name": "s", "tasks": TASKS, "transfer": base}]})
    assert parse_study(yaml.safe_load(dump_study(with_transfer))) == with_transfer


@pytest.mark.parametrize("transfer,message", [
    ({"dataset": "nope"}, "splits[0].transfer.dataset: unknown dataset 'nope' (choose from: cifar10, cifar100, "),
    ({"dataset": "mnist5k", "fraction": 0}, "splits[0].transfer.fraction: Input should be greater than 0"),
    ({"dataset": "mnist5k", "fraction": 1.5}, "splits[0].transfer.fraction: Input should be less than or equal to 1"),
    ({"dataset": "mnist5k", "classes": [3, 10]},
     "splits[0].transfer.classes: class 10 is out of range for data set 'mnist5k' (classes 0..9)"),
    ({"dataset": "mnist5k", "classes": [3, 3]}, "splits[0].transfer.classes: a class is listed twice"),
    ({"dataset": "mnist5k", "fraction": 0.0001}, "splits[0].transfer.fraction: 0.0001 of the 3600 training images "
                                                 "of 'mnist5k' leaves 0; the pool needs at least 2"),
    ({"dataset": "npz"}, "splits[0].transfer.root: required for dataset 'npz'"),
    ({"dataset": "mnist5k", "size": 3}, "splits[0].transfer.size: unknown field"),
])
def test_bad_transfer_sets_are_one_line_naming_the_field_exit_2_nothing_written(isolated, capsys, transfer, message):
    data = copy.deepcopy(TINY)
    data["splits"][0]["transfer"] = transfer
    path = isolated / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run-study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error: ") and message in err and "\n" not in err
    assert sorted(p.name for p in isolated.iterdir()) == ["s.yaml"]  # no store, no cache


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # about 10 s of CPU (worker processes, MLflow), more on a busy machine
def test_a_study_with_a_transfer_set_runs_end_to_end_and_says_what_it_learned_from(study_run):
    assert study_run["code"] == 0 and sorted(study_run["runs"]) == ["kd", "scratch"]
    kd, scratch = study_run["runs"]["kd"], study_run["runs"]["scratch"]
    assert kd.info.status == scratch.info.status == "FINISHED"
    assert kd.data.tags["harness.pool"] == "transfer:mnist5k:0.05" and scratch.data.tags["harness.pool"] == "train"
    assert kd.data.metrics["pool_size"] == round(0.05 * N_TRAIN["mnist5k"]) == 180
    assert scratch.data.metrics["pool_size"] == N_TRAIN["digits"]
    assert (kd.data.params["split.transfer.dataset"], kd.data.params["split.transfer.fraction"]) == ("mnist5k", "0.05")
    for run in (kd, scratch):  # the pool has no labels: no pseudo-label accuracy; the test-split ones stay
        m = run.data.metrics
        assert "diag/pseudo_label_acc" not in m and "diag/oracle_pseudo_label_acc" not in m
        assert 0 < m["diag/ensemble_union_acc"] <= m["diag/oracle_ensemble_acc"] <= 1  # claiming <= oracle
        assert 0 < m["test/union_acc"] <= 1


@pytest.mark.slow
def test_the_report_says_what_the_students_learned_from(study_run, store) -> None:
    """The comparison says, from the ``harness.pool`` tags, that kd learned from 180 MNIST-5k
    images and scratch (†) from the labelled training images; ``pool_size`` is a final metric."""
    from harness.report.build import build_report

    out = build_report("ood", tracking_uri=store["uri"], out_dir=store["dir"] / "report")
    md = (out / "report.md").read_text()
    assert ("Transfer sets: the label-free students learned on `2x5-mnist` from the transfer set `mnist5k` "
            "(0.05 of its training part), 180 images, not from the teachers' training images;") in md
    import pandas as pd

    comp = pd.read_csv(out / "comparison.csv").set_index("row")
    assert comp.loc["kd", "pool_size.mean"] == 180 and comp.loc["scratch", "pool_size.mean"] == 1212
