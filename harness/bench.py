"""``harness bench``: the harness's cost on top of training, as ratios measured in one run.

- ``overhead_ratio``: a harness training epoch (method loss dict, weighted sum, optimiser,
  validation, one batched MLflow call per epoch to a real sqlite store) over a bare PyTorch loop
  doing the same forward/backward/validation work. Target <= 1.03.
- ``cache_ratio``: an amalgamation epoch with cached teacher outputs over one running the
  teachers live on every batch. Target <= 0.5.
- ``makespan_ratio``: wall time of a small study on the local pool with N slots over the sum of
  its trials' own durations divided by N. Target <= 1.10.
- ``estimate_ratio`` (CPU): ``harness run-study --estimate``'s wall time of that study
  (:mod:`harness.estimate`, computed just before it runs) over its measured wall time. Target
  within [0.7, 1.3].
Absolute images/s and peak memory are printed as context. Each pair is measured alternately
(A, B, A, B, ...) and compared by medians, so background load affects both sides alike.

``--device cuda`` (``cuda:N``) measures the same on a GPU and adds the GPU figures:

- ``images_per_second`` vs ``bare_images_per_second``: training throughput of the harness and of
  the bare loop on the same GPU, the bare loop doing the same arithmetic (bf16 autocast when
  ``train.amp`` gives bf16 there, channels_last);
- ``packing_ratio``: trials per hour of a small study with ``trials_per_device: k`` (k =
  :data:`PACK_K`) over the same study with ``trials_per_device: 1`` on that GPU, i.e. makespan(1)
  / makespan(k), makespan from the first trial's start to the last trial's end. Target >= 2;
  ``makespan_ratio`` is then that of the packed run on its k slots;
- ``gpu_peak_mb``: peak GPU memory of a harness training run in this process, as trials log it
  (what torch's allocator held, :func:`harness.train.gpu_memory_metrics`), and
  ``trial_gpu_peak_mb``: the largest ``gpu_peak_mb`` a trial of the packed study logged.
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

from harness.errors import HarnessError
from harness.store import END, KIND, KIND_BENCH, KIND_TRIAL, START

#: figure -> (direction, target); "<=": lower is better
TARGETS = {"overhead_ratio": ("<=", 1.03), "cache_ratio": ("<=", 0.5), "makespan_ratio": ("<=", 1.10)}
GPU_TARGETS = {"packing_ratio": (">=", 2.0)}
#: "in": within [low, high]
CPU_TARGETS = {"estimate_ratio": ("in", (0.7, 1.3))}
#: trials per GPU of the packed run of the packing benchmark
PACK_K = 4


def check_device(device: str | None) -> str:
    """``cpu`` (the default) or a CUDA device this process can use; a one-line HarnessError
    naming ``--device`` otherwise."""
    device = device or "cpu"
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise HarnessError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise HarnessError(f"--device {device}: CUDA is not available here ({why}; torch {torch.__version__})")
    index = int(device.split(":")[1]) if ":" in device else 0
    n = torch.cuda.device_count()
    if index >= n:
        raise HarnessError(f"--device {device}: not visible here ({n} GPU{'s' * (n != 1)} visible)")
    return f"cuda:{index}"


def _sync(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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
    """Harness fit() with MLflow logging vs a bare loop with the same work (on CUDA the same
    arithmetic too: bf16 autocast where the harness uses it, channels_last)."""
    from harness import losses
    from harness.config import TrainConfig
    from harness.tracking import Tracker
    from harness.train import effective_precision, evaluate, fit, gpu_memory_metrics, teacher_outputs

    data, teachers, make_kd = _setup(device)
    cfg = TrainConfig(epochs=epochs, batch_size=128)
    tmp = tempfile.mkdtemp(prefix="harness-bench-")
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
    exp = tracker.experiment("bench")
    x = data.parts["train"].x.to(device)
    cached = teacher_outputs(teachers, x)
    cuda = device.startswith("cuda")
    bf16 = effective_precision(cfg, device) == "bf16"
    peaks: list[float] = []

    def harness_run() -> float:
        run = tracker.start(exp, "overhead", {KIND: KIND_BENCH})
        m = make_kd()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        fit(m, data, cfg, seed=0, device=device, cached_outputs=cached,
            on_epoch=lambda e, mt: tracker.log_metrics(run, mt, step=e))
        _sync(device)
        dt = time.perf_counter() - t0
        if cuda:
            peaks.append(gpu_memory_metrics(device)["gpu_peak_mb"])
        tracker.finish(run)
        return dt

    xb_all = x.contiguous(memory_format=torch.channels_last) if cuda else x

    def bare_run() -> float:
        m = make_kd()
        student = m.student
        if cuda:
            student.to(memory_format=torch.channels_last)
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
                with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    out = student(xb_all[idx])
                loss = losses.soft_target_kl(target[idx], out.float(), 1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            student.eval()
            evaluate(student, data.parts["val"], data.sizes, data.offsets, device)
        student.eval()  # the same final work as the harness: test split, last and best-val model
        evaluate(student, data.parts["test"], data.sizes, data.offsets, device)
        evaluate(student, data.parts["test"], data.sizes, data.offsets, device)
        _sync(device)
        return time.perf_counter() - t0

    try:
        harness_run(), bare_run()  # warm-up (allocator, MLflow connection, cudnn autotuning)
        th, tb = _alternate(harness_run, bare_run, reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"overhead_ratio": th / tb, "harness_seconds": th, "bare_seconds": tb,
           "images_per_second": epochs * len(x) / th, "bare_images_per_second": epochs * len(x) / tb}
    if cuda:
        out["gpu_peak_mb"] = max(peaks)
    return out


def bench_cache(device: str = "cpu", reps: int = 3) -> dict[str, float]:
    """One amalgamation epoch with cached teacher outputs vs teachers run live every batch."""
    from harness.config import TrainConfig
    from harness.data.source import image_source
    from harness.train import teacher_outputs, train_epoch

    data, teachers, make_kd = _setup(device)
    cfg = TrainConfig(epochs=1, batch_size=128)
    x = data.parts["train"].x.to(device)
    cached = teacher_outputs(teachers, x)
    source = image_source(x)

    def epoch(cache) -> Callable[[], float]:
        def run() -> float:
            m = make_kd()
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            _sync(device)
            t0 = time.perf_counter()
            train_epoch(m, opt, source, None, cache, cfg, torch.Generator().manual_seed(0))
            _sync(device)
            return time.perf_counter() - t0

        return run

    epoch(cached)(), epoch(None)()
    tc, tl = _alternate(epoch(cached), epoch(None), reps)
    return {"cache_ratio": tc / tl, "cached_epoch_seconds": tc, "live_epoch_seconds": tl}


def _small_study(name: str, tmp: Path, trials: int, **extra: Any) -> dict[str, Any]:
    """Two methods x ``trials // 2`` seeds on digits, trials of ~3 s on a CPU core (like the
    digits study's), teachers cached in ``tmp/cache``."""
    return {
        "name": name,
        "dataset": {"name": "digits"},
        "splits": [{"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}],
        "teachers": [{"arch": "cnn", "width": 8, "epochs": 2}],
        "student": {"arch": "cnn", "width": 16},
        "train": {"epochs": 15, "batch_size": 64},
        "methods": {"kd": {}, "cka": {}},
        "seeds": list(range(max(1, trials // 2))),
        "cache_dir": str(tmp / "cache"),
        **extra,
    }


def _run_timed(study: dict[str, Any], tmp: Path, workers: int | None) -> tuple[list[Any], float]:
    """Run ``study`` on the local pool with its own store in ``tmp``; its FINISHED trial runs and
    the study's wall time. RuntimeError if a trial failed."""
    import yaml

    from harness.runner import run_study
    from harness.tracking import Tracker

    path = tmp / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp}/{study['name']}.db"
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # stdout stays the figures (--json)
        code = run_study(path, tracking_uri=uri, workers=workers, report=False, live=False)
    wall = time.time() - t0
    if code != 0:
        raise RuntimeError(f"benchmark study {study['name']} failed")
    tracker = Tracker(uri)
    return tracker.find(tracker.experiment(study["name"]), {KIND: KIND_TRIAL}, ("FINISHED",)), wall


def _spans(runs: list[Any]) -> tuple[float, float]:
    """(makespan: first start to last end, sum of the trials' own durations) from their tags."""
    from harness.tracking import tag_seconds

    spans = [(tag_seconds(r.data.tags[START]), tag_seconds(r.data.tags[END])) for r in runs]
    return max(e for _, e in spans) - min(s for s, _ in spans), sum(e - s for s, e in spans)


def _estimate(study: dict[str, Any], tmp: Path, workers: int) -> float:
    """The estimated wall seconds of ``study`` as :func:`_run_timed` runs it (same file, its new
    store in ``tmp``, teachers not cached). The runner's imports are done first: the measured
    run's clock starts after them too."""
    import yaml

    from harness.estimate import estimate_study, import_preload

    import_preload()
    path = tmp / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study))
    with contextlib.redirect_stdout(sys.stderr):
        return estimate_study(path, workers, f"sqlite:///{tmp}/{study['name']}.db").wall_seconds


def bench_makespan(workers: int = 2, trials: int = 8) -> dict[str, float]:
    """Wall time of a small study on the local pool's CPU slots vs the sum of its trials'
    durations / N, and vs its estimate made just before."""
    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    try:
        study = _small_study("bench-makespan", tmp, trials, devices="cpu")
        estimated = _estimate(study, tmp, workers)
        runs, wall = _run_timed(study, tmp, workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    makespan, busy = _spans(runs)
    return {"makespan_ratio": makespan / (busy / workers), "makespan_seconds": makespan,
            "study_wall_seconds": wall, "trial_seconds_sum": busy, "workers": float(workers),
            "estimate_ratio": estimated / wall, "estimated_wall_seconds": estimated}


def bench_packing(device: str, k: int = PACK_K, trials: int = 2 * PACK_K) -> dict[str, float]:
    """The same small study on one GPU with ``trials_per_device`` 1 and ``k``: trials per hour
    of the packed run over the unpacked one, the packed run's makespan ratio on its k slots, and
    the largest per-trial GPU peak it logged."""
    tmp = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    try:
        study = _small_study("bench-pack1", tmp, trials, devices=[device], trials_per_device=1)
        runs1, _ = _run_timed(study, tmp, None)  # also trains the teachers (outside the spans)
        study.update(name=f"bench-pack{k}", trials_per_device=k)
        runs_k, wall = _run_timed(study, tmp, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (span1, _), (span_k, busy_k) = _spans(runs1), _spans(runs_k)
    peaks = [r.data.metrics.get("gpu_peak_mb", r.data.metrics.get("cuda_max_allocated_mb", 0.0)) for r in runs_k]
    return {"packing_ratio": span1 / span_k, "packing_k": float(k), "trials_per_hour_1": len(runs1) * 3600 / span1,
            f"trials_per_hour_{k}": len(runs_k) * 3600 / span_k, "makespan_ratio": span_k / (busy_k / k),
            "makespan_seconds": span_k, "study_wall_seconds": wall, "trial_seconds_sum": busy_k,
            "workers": float(k), "trial_gpu_peak_mb": max(peaks)}


def run_bench(device: str | None = None, workers: int = 2, as_json: bool = False, quick: bool = False) -> int:
    """Measure and print every ratio (``quick``: one repetition of each, for smoke tests).

    ``device``: ``cpu`` (default) or ``cuda``/``cuda:N``, which adds the GPU figures (packing
    replaces the CPU pool's makespan study); CUDA where there is none is a HarnessError."""
    device = check_device(device)
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(), "cores": os.cpu_count()}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(device)
    reps = 1 if quick else 3
    out.update(bench_overhead(device, epochs=1 if quick else 4, reps=reps))
    out.update(bench_cache(device, reps=reps))
    if cuda:
        out.update(bench_packing(device, trials=PACK_K if quick else 2 * PACK_K))
    else:
        out.update(bench_makespan(workers, trials=4 if quick else 8))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if as_json:
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"harness bench on {out.get('gpu', device)} ({out['cores']} cores, {out['torch_threads']} torch threads)")
    for key, (op, target) in {**TARGETS, **(GPU_TARGETS if cuda else CPU_TARGETS)}.items():
        if op == "in":
            ok = target[0] <= out[key] <= target[1]
            goal = f"in [{target[0]:.2f}, {target[1]:.2f}]"
        else:
            ok = out[key] <= target if op == "<=" else out[key] >= target
            goal = f"{op} {target:.2f}"
        print(f"  {key:<16} {out[key]:6.3f}   target {goal} ({'meets' if ok else 'MISSES'})")
    slots = f"{PACK_K} slots on {device}" if cuda else f"{workers} slots"
    print(f"  context: {out['images_per_second']:.0f} img/s in harness training vs {out['bare_images_per_second']:.0f} "
          f"in a bare loop, cached epoch {out['cached_epoch_seconds']:.2f}s vs live {out['live_epoch_seconds']:.2f}s, "
          f"makespan {out['makespan_seconds']:.1f}s for {out['trial_seconds_sum']:.1f}s of trials on "
          f"{slots}, peak RSS {out['peak_rss_mb']:.0f} MB")
    if not cuda:
        print(f"  estimate: {out['estimated_wall_seconds']:.1f}s estimated before the study ran, "
              f"{out['study_wall_seconds']:.1f}s measured")
    if cuda:
        print(f"  GPU: trials per hour {out['trials_per_hour_1']:.0f} with 1 trial per GPU, "
              f"{out[f'trials_per_hour_{PACK_K}']:.0f} with {PACK_K}; peak memory {out['gpu_peak_mb']:.0f} MB "
              f"in harness training, {out['trial_gpu_peak_mb']:.0f} MB in the largest packed trial")
    return 0
