"""Task splits: offsets, label remapping, held-out validation, the multiple-tasks form, partitions."""

from __future__ import annotations

import pytest
import torch

from harness.config import DatasetConfig, PartitionSpec, SplitConfig
from harness.data.datasets import load_dataset
from harness.data.splits import build_split, resolve_partition
from harness.errors import HarnessError


def test_offsets_and_union_labels_follow_task_order():
    split = build_split(SplitConfig(name="s", tasks=[[7, 2], [0, 9, 4]]), DatasetConfig(name="digits"))
    assert split.sizes == [2, 3] and split.offsets == [0, 2] and split.num_classes == 5
    ds = load_dataset("digits")
    # union label of class 7 is 0, of 2 is 1, of 0 is 2, 9 -> 3, 4 -> 4; other classes dropped;
    # images are grouped task by task, each task in source order
    lut = {7: 0, 2: 1, 0: 2, 9: 3, 4: 4}
    keep0 = torch.tensor([int(c) in (7, 2) for c in ds.y_test])
    keep1 = torch.tensor([int(c) in (0, 9, 4) for c in ds.y_test])
    ys = torch.cat([ds.y_test[keep0], ds.y_test[keep1]])
    expected = torch.tensor([lut[int(c)] for c in ys])
    assert torch.equal(split.parts["test"].y, expected)
    assert torch.equal(split.parts["test"].x, torch.cat([ds.x_test[keep0], ds.x_test[keep1]]))
    assert torch.equal(split.parts["test"].t, (expected >= 2).long())
    x1, y1 = split.task_part(1, "train")
    assert set(y1.tolist()) == {0, 1, 2} and len(x1) == int((split.parts["train"].t == 1).sum())


def test_validation_held_out_fixed_and_disjoint():
    cfg = SplitConfig(name="s", tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    a = build_split(cfg, DatasetConfig(name="digits", val_fraction=0.1))
    b = build_split(cfg, DatasetConfig(name="digits", val_fraction=0.1))
    assert torch.equal(a.parts["val"].x, b.parts["val"].x)
    n_train_src = len(load_dataset("digits").y_train)
    assert len(a.parts["train"]) + len(a.parts["val"]) == n_train_src
    assert len(a.parts["val"]) == round(0.1 * n_train_src) or abs(len(a.parts["val"]) - 0.1 * n_train_src) < 1
    # no validation image is also a training image
    tr = {tuple(r.tolist()) for r in a.parts["train"].x.flatten(1)}
    dup = sum(tuple(r.tolist()) in tr for r in a.parts["val"].x.flatten(1))
    assert dup <= 2  # digits has a couple of exact duplicate images in the source data
    assert set(a.parts["val"].y.tolist()) == set(range(10))  # stratified
    c = build_split(cfg, DatasetConfig(name="digits", val_fraction=0.0))
    assert len(c.parts["val"]) == 0 and len(c.parts["train"]) == n_train_src


def test_partial_class_coverage_drops_other_images():
    split = build_split(SplitConfig(name="s", tasks=[[0, 1, 2], [3, 4, 5], [6, 7, 8]]), DatasetConfig(name="digits"))
    assert split.offsets == [0, 3, 6] and split.num_classes == 9
    assert int(split.parts["test"].y.max()) == 8 and len(split.parts["test"]) < 450


def test_multiple_tasks_form_concatenates_datasets():
    cfg = SplitConfig.model_validate(
        {"name": "dm", "tasks": [{"dataset": "digits"}, {"dataset": "mnist5k", "classes": [3, 1]}]}
    )
    split = build_split(cfg, DatasetConfig(name="digits", image_size=16))
    assert split.sizes == [10, 2] and split.offsets == [0, 10] and split.in_shape == (1, 16, 16)
    assert [t.dataset for t in split.tasks] == ["digits", "mnist5k"]
    m = split.parts["test"].t == 1
    mn = load_dataset("mnist5k")
    assert int(m.sum()) == int(((mn.y_test == 3) | (mn.y_test == 1)).sum())
    assert set(split.parts["test"].y[m].tolist()) == {10, 11}
    _, local = split.task_part(1, "test")
    assert set(local.tolist()) == {0, 1}


def test_multiple_tasks_need_one_image_size():
    cfg = SplitConfig.model_validate({"name": "dm", "tasks": [{"dataset": "digits"}, {"dataset": "mnist5k"}]})
    with pytest.raises(HarnessError, match=r"splits\[0\]: tasks have image sizes .* set dataset.image_size"):
        build_split(cfg, DatasetConfig(name="digits"))


def test_out_of_range_class_names_field():
    with pytest.raises(HarnessError, match=r"splits\[2\]\.tasks\[1\]: class 10 is out of range for data set 'digits'"):
        build_split(SplitConfig(name="s", tasks=[[0], [10]]), DatasetConfig(name="digits"), "splits[2]")


@pytest.mark.parametrize("n, spec, expected", [
    (10, {"k": 3}, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]),
    (10, {"k": 2}, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
    (10, {"k": 10}, [[c] for c in range(10)]),
    (100, {"k": 2}, [list(range(50)), list(range(50, 100))]),  # the CIFAR-100 2x50 split
    (100, {"k": 3, "classes": [9, 2, 50, 7, 1]}, [[1, 2], [7, 9], [50]]),  # a subset, ascending
    (100, {"k": 2, "classes": list(range(50))}, [list(range(25)), list(range(25, 50))]),
    # numpy default_rng(seed).permutation, pinned: a change here moves results (RESULTS_VERSION)
    (10, {"k": 2, "order": "random", "seed": 0}, [[2, 3, 4, 6, 7], [0, 1, 5, 8, 9]]),
    (10, {"k": 2, "order": "random", "seed": 1}, [[0, 1, 4, 7, 8], [2, 3, 5, 6, 9]]),
    (10, {"k": 3, "order": "random", "classes": [9, 7, 5, 3, 1, 0]}, [[3, 5], [7, 9], [0, 1]]),
])
def test_resolve_partition_table(n, spec, expected):
    assert resolve_partition(n, PartitionSpec(**spec)) == expected


@pytest.mark.parametrize("n, k", [(10, 2), (10, 3), (10, 7), (100, 20), (100, 3), (7, 7)])
@pytest.mark.parametrize("order", ["contiguous", "random"])
def test_resolve_partition_is_a_near_equal_disjoint_cover(n, k, order):
    tasks = resolve_partition(n, PartitionSpec(k=k, order=order, seed=3 if order == "random" else 0))
    flat = [c for t in tasks for c in t]
    assert len(tasks) == k and sorted(flat) == list(range(n))  # union = all classes, disjoint
    sizes = [len(t) for t in tasks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert all(t == sorted(t) for t in tasks)


def test_random_partition_is_reproducible_and_seed_dependent():
    spec = dict(k=5, order="random")
    a = resolve_partition(100, PartitionSpec(**spec, seed=0))
    assert a == resolve_partition(100, PartitionSpec(**spec, seed=0))
    assert a != resolve_partition(100, PartitionSpec(**spec, seed=1))
    assert a != resolve_partition(100, PartitionSpec(k=5))


@pytest.mark.parametrize("n, spec, message", [
    (10, {"k": 11}, r"^p\.k: 11 tasks from the 10 classes of data set 'd' \(k must be at most the number of classes\)$"),
    (10, {"k": 3, "classes": [0, 1]}, r"^p\.k: 3 tasks from the 2 classes of partition\.classes"),
    (10, {"k": 2, "classes": [0, 10]}, r"^p\.classes: class 10 is out of range for data set 'd' \(classes 0\.\.9\)$"),
])
def test_resolve_partition_rejects_impossible_specs(n, spec, message):
    with pytest.raises(HarnessError, match=message):
        resolve_partition(n, PartitionSpec(**spec), "p", "data set 'd'")


def test_partition_split_builds_concrete_tasks():
    cfg = SplitConfig.model_validate({"name": "k3", "partition": {"k": 3}})
    split = build_split(cfg, DatasetConfig(name="digits"))
    assert [list(t.classes) for t in split.tasks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split.describe()["tasks"] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split.sizes == [4, 3, 3] and split.offsets == [0, 4, 7] and split.num_classes == 10
    assert [t.names for t in split.tasks][1] == ("4", "5", "6")
    # the same data as the explicit split with those class lists
    explicit = build_split(SplitConfig(name="k3", tasks=[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]), DatasetConfig(name="digits"))
    for part in ("train", "val", "test"):
        assert torch.equal(split.parts[part].x, explicit.parts[part].x)
        assert torch.equal(split.parts[part].y, explicit.parts[part].y)
        assert torch.equal(split.parts[part].t, explicit.parts[part].t)


def test_random_partition_split_remaps_labels_per_task():
    cfg = SplitConfig.model_validate({"name": "r", "partition": {"k": 2, "order": "random", "seed": 0,
                                                                 "classes": [1, 3, 5, 7]}})
    split = build_split(cfg, DatasetConfig(name="digits"))
    tasks = resolve_partition(10, cfg.partition)  # type: ignore[arg-type]
    assert [list(t.classes) for t in split.tasks] == tasks and sorted(sum(tasks, [])) == [1, 3, 5, 7]
    ds = load_dataset("digits")
    lut = {c: i for i, c in enumerate(sum(tasks, []))}  # union label: position in the task order
    # images task by task, each task in source order
    expected = [lut[int(c)] for t in tasks for c in ds.y_test if int(c) in t]
    assert split.parts["test"].y.tolist() == expected
    assert split.parts["test"].t.tolist() == [k for k, t in enumerate(tasks) for c in ds.y_test if int(c) in t]


def test_partition_with_more_tasks_than_classes_names_k():
    cfg = SplitConfig.model_validate({"name": "k11", "partition": {"k": 11}})
    with pytest.raises(HarnessError, match=r"^splits\[1\]\.partition\.k: 11 tasks from the 10 classes of data set 'digits'"):
        build_split(cfg, DatasetConfig(name="digits"), "splits[1]")


def test_partition_of_an_unstreamable_data_set_names_stream():
    cfg = SplitConfig.model_validate({"name": "k2", "partition": {"k": 2}})
    with pytest.raises(HarnessError, match=r"^dataset\.stream: only .* can be streamed, not 'digits'; remove stream"):
        build_split(cfg, DatasetConfig(name="digits", stream=True))


def test_a_hold_out_smaller_than_the_class_count_is_one_line(tmp_path):
    """12 training images of 4 classes, val_fraction 0.1: 2 validation images cannot hold one per
    class. One line naming dataset.val_fraction (scikit-learn's own ValueError was a traceback)."""
    import numpy as np

    from harness.errors import HarnessError

    path = tmp_path / "small.npz"
    np.savez(path, x_train=np.zeros((12, 1, 8, 8), "float32"), y_train=np.repeat(np.arange(4), 3),
             x_test=np.zeros((4, 1, 8, 8), "float32"), y_test=np.arange(4))
    ds = DatasetConfig(name="npz", root=str(path), val_fraction=0.1)
    with pytest.raises(HarnessError, match=r"^dataset\.val_fraction: 0\.1 of the 12 training images of 'npz' is 2 "
                                           r"validation images, fewer than its 4 classes") as ei:
        build_split(SplitConfig(name="s", tasks=[[0, 1], [2, 3]]), ds)
    assert "\n" not in str(ei.value)
    ok = build_split(SplitConfig(name="s", tasks=[[0, 1], [2, 3]]), ds.model_copy(update={"val_fraction": 0.34}))
    assert len(ok.parts["val"]) == 5 and len(ok.parts["train"]) == 7
