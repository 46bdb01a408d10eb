"""Task splits: which classes each teacher covers, union label offsets, train/val/test parts.

Union label space (spec, "Setting"): task k owns the slice S_k = [o_k, o_k + n_k) of the
student's n = sum_k n_k logits, o_k = sum of earlier n_j. A class c of task k has the union
label o_k + (position of c in task k's class list) and the local label (that position).

The validation part is held out of each source data set's training part (stratified, fixed
random state 0), so it is the same for every split, teacher, method and seed. The test part is
used for final metrics only.

A ``partition: {k, order, seed, classes}`` split is resolved here, where the data set's class
count is known (:func:`resolve_partition`); the built :class:`SplitData` carries the concrete
class list of every task, like an explicit ``tasks`` split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from harness.config import DatasetConfig, PartitionSpec, SplitConfig, TaskSource
from harness.data.datasets import ArraySet, load_dataset
from harness.data.stream import STREAMABLE, LazyImages, LazySet, cat_images, is_lazy, open_lazy
from harness.errors import HarnessError

Part = Literal["train", "val", "test"]


@dataclass(frozen=True)
class TaskInfo:
    """One teacher's task: where its images come from and which classes it covers."""

    dataset: str
    root: str | None
    classes: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.classes)


@dataclass
class PartData:
    """Images of one part (train/val/test) with union labels ``y`` and task ids ``t``.

    ``x`` is a float tensor, or a :class:`~harness.data.stream.LazyImages` collection when the
    data set is streamed (``dataset.stream``); ``y`` and ``t`` are always tensors."""

    x: torch.Tensor | LazyImages
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class SplitData:
    """Everything a trial needs to know about one split's data."""

    name: str
    tasks: list[TaskInfo]
    parts: dict[str, PartData]

    @property
    def sizes(self) -> list[int]:
        return [t.n for t in self.tasks]

    @property
    def offsets(self) -> list[int]:
        return [int(o) for o in np.cumsum([0] + self.sizes[:-1])]

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.parts["train"].x.shape[1:])  # type: ignore[return-value]

    def task_part(self, k: int, part: Part) -> tuple[torch.Tensor | LazyImages, torch.Tensor]:
        """Task k's images of a part with its local labels 0..n_k-1 (what teacher k trains on)."""
        p = self.parts[part]
        mask = p.t == k
        return p.x[mask], p.y[mask] - self.offsets[k]

    def describe(self) -> dict[str, object]:
        return {
            "tasks": [list(t.classes) for t in self.tasks],
            "sources": [t.dataset for t in self.tasks],
            "sizes": {p: len(d) for p, d in self.parts.items()},
            "in_shape": list(self.in_shape),
        }


@lru_cache(maxsize=8)
def _source(
    name: str, root: str | None, image_size: int | None, val_fraction: float, stream: bool = False
) -> dict[str, tuple]:
    """A data set's train/val/test arrays (cached per process); lazy collections with ``stream``."""
    ds: ArraySet | LazySet = (
        open_lazy(name, root, image_size) if stream else load_dataset(name, root=root, image_size=image_size)
    )
    xtr, ytr = ds.x_train, ds.y_train
    if val_fraction > 0:
        idx = np.arange(len(ytr))
        strat = ytr.numpy() if np.bincount(ytr.numpy()).min() >= 2 else None
        tr, va = train_test_split(idx, test_size=val_fraction, stratify=strat, random_state=0)
        tr, va = np.sort(tr), np.sort(va)
        parts = {"train": (xtr[tr], ytr[tr]), "val": (xtr[va], ytr[va])}
    else:
        parts = {"train": (xtr, ytr), "val": (xtr[:0], ytr[:0])}
    parts["test"] = (ds.x_test, ds.y_test)
    parts["meta"] = (ds.num_classes, ds.classes)  # type: ignore[assignment]
    return parts


def _match_channels(xs: list) -> list:
    c = max(x.shape[1] for x in xs)

    def match(x):
        if x.shape[1] != 1 or c == 1:
            return x
        return x.with_channels(c) if is_lazy(x) else x.expand(-1, c, -1, -1).contiguous()

    return [match(x) for x in xs]


def check_stream(split: SplitConfig, dataset: DatasetConfig, field: str = "splits[0]") -> None:
    """HarnessError (naming ``dataset.stream``) unless every task of the split reads a data set
    that can be streamed; nothing is loaded."""
    if not dataset.stream:
        return
    for k, task in enumerate(split.tasks or [None]):  # a partition reads the study's data set
        name = task.dataset if isinstance(task, TaskSource) else dataset.name
        if name not in STREAMABLE:
            where = f" ({field}.tasks[{k}])" if isinstance(task, TaskSource) else ""
            raise HarnessError(
                f"dataset.stream: only {', '.join(STREAMABLE)} can be streamed, "
                f"not '{name}'{where}; remove stream: true to load it into memory"
            )


def resolve_partition(
    num_classes: int, spec: PartitionSpec, field: str = "partition", dataset: str = "the data set"
) -> list[list[int]]:
    """The class list of each of ``spec.k`` tasks (pure: the same answer for the same arguments).

    The classes (``spec.classes`` or 0..num_classes-1, ascending) are, for ``order: random``,
    permuted by ``numpy.random.default_rng(spec.seed).permutation``, then cut into k consecutive
    chunks as :func:`numpy.array_split` does: the first ``n mod k`` tasks get ``n // k + 1``
    classes, the others ``n // k`` (10 into 3: [0..3], [4, 5, 6], [7, 8, 9]). Each task's list is
    sorted. HarnessError naming ``{field}.classes`` / ``{field}.k`` for a class out of range or
    more tasks than classes."""
    classes = list(range(num_classes)) if spec.classes is None else list(spec.classes)
    bad = [c for c in classes if c >= num_classes]
    if bad:
        raise HarnessError(
            f"{field}.classes: class {bad[0]} is out of range for {dataset} (classes 0..{num_classes - 1})"
        )
    if spec.k > len(classes):
        of = dataset if spec.classes is None else "partition.classes"
        raise HarnessError(
            f"{field}.k: {spec.k} tasks from the {len(classes)} classes of {of} "
            "(k must be at most the number of classes)"
        )
    order = np.asarray(classes, dtype=np.int64)
    if spec.order == "random":
        order = np.random.default_rng(spec.seed).permutation(order)
    return [sorted(int(c) for c in chunk) for chunk in np.array_split(order, spec.k)]


def build_split(split: SplitConfig, dataset: DatasetConfig, field: str = "splits[0]") -> SplitData:
    """Resolve a split against its data: generate a ``partition``'s tasks, check classes, remap
    labels, concatenate tasks.

    Raises HarnessError naming ``field`` when a class is out of range, a partition has more
    tasks than classes (``{field}.partition.k``) or the tasks' images cannot share one shape.
    """
    check_stream(split, dataset, field)
    # (source name, root, classes or None for all, field naming the task) per task
    specs: list[tuple[str, str | None, list[int] | None, str]] = []
    if split.partition is not None:
        num_classes = _source(dataset.name, dataset.root, dataset.image_size, dataset.val_fraction,
                              dataset.stream)["meta"][0]
        lists = resolve_partition(num_classes, split.partition, f"{field}.partition", f"data set '{dataset.name}'")
        specs = [(dataset.name, dataset.root, c, f"{field}.partition (task {k})") for k, c in enumerate(lists)]
    for k, task in enumerate(split.tasks or []):
        if isinstance(task, TaskSource):
            specs.append((task.dataset, task.root, task.classes, f"{field}.tasks[{k}]"))
        else:
            specs.append((dataset.name, dataset.root, task, f"{field}.tasks[{k}]"))
    tasks: list[TaskInfo] = []
    chunks: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"train": [], "val": [], "test": []}
    offset = 0
    for k, (name, root, classes, where) in enumerate(specs):
        src = _source(name, root, dataset.image_size, dataset.val_fraction, dataset.stream)
        num_classes, class_names = src["meta"]
        classes = list(range(num_classes)) if classes is None else list(classes)
        bad = [c for c in classes if c >= num_classes]
        if bad:
            raise HarnessError(
                f"{where}: class {bad[0]} is out of range for data set '{name}' "
                f"(classes 0..{num_classes - 1})"
            )
        tasks.append(TaskInfo(name, root, tuple(classes), tuple(class_names[c] for c in classes)))
        lut = torch.full((num_classes,), -1, dtype=torch.long)
        lut[torch.tensor(classes)] = torch.arange(len(classes)) + offset
        for part in chunks:
            x, y = src[part]
            union = lut[y]
            keep = union >= 0
            chunks[part].append((x[keep], union[keep], torch.full((int(keep.sum()),), k, dtype=torch.long)))
        offset += len(classes)
    shapes = {tuple(c[0].shape[2:]) for c in chunks["train"]}
    if len(shapes) > 1:
        raise HarnessError(
            f"{field}: tasks have image sizes {sorted(shapes)}; set dataset.image_size to resize them to one"
        )
    parts = {}
    for part, cs in chunks.items():
        xs = _match_channels([c[0] for c in cs])
        parts[part] = PartData(cat_images(xs), torch.cat([c[1] for c in cs]), torch.cat([c[2] for c in cs]))
    for k in range(len(tasks)):
        if int((parts["train"].t == k).sum()) == 0:
            raise HarnessError(f"{specs[k][3]}: no training images for this task")
    return SplitData(split.name, tasks, parts)
