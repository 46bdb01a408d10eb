"""``harness bench --json``: every ratio present and consistent with the timings it reports;
``--device cuda`` where there is no CUDA is one line and exit code 2 (the GPU figures themselves
are checked by ``tests/gpu/test_bench_gpu.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from harness.bench import check_device
from harness.cli import main
from harness.errors import HarnessError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")


@pytest.mark.slow
def test_bench_json_quick(tmp_path):
    env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "bench", "--json", "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert out["device"] == "cpu"  # the default, also where a GPU is visible
    for key in ("overhead_ratio", "cache_ratio", "makespan_ratio", "images_per_second", "bare_images_per_second",
                "peak_rss_mb"):
        assert out[key] > 0, key
    assert out["overhead_ratio"] == pytest.approx(out["harness_seconds"] / out["bare_seconds"])
    assert out["overhead_ratio"] == pytest.approx(out["bare_images_per_second"] / out["images_per_second"])
    assert out["cache_ratio"] == pytest.approx(out["cached_epoch_seconds"] / out["live_epoch_seconds"])
    assert out["makespan_ratio"] == pytest.approx(out["makespan_seconds"] / (out["trial_seconds_sum"] / out["workers"]))
    # the estimate of the makespan study, made before it ran, over its measured wall time
    assert out["estimated_wall_seconds"] > 0 and out["study_wall_seconds"] > out["makespan_seconds"]
    assert out["estimate_ratio"] == pytest.approx(out["estimated_wall_seconds"] / out["study_wall_seconds"])
    assert out["cache_ratio"] < 1.0  # reading cached outputs is never slower than running two teachers
    assert not {"packing_ratio", "gpu_peak_mb", "cuda_max_allocated_mb"} & set(out)  # GPU figures: --device cuda
    assert not (tmp_path / "mlflow.db").exists()  # the bench uses its own temporary store


def test_default_device_is_cpu():
    assert check_device(None) == "cpu" and check_device("cpu") == "cpu"


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_and_exit_2(device, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the bench would make its store
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", device, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no figures, no JSON
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"harness: error: --device {device}: CUDA is not available here (")
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written
    with pytest.raises(HarnessError, match=r"^--device cuda: CUDA is not available here"):
        check_device("cuda")
