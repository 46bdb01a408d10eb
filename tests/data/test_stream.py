"""dataset.stream: lazy image folders decode exactly like the in-memory loader, and a whole trial
streamed through DataLoaders gives bitwise the same results as the in-memory path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import DatasetConfig, SplitConfig, TaskSource, TrainConfig, parse_study
from harness.data.datasets import load_dataset
from harness.data.splits import build_split
from harness.data.stream import (
    BatchLoader, LazyImages, cat_images, is_lazy, iter_batches, loader_workers, open_image_folder,
)
from harness.errors import HarnessError
from harness.methods.base import SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.train import batch_indices, fit

CLASSES = ("ant", "bee", "cat", "dog")


def write_folder(root: Path, n_train: int = 12, n_test: int = 4, seed: int = 0, gray: bool = False) -> Path:
    """root/{train,test}/<class>/NNN.png: class-coloured noise, mostly 8x8 RGB, every third image
    10x9 (so image_size must resize), every fourth one grayscale (mode L) unless ``gray`` (all L)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(CLASSES):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (10, 9) if i % 3 == 0 else (8, 8)
                base = np.array([60 * ci, 255 - 60 * ci, (97 * ci) % 256], dtype=np.float64)
                arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr, "RGB")
                if gray or i % 4 == 1:
                    img = img.convert("L")
                img.save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture
def one_worker(monkeypatch):
    """One DataLoader worker process (what a 2-core machine gets anyway)."""
    monkeypatch.setenv("HARNESS_DATA_WORKERS", "1")


def _ds(folder: Path, stream: bool, **kw) -> DatasetConfig:
    return DatasetConfig(name="image_folder", root=str(folder), image_size=8, val_fraction=0.25, stream=stream, **kw)


SPLIT = SplitConfig(name="2x2", tasks=[[0, 1], [2, 3]])


# --------------------------------------------------------------------------- LazyImages


def test_lazy_load_is_bitwise_the_in_memory_loader(folder):
    mem = load_dataset("image_folder", root=str(folder), image_size=8)
    lazy = open_image_folder(str(folder), image_size=8)
    assert lazy.classes == mem.classes == CLASSES and lazy.num_classes == 4
    for split in ("train", "test"):
        x, xm = getattr(lazy, f"x_{split}"), getattr(mem, f"x_{split}")
        assert is_lazy(x) and len(x) == len(xm) and x.shape == xm.shape and x.dtype == xm.dtype
        assert torch.equal(getattr(lazy, f"y_{split}"), getattr(mem, f"y_{split}"))
        full = x.load()
        assert full.dtype == torch.float32 and full.is_contiguous() and torch.equal(full, xm)
    x, xm = lazy.x_train, mem.x_train
    idx = torch.tensor([7, 0, 33, 7, -1])
    assert torch.equal(x.load(idx), xm[idx])  # any order, repeats, negative indices
    assert torch.equal(x[idx].load(), xm[idx])  # LongTensor -> lazy subset
    mask = mem.y_train >= 2
    assert torch.equal(x[mask].load(), xm[mask])  # bool mask
    assert torch.equal(x[5:17:3].load(), xm[5:17:3]) and len(x[:0]) == 0  # slices
    assert x[:0].load().shape == (0, 3, 8, 8)
    assert torch.equal(x[np.array([3, 1])].load(), xm[[3, 1]])  # numpy indices
    assert torch.equal(x[4], xm[4])  # an int decodes one image
    both = cat_images([x[:5], lazy.x_test[2:4]])
    assert torch.equal(both.load(), torch.cat([xm[:5], mem.x_test[2:4]]))


def test_without_image_size_all_images_must_share_one_size(tmp_path):
    for i, size in enumerate([(6, 5), (6, 5), (6, 5)]):
        d = tmp_path / ("train" if i < 2 else "test") / "a"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    lazy = open_image_folder(str(tmp_path))
    assert lazy.x_train.shape == (2, 3, 5, 6)  # [N, C, H, W]: PIL size is (W, H)
    assert torch.equal(lazy.x_train.load(), load_dataset("image_folder", root=str(tmp_path)).x_train)
    Image.fromarray(np.zeros((7, 6, 3), np.uint8)).save(tmp_path / "train" / "a" / "big.png")
    with pytest.raises(HarnessError) as ei:
        open_image_folder(str(tmp_path))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"image_folder: images in {tmp_path} differ in size")
    assert "big.png is 6x7" in msg and "dataset.image_size" in msg


def test_grayscale_folder_matches_channels_like_the_in_memory_path(folder, tmp_path):
    gray = write_folder(tmp_path / "gray", n_train=6, n_test=2, seed=1, gray=True)
    assert open_image_folder(str(gray), 8).x_train.shape[1] == 1
    split = SplitConfig(name="mixed", tasks=[TaskSource(dataset="image_folder", root=str(folder), classes=[0, 1]),
                                             TaskSource(dataset="image_folder", root=str(gray), classes=[2, 3])])
    mem, lazy = build_split(split, _ds(folder, False)), build_split(split, _ds(folder, True))
    for p in ("train", "val", "test"):
        assert lazy.parts[p].x.shape == mem.parts[p].x.shape and lazy.parts[p].x.shape[1] == 3
        assert torch.equal(lazy.parts[p].x.load(), mem.parts[p].x)


# --------------------------------------------------------------------------- splits


def test_build_split_streamed_equals_in_memory(folder):
    mem, lazy = build_split(SPLIT, _ds(folder, False)), build_split(SPLIT, _ds(folder, True))
    assert lazy.describe() == mem.describe() and lazy.in_shape == mem.in_shape == (3, 8, 8)
    assert lazy.sizes == mem.sizes and lazy.offsets == mem.offsets and lazy.tasks == mem.tasks
    gen = torch.Generator().manual_seed(0)
    for p in ("train", "val", "test"):
        a, b = mem.parts[p], lazy.parts[p]
        assert is_lazy(b.x) and not is_lazy(a.x)
        assert torch.equal(a.y, b.y) and torch.equal(a.t, b.t) and len(a) == len(b)
        idx = torch.randint(0, len(a), (9,), generator=gen)
        assert torch.equal(b.x.load(idx), a.x[idx])
        assert torch.equal(b.x.load(), a.x)
        for k in range(2):
            (xa, ya), (xb, yb) = mem.task_part(k, p), lazy.task_part(k, p)
            assert torch.equal(ya, yb) and torch.equal(xb.load(), xa)


def test_empty_val_part_and_pickling(folder):
    import pickle

    from harness.train import evaluate

    data = build_split(SPLIT, _ds(folder, True).model_copy(update={"val_fraction": 0.0}))
    val = data.parts["val"]
    assert is_lazy(val.x) and len(val) == 0 and val.x.shape == (0, 3, 8, 8) and val.x.load().shape == (0, 3, 8, 8)
    assert evaluate(lambda x: x.flatten(1)[:, :4], val, data.sizes, data.offsets, "cpu") == {}
    x = data.parts["train"].x
    back = pickle.loads(pickle.dumps(x))  # what a spawned DataLoader worker or a Ray task receives
    assert torch.equal(back.load([0, 5]), x.load([0, 5]))


def test_stream_is_only_for_image_folders(folder):
    with pytest.raises(HarnessError) as ei:
        build_split(SplitConfig(name="d", tasks=[[0], [1]]), DatasetConfig(name="digits", stream=True))
    msg = str(ei.value)
    assert msg.startswith("dataset.stream: ") and "'digits'" in msg and "\n" not in msg
    split = SplitConfig(name="m", tasks=[TaskSource(dataset="image_folder", root=str(folder)),
                                         TaskSource(dataset="mnist5k")])
    with pytest.raises(HarnessError) as ei:
        build_split(split, _ds(folder, True), "splits[3]")
    assert str(ei.value).startswith("dataset.stream: ") and "'mnist5k' (splits[3].tasks[1])" in str(ei.value)


def test_stream_error_comes_before_anything_is_created(isolated):
    from harness.cli import main
    from tests.conftest import write_study

    study = write_study(isolated / "s.yaml", dataset={"name": "digits", "stream": True})
    assert main(["run-study", str(study), "--no-report", "--workers", "1"]) == 2
    assert not (isolated / "mlflow.db").exists() and not (isolated / "cache").exists()


def test_unreadable_image_one_line_error_at_scan_and_at_decode(folder, tmp_path, one_worker):
    bad_root = write_folder(tmp_path / "bad", n_train=2, n_test=1)
    junk = bad_root / "train" / "ant" / "zz.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(HarnessError) as ei:
        open_image_folder(str(bad_root), 8)
    assert str(ei.value).startswith(f"image_folder: {junk} is not a readable image")
    # a valid header with truncated pixel data passes the header scan and fails when decoded,
    # in a DataLoader worker: still one line naming the file
    good = bad_root / "train" / "ant" / "000.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 9, 3), dtype=np.uint8)).save(junk)
    junk.write_bytes(junk.read_bytes()[:60])
    lazy = open_image_folder(str(bad_root), 8)
    assert good.exists() and str(junk) in set(lazy.x_train.paths)
    with pytest.raises(HarnessError) as ei:
        list(iter_batches(lazy.x_train, 4))
    msg = str(ei.value)
    assert msg.startswith(f"image_folder: {junk} is not a readable image") and "\n" not in msg


# --------------------------------------------------------------------------- DataLoader


def test_loader_workers_rule(monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_WORKERS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert loader_workers() == min(4, max(0, cores - 1))
    monkeypatch.setenv("HARNESS_DATA_WORKERS", "0")
    assert loader_workers() == 0
    monkeypatch.setenv("HARNESS_DATA_WORKERS", "many")
    with pytest.raises(HarnessError, match="HARNESS_DATA_WORKERS"):
        loader_workers()


class RecordingImages(LazyImages):
    """Appends (pid, in a DataLoader worker?, decoded paths) of every ``load`` to a file."""

    log: str = ""

    def load(self, indices=None):
        out = super().load(indices)
        pos = np.arange(len(self)) if indices is None else np.asarray(indices).reshape(-1)
        worker = torch.utils.data.get_worker_info() is not None
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {int(worker)} {','.join(Path(p).name + '@' + Path(p).parent.name for p in self.paths[pos])}\n")
        return out


def _method(data, name="kd", seed=3):
    cls = get_method(name)
    torch.manual_seed(0)
    teachers = TeacherSet([build_model("cnn", data.in_shape, n, width=4) for n in data.sizes])
    torch.manual_seed(seed)
    return cls(build_model("cnn", data.in_shape, data.num_classes, width=4), teachers, cls.ParamsModel(),
               SplitInfo(tuple(data.sizes), tuple(data.offsets)))


def test_training_reads_batches_through_a_dataloader_never_the_whole_part(folder, tmp_path, one_worker):
    data = build_split(SPLIT, _ds(folder, True))
    train = data.parts["train"].x
    rec = RecordingImages(train.paths, train.spec_ids, train.specs, train.channels, train.hw)
    rec.log = str(tmp_path / "loads.txt")
    data.parts["train"].x = rec
    cfg = TrainConfig(epochs=2, batch_size=8)
    n = len(rec)
    assert n % 8 != 0  # a partial batch that must be dropped
    method = _method(data)
    mem = build_split(SPLIT, _ds(folder, False))
    from harness.train import teacher_outputs

    cached = teacher_outputs(method.teachers, mem.parts["train"].x)  # as the trial's disk cache would
    fit(method, data, cfg, seed=5, cached_outputs=cached)
    lines = [ln.split(" ", 2) for ln in Path(rec.log).read_text().splitlines()]
    gen = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(cfg.epochs):
        expected += [[rec.paths[i] for i in b.tolist()] for b in batch_indices(torch.randperm(n, generator=gen), 8)]
    assert len(lines) == len(expected) == cfg.epochs * (n // 8)
    for (pid, worker, names), paths in zip(lines, expected):
        assert int(pid) != os.getpid() and worker == "1"  # decoded in a DataLoader worker process
        assert names.split(",") == [Path(p).name + "@" + Path(p).parent.name for p in paths]  # same perm, same batches


def test_fit_with_augmentation_streamed_equals_in_memory(folder, one_worker):
    """Augmented (teachers run per batch): the loss of every epoch and the final metrics agree bitwise."""
    cfg = TrainConfig(epochs=2, batch_size=8, augment=True, lr=0.01)
    results = []
    for stream in (False, True):
        data = build_split(SPLIT, _ds(folder, stream))
        res = fit(_method(data, "cka"), data, cfg, seed=1)
        results.append(([{k: v for k, v in h.items() if k.startswith(("loss/", "val/"))} for h in res.history],
                        res.final, res.best_state))
    (h0, f0, s0), (h1, f1, s1) = results
    assert h0 == h1 and f0 == f1 and h0[0]["loss/total"] > 0
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


def test_batch_loader_keeps_order_and_persistent_workers_across_passes(folder, one_worker):
    x = open_image_folder(str(folder), 8).x_train
    full = x.load()
    with BatchLoader(x, "cpu", persistent=True) as loader:
        assert loader.workers == 1 and loader.loader.persistent_workers and not loader.loader.pin_memory
        for seed in (0, 1):
            batches = batch_indices(torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)), 5)
            got = list(loader.pass_over(batches))
            assert len(got) == len(batches) and all(torch.equal(g, full[b]) for g, b in zip(got, batches))
    assert torch.equal(torch.cat(list(iter_batches(x, 7))), full)


# --------------------------------------------------------------------------- whole trials


def _metrics_and_curves(tracker_uri: str, study_name: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker_uri)
    exp = client.get_experiment_by_name(study_name)
    out = {}
    skip = ("epoch_seconds", "images_per_second", "trial_seconds", "peak_rss_mb", "cuda_max_allocated_mb")
    for r in client.search_runs([exp.experiment_id], max_results=100):
        if r.data.tags.get("harness.kind") != "trial":
            continue
        curves = {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                  for k in r.data.metrics if k not in skip}
        out[r.data.tags["harness.run"]] = curves  # the full name (the run name is the short one)
    return out


def test_whole_trials_are_bitwise_identical_streamed_or_in_memory(folder, tmp_path, monkeypatch, one_worker):
    """kd, cka and the teacher ensemble (teachers trained in each path from an empty cache):
    every logged metric, per epoch and final, agrees bitwise."""
    from harness.grid import expand
    from harness.teachers import cached_outputs, get_teachers
    from harness.tracking import Tracker
    from harness.trial import run_trial

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs, teachers = {}, {}
    for stream in (False, True):
        study = parse_study({
            "name": f"streamy{int(stream)}",
            "dataset": {"name": "image_folder", "root": str(folder), "image_size": 8, "val_fraction": 0.25,
                        "stream": stream},
            "splits": [{"name": "2x2", "tasks": [[0, 1], [2, 3]]}],
            "teachers": [{"arch": "cnn", "width": 4, "epochs": 2, "batch_size": 8, "lr": 0.01}],
            "student": {"arch": "cnn", "width": 4},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.01},
            "methods": {"kd": {}, "cka": {}, "teachers": {}},
            "seeds": [0],
            "cache_dir": str(tmp_path / f"cache{int(stream)}"),  # each path trains its own teachers
        })
        tracker = Tracker(uri)
        exp = tracker.experiment(study.name, create=True)
        trials = expand(study)
        assert sorted(t.method for t in trials) == ["cka", "kd", "teachers"]
        for t in trials:
            run_trial(study, t, tracker, exp)
        runs[stream] = _metrics_and_curves(uri, study.name)
        data = build_split(study.splits[0], study.dataset)
        assert is_lazy(data.parts["train"].x) == stream
        recs = get_teachers(data, study.dataset, study.teachers_for(study.splits[0]), study.cache_dir)
        assert all(r.cached for r in recs)
        teachers[stream] = (recs, cached_outputs(recs, data, study.cache_dir))
    assert runs[False] == runs[True]
    kd = runs[True]["2x2/kd/seed0"]
    assert len(kd["loss/total"]) == 2 and "diag/pseudo_label_acc" in kd and "test/union_acc" in kd
    (r0, o0), (r1, o1) = teachers[False], teachers[True]
    for a, b in zip(r0, r1):
        assert a.key == b.key and a.metrics == b.metrics
        sa, sb = a.net.state_dict(), b.net.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert all(torch.equal(u, v) for u, v in zip(a.stats.to_dict().values(), b.stats.to_dict().values())
                   if isinstance(u, torch.Tensor))
    assert all(torch.equal(u, v) for u, v in zip(o0[0] + o0[1], o1[0] + o1[1]))
