"""Task splits: offsets, label remapping, held-out validation, the multiple-tasks form."""

from __future__ import annotations

import pytest
import torch

from harness.config import DatasetConfig, SplitConfig
from harness.data.datasets import load_dataset
from harness.data.splits import build_split
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
