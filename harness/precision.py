"""The numeric precision policy of a trial, in one place.

With ``train.amp`` on a CUDA device with bf16 (:func:`harness.train.effective_precision`), the
training loop runs the student's and the teachers' forward passes and the method's losses under
bf16 autocast: matmuls and convolutions in bf16, which halves memory traffic and is what makes
GPU trials fast. bf16 keeps 8 bits of mantissa (about 3 significant digits), which is harmless for
a network's activations and for cross-entropy over logits, but not for arithmetic whose result is
a small difference of large numbers or is scaled up afterwards:

- kernel two-sample statistics (CFL's MMD): squared distances computed as |a|^2 + |b|^2 - 2 a.b
  lose all their digits when a and b are close, and the kernel's 1/(2 sigma^2) factors of small
  bandwidths amplify the rounding error into a gradient of random direction;
- routing claim scores (Mahalanobis distances, k-NN distances, log-sum-exp and log-odds over
  classes, standardisation against fitted statistics): near-tie decisions must not depend on the
  device, and training and diagnostics must route the same way;
- contrastive losses (log-sum-exp over a batch at temperature 0.05-0.1) and KL divergences
  between softened distributions, whose gradients are differences of probabilities.

Policy: **these run in float32, outside autocast**, whatever the trial's precision; everything
else (feature extractors, heads, projection MLPs) may run in bf16. A function that must run in
float32 is wrapped by :func:`float32` (or its body runs inside :func:`float32_region`); its
tensor arguments are cast to at least float32 on entry (float64 stays float64). On the CPU, and
with ``amp: false``, this changes nothing: the trial already runs in float32.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def float32_region() -> Iterator[None]:
    """Autocast off for every device type that may have it on (CUDA, CPU): ops inside run in
    the dtype of their inputs, which :func:`to_float32` makes float32."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cuda", "cpu"):
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def to_float32(obj: Any) -> Any:
    """Floating tensors narrower than float32 (bf16, fp16), also inside lists, tuples and dicts,
    as float32; float32 and float64 tensors and everything else as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.dtype in (torch.bfloat16, torch.float16) else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(to_float32(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    return obj


def float32(fn: F) -> F:
    """Decorator: run ``fn`` outside autocast with its floating tensor arguments in float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with float32_region():
            return fn(*to_float32(args), **to_float32(kwargs))

    return wrapper  # type: ignore[return-value]
