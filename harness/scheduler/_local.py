"""The local pool: one fresh worker process per job on a free slot of this machine."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from harness.errors import HarnessError
from harness.scheduler._slots import Slot, describe_slots
from harness.scheduler._worker import Outcome, Target, WorkerContext, enter_worker, error_text

#: Imported once by the forkserver, so every worker starts with them loaded. ``torch._dynamo`` is
#: imported lazily by the first optimiser torch builds (~2 s on a CPU core), once per worker without it.
PRELOAD = ("harness.trial", "torch._dynamo", "sklearn.linear_model", "mlflow.store.tracking.sqlalchemy_store")


def _die_with_runner(lifeline: Any) -> None:
    """Kill this worker when the runner dies: only the runner holds the other end of ``lifeline``
    and never writes to it, so EOF means the runner is gone (even by SIGKILL). A killed runner
    thus leaves no orphan that would later finish a run the resume has redone."""

    def watch() -> None:
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="harness-lifeline", daemon=True).start()


def _local_main(slot: Slot, ctx: WorkerContext, conn: Any, lifeline: Any) -> None:
    """Entry point of a local worker process: set up for the slot, warm up, then wait for one job
    ``(target, payload)`` on ``conn`` (None: not needed after all) and send its result back."""
    _die_with_runner(lifeline)
    try:
        enter_worker(ctx, slot)
        for fn, arg in ctx.warm:
            try:
                fn(arg)
            except Exception:  # best effort: the job itself redoes (and reports) what failed here
                pass
        job = conn.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        sys.exit(0)
    if job is None:
        sys.exit(0)
    target, payload = job
    try:
        result = target(payload, slot)
    except BaseException as e:
        conn.send(("error", error_text(e)))
        conn.close()
        sys.exit(1)
    conn.send(("ok", result))
    conn.close()


@contextmanager
def _importable_main() -> Iterator[None]:
    """Hide a ``__main__.__file__`` that is no file (``python - < script``, ``<stdin>``) while a
    worker starts: multiprocessing would make each worker re-run it as a path and fail."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    fake = path is not None and getattr(main, "__spec__", None) is None and not os.path.isfile(path)
    if fake:
        del main.__file__  # type: ignore[union-attr]
    try:
        yield
    finally:
        if fake:
            main.__file__ = path  # type: ignore[union-attr]


def signal_text(code: int) -> str:
    try:
        return f"signal {code} {signal.Signals(code).name}"
    except ValueError:
        return f"signal {code}"


@dataclass
class _Running:
    proc: Any
    conn: Any
    lifeline: Any
    slot: Slot
    message: tuple | None = None  # ("ok", result) or ("error", text); () once the pipe hit EOF
    ctx: WorkerContext | None = None  # what a standby was set up with

    def close(self) -> None:
        self.conn.close()
        self.lifeline.close()


class LocalPool:
    """One worker process per job on a free slot of this machine; at most ``limit`` at a time.

    With ``standby`` (default), starting a job on a slot also starts the slot's next worker, which
    sets itself up while the job runs, so the next job on the slot starts without that delay."""

    def __init__(self, slots: list[Slot], workers: int | None = None, preload: tuple[str, ...] = PRELOAD,
                 standby: bool = True) -> None:
        if not slots:
            raise HarnessError("the device pool has no slots")
        self.slots = list(slots)
        self.limit = min(len(slots), workers or len(slots))
        self.standby = standby
        self._free = list(slots)
        self._caps: dict[str, int] = {}  # device -> at most this many of its slots at once (packing)
        self._running: dict[str, _Running] = {}
        self._standby: dict[str, _Running] = {}  # slot name -> a set-up worker waiting for a job
        if "forkserver" in mp.get_all_start_methods():
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(list(preload))
        else:  # Windows
            self._ctx = mp.get_context("spawn")

    @property
    def teacher_device(self) -> str:
        return self.slots[0].parent_device

    def describe(self) -> str:
        return describe_slots(self.slots, self.limit)

    def warm(self) -> None:
        """Start the forkserver now (its imports then overlap with the teacher stage)."""
        if self._ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()

    def has_room(self) -> bool:
        return len(self._running) < self.limit and self._pick() is not None

    def cap(self, device: str, n: int) -> None:
        """From now on run at most ``n`` (>= 1) jobs at a time on the slots of ``device`` (their
        ``parent_device``, e.g. ``cuda:0``); jobs running there now go on."""
        self._caps[device] = max(1, n)

    def _pick(self) -> Slot | None:
        """The first free slot whose device is below its cap."""
        busy: dict[str, int] = {}
        for r in self._running.values():
            busy[r.slot.parent_device] = busy.get(r.slot.parent_device, 0) + 1
        for slot in self._free:
            dev = slot.parent_device
            if busy.get(dev, 0) < self._caps.get(dev, len(self.slots)):
                return slot
        return None

    def _start(self, slot: Slot, ctx: WorkerContext) -> _Running:
        """A new worker for ``slot``, setting itself up and then waiting for a job."""
        here, there = self._ctx.Pipe(duplex=True)
        life_r, life_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_local_main, args=(slot, ctx, there, life_r),
                                 name=f"harness-worker-{slot.name}")
        try:
            with _importable_main():
                proc.start()
        except BaseException:
            here.close()
            life_w.close()
            raise
        finally:
            there.close()
            life_r.close()
        return _Running(proc, here, life_w, slot, ctx=ctx)

    def submit(self, key: str, target: Target, payload: Any, ctx: WorkerContext) -> Slot:
        """Start ``target(payload, slot)`` on a free slot (in its standby worker when that one
        was set up with the same context, else in a new worker); returns the slot."""
        slot = self._pick()
        if slot is None:
            raise HarnessError("the device pool has no free slot (submit only when has_room())")
        self._free.remove(slot)
        try:
            r = self._standby.pop(slot.name, None)
            if r is not None and not (r.ctx is ctx and r.proc.is_alive() and _send(r.conn, (target, payload))):
                _discard(r)
                r = None
            if r is None:
                r = self._start(slot, ctx)
                if not _send(r.conn, (target, payload)):
                    _discard(r)
                    raise HarnessError(f"could not start a worker on {slot.name}")
        except BaseException:
            self._free.append(slot)
            self._free.sort(key=self.slots.index)
            raise
        self._running[key] = r
        if self.standby:
            try:
                self._standby[slot.name] = self._start(slot, ctx)
            except OSError:  # no room for another process now: the next job starts a fresh one
                pass
        return slot

    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes of the jobs that ended within ``timeout`` seconds (maybe none)."""
        if not self._running:
            return []
        handles: dict[Any, str] = {}
        for key, r in self._running.items():
            handles[r.proc.sentinel] = key
            if r.message is None:
                handles[r.conn] = key  # read results as they come: a full pipe would block the worker
        ready = mp.connection.wait(list(handles), timeout)
        for h in ready:
            r = self._running[handles[h]]
            if h is r.conn:
                r.message = _recv(r.conn) or ()
        return [self._reap(handles[h]) for h in ready if isinstance(h, int)]

    def _reap(self, key: str) -> Outcome:
        r = self._running.pop(key)
        r.proc.join()
        if r.message is None and r.conn.poll():
            r.message = _recv(r.conn) or ()
        r.close()
        self._free.append(r.slot)
        self._free.sort(key=self.slots.index)
        code = r.proc.exitcode
        if r.message and r.message[0] == "ok":
            return Outcome(key, r.slot, True, r.message[1])
        if r.message:
            return Outcome(key, r.slot, False, error=r.message[1], kind="exception")
        if code is not None and code < 0:
            return Outcome(key, r.slot, False, error=f"worker died ({signal_text(-code)})", kind="worker_died")
        return Outcome(key, r.slot, False, error=f"worker exited with code {code} and no result", kind="worker_died")

    def stop(self) -> list[str]:
        """Terminate every running worker (SIGTERM, then SIGKILL); returns their job keys."""
        for r in self._running.values():
            r.proc.terminate()
        deadline = time.time() + 5
        for r in self._running.values():
            r.proc.join(max(0.0, deadline - time.time()))
            if r.proc.is_alive():
                r.proc.kill()
                r.proc.join()
            r.close()
        keys = list(self._running)
        self._running.clear()
        self._free = list(self.slots)
        return keys

    def close(self) -> None:
        self.stop()
        for r in self._standby.values():
            _discard(r)
        self._standby.clear()


def _send(conn: Any, job: Any) -> bool:
    try:
        conn.send(job)
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False


def _discard(r: _Running) -> None:
    """End an idle worker: tell it no job is coming, then make sure it is gone."""
    _send(r.conn, None)
    r.proc.join(1.0)
    if r.proc.is_alive():
        r.proc.kill()
        r.proc.join()
    r.close()


def _recv(conn: Any) -> tuple | None:
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None
