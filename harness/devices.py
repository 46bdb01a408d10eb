"""What this process may run on: the GPUs it may use and the cores it may run on.

Read by the scheduler (:func:`harness.scheduler.build_slots` makes its slots from them) and by
whatever must know the devices without building a pool (the grid's effective precision,
:func:`harness.grid.study_precision`). Torch is imported only to count GPUs.
"""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """Ids (as ``CUDA_VISIBLE_DEVICES`` names them) of the GPUs this process may use."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env else []
    return ids[:n] if len(ids) >= n else [str(i) for i in range(n)]
