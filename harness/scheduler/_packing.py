"""How many trials fit on one GPU: the pool's packing check, as pure decisions on numbers.

``trials_per_device: k`` packs k trials (k worker processes) on each GPU. Each holds its peak
``gpu_peak_mb`` (what torch's caching allocator reserved, :func:`harness.train.gpu_memory_metrics`)
plus its CUDA context, which torch does not count (:data:`CUDA_CONTEXT_MB`). So k trials fit
when ``k * (peak + context) <= total``. The peak is known before the study starts when the store
holds a finished run of one of its trial keys with ``gpu_peak_mb`` (the runner refuses to start:
exit 2), else it is learned from the first trial that finishes on each GPU (the pool then runs
fewer trials at a time there, and says so). Nothing here asks a GPU: totals and peaks are given,
so every decision is testable on a machine without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: GPU memory a worker holds besides its tensors' allocator (CUDA context, cuBLAS/cuDNN handles
#: and kernels), in MiB; not part of ``gpu_peak_mb``. About 300-600 MiB on current GPUs and CUDA.
CUDA_CONTEXT_MB = 512.0


def trials_that_fit(peak_mb: float, total_mb: float, context_mb: float = CUDA_CONTEXT_MB) -> int:
    """``floor(total / (peak + context))``: how many trials of this peak one GPU holds (0 when
    not even one does)."""
    return int(math.floor(total_mb / (peak_mb + context_mb)))


@dataclass(frozen=True)
class Packing:
    """One packing decision: ``trials`` trials of ``peak_mb`` each on ``device`` of ``total_mb``."""

    device: str
    trials: int
    peak_mb: float
    total_mb: float
    source: str  # where the peak comes from, e.g. "the first trial that finished on cuda:0"
    context_mb: float = CUDA_CONTEXT_MB

    @property
    def fit(self) -> int:
        """Trials that fit at once, at least 1 (one trial alone is not a packing question)."""
        return max(1, trials_that_fit(self.peak_mb, self.total_mb, self.context_mb))

    @property
    def ok(self) -> bool:
        return self.trials <= self.fit

    def numbers(self) -> str:
        """``3 trials x (5200 MB peak + 512 MB CUDA context) = 17136 MB > 16384 MB on cuda:0``"""
        need = self.trials * (self.peak_mb + self.context_mb)
        return (f"{self.trials} trials x ({self.peak_mb:.0f} MB peak + {self.context_mb:.0f} MB CUDA context) = "
                f"{need:.0f} MB > {self.total_mb:.0f} MB on {self.device}")

    def refusal(self) -> str:
        """The one line that stops a study before it starts."""
        return (f"trials_per_device: {self.numbers()} (peak: {self.source}); at most {self.fit} fit: "
                f"set trials_per_device: {self.fit}")

    def reduction(self) -> str:
        """The one line said when the pool learns it during the run."""
        return (f"trials_per_device: {self.numbers()} (peak: {self.source}); running at most {self.fit} "
                f"at a time on {self.device} from now on")


def check_packing(trials_per_device: int, peak_mb: float | None, totals_mb: dict[str, float],
                  source: str) -> list[Packing]:
    """The devices (of ``totals_mb``: GPU -> total memory in MiB) where ``trials_per_device``
    trials of ``peak_mb`` do not fit; [] when all fit or the peak is unknown."""
    if peak_mb is None or trials_per_device <= 1:
        return []
    checks = [Packing(dev, trials_per_device, peak_mb, total, source) for dev, total in sorted(totals_mb.items())]
    return [c for c in checks if not c.ok]


@dataclass
class PackingGuard:
    """The run-time side: the largest peak seen so far on each GPU and the concurrency it allows.

    :meth:`observe` is fed each finished trial's ``gpu_peak_mb``; it returns a :class:`Packing`
    when that peak lowers the number of trials that may run at once on the device (never raises
    it again: a later, smaller peak does not make the larger one go away)."""

    trials_per_device: int
    totals_mb: dict[str, float]
    context_mb: float = CUDA_CONTEXT_MB
    caps: dict[str, int] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)

    def observe(self, device: str, peak_mb: float | None) -> Packing | None:
        if peak_mb is None or device not in self.totals_mb or not math.isfinite(peak_mb):
            return None
        first = device not in self.peaks
        self.peaks[device] = max(peak_mb, self.peaks.get(device, 0.0))
        which = "the first trial that finished there" if first else "the largest of the trials finished there"
        p = Packing(device, self.caps.get(device, self.trials_per_device), self.peaks[device],
                    self.totals_mb[device], f"{which}, gpu_peak_mb", self.context_mb)
        if p.ok:
            return None
        self.caps[device] = p.fit
        return p
