"""Where trials run: a pool of device slots with one worker process per trial, or Ray tasks.

A *slot* holds one trial at a time: a GPU (``trials_per_device`` slots each, to pack small
trials) or a CPU slot with a fixed number of torch threads (``max(1, cores // slots)``), so
concurrent trials never oversubscribe the cores and a trial's result does not depend on how
many run beside it (``--workers`` only bounds concurrency; it never changes the slots).

Two pools share one small interface (``limit``, ``has_room``, ``submit``, ``wait``, ``stop``,
``close``), so the runner's loop is the same for both:

- :class:`LocalPool`: one fresh process per job on a free slot. Workers fork from a forkserver
  that imported torch and the harness once (~30 ms per worker instead of ~6 s for spawn), and
  each slot keeps one *standby* worker, started while the slot's current job runs, that has set
  itself up (threads, environment, tracking store, data) and waits for the next job; a
  worker sees only its GPU (``CUDA_VISIBLE_DEVICES``), dies with the runner, and a worker that
  crashes (SIGKILL, segfault, the OOM killer) is reported as such while the pool goes on.
- :class:`RayPool`: the same jobs as Ray tasks with ``num_gpus`` per trial (fractional for
  packing), so Ray places them on a cluster.
- :class:`SlurmPool`: the same jobs as Slurm jobs through submitit, the trials of a submission
  as one job array, each split's teachers as a job first (:mod:`._slurm`).

Packing is checked on numbers (:mod:`._packing`): ``trials_per_device`` trials of a known peak
``gpu_peak_mb`` must fit in the GPU's memory (the runner refuses to start otherwise), and a peak
learned from a finished trial lowers the pool's concurrency on that GPU (:meth:`LocalPool.cap`).

The pools run any picklable ``target(payload, slot)``; the runner passes :func:`run_trial_job`.
The scheduler never imports a method.
"""

from harness.devices import cpu_cores, visible_gpus
from harness.scheduler._local import PRELOAD, LocalPool
from harness.scheduler._packing import CUDA_CONTEXT_MB, Packing, PackingGuard, check_packing, trials_that_fit
from harness.scheduler._ray import RayPool
from harness.scheduler._slurm import (
    JobInfo, SlurmPool, TeacherJob, active_trials, check_slurm, ended_text, job_precision, run_teacher_job, sacct, squeue,
    trial_key_of,
)
from harness.scheduler._slots import Slot, build_slots, describe_slots, gpu_total_mb
from harness.scheduler._worker import Outcome, TrialJob, WorkerContext, enter_worker, run_trial_job, warm_trial_worker

__all__ = [
    "CUDA_CONTEXT_MB", "PRELOAD", "JobInfo", "LocalPool", "Outcome", "Packing", "PackingGuard", "RayPool", "Slot", "SlurmPool",
    "TeacherJob", "TrialJob", "WorkerContext", "active_trials", "build_slots", "check_slurm", "check_packing", "cpu_cores",
    "describe_slots", "ended_text", "enter_worker", "gpu_total_mb", "job_precision", "run_teacher_job", "run_trial_job", "sacct",
    "squeue", "trial_key_of", "trials_that_fit", "visible_gpus", "warm_trial_worker",
]
