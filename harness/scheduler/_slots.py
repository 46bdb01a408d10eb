"""Device slots: where one trial at a time can run (a GPU share or a CPU slot)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from harness.devices import cpu_cores, visible_gpus
from harness.errors import HarnessError

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Slot:
    """A place for one trial at a time.

    Attributes:
        name: shown in the progress display and tagged ``harness.slot`` (``cuda:3``, ``cuda:3#1``
            for the second trial packed on GPU 3, ``cpu#0``, ``10.0.0.5/gpu2`` under Ray).
        device: the torch device inside the worker (``cuda:0`` for a pinned GPU, ``cpu``).
        visible: ``CUDA_VISIBLE_DEVICES`` for the worker (``""`` hides every GPU from a CPU slot;
            None leaves it as it is, e.g. set by Ray).
        threads: torch (and BLAS) threads of the worker.
        parent_device: the same device as the runner process sees it (for the teacher stage).
    """

    name: str
    device: str
    visible: str | None
    threads: int
    parent_device: str


def build_slots(
    devices: Union[str, list[str]], trials_per_device: int = 1, cores: int | None = None,
    gpus: list[str] | None = None,
) -> list[Slot]:
    """The slots of a device pool.

    ``auto`` takes every visible GPU, else CPU slots; ``cpu`` gives CPU slots; either way CPU
    slots are one per core (one thread each). An explicit list (``[cuda:0, cuda:3]``, ``[cpu,
    cpu]``) pins those devices. Every listed device gets ``trials_per_device`` slots, and every
    slot ``max(1, cores // slots)`` threads.

    Args:
        devices: the study's ``devices`` field.
        trials_per_device: slots per listed device or GPU (packing small trials).
        cores: CPU cores to share (default: those of this process).
        gpus: ids of the visible GPUs (default: asked from torch).
    """
    cores = cores or cpu_cores()
    if isinstance(devices, str):
        gpus = visible_gpus() if gpus is None and devices == "auto" else (gpus or [])
        if devices == "cpu" or not gpus:
            return [Slot(f"cpu#{i}", "cpu", "", 1, "cpu") for i in range(cores)]
        devices = [f"cuda:{i}" for i in range(len(gpus))]
    if gpus is None:
        gpus = visible_gpus() if any(str(d).startswith("cuda") for d in devices) else []
    entries = _check_devices(devices, gpus)
    threads = max(1, cores // (len(entries) * trials_per_device))
    slots, n_cpu = [], 0
    for dev in entries:
        for j in range(trials_per_device):
            if dev.startswith("cuda"):
                name = dev if trials_per_device == 1 else f"{dev}#{j}"
                slots.append(Slot(name, "cuda:0", gpus[int(dev.split(":")[1])], threads, dev))
            else:
                slots.append(Slot(f"{dev}#{n_cpu}", dev, "", threads, dev))
                n_cpu += 1
    return slots


def _check_devices(devices: list[str], gpus: list[str]) -> list[str]:
    """Normalise ``cuda`` to ``cuda:0`` and check every entry (HarnessError naming it)."""
    out = []
    for i, dev in enumerate(devices):
        dev = "cuda:0" if dev == "cuda" else str(dev).strip()
        if not _DEVICE.match(dev):
            raise HarnessError(f"devices[{i}]: {dev!r} is not a device (use cpu, mps, cuda or cuda:N)")
        if dev.startswith("cuda"):
            n = len(gpus)
            if int(dev.split(":")[1]) >= n:
                raise HarnessError(f"devices[{i}]: {dev} is not visible here ({n} GPU{'s' * (n != 1)} visible)")
            if dev in out:
                raise HarnessError(f"devices[{i}]: {dev} is listed twice (use trials_per_device to pack trials)")
        out.append(dev)
    return out


def gpu_total_mb(slots: list[Slot]) -> dict[str, float]:
    """Total memory in MiB of each GPU the slots use (their ``parent_device``, as this process
    sees it); {} without GPU slots. Starts CUDA in this process (the runner's teacher stage would)."""
    devices = sorted({s.parent_device for s in slots if s.parent_device.startswith("cuda")})
    if not devices:
        return {}
    import torch

    return {d: torch.cuda.get_device_properties(torch.device(d)).total_memory / 2**20 for d in devices}


def describe_slots(slots: list[Slot], limit: int) -> str:
    """One line, e.g. ``4 slots on cuda:0, cuda:1 (2 per device, 4 threads each), 4 at a time``."""
    devs = list(dict.fromkeys(s.parent_device for s in slots))
    what = f"{len(slots)} CPU slots" if devs == ["cpu"] else f"{len(slots)} slots on {', '.join(devs)}"
    return f"{what} ({slots[0].threads} torch thread{'s' * (slots[0].threads != 1)} each), {limit} at a time"
