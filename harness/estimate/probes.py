"""The estimate's fixed costs, measured here and now: the imports of the runner and the
forkserver (:func:`import_preload`, :func:`measure_pool_start`), MLflow's requests on a throwaway
store (:func:`measure_mlflow`), how much slower processes run side by side
(:func:`measure_contention`), and whether the target store would be created (:func:`store_is_new`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.store import (
    ATTEMPT, END, GIT_COMMIT, KIND, KIND_STUDY, KIND_TRIAL, METHOD, SEED, SEEDED, SPLIT, STUDY,
    TRIAL_ARTIFACT, TRIAL_KEY, USES_LABELS, VARIANT, VERSION, probe_tag,
)


def import_preload() -> float:
    """Seconds to import torch and what the forkserver preloads, here (0 where already imported:
    then the runner in this process would not pay them either)."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from harness.scheduler import PRELOAD

    for mod in PRELOAD:
        importlib.import_module(mod)
    return time.perf_counter() - t0


_IMPORTS = "from harness.estimate.probes import import_preload; import_preload()"


def measure_pool_start(timeout: float = 600.0) -> float:
    """Seconds a fresh interpreter takes to import what the forkserver preloads (its start-up),
    in a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HarnessError(f"--estimate: could not time a worker's start-up ({tail})")
    return time.perf_counter() - t0


def measure_mlflow(config: dict[str, Any], epochs: int) -> dict[str, float]:
    """MLflow's costs here, on a store created in a temporary folder (deleted afterwards):
    ``store`` (create it), ``reopen`` (open it again), ``op`` (one request, the median of five)
    and ``trial`` (one trial's requests: the run opened with the resolved ``config`` as params
    and ``trial.yaml``, its tags, ``epochs`` epochs of curves, final metrics, finishing)."""
    import logging
    import shutil

    import yaml

    from harness.tracking import Tracker

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="harness-estimate-")
    try:
        uri = f"sqlite:///{tmp}/probe.db"
        t0 = time.perf_counter()
        tracker = Tracker(uri)
        store = time.perf_counter() - t0
        t0 = time.perf_counter()
        Tracker(uri)
        reopen = time.perf_counter() - t0
        exp = tracker.client.create_experiment("estimate-probe", artifact_location=f"{tmp}/artifacts")
        parent = tracker.start(exp, "study", {KIND: KIND_STUDY})
        ops = []
        for i in range(5):
            t0 = time.perf_counter()
            tracker.log_metrics(parent, {"probe": float(i)}, step=i)
            ops.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # as open_trial_run, execute_trial and finish_unique do
        tags = {k: "x" * 16 for k in (STUDY, SPLIT, METHOD, VARIANT, SEED, TRIAL_KEY, USES_LABELS, SEEDED, VERSION,
                                      ATTEMPT, GIT_COMMIT)}
        run = tracker.start(exp, "trial", {**tags, KIND: KIND_TRIAL}, config, parent)
        tracker.log_text(run, yaml.safe_dump(config), TRIAL_ARTIFACT)
        for group in range(3):
            tracker.set_tags(run, {probe_tag(group, i): "x" * 16 for i in range(8)})
        buf = tracker.buffered(run)
        for e in range(1, epochs + 1):
            buf.log({f"m{i}": float(i) for i in range(10)}, step=e)
        buf.flush()
        tracker.log_metrics(run, {f"final{i}": float(i) for i in range(20)}, step=epochs)
        tracker.set_tags(run, {END: "0"})
        tracker.run(run)
        tracker.find(exp, {KIND: KIND_TRIAL}, ("FINISHED",))
        tracker.finish(run)
        trial = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"store": store, "reopen": reopen, "op": sorted(ops)[len(ops) // 2], "trial": trial}


#: the contention workload: small single-threaded array arithmetic in a Python loop, like a small
#: network's training step (dispatch overhead and vectorised kernels); one round per "go" line
_SPIN = """import sys, time
import numpy as np
a = np.random.default_rng(0).standard_normal((96, 96)).astype(np.float32)
print("ready", flush=True)
for line in sys.stdin:
    b = a.copy()
    t = time.perf_counter()
    for _ in range({n}):
        b = np.maximum(a @ b, 0.0)
        b /= np.abs(b).max() + 1.0
    print(time.perf_counter() - t, flush=True)
"""


def measure_contention(procs: int, reps: int = 5, work: int = 1000) -> float:
    """How much slower each of ``procs`` CPU-bound processes runs when they run at once than one
    alone, here and now (other users' load included): ``procs`` single-threaded processes
    (:data:`_SPIN`) run a fixed workload, one alone then all at once, alternately ``reps`` times;
    the median ratio of the median times, at least 1."""
    import statistics

    env = {**os.environ, **{v: "1" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    ps = [subprocess.Popen([sys.executable, "-c", _SPIN.format(n=work)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    try:
        for p in ps:
            if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise HarnessError("--estimate: the contention probe did not start")

        def round_(group: list[Any]) -> list[float]:
            for p in group:
                p.stdin.write("go\n")
                p.stdin.flush()
            return [float(p.stdout.readline()) for p in group]

        ratios = []
        for _ in range(reps):
            alone = round_(ps[:1])[0]
            ratios.append(statistics.median(round_(ps)) / alone)
    finally:
        for p in ps:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=10)
    return max(1.0, statistics.median(ratios))


def store_is_new(uri: str) -> bool:
    """Whether opening ``uri`` would create the store (a SQLite file that does not exist or is empty)."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri[len("sqlite:///"):].split("?")[0])
    return not path.exists() or path.stat().st_size == 0
