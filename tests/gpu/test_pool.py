"""The pool on a GPU: ``trials_per_device`` 1 and 3 on one GPU (real worker processes), and
``devices: [cuda:0, cuda:1]`` where two GPUs exist. ``train.deterministic: true``, so every
placement gives the same numbers bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from harness.store import TAG
from tests.gpu.common import (
    DEVICE, ON_GPU, assert_all_finished, by, metric, peak_concurrency, run, slot_names, study,
)

METHODS = {"kd": {}, "cka": {}, "cfl": {}}
SEEDS = [0, 1]  # six trials
NUMBERS = ("test/union_acc", "test/union_acc_bestval", "val/union_acc_best", "diag/pseudo_label_acc", "loss/total")


def pool_study(name: str, work: Path, **over: Any) -> dict[str, Any]:
    return study(name, work, methods=METHODS, seeds=SEEDS, train={"deterministic": True}, **over)


@pytest.fixture(scope="module")
def one_per_gpu(work: Path) -> list[Any]:
    runs = run(pool_study("pool-k1", work, trials_per_device=1), work)
    assert_all_finished(runs, 6)
    return runs


def numbers(runs: list[Any]) -> dict[tuple[str, str], float]:
    return {(key, m): metric(r, m) for key, r in by(runs).items() for m in NUMBERS}


def same_numbers(a: list[Any], b: list[Any]) -> None:
    """Bit for bit on a GPU; in a CPU rehearsal the slots' thread counts differ (cores / slots),
    and so do the CPU's sums, so there only close."""
    if ON_GPU:
        assert numbers(a) == numbers(b)
    else:
        assert numbers(a) == pytest.approx(numbers(b), rel=1e-3)


def test_one_trial_per_gpu(one_per_gpu: list[Any]) -> None:
    assert peak_concurrency(one_per_gpu) == 1
    assert {r.data.tags[f"{TAG}slot"] for r in one_per_gpu} == slot_names(1)
    assert {r.data.tags[f"{TAG}device"] for r in one_per_gpu} == {DEVICE}
    # the flags a deterministic trial needs were really set in each worker (cuBLAS's before CUDA)
    assert {r.data.tags[f"{TAG}deterministic"] for r in one_per_gpu} == {"true"}
    if ON_GPU:  # the peak of each trial, logged (a GPU share is sized by it)
        assert all(metric(r, "gpu_peak_mb") > 0 for r in one_per_gpu)


def test_three_trials_packed_on_one_gpu_give_the_same_numbers(work: Path, one_per_gpu: list[Any]) -> None:
    runs = run(pool_study("pool-k3", work, trials_per_device=3), work)
    assert_all_finished(runs, 6)
    assert peak_concurrency(runs) == 3
    assert {r.data.tags[f"{TAG}slot"] for r in runs} == slot_names(3)
    assert len({r.data.tags[f"{TAG}pid"] for r in runs}) == 6  # one worker process per trial
    # deterministic: the same trial keys and the same numbers, whatever shares the GPU
    same_numbers(runs, one_per_gpu)


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus(work: Path, one_per_gpu: list[Any]) -> None:
    runs = run(pool_study("pool-2gpu", work, devices=["cuda:0", "cuda:1"]), work)
    assert_all_finished(runs, 6)
    assert {r.data.tags[f"{TAG}slot"] for r in runs} == {"cuda:0", "cuda:1"}  # both used
    same_numbers(runs, one_per_gpu)
