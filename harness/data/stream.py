"""Streaming data path for large image folders (``dataset.stream: true``).

In-memory data sets live as float tensors and the training loop slices batches from them. With
``dataset.stream: true`` an ``image_folder`` data set is *not* decoded up front: every part
(train/val/test) holds a :class:`LazyImages` collection (file paths plus how to decode them),
and images are decoded batch by batch by a :class:`torch.utils.data.DataLoader` with worker
processes (and pinned memory on CUDA) while the model trains.

``LazyImages.load`` decodes with the same function as the in-memory loader
(:func:`harness.data.datasets.decode_images`: PIL conversion, bilinear resize, uint8 / 255 in
float32), so a streamed batch is bitwise identical to the same rows of the in-memory tensor.
Labels ``y`` and task ids ``t`` stay (small) tensors.

Loader workers (:func:`loader_workers`): ``HARNESS_DATA_WORKERS`` if set, else
``min(4, cores - 1)`` where ``cores`` is the number of CPUs this process may run on
(``os.sched_getaffinity``: a trial's slot may be pinned to fewer than the machine has), leaving
one core to the training process itself; 0 (decode in the training process) when there is only
one core or the process is a daemon (which may not start children). A pass of ``B`` batches uses
at most ``B - 1`` workers (a pass of one batch decodes in the process: a worker could not overlap
anything with it). Workers of the training loader persist across epochs; other passes (evaluation,
teacher outputs, routing statistics) start and stop theirs.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from harness.data.datasets import check_image_size, decode_images, scan_image_folder
from harness.errors import HarnessError

__all__ = [
    "LazyImages", "LazySet", "STREAMABLE", "is_lazy", "cat_images", "open_image_folder",
    "loader_workers", "BatchLoader", "iter_batches", "in_chunks", "images_device", "on_device",
]

#: the data sets that ``dataset.stream: true`` supports
STREAMABLE = ("image_folder",)


@dataclass(frozen=True)
class DecodeSpec:
    """How the files of one image folder are decoded (see ``decode_images``)."""

    mode: str  # "L" or "RGB"
    image_size: int | None

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


Index = Union[Tensor, np.ndarray, slice, Sequence[int], int]


class LazyImages:
    """A lazy ``[N, C, H, W]`` float32 image collection: file paths, decoded on :meth:`load`.

    Indexing (LongTensor, bool mask, slice, numpy array, list) returns a lazy subset;
    :func:`cat_images` concatenates; :meth:`with_channels` expands grayscale to C channels
    (as the in-memory channel matching does); ``load(indices)`` decodes a batch.
    """

    def __init__(
        self, paths: Sequence[str] | np.ndarray, spec_ids: Sequence[int] | np.ndarray,
        specs: Sequence[DecodeSpec], channels: int, hw: tuple[int, int],
    ) -> None:
        self.paths = np.asarray(paths, dtype=object).reshape(-1)
        self.spec_ids = np.asarray(spec_ids, dtype=np.int64).reshape(-1)
        self.specs = tuple(specs)
        self.channels = int(channels)
        self.hw = (int(hw[0]), int(hw[1]))
        if len(self.paths) != len(self.spec_ids):
            raise ValueError("LazyImages: one decode spec id per path")
        if any(s.channels not in (1, self.channels) for s in self.specs):
            raise ValueError(f"LazyImages: cannot produce {self.channels} channels from {self.specs}")

    # ------------------------------------------------------------------ tensor-like surface
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, *self.hw))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def dim(self) -> int:
        return 4

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} images, {self.channels}x{self.hw[0]}x{self.hw[1]})"

    def _subset(self, pos: np.ndarray) -> "LazyImages":
        return LazyImages(self.paths[pos], self.spec_ids[pos], self.specs, self.channels, self.hw)

    def __getitem__(self, key: Index) -> "LazyImages | Tensor":
        """A lazy subset (an int gives the decoded ``[C, H, W]`` image)."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.load([int(key)])[0]
        if isinstance(key, slice):
            return self._subset(np.arange(len(self))[key])
        return self._subset(self._positions(key))

    def _positions(self, key: Any) -> np.ndarray:
        if isinstance(key, Tensor):
            key = key.detach().cpu().numpy()
        a = np.asarray(key)
        if a.dtype == np.bool_:
            if a.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {a.shape} for {len(self)} images")
            return np.flatnonzero(a)
        if a.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(a.dtype, np.integer):
            raise IndexError(f"LazyImages indices must be integers or a boolean mask, got {a.dtype}")
        a = a.astype(np.int64).reshape(-1)
        if a.min() < -len(self) or a.max() >= len(self):
            raise IndexError(f"index out of range for {len(self)} images")
        return np.where(a < 0, a + len(self), a)

    def with_channels(self, c: int) -> "LazyImages":
        """The same images with ``c`` channels (grayscale copied into every channel)."""
        if c == self.channels:
            return self
        if self.channels != 1:
            raise ValueError(f"LazyImages: cannot turn {self.channels} channels into {c}")
        return LazyImages(self.paths, self.spec_ids, self.specs, c, self.hw)

    # ------------------------------------------------------------------ decoding
    def load(self, indices: Index | None = None) -> Tensor:
        """Decode ``self[indices]`` (all images when None) to float32 ``[B, C, H, W]`` in order."""
        pos = np.arange(len(self)) if indices is None else (
            np.arange(len(self))[indices] if isinstance(indices, slice) else self._positions(indices)
        )
        if len(pos) == 0:
            return torch.empty((0, self.channels, *self.hw), dtype=torch.float32)
        ids = self.spec_ids[pos]
        groups = np.unique(ids)
        if len(groups) == 1:  # the usual case: one image folder, decoded straight into the batch
            return self._decode(pos, int(groups[0]))
        out = torch.empty((len(pos), self.channels, *self.hw), dtype=torch.float32)
        for s in groups:
            rows = np.flatnonzero(ids == s)
            out[torch.from_numpy(rows)] = self._decode(pos[rows], int(s))
        return out

    def _decode(self, pos: np.ndarray, spec_id: int) -> Tensor:
        spec = self.specs[spec_id]
        x = decode_images(list(self.paths[pos]), spec.mode, spec.image_size)
        if tuple(x.shape[2:]) != self.hw:
            raise HarnessError(
                f"image_folder: {self.paths[pos[0]]} decodes to {tuple(x.shape[2:])}, expected {self.hw}"
            )
        if x.shape[1] != self.channels:  # grayscale folder in an RGB split: copy the channel
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return x


def cat_images(xs: Sequence["Tensor | LazyImages"]) -> "Tensor | LazyImages":
    """``torch.cat`` for tensors; concatenation of lazy collections (all must be lazy)."""
    if not any(is_lazy(x) for x in xs):
        return torch.cat(list(xs))  # type: ignore[arg-type]
    if not all(is_lazy(x) for x in xs):
        raise TypeError("cat_images: cannot mix tensors and LazyImages")
    lazy: list[LazyImages] = list(xs)  # type: ignore[arg-type]
    shapes = {tuple(x.shape[1:]) for x in lazy}
    if len(shapes) > 1:
        raise ValueError(f"cat_images: image shapes differ {sorted(shapes)}")
    specs: list[DecodeSpec] = []
    paths, ids = [], []
    for x in lazy:  # one list of decode specs; each part's spec ids renumbered into it
        remap = []
        for s in x.specs:
            if s not in specs:
                specs.append(s)
            remap.append(specs.index(s))
        paths.append(x.paths)
        ids.append(np.asarray(remap, dtype=np.int64)[x.spec_ids] if len(x) else np.zeros(0, np.int64))
    return LazyImages(np.concatenate(paths), np.concatenate(ids), specs, lazy[0].channels, lazy[0].hw)


def is_lazy(x: object) -> bool:
    return isinstance(x, LazyImages)


def on_device(x: "Tensor | LazyImages", device: str | torch.device) -> "Tensor | LazyImages":
    """A tensor moved to ``device``; a lazy collection as it is (its batches move when loaded)."""
    return x if is_lazy(x) else x.to(device)  # type: ignore[union-attr]


@dataclass(frozen=True)
class LazySet:
    """The lazy counterpart of :class:`harness.data.datasets.ArraySet` (same field names)."""

    name: str
    x_train: LazyImages
    y_train: Tensor
    x_test: LazyImages
    y_test: Tensor
    num_classes: int
    classes: tuple[str, ...]


def open_image_folder(root: str | os.PathLike | None, image_size: int | None = None) -> LazySet:
    """``image_folder`` without decoding: file lists and headers only (same checks and errors)."""
    image_size = check_image_size(image_size)
    index = scan_image_folder(root, image_size)
    spec = DecodeSpec(index.mode, image_size)

    def part(split: str) -> tuple[LazyImages, Tensor]:
        entries = index.files[split]
        x = LazyImages([str(p) for p, _ in entries], np.zeros(len(entries), np.int64), [spec],
                       index.channels, index.hw)
        return x, torch.tensor([c for _, c in entries], dtype=torch.int64)

    x_tr, y_tr = part("train")
    x_te, y_te = part("test")
    return LazySet("image_folder", x_tr, y_tr, x_te, y_te, len(index.classes), index.classes)


def open_lazy(name: str, root: str | None, image_size: int | None) -> LazySet:
    if name not in STREAMABLE:
        raise HarnessError(f"dataset.stream: only {', '.join(STREAMABLE)} can be streamed, not '{name}'")
    return open_image_folder(root, image_size)


# --------------------------------------------------------------------------- DataLoader


def loader_workers() -> int:
    """DataLoader worker processes: ``$HARNESS_DATA_WORKERS``, else ``min(4, cores - 1)``
    (0 with one core: decoding then happens in the training process)."""
    env = os.environ.get("HARNESS_DATA_WORKERS", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            raise HarnessError(f"HARNESS_DATA_WORKERS: must be an integer, got {env!r}") from None
    if multiprocessing.current_process().daemon:  # daemonic processes may not have children
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, max(0, cores - 1))


class _Fetch(torch.utils.data.Dataset):
    """Map-style data set whose items are whole batches: ``fetch[indices] -> images.load(indices)``."""

    def __init__(self, images: LazyImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices: Tensor) -> Tensor:
        return self.images.load(indices)


class _Batches(torch.utils.data.Sampler):
    """Yields the index batches set for the current pass (one LongTensor per batch)."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def __iter__(self) -> Iterator[Tensor]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """A DataLoader over a lazy collection that yields the batches it is given, in order.

    ``pass_over(batches)`` decodes ``images[b]`` for every index batch ``b`` in worker processes
    (prefetching ahead of the consumer), pins them when the device is CUDA and moves them to the
    device. With ``persistent`` the workers live across passes (training epochs)."""

    def __init__(self, images: LazyImages, device: str | torch.device = "cpu", persistent: bool = True,
                 workers: int | None = None, batches_per_pass: int | None = None) -> None:
        self.images = images
        self.device = torch.device(device)
        self.workers = loader_workers() if workers is None else workers
        if batches_per_pass is not None:  # a worker only overlaps decoding with the *next* batch
            self.workers = min(self.workers, max(0, batches_per_pass - 1))
        self._sampler = _Batches()
        w = self.workers
        self.loader = torch.utils.data.DataLoader(
            _Fetch(images), sampler=self._sampler, batch_size=None,  # the sampler yields batches
            num_workers=w, pin_memory=self.device.type == "cuda",
            persistent_workers=persistent and w > 0, prefetch_factor=2 if w > 0 else None,
            generator=torch.Generator(),  # workers' base seed: never draw from the global RNG
        )

    def pass_over(self, batches: Iterable[Tensor]) -> Iterator[Tensor]:
        self._sampler.batches = [torch.as_tensor(b, dtype=torch.long).cpu() for b in batches]
        if not self._sampler.batches:
            return
        it = iter(self.loader)
        done = False
        try:
            for xb in it:
                yield xb.to(self.device, non_blocking=True)
            done = True
        except HarnessError as e:  # re-raised from a worker with its traceback: keep the message
            message = _worker_message(str(e))
        else:
            return
        finally:
            if not done:  # an error, or the consumer stopped early: stop the workers now
                _shutdown(it)
                if self.loader.persistent_workers:
                    self.loader._iterator = None  # type: ignore[attr-defined]
        raise HarnessError(message)

    def close(self) -> None:
        """Stop persistent workers now (they would otherwise stop when garbage collected)."""
        _shutdown(getattr(self.loader, "_iterator", None))
        self.loader._iterator = None  # type: ignore[attr-defined]

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shutdown(it: object) -> None:
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


def _worker_message(msg: str) -> str:
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split("HarnessError: ", 1)[1] if "HarnessError: " in last else last
    return msg


def sequential_batches(n: int, batch_size: int) -> list[Tensor]:
    """``[0, bs), [bs, 2 bs), ...``: the chunks an in-memory pass slices."""
    return [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def iter_batches(images: LazyImages, batch_size: int, device: str | torch.device = "cpu") -> Iterator[Tensor]:
    """``images`` decoded in order in chunks of ``batch_size`` (the same chunks that slicing an
    in-memory tensor gives), through a DataLoader, each chunk on ``device``."""
    batches = sequential_batches(len(images), batch_size)
    loader = BatchLoader(images, device, persistent=False, batches_per_pass=len(batches))
    try:
        yield from loader.pass_over(batches)
    finally:
        loader.close()


def images_device(x: "Tensor | LazyImages", device: str | torch.device | None = None) -> torch.device:
    """Where :func:`in_chunks` puts the chunks of ``x``: a tensor's own device, else ``device`` (CPU)."""
    return torch.device(device or "cpu") if is_lazy(x) else x.device  # type: ignore[union-attr]


def in_chunks(x: "Tensor | LazyImages", batch_size: int, device: str | torch.device | None = None) -> Iterator[Tensor]:
    """``x`` in order in chunks of ``batch_size``: slices of a tensor (where it lives), or the
    same chunks of a lazy collection decoded through a DataLoader onto ``device`` (default CPU).
    Every in-order pass (evaluation, teacher outputs, routing statistics) reads through this."""
    if is_lazy(x):
        yield from iter_batches(x, batch_size, device or "cpu")  # type: ignore[arg-type]
    else:
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size]  # type: ignore[index]
