"""One batch source for the training loop, whatever holds the images.

A part's images are a tensor (in memory: on the trial's device, or in RAM) or a
:class:`harness.data.stream.LazyImages` collection (``dataset.stream: true``: decoded from disk).
The training loop does not ask which: it reads an :class:`ImageSource`, whose :meth:`~ImageSource.take`
gives, for each index batch ``b`` of the epoch, the images ``x[b]`` on the source's device and
``b`` itself on that device (to index the labels and the cached teacher outputs), in order:

- in memory, ``x`` is moved to the device once (channels-last on CUDA when asked) and a batch is
  the slice ``x[b]``;
- streamed, a :class:`harness.data.stream.BatchLoader` (worker processes, prefetching, pinned
  memory on CUDA) decodes the same index batches and moves them to the device (channels-last on
  CUDA), bitwise identical to the in-memory slices. A ``persistent`` source keeps one loader's
  workers for all its passes (a trial's epochs) until :meth:`~ImageSource.close`; otherwise each
  pass starts and stops its own.

In-order passes (evaluation, teacher outputs, routing statistics) read
:func:`harness.data.stream.in_chunks`, the same way for both; :attr:`ImageSource.images` is what
they are given. This module and :mod:`harness.data.stream` are the only places that ask whether
images are in memory.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from harness.data.stream import BatchLoader, LazyImages, is_lazy

__all__ = ["ImageSource", "image_source"]


class ImageSource:
    """A part's images on one device, read batch by batch (the module docstring)."""

    #: the device the batches land on
    device: torch.device
    #: the images as the in-order passes read them (a tensor on :attr:`device`, or the lazy collection)
    images: "Tensor | LazyImages"

    def __len__(self) -> int:
        return len(self.images)

    def take(self, batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x[b], b on the device)`` for each index batch ``b`` (CPU long tensors), in order."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop what the source keeps running (a persistent loader's workers); idempotent."""

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _InMemory(ImageSource):
    def __init__(self, x: Tensor, device: torch.device, channels_last: bool) -> None:
        x = x.to(device)
        if channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        self.images, self.device = x, device

    def take(self, batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        on_dev = [idx.to(self.device) for idx in batches]  # one host->device copy of each batch's indices
        return ((self.images[idx], idx) for idx in on_dev)  # type: ignore[index]


class _Streamed(ImageSource):
    def __init__(self, images: LazyImages, device: torch.device, persistent: bool,
                 batches_per_pass: int | None) -> None:
        self.images, self.device = images, device
        self.batches_per_pass = batches_per_pass
        self._loader = BatchLoader(images, device, persistent=True, batches_per_pass=batches_per_pass) \
            if persistent else None

    def take(self, batches: Sequence[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        on_dev = [idx.to(self.device) for idx in batches]
        own = self._loader is None
        loader = self._loader or BatchLoader(self.images, self.device, persistent=False,  # type: ignore[arg-type]
                                             batches_per_pass=self.batches_per_pass or len(batches))
        try:
            for xb, idx in zip(loader.pass_over(batches), on_dev):
                if self.device.type == "cuda":
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yield xb, idx
        finally:
            if own:
                loader.close()

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()


def image_source(
    x: "Tensor | LazyImages", device: str | torch.device | None = None, *, channels_last: bool = False,
    persistent: bool = False, batches_per_pass: int | None = None,
) -> ImageSource:
    """The images ``x`` as a batch source on ``device`` (default: a tensor's own device, else the CPU).

    ``channels_last``: an in-memory tensor is stored channels-last on CUDA (streamed batches always
    are there). ``persistent`` and ``batches_per_pass`` apply to streamed images: one loader whose
    workers live for every pass until :meth:`ImageSource.close`, sized for passes of that many
    batches (a worker only overlaps decoding with the next batch)."""
    if is_lazy(x):
        return _Streamed(x, torch.device(device or "cpu"), persistent, batches_per_pass)  # type: ignore[arg-type]
    dev = torch.device(device) if device is not None else x.device  # type: ignore[union-attr]
    return _InMemory(x, dev, channels_last)  # type: ignore[arg-type]
