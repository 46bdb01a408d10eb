"""``harness bench --device cuda --json --quick``: the GPU figures are there and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.bench import PACK_K
from tests.gpu.common import gpu_only


def check_figures(out: dict[str, Any]) -> None:
    """The GPU figures of one ``harness bench --device cuda --json`` (also run on the full
    bench's output by ``scripts/gpu_check.sh``)."""
    assert out["device"] == "cuda:0" and out["gpu"]
    for key in ("images_per_second", "bare_images_per_second", "gpu_peak_mb", "trial_gpu_peak_mb",
                "trials_per_hour_1", f"trials_per_hour_{PACK_K}", "cuda_max_allocated_mb"):
        assert out[key] > 0, key
    assert out["overhead_ratio"] == pytest.approx(out["bare_images_per_second"] / out["images_per_second"])
    assert out["packing_ratio"] == pytest.approx(out[f"trials_per_hour_{PACK_K}"] / out["trials_per_hour_1"])
    assert out["packing_k"] == PACK_K and out["packing_ratio"] > 1.0  # packing is never slower than one at a time
    assert out["makespan_ratio"] == pytest.approx(out["makespan_seconds"] / (out["trial_seconds_sum"] / PACK_K))


@gpu_only
def test_bench_reports_gpu_figures(tmp_path: Path) -> None:
    env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "bench", "--device", "cuda", "--json", "--quick"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_figures(json.loads(proc.stdout))


if __name__ == "__main__":  # scripts/gpu_check.sh: check a bench JSON file
    check_figures(json.loads(Path(sys.argv[1]).read_text()))
    print("bench figures: consistent")
