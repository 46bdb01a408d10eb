"""CPU vs GPU: the same study (same teachers from the shared cache, same trial keys at fp32)
trained on both. Float32 with ``train.deterministic: true`` agrees within 0.5 points of mean
union accuracy, bf16 autocast within 1 point of float32; the teachers' row agrees with every rule.

KD, CKA and the supervised student, 3 seeds, 8 epochs of batches of 32. CFL is not in the mean:
on digits its accuracy moves by up to 6 points (3 on a 3-seed mean) between two CPU runs that
differ only in their thread count, i.e. in rounding, so a 0.5-point bound would measure that
chaos, not the GPU. Its bf16 arithmetic is checked where it is deterministic, in
``test_precision_gpu.py`` (gradient cosine on a fixed batch)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from harness.store import TAG
from tests.gpu.common import (
    AMP_PRECISION, DEVICE, ON_GPU, RULES, TEST_IMAGES, assert_all_finished, by, metric, run, study,
)

METHODS = {"kd": {}, "cka": {}, "scratch": {}}
SEEDS = [0, 1, 2]  # 9 trials a side


def trained(name: str, work: Path, device: str, amp: bool) -> dict[str, Any]:
    """The agreement study on ``device`` (GPU: 4 trials at a time): runs by method:variant/seed."""
    over: dict[str, Any] = {"devices": [device] if device != "cpu" else "cpu"}
    if device != "cpu":
        over["trials_per_device"] = 4
    spec = study(name, work, methods=METHODS, seeds=SEEDS,
                 train={"epochs": 8, "batch_size": 32, "amp": amp, "deterministic": True}, **over)
    runs = run(spec, work)
    assert_all_finished(runs, 9)
    return by(runs, "label")


@pytest.fixture(scope="module")
def cpu_fp32(work: Path) -> dict[str, Any]:
    return trained("agree-cpu", work, "cpu", amp=False)


@pytest.fixture(scope="module")
def gpu_fp32(work: Path) -> dict[str, Any]:
    return trained("agree-gpu-fp32", work, DEVICE, amp=False)


def union(runs: dict[str, Any]) -> dict[str, float]:
    return {k: metric(r, "test/union_acc") for k, r in sorted(runs.items())}


def mean_gap(a: dict[str, float], b: dict[str, float]) -> float:
    assert a.keys() == b.keys()
    return statistics.fmean(a[k] - b[k] for k in a)


def test_float32_deterministic_gpu_agrees_with_cpu(cpu_fp32: dict[str, Any], gpu_fp32: dict[str, Any]) -> None:
    both = [*cpu_fp32.values(), *gpu_fp32.values()]
    assert {r.data.tags[f"{TAG}precision"] for r in both} == {"fp32"}
    assert {r.data.tags[f"{TAG}deterministic"] for r in both} == {"true"}
    # the same trials: equal keys (the key carries the precision, not the device)
    assert {k: r.data.tags[f"{TAG}trial_key"] for k, r in cpu_fp32.items()} == \
           {k: r.data.tags[f"{TAG}trial_key"] for k, r in gpu_fp32.items()}
    cpu, gpu = union(cpu_fp32), union(gpu_fp32)
    assert statistics.fmean(cpu.values()) > 0.6  # trained (about 0.75 on a CPU), not at chance (0.1)
    gap = mean_gap(gpu, cpu)
    assert abs(gap) <= 0.005, f"GPU - CPU mean union accuracy {gap:+.4f}; per trial: " + ", ".join(
        f"{k} {gpu[k]:.3f}/{cpu[k]:.3f}" for k in cpu)


def test_bf16_within_one_point_of_float32(work: Path, gpu_fp32: dict[str, Any]) -> None:
    bf16 = trained("agree-gpu-amp", work, DEVICE, amp=True)
    assert {r.data.tags[f"{TAG}precision"] for r in bf16.values()} == {AMP_PRECISION}
    if ON_GPU:  # another precision is another trial
        assert all(bf16[k].data.tags[f"{TAG}trial_key"] != r.data.tags[f"{TAG}trial_key"] for k, r in gpu_fp32.items())
    low, full = union(bf16), union(gpu_fp32)
    gap = mean_gap(low, full)
    assert abs(gap) <= 0.01, f"bf16 - fp32 mean union accuracy {gap:+.4f}; per trial: " + ", ".join(
        f"{k} {low[k]:.3f}/{full[k]:.3f}" for k in full)


def test_teachers_row_with_every_rule_agrees_with_cpu(work: Path) -> None:
    """Frozen teachers, so only the arithmetic of their outputs and of routing differs: at most
    two of the 450 test images (0.5 points) change hands with any rule."""
    rows = {}
    for device in ("cpu", DEVICE):
        name = f"teachers-{'gpu' if device != 'cpu' else 'cpu'}"
        over = {"devices": [device], "trials_per_device": 4} if device != "cpu" else {"devices": "cpu"}
        runs = run(study(name, work, methods={"teachers": {}}, routing=RULES, **over), work)
        assert_all_finished(runs, len(RULES))
        rows[device] = {r.data.tags[f"{TAG}variant"]: r for r in runs}
    cpu, gpu = rows["cpu"], rows[DEVICE]
    assert len(cpu) == len(RULES) and cpu.keys() == gpu.keys()
    for rule in cpu:
        for m in ("test/union_acc", "diag/ensemble_union_acc", "test/task_acc/0", "test/task_acc/1"):
            a, b = metric(gpu[rule], m), metric(cpu[rule], m)
            assert abs(a - b) <= 2 / TEST_IMAGES + 1e-9, f"{rule}: {m} GPU {a:.4f} vs CPU {b:.4f}"
