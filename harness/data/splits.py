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

The *pool* is what the label-free student learns from: the training part, or a split's
``transfer`` set (:func:`load_pool`), loaded here with the split and carried as
:attr:`SplitData.pool` without labels (``y = t = -1``). Teachers, their own-data statistics and
every evaluation (val/test) stay on the split's own parts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from harness.config import DatasetConfig, PartitionSpec, SplitConfig, TaskSource, TransferConfig
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
    """Everything a trial needs to know about one split's data.

    ``pool``: the split's transfer set (``splits[i].transfer``), the unlabelled images label-free
    students learn from, labels and task ids -1; None when they learn from the training part.
    ``transfer``: its config (None with it)."""

    name: str
    tasks: list[TaskInfo]
    parts: dict[str, PartData]
    pool: PartData | None = None
    transfer: TransferConfig | None = None

    @property
    def pool_part(self) -> PartData:
        """The student's unlabelled images: the transfer set, else the training part (whose
        labels only the diagnostics may read)."""
        return self.pool if self.pool is not None else self.parts["train"]

    @property
    def pool_label(self) -> str:
        """``train``, or ``transfer:<dataset>:<fraction>`` (the ``harness.pool`` tag)."""
        return "train" if self.transfer is None else self.transfer.label

    def student_view(self, uses_labels: bool) -> "SplitData":
        """What a method trains on: with a transfer set, a label-free method's training part is
        the pool; a method that ``uses_labels`` keeps the labelled training part. Validation and
        test parts are the split's own either way."""
        if self.pool is None or uses_labels:
            return self
        return replace(self, parts={**self.parts, "train": self.pool})

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
        out: dict[str, object] = {
            "tasks": [list(t.classes) for t in self.tasks],
            "sources": [t.dataset for t in self.tasks],
            "sizes": {p: len(d) for p, d in self.parts.items()},
            "in_shape": list(self.in_shape),
        }
        if self.pool is not None:
            out["pool"] = {"source": self.pool_label, "n": len(self.pool)}
        return out


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
        counts = np.bincount(ytr.numpy())
        strat = ytr.numpy() if counts.min() >= 2 else None
        n_val, n_classes = int(np.ceil(val_fraction * len(ytr))), int((counts > 0).sum())
        if strat is not None and (n_val < n_classes or len(ytr) - n_val < n_classes):
            raise HarnessError(
                f"dataset.val_fraction: {val_fraction} of the {len(ytr)} training images of '{name}' is {n_val} "
                f"validation images, fewer than its {n_classes} classes (a stratified hold-out needs one per class, "
                "and as many left to train on): raise val_fraction or use more images")
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
    return attach_pool(SplitData(split.name, tasks, parts), split, dataset, field)


#: seed of the fixed random subset a transfer set's ``fraction`` draws
POOL_SEED = 0


def _convert_channels(x: torch.Tensor, channels: int, where: str, name: str) -> torch.Tensor:
    """1 -> 3 channels by repetition, 3 -> 1 by the mean of the channels; HarnessError otherwise."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        return x.mean(1, keepdim=True)
    raise HarnessError(
        f"{where}.dataset: '{name}' has {have}-channel images but the split's have {channels} "
        "(only 1 -> 3 and 3 -> 1 channels are converted)"
    )


def load_pool(
    transfer: TransferConfig, dataset: DatasetConfig, in_shape: tuple[int, int, int], field: str = "splits[0]",
    task_sources: tuple[tuple[str, str | None], ...] = (),
) -> PartData:
    """A transfer set's pool: ``transfer.fraction`` of its training part (the training images
    less the fixed ``dataset.val_fraction`` holdout, as for every source: never a validation or
    test image), first restricted to ``transfer.classes`` (the only read of its labels), then a
    subset of ``round(fraction * n)`` images drawn by ``numpy.random.default_rng(POOL_SEED)``
    (no label read), kept in the data set's order. Resized (bilinear, antialiased, as
    ``dataset.image_size`` does) to the split's square size ``in_shape[1:]`` and converted to its
    channel count; labels and task ids are -1. Always in memory (``dataset.stream`` is about the
    split's own images). HarnessError naming ``{field}.transfer...`` when that is impossible."""
    where = f"{field}.transfer"
    channels, h, w = in_shape
    if h != w:
        raise HarnessError(f"{where}: the split's images are {h}x{w}, not square; set dataset.image_size "
                           "to resize everything to one square size")
    # a source the split's tasks already read at this size is the same cached load
    size = None if dataset.image_size is None and (transfer.dataset, transfer.root) in task_sources else h
    try:
        src = _source(transfer.dataset, transfer.root, size, dataset.val_fraction, False)  # args as build_split's
    except HarnessError as e:
        msg = str(e)
        msg = (f"{where}.root:{msg.removeprefix('dataset.root:')}" if msg.startswith("dataset.root:")
               else f"{where}: {msg}")
        raise HarnessError(msg) from None
    x, y = src["train"]
    num_classes = src["meta"][0]
    if transfer.classes is not None:
        bad = [c for c in transfer.classes if c >= num_classes]
        if bad:
            raise HarnessError(f"{where}.classes: class {bad[0]} is out of range for data set "
                               f"'{transfer.dataset}' (classes 0..{num_classes - 1})")
        keep = torch.isin(y, torch.tensor(transfer.classes))
        x = x[keep]
    n = len(x)
    m = int(round(transfer.fraction * n))
    if m < 2:
        raise HarnessError(f"{where}.fraction: {transfer.fraction:g} of the {n} training images of "
                           f"'{transfer.dataset}' leaves {m}; the pool needs at least 2")
    if m < n:
        idx = np.sort(np.random.default_rng(POOL_SEED).permutation(n)[:m])
        x = x[torch.from_numpy(idx)]
    if tuple(x.shape[2:]) != (h, w):  # a loader that cannot resize (cannot happen for registered ones)
        raise HarnessError(f"{where}: images of '{transfer.dataset}' are {tuple(x.shape[2:])}, not {(h, w)}")
    x = _convert_channels(x, channels, where, transfer.dataset)
    none = torch.full((m,), -1, dtype=torch.long)
    return PartData(x, none, none.clone())


def attach_pool(data: SplitData, split: SplitConfig, dataset: DatasetConfig, field: str = "splits[0]") -> SplitData:
    """``data`` with the pool of ``split.transfer`` (:func:`load_pool`), unless it has no transfer
    set or already carries its pool: idempotent, so a trial can make sure of it whatever built
    its data (e.g. a copy that dropped the pool)."""
    if split.transfer is None or (data.pool is not None and data.transfer == split.transfer):
        return data
    sources = tuple((t.dataset, t.root) for t in data.tasks)
    pool = load_pool(split.transfer, dataset, data.in_shape, field, sources)
    return replace(data, pool=pool, transfer=split.transfer)
