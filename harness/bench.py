"""``harness bench``: the harness's cost on top of training, as ratios measured in one run.

- ``overhead_ratio``: a harness training epoch (method loss dict, weighted sum, optimiser,
  validation, one batched MLflow call per epoch to a real sqlite store) over a bare PyTorch loop
  doing the same forward/backward/validation work. Target <= 1.03.
- ``cache_ratio``: an amalgamation epoch with cached teacher outputs over one running the
  teachers live on every batch. Target <= 0.5.
- ``makespan_ratio``: wall time of a small study on the local pool with N slots over the sum of
  its trials' own durations divided by N. Target <= 1.10.
Absolute images/s and peak memory are printed as context. Each pair is measured alternately
(A, B, A, B, ...) and compared by medians, so background load affects both sides alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

TARGETS = {"overhead_ratio": 1.03, "cache_ratio": 0.5, "makespan_ratio": 1.10}


def _setup(device: str, student_width: int = 16, teacher_width: int = 32):
    from harness.config import DatasetConfig, SplitConfig
    from harness.data.splits import build_split
    from harness.methods.base import SplitInfo, TeacherSet, get_method
    from harness.models import build_model

    data = build_split(SplitConfig(name="2x5", tasks=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]), DatasetConfig(name="mnist5k"))
    torch.manual_seed(0)
    teachers = TeacherSet([build_model("cnn", data.in_shape, 5, width=teacher_width) for _ in range(2)]).to(device)

    def make_kd():
        torch.manual_seed(1)
        cls = get_method("kd")
        student = build_model("cnn", data.in_shape, 10, width=student_width)
        return cls(student, teachers, cls.ParamsModel(), SplitInfo(tuple(data.sizes), tuple(data.offsets))).to(device)

    return data, teachers, make_kd


def _alternate(a: Callable[[], float], b: Callable[[], float], reps: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(reps):
        ta.append(a())
        tb.append(b())
    return statistics.median(ta), statistics.median(tb)


def bench_overhead(device: str = "cpu", epochs: int = 4, reps: int = 3) -> dict[str, float]:
    """Harness fit() with MLflow logging vs a bare loop with the same work."""
    from harness import losses
    from harness.config import TrainConfig
    from harness.tracking import Tracker
    from harness.train import evaluate, fit, teacher_outputs

    data, teachers, make_kd = _setup(device)
    cfg = TrainConfig(epochs=epochs, batch_size=128)
    tmp = tempfile.mkdtemp(prefix="harness-bench-")
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
    exp = tracker.experiment("bench")
    x = data.parts["train"].x.to(device)
    cached = teacher_outputs(teachers, x)

    def harness_run() -> float:
        run = tracker.start(exp, "overhead", {"harness.kind": "bench"})
        m = make_kd()
        t0 = time.perf_counter()
        fit(m, data, cfg, seed=0, device=device, cached_outputs=cached,
            on_epoch=lambda e, mt: tracker.log_metrics(run, mt, step=e))
        dt = time.perf_counter() - t0
        tracker.finish(run)
        return dt

    def bare_run() -> float:
        m = make_kd()
        student = m.student
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        target = torch.cat(cached[0], 1)
        gen = torch.Generator().manual_seed(0)
        n = len(x)
        t0 = time.perf_counter()
        for _ in range(epochs):
            student.train()
            perm = torch.randperm(n, generator=gen)
            for b in range(n // cfg.batch_size):
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size].to(device)
                loss = losses.soft_target_kl(target[idx], student(x[idx]), 1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            student.eval()
            evaluate(student, data.parts["val"], data.sizes, data.offsets, device)
        student.eval()  # the same final work as the harness: test split, last and best-val model
        evaluate(student, data.parts["test"], data.sizes, data.offsets, device)
        evaluate(student, data.parts["test"], data.sizes, data.offsets, device)
        return time.perf_counter() - t0

    try:
        harness_run(), bare_run()  # warm-up (allocator, MLflow connection)
        th, tb = _alternate(harness_run, bare_run, reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"overhead_ratio": th / tb, "harness_seconds": th, "bare_seconds": tb,
            "images_per_second": epochs * len(x) / th}


def bench_cache(device: str = "cpu", reps: int = 3) -> dict[str, float]:
    """One amalgamation epoch with cached teacher outputs vs teachers run live every batch."""
    from harness.config import TrainConfig
    from harness.train import teacher_outputs, train_epoch

    data, teachers, make_kd = _setup(device)
    cfg = TrainConfig(epochs=1, batch_size=128)
    x = data.parts["train"].x.to(device)
    cached = teacher_outputs(teachers, x)

    def epoch(cache) -> Callable[[], float]:
        def run() -> float:
            m = make_kd()
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            t0 = time.perf_counter()
            train_epoch(m, opt, x, None, cache, cfg, torch.Generator().manual_seed(0))
            return time.perf_counter() - t0

        return run

    epoch(cached)(), epoch(None)()
    tc, tl = _alternate(epoch(cached), epoch(None), reps)
    return {"cache_ratio": tc / tl, "cached_epoch_seconds": tc, "live_epoch_seconds": tl}


def bench_makespan(workers: int = 2, trials: int = 8) -> dict[str, float]:
    """Wall time of a small study on the local pool vs the sum of its trials' durations / N."""
    import yaml

    from harness.runner import run_study
    from harness.tracking import TAG, Tracker

    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    study = {
        "name": "bench-makespan",
        "dataset": {"name": "digits"},
        "splits": [{"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}],
        "teachers": [{"arch": "cnn", "width": 8, "epochs": 2}],
        "student": {"arch": "cnn", "width": 16},
        "train": {"epochs": 15, "batch_size": 64},  # trials of ~3 s, like the digits study's
        "methods": {"kd": {}, "cka": {}},
        "seeds": list(range(trials // 2)),
        "cache_dir": str(tmp / "cache"),
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp}/mlflow.db"
    try:
        t0 = time.time()
        with contextlib.redirect_stdout(sys.stderr):  # stdout stays the figures (--json)
            code = run_study(path, tracking_uri=uri, workers=workers, report=False, live=False)
        wall = time.time() - t0
        if code != 0:
            raise RuntimeError("makespan benchmark study failed")
        tracker = Tracker(uri)
        runs = tracker.find(tracker.experiment(study["name"]), {f"{TAG}kind": "trial"}, ("FINISHED",))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    spans = [(float(r.data.tags[f"{TAG}start"]), float(r.data.tags[f"{TAG}end"])) for r in runs]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    busy = sum(e - s for s, e in spans)
    return {"makespan_ratio": (last - first) / (busy / workers), "makespan_seconds": last - first,
            "study_wall_seconds": wall, "trial_seconds_sum": busy, "workers": float(workers)}


def run_bench(device: str | None = None, workers: int = 2, as_json: bool = False, quick: bool = False) -> int:
    """Measure and print every ratio (``quick``: one repetition of each, for smoke tests)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(), "cores": os.cpu_count()}
    reps = 1 if quick else 3
    out.update(bench_overhead(device, epochs=1 if quick else 4, reps=reps))
    out.update(bench_cache(device, reps=reps))
    out.update(bench_makespan(workers, trials=4 if quick else 8))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if as_json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"harness bench on {device} ({out['cores']} cores, {out['torch_threads']} torch threads)")
    for key, target in TARGETS.items():
        ok = "meets" if out[key] <= target else "MISSES"
        print(f"  {key:<16} {out[key]:6.3f}   target <= {target:.2f} ({ok})")
    print(f"  context: {out['images_per_second']:.0f} img/s in harness training, "
          f"cached epoch {out['cached_epoch_seconds']:.2f}s vs live {out['live_epoch_seconds']:.2f}s, "
          f"makespan {out['makespan_seconds']:.1f}s for {out['trial_seconds_sum']:.1f}s of trials on "
          f"{workers} slots, peak RSS {out['peak_rss_mb']:.0f} MB")
    return 0
