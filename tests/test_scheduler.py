"""Tests for harness.scheduler: device slots, the local worker pool, crash isolation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.scheduler import LocalPool, Outcome, Slot, WorkerContext, build_slots, visible_gpus
from tests import plugins_for_tests as plug
from tests.waiting import bound, wait_for

# --------------------------------------------------------------------------- slots


def test_auto_without_gpus_gives_one_single_threaded_cpu_slot_per_core() -> None:
    slots = build_slots("auto", trials_per_device=3, cores=4, gpus=[])
    assert [s.name for s in slots] == ["cpu#0", "cpu#1", "cpu#2", "cpu#3"]
    assert {(s.device, s.visible, s.threads, s.parent_device) for s in slots} == {("cpu", "", 1, "cpu")}
    assert build_slots("cpu", cores=2, gpus=["0"]) == build_slots("auto", cores=2, gpus=[])


def test_auto_takes_every_gpu_and_packs_trials_per_device() -> None:
    slots = build_slots("auto", trials_per_device=2, cores=16, gpus=["0", "1"])
    assert [s.name for s in slots] == ["cuda:0#0", "cuda:0#1", "cuda:1#0", "cuda:1#1"]
    assert [s.visible for s in slots] == ["0", "0", "1", "1"]  # each worker sees only its GPU ...
    assert {s.device for s in slots} == {"cuda:0"}  # ... as cuda:0
    assert {s.threads for s in slots} == {4}  # 16 cores over 4 slots


def test_explicit_list_pins_devices_through_cuda_visible_devices_ids() -> None:
    slots = build_slots(["cuda:1"], cores=8, gpus=["3", "5"])  # CUDA_VISIBLE_DEVICES=3,5
    assert [(s.name, s.visible, s.parent_device, s.threads) for s in slots] == [("cuda:1", "5", "cuda:1", 8)]
    mixed = build_slots(["cuda", "cpu", "cpu"], cores=6, gpus=["0"])
    assert [s.name for s in mixed] == ["cuda:0", "cpu#0", "cpu#1"]
    assert [s.visible for s in mixed] == ["0", "", ""] and {s.threads for s in mixed} == {2}


@pytest.mark.parametrize(
    ("devices", "message"),
    [(["cuda:2"], "devices[0]: cuda:2 is not visible here (1 GPU visible)"),
     (["cpu", "tpu"], "devices[1]: 'tpu' is not a device"),
     (["cuda:0", "cuda:0"], "devices[1]: cuda:0 is listed twice (use trials_per_device")],
)
def test_bad_device_lists_are_user_errors(devices: list[str], message: str) -> None:
    with pytest.raises(HarnessError) as err:
        build_slots(devices, gpus=["0"])
    assert str(err.value).startswith(message)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert visible_gpus() == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]


# --------------------------------------------------------------------------- local pool


def _drain(pool: LocalPool, jobs: list[tuple[str, object, object]], timeout: float = 300) -> dict[str, Outcome]:
    """Submit whenever there is room, like the runner; return every outcome by key."""
    ctx, pending, out = WorkerContext.capture(), list(jobs), {}
    deadline = time.monotonic() + bound(timeout)
    while pending or len(out) < len(jobs):
        while pending and pool.has_room():
            key, target, payload = pending.pop(0)
            pool.submit(key, target, payload, ctx)
        out.update({o.key: o for o in pool.wait(0.5)})
        assert time.monotonic() < deadline, "pool did not finish (a hang; HARNESS_TEST_PATIENCE scales the bound)"
    return out


def test_pool_bounds_concurrency_and_never_shares_a_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_PLUGINS", "tests.plugins_for_tests")
    pool = LocalPool(build_slots("cpu", cores=3), workers=2)
    assert pool.limit == 2
    res = _drain(pool, [(f"j{i}", plug.nap, 0.6) for i in range(5)])
    seen = [o.result for o in res.values()]
    assert all(o.ok for o in res.values())
    assert len({r["pid"] for r in seen}) == 5  # one fresh process per job
    for r in seen:  # what each worker saw: no GPU, one thread, the runner's env, cwd and import path
        assert (r["cuda_visible"], r["threads"], r["omp"]) == ("", 1, "1")
        assert r["plugins"] == "tests.plugins_for_tests" and r["cwd"] == os.getcwd() and r["has_tests_path"]
    events = sorted([(r["start"], 1, r["slot"]) for r in seen] + [(r["end"], -1, r["slot"]) for r in seen])
    active, peak, busy = 0, 0, set()
    for _, step, slot in events:
        active += step
        peak = max(peak, active)
        if step == 1:
            assert slot not in busy, f"two concurrent jobs on {slot}"
            busy.add(slot)
        else:
            busy.discard(slot)
    assert peak == 2


def test_each_slot_keeps_a_warmed_standby_worker_for_its_next_job(tmp_path: Path) -> None:
    """Starting a job on a slot starts the slot's next worker, which runs the context's warm-up
    while the job runs; the next job on that slot runs in it (a fresh process all the same)."""
    pool = LocalPool(build_slots("cpu", cores=1))
    ctx = WorkerContext.capture(warm=((plug.mark_warm, str(tmp_path)),))
    try:
        pool.submit("a", plug.nap, 0.8, ctx)
        standby = pool._standby["cpu#0"].proc.pid
        first = _wait_one(pool)
        assert first.ok and first.result["pid"] != standby
        warmed = {p.name.split("-")[1]: float(p.read_text()) for p in tmp_path.glob("warm-*")}
        assert str(standby) in warmed and warmed[str(standby)] < first.result["end"]  # warmed during job a
        pool.submit("b", plug.report_warm, None, ctx)
        second = _wait_one(pool)
        assert second.ok and second.result["pid"] == standby
        assert second.result["warmed"].startswith(f"{standby}:")  # the warm-up ran in this very process
        # a job with another context does not use a standby set up for this one
        pool.submit("c", plug.report_warm, None, WorkerContext.capture())
        third = _wait_one(pool)
        assert third.ok and third.result["warmed"] == "" and third.result["pid"] != pool._standby["cpu#0"].proc.pid
    finally:
        pool.close()
    assert not pool._standby


def test_a_failing_warm_up_does_not_fail_the_job() -> None:
    pool = LocalPool(build_slots("cpu", cores=1))
    ctx = WorkerContext.capture(warm=((plug.mark_warm, "/nonexistent/dir"),))
    try:
        pool.submit("a", plug.nap, 0.0, ctx)
        assert _wait_one(pool).ok
    finally:
        pool.close()


def test_pool_works_from_a_script_read_on_stdin(tmp_path: Path) -> None:
    """``python - < script``: multiprocessing would make every worker re-run '<stdin>' as a file."""
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from harness.scheduler import LocalPool, WorkerContext, build_slots\n"
        "import tests.plugins_for_tests as plug\n"
        "pool = LocalPool(build_slots('cpu', cores=1))\n"
        "pool.submit('a', plug.nap, 0.0, WorkerContext.capture())\n"
        "outs = []\n"
        "while not outs: outs = pool.wait(1.0)\n"
        "pool.close()\n"
        "print('OK' if outs[0].ok else outs[0].error)\n"
    )
    out = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, cwd=tmp_path, timeout=bound(120))
    assert out.stdout.strip().endswith("OK"), out.stdout + out.stderr


def _wait_one(pool: LocalPool, timeout: float = 300) -> Outcome:
    return wait_for("an outcome", lambda: pool.wait(0.5), timeout=timeout, every=0)[0]


def test_worker_sees_only_its_gpu_and_its_thread_count() -> None:
    slot = Slot("cuda:1", "cuda:0", "5", 3, "cuda:1")  # no GPU needed: only the environment is checked
    pool = LocalPool([slot])
    res = _drain(pool, [("g", plug.nap, 0.0)])["g"]
    assert res.ok and res.slot == slot
    assert (res.result["cuda_visible"], res.result["threads"], res.result["omp"]) == ("5", 3, "3")


def test_crashing_jobs_do_not_stop_the_pool() -> None:
    pool = LocalPool(build_slots("cpu", cores=2))
    res = _drain(pool, [("raise", plug.fail, "bad input"), ("kill", plug.kill_self, None),
                        ("exit", plug.exit_quietly, 3), ("ok1", plug.nap, 0.0), ("ok2", plug.nap, 0.0)])
    assert (res["raise"].ok, res["raise"].kind, res["raise"].error) == (False, "exception", "ValueError: bad input")
    assert (res["kill"].kind, res["kill"].error) == ("worker_died", "worker died (signal 9 SIGKILL)")
    assert (res["exit"].kind, res["exit"].error) == ("worker_died", "worker exited with code 3 and no result")
    assert res["ok1"].ok and res["ok2"].ok
    assert pool.has_room() and sorted(s.name for s in pool._free) == ["cpu#0", "cpu#1"]


def test_worker_writes_shipped_files_where_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Ray node without the runner's file system gets: the teacher cache entries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kept.pt").write_bytes(b"local")
    ctx = WorkerContext.capture({"cache/teachers/new.pt": b"shipped", "cache/kept.pt": b"shipped"})
    pool = LocalPool(build_slots("cpu", cores=1))
    pool.submit("w", plug.nap, 0.0, ctx)
    assert _wait_one(pool).ok
    assert (tmp_path / "cache" / "teachers" / "new.pt").read_bytes() == b"shipped"
    assert (tmp_path / "cache" / "kept.pt").read_bytes() == b"local"


def test_stop_terminates_running_workers() -> None:
    pool = LocalPool(build_slots("cpu", cores=2))
    ctx = WorkerContext.capture()
    pool.submit("long", plug.nap, 60.0, ctx)
    proc = pool._running["long"].proc
    assert pool.stop() == ["long"]
    assert not proc.is_alive() and proc.exitcode < 0  # ended by a signal, not by finishing its nap
    assert pool.wait(0.1) == [] and pool.has_room()


def test_workers_must_be_positive() -> None:
    from harness.runner import make_pool
    from harness.config import parse_study

    study = parse_study({"name": "s", "splits": [{"name": "a", "tasks": [[0], [1]]}], "teachers": [{"arch": "mlp"}],
                         "student": {"arch": "mlp"}, "methods": {"kd": {}}})
    with pytest.raises(HarnessError, match="--workers must be at least 1"):
        make_pool(study, "local", 0, None)
    with pytest.raises(HarnessError, match="--address is for --backend ray"):
        make_pool(study, "local", None, "auto")


# --------------------------------------------------------------------------- packing trials on a GPU


def report_env(names: tuple[str, ...], slot: Slot) -> dict[str, str | None]:
    """A pool target: these variables as the worker has them."""
    return {n: os.environ.get(n) for n in names}


def test_context_env_reaches_the_worker_before_its_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    pool = LocalPool(build_slots("cpu", cores=1), standby=False)
    try:
        pool.submit("a", report_env, ("CUBLAS_WORKSPACE_CONFIG",),
                    WorkerContext.capture(env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}))
        first = _wait_one(pool)
        pool.submit("b", report_env, ("CUBLAS_WORKSPACE_CONFIG",), WorkerContext.capture())
        second = _wait_one(pool)
    finally:
        pool.close()
    assert first.ok and first.result == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert second.ok and second.result == {"CUBLAS_WORKSPACE_CONFIG": None}


def test_trials_that_fit_count_the_cuda_context_of_every_worker() -> None:
    from harness.scheduler import CUDA_CONTEXT_MB, Packing, check_packing, trials_that_fit

    assert CUDA_CONTEXT_MB == 512
    assert trials_that_fit(7680, 16384) == 2  # 16384 / 8192
    assert trials_that_fit(7681, 16384) == 1
    assert trials_that_fit(20000, 16384) == 0
    p = Packing("cuda:0", 3, 6000, 16384, "gpu_peak_mb of the finished run 2x5/kd/seed0")
    assert (p.fit, p.ok) == (2, False)
    assert p.refusal() == ("trials_per_device: 3 trials x (6000 MB peak + 512 MB CUDA context) = 19536 MB > "
                           "16384 MB on cuda:0 (peak: gpu_peak_mb of the finished run 2x5/kd/seed0); at most 2 fit: "
                           "set trials_per_device: 2")
    assert Packing("cuda:0", 2, 6000, 16384, "x").ok  # 2 x 6512 = 13024 MB
    assert Packing("cuda:0", 1, 20000, 16384, "x").ok  # one trial alone is never refused for packing
    totals = {"cuda:1": 16384.0, "cuda:0": 81920.0}  # a small and a large GPU
    assert [c.device for c in check_packing(3, 6000, totals, "x")] == ["cuda:1"]
    assert check_packing(3, None, totals, "x") == [] and check_packing(1, 60000, totals, "x") == []


def test_packing_guard_lowers_concurrency_when_a_finished_trial_shows_it_does_not_fit() -> None:
    from harness.scheduler import PackingGuard

    guard = PackingGuard(4, {"cuda:0": 24576.0, "cuda:1": 81920.0})
    assert guard.observe("cuda:0", 4000) is None  # 4 x 4512 = 18048 MB fit
    assert guard.observe("cpu", 99999) is None and guard.observe("cuda:0", None) is None
    p = guard.observe("cuda:0", 7000)  # a larger trial: 4 x 7512 MB do not fit, 3 do
    assert p is not None and (p.device, p.trials, p.fit) == ("cuda:0", 4, 3)
    assert p.reduction() == ("trials_per_device: 4 trials x (7000 MB peak + 512 MB CUDA context) = 30048 MB > "
                             "24576 MB on cuda:0 (peak: the largest of the trials finished there, gpu_peak_mb); "
                             "running at most 3 at a time on cuda:0 from now on")
    assert guard.observe("cuda:0", 5000) is None and guard.caps == {"cuda:0": 3}  # never back up
    q = guard.observe("cuda:0", 9000)  # 3 x 9512 = 28536 > 24576: down to 2
    assert q is not None and (q.trials, q.fit) == (3, 2)
    first = guard.observe("cuda:1", 30000)  # the first trial finished on the other GPU: 2 fit there
    assert first is not None and first.fit == 2 and "the first trial that finished there" in first.source
    assert guard.caps == {"cuda:0": 2, "cuda:1": 2}


def test_a_peak_learned_during_the_run_caps_the_jobs_on_that_gpu() -> None:
    """Three slots packed on one GPU; a finished trial's peak says two fit: from then on the pool
    runs at most two jobs there at once (no GPU needed: the jobs only sleep) and says so."""
    import io

    from harness.progress import Progress
    from harness.runner import Session, learn_packing
    from harness.scheduler import PackingGuard

    slots = [Slot(f"cuda:0#{i}", "cuda:0", "0", 1, "cuda:0") for i in range(3)]
    pool = LocalPool(slots, standby=False)
    guard = PackingGuard(3, {"cuda:0": 16384.0})
    session = Session(None, None, "", pool, provenance={}, packing=guard)  # type: ignore[arg-type]
    out = io.StringIO()
    learn_packing(session, slots[1], {"gpu_peak_mb": 6000.0}, Progress(6, 3, out))
    assert "trials_per_device: 3 trials x (6000 MB peak + 512 MB CUDA context) = 19536 MB > 16384 MB on cuda:0" \
           in out.getvalue() and "running at most 2 at a time on cuda:0 from now on" in out.getvalue()
    try:
        res = _drain(pool, [(f"j{i}", plug.nap, 0.5) for i in range(4)])
    finally:
        pool.close()
    spans = sorted((o.result["start"], o.result["end"]) for o in res.values())
    assert all(o.ok for o in res.values())
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2
