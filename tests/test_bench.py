"""``harness bench --json``: every ratio present and consistent with the timings it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_json_quick(tmp_path):
    env = {**os.environ, "HARNESS_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "bench", "--json", "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    for key in ("overhead_ratio", "cache_ratio", "makespan_ratio", "images_per_second", "peak_rss_mb"):
        assert out[key] > 0, key
    assert out["overhead_ratio"] == pytest.approx(out["harness_seconds"] / out["bare_seconds"])
    assert out["cache_ratio"] == pytest.approx(out["cached_epoch_seconds"] / out["live_epoch_seconds"])
    assert out["makespan_ratio"] == pytest.approx(out["makespan_seconds"] / (out["trial_seconds_sum"] / out["workers"]))
    assert out["cache_ratio"] < 1.0  # reading cached outputs is never slower than running two teachers
    assert not (tmp_path / "mlflow.db").exists()  # the bench uses its own temporary store
