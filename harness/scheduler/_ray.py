"""The Ray pool: the same jobs as Ray tasks, placed by Ray on a cluster."""

from __future__ import annotations

from typing import Any, Union

from harness.errors import HarnessError
from harness.scheduler._slots import Slot
from harness.scheduler._worker import Outcome, Target, WorkerContext, enter_worker, error_text


def _ray_main(target: Target, payload: Any, ctx: WorkerContext) -> Any:
    """Entry point of a Ray task: the slot is whatever Ray gave it (its GPUs are cuda:0...)."""
    import ray

    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    node = ray.util.get_node_ip_address()
    where = f"gpu{','.join(gpu_ids)}" if gpu_ids else "cpu"
    slot = Slot(f"{node}/{where}", "cuda:0" if gpu_ids else "cpu", None, 1, "cuda:0" if gpu_ids else "cpu")
    enter_worker(ctx, slot)
    return target(payload, slot)


class RayPool:
    """Jobs as Ray tasks (one CPU, and ``1 / trials_per_device`` GPU when the study uses GPUs).

    Ray decides where each task runs; this pool only keeps at most ``limit`` in flight, so
    MLflow's RUNNING runs are the trials that really run (``--workers``, else the cluster's
    capacity in trials)."""

    def __init__(
        self, devices: Union[str, list[str]], trials_per_device: int = 1, workers: int | None = None,
        address: str | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise HarnessError("--backend ray needs Ray: pip install 'ka-harness[ray]'") from None
        self._ray = ray
        self._running: dict[Any, str] = {}  # object ref -> job key
        self._ctx_refs: dict[int, Any] = {}
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                ray.init(address=address, include_dashboard=False, configure_logging=False,
                         log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = f"connect to the Ray cluster at {address}" if address else "start Ray on this machine"
                raise HarnessError(f"--backend ray: cannot {where} ({error_text(e)})") from None
        res = ray.cluster_resources()
        wants_gpu = devices == "auto" or (isinstance(devices, list) and any(str(d).startswith("cuda") for d in devices))
        gpus = res.get("GPU", 0.0)
        if isinstance(devices, list) and wants_gpu and not gpus:
            self.close()
            raise HarnessError("devices: the study lists GPUs but the Ray cluster has none")
        self.gpu_share = 1.0 / trials_per_device if wants_gpu and gpus else 0.0
        capacity = int(gpus * trials_per_device) if self.gpu_share else int(res.get("CPU", 1))
        self.limit = workers or max(1, capacity)
        # a fresh process per GPU trial releases its GPU memory (max_calls is not an .options() key)
        self._task = ray.remote(max_calls=1)(_ray_main) if self.gpu_share else ray.remote(_ray_main)

    @property
    def teacher_device(self) -> str:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def warm(self) -> None:
        pass

    def describe(self) -> str:
        per = f"{self.gpu_share:g} GPU + 1 CPU" if self.gpu_share else "1 CPU"
        return f"Ray tasks of {per} each, {self.limit} at a time"

    def has_room(self) -> bool:
        return len(self._running) < self.limit

    def submit(self, key: str, target: Target, payload: Any, ctx: WorkerContext) -> Slot | None:
        if id(ctx) not in self._ctx_refs:  # shipped once (teacher files can be large)
            self._ctx_refs[id(ctx)] = self._ray.put(ctx)
        task = self._task.options(num_cpus=1, num_gpus=self.gpu_share, max_retries=0)  # retries are ours
        ref = task.remote(target, payload, self._ctx_refs[id(ctx)])
        self._running[ref] = key
        return None  # Ray picks the slot; the worker tags it

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._running:
            return []
        refs = list(self._running)
        ready, rest = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            ready += self._ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return [self._outcome(ref) for ref in ready]

    def _outcome(self, ref: Any) -> Outcome:
        exc = self._ray.exceptions
        key = self._running.pop(ref)
        try:
            return Outcome(key, None, True, self._ray.get(ref))
        except exc.RayTaskError as e:
            cause = getattr(e, "cause", None)
            return Outcome(key, None, False, error=error_text(cause) if cause else error_text(e), kind="exception")
        except exc.OutOfMemoryError:
            return Outcome(key, None, False, error="out of memory: Ray's memory monitor killed the worker",
                           kind="worker_died")
        except exc.WorkerCrashedError:
            return Outcome(key, None, False, error="worker died (the Ray worker process crashed or was killed)",
                           kind="worker_died")
        except exc.RayError as e:  # a lost node, a cancelled task, ...
            return Outcome(key, None, False, error=f"worker died ({error_text(e)})", kind="worker_died")

    def stop(self) -> list[str]:
        keys = list(self._running.values())
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()
        return keys

    def close(self) -> None:
        self.stop()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
