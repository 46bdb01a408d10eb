"""Scaling view: union accuracy vs the number of teachers K, from real MLflow stores whose trial
runs log the split params of ``harness.grid.resolved_config``; hand-computed means, stds and
95% t-intervals (t quantiles written out, not taken from scipy), the table, the sentences, the
CSV and the figure; no view with one K only."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from harness.report import scaling
from harness.report.tables import comparison_frame
from tests.report import store
from tests.report.conftest import _store_dir

T975 = {1: 12.706204736174698, 2: 4.302652729911275}  # t(0.975, df), from tables
TEN = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
# split -> params of its cut (as resolved_config logs them: flattened, Python string form)
SPLITS = {
    "k2": {"split.tasks": "[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]"},
    "k5": {"split.partition.k": "5", "split.partition.classes": TEN, "split.partition.order": "contiguous"},
    "k10": {"split.partition.k": "10", "split.partition.classes": TEN, "split.partition.order": "contiguous"},
    "k10r": {"split.partition.k": "10", "split.partition.classes": TEN, "split.partition.order": "random",
             "split.partition.seed": "1"},  # a second K = 10 partition: its own column, never pooled
    "sub": {"split.partition.k": "2", "split.partition.classes": "[0, 1, 2, 3, 4]"},  # other classes
}
K = {"k2": 2, "k5": 5, "k10": 10, "k10r": 10, "sub": 2}
# (split, method) -> last-epoch union accuracy per seed
ACC = {
    ("k2", "kd"): [0.90, 0.92, 0.94], ("k5", "kd"): [0.80, 0.84, 0.82], ("k10", "kd"): [0.60, 0.66, 0.63],
    ("k2", "cka"): [0.93, 0.95, 0.94], ("k5", "cka"): [0.88, 0.86, 0.90], ("k10", "cka"): [0.80, 0.78, 0.79],
    ("k2", "scratch"): [0.96, 0.97, 0.98], ("k5", "scratch"): [0.95, 0.96, 0.97],
    ("k10", "scratch"): [0.94, 0.95, 0.96],
    ("k10r", "kd"): [0.60, 0.64], ("sub", "kd"): [0.95],
}
ENSEMBLE = {"k2": 0.91, "k5": 0.85, "k10": 0.75}  # the teachers' claiming ensemble (one seed-independent run)


def _trial(client: MlflowClient, exp: str, split: str, method: str, seed: int, acc: float,
           keys: list[str]) -> None:
    final = {"test/union_acc": acc, "test/union_acc_best": acc, "best_epoch": 0.0 if method == "teachers" else 2.0,
             **{f"test/task_acc/{k}": acc for k in range(K[split])}}
    params = {"seed": str(seed), "method": method, "variant": "full", "study": store.STUDY, "split.name": split,
              "dataset.name": "digits", "dataset.root": "None", **SPLITS[split]}
    store.log_run(client, exp, store.trial_tags(split, method, "full", seed, method == "scratch"), final,
                  params=params)
    keys.append(store.key(split, method, "full", seed))


def _store(folder: Path, accs: dict, ensembles: dict) -> str:
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(store.STUDY, artifact_location=(folder / "art").as_uri())
    keys: list[str] = []
    for split, acc in ensembles.items():
        _trial(client, exp, split, "teachers", 0, acc, keys)
    for (split, method), values in accs.items():
        for seed, acc in enumerate(values):
            _trial(client, exp, split, method, seed, acc, keys)
    run = store.log_run(client, exp, {"harness.kind": "study", "harness.study": store.STUDY}, {})
    client.log_text(run, json.dumps(keys), "trial_keys.json")
    return uri


@pytest.fixture(scope="module")
def store_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Path]]:
    """Fresh store folders (RAM-backed where possible), removed at the end of the module."""
    made: list[Path] = []

    def make() -> Path:
        made.append(_store_dir(tmp_path_factory))
        return made[-1]

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def built(store_dirs: Callable[[], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.report.build import build_report

    uri = _store(store_dirs(), ACC, ENSEMBLE)
    return build_report(store.STUDY, tracking_uri=uri, out_dir=tmp_path_factory.mktemp("scaling") / "report")


def _by_hand(values: list[float]) -> tuple[float, float, float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def test_csv_means_and_t_intervals_by_hand(built: Path) -> None:
    csv = pd.read_csv(built / "scaling.csv")
    assert set(csv["split"]) == {"k2", "k5", "k10", "k10r"}  # not `sub`: other classes, one K
    assert list(dict.fromkeys(csv["split"])) == ["k2", "k5", "k10", "k10r"]  # K ascending
    assert set(csv["group"]) == {"digits, classes 0–9"}
    for (split, method), values in ACC.items():
        if split == "sub":
            continue
        r = csv[(csv["split"] == split) & (csv["row"] == method)].iloc[0]
        mean, std, lo, hi = _by_hand(values)
        assert (r["k"], r["n"]) == (K[split], len(values))
        assert (r["mean"], r["std"]) == (pytest.approx(mean), pytest.approx(std))
        assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    kd2 = csv[(csv["split"] == "k2") & (csv["row"] == "kd")].iloc[0]
    assert (kd2["ci_low"], kd2["ci_high"]) == (pytest.approx(0.870317, abs=1e-6), pytest.approx(0.969683, abs=1e-6))
    assert kd2["k_source"] == "split.tasks" and csv.loc[csv["split"] == "k5", "k_source"].iloc[0] == "split.partition.k"
    ref = csv[(csv["split"] == "k2") & (csv["row"] == "teachers")].iloc[0]
    assert ref["kind"] == "reference" and ref["n"] == 1 and ref["mean"] == pytest.approx(0.91)
    assert pd.isna(ref["ci_low"]) and pd.isna(ref["ci_high"]) and ref["note"] == scaling.NO_CI
    assert set(csv.loc[csv["row"] == "scratch", "uses_labels"]) == {True}


def test_table_sentences_and_figure(built: Path) -> None:
    md = (built / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads.index("## Scaling with the number of teachers K") == heads.index("## Aggregate over splits") + 1
    assert "With n = 3 seeds the interval is mean ± 2.48 × std." in md
    assert "### Data set digits, classes 0–9\n" in md
    assert "| Method | K = 2 (`k2`) | K = 5 (`k5`) | K = 10 (`k10`) | K = 10 (`k10r`) |" in md
    assert ("| kd | 92.0 ± 2.0 [87.0, 97.0] (n=3) | 82.0 ± 2.0 [77.0, 87.0] (n=3) "
            "| 63.0 ± 3.0 [55.5, 70.5] (n=3) | 62.0 ± 2.8 [36.6, 87.4] (n=2) |") in md
    assert "| cka | 94.0 ± 1.0 [91.5, 96.5] (n=3) | 88.0 ± 2.0 [83.0, 93.0] (n=3) | 79.0 ± 1.0 [76.5, 81.5] (n=3) | – |" in md
    assert "| scratch † | 97.0 ± 1.0 [94.5, 99.5] (n=3) |" in md
    assert "| teachers (claiming ensemble) | 91.0 (n=1; no CI) | 85.0 (n=1; no CI) | 75.0 (n=1; no CI) | – |" in md
    assert "- kd: 92.0% at K = 2 to 63.0% (`k10`) and 62.0% (`k10r`) at K = 10 (−30.0 to −29.0 pt).\n" in md
    assert "- cka: 94.0% at K = 2 to 79.0% at K = 10 (−15.0 pt).\n" in md
    assert "- scratch: 97.0% at K = 2 to 95.0% at K = 10 (−2.0 pt).\n" in md
    assert "- teachers (claiming ensemble): 91.0% at K = 2 to 75.0% at K = 10 (−16.0 pt).\n" in md
    assert "Not in this view: `sub` (K = 2): no other split cuts classes 0–4 of digits into a different K.\n" in md
    assert (built / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Union accuracy vs number of teachers K](scaling.png)" in md


def test_one_k_only_no_view(store_dirs: Callable[[], Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two K = 10 partitions of the same classes, and `sub` (other classes, K = 2): nothing to scale."""
    from harness.report.build import build_report

    accs = {k: v for k, v in ACC.items() if k in (("k10", "kd"), ("k10r", "kd"), ("sub", "kd"))}
    uri = _store(store_dirs(), accs, {})
    out = build_report(store.STUDY, tracking_uri=uri, out_dir=tmp_path_factory.mktemp("one-k") / "report")
    assert "Scaling" not in (out / "report.md").read_text()
    assert not (out / "scaling.csv").exists() and not (out / "scaling.png").exists()


def test_unrecorded_classes_then_the_study_file(study_data) -> None:
    """The toy store logs no split params and no study file: K from the task-accuracy columns,
    never compared; with a study file, K and classes come from it."""
    comp = comparison_frame(study_data)
    infos = {i.split: i for i in scaling.split_infos(comp, study_data)}
    assert (infos["2x5"].k, infos["3x3"].k) == (2, 3)
    assert infos["2x5"].k_source == "task-accuracy columns" and infos["2x5"].group is None
    assert scaling.scaling_frame(comp, study_data).empty
    yaml = ("name: toy\ndataset: {name: digits}\nsplits:\n  - {name: 2x5, tasks: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}\n"
            "  - {name: 3x3, partition: {k: 3, classes: [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]}}\n")
    data = dataclasses.replace(study_data, params=study_data.params[["seed"]], study_yaml=yaml)
    infos = {i.split: i for i in scaling.split_infos(comp, data)}
    assert (infos["2x5"].k, infos["3x3"].k, infos["3x3"].k_source) == (2, 3, "study file")
    assert infos["2x5"].group == infos["3x3"].group and infos["3x3"].classes == "classes 0–9"
    frame = scaling.scaling_frame(comp, data)
    assert list(dict.fromkeys(frame["split"])) == ["2x5", "3x3"]
    cka = frame[(frame["split"] == "3x3") & (frame["row"] == "cka")].iloc[0]
    mean, std = 0.825, math.sqrt(0.00035)  # SPLIT_B_FULL: squared deviations sum to 0.00175
    assert (cka["n"], cka["mean"], cka["std"]) == (6, pytest.approx(mean), pytest.approx(std))
    half = 2.570581835636314 * std / math.sqrt(6)  # t(0.975, 5)
    assert (cka["ci_low"], cka["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))


def test_t_interval_and_classes_text() -> None:
    assert all(math.isnan(v) for v in scaling.t_interval(0.9, float("nan"), 1))
    assert scaling.t_interval(0.9, 0.0, 3) == (0.9, 0.9)
    lo, hi = scaling.t_interval(0.5, 0.1, 2)
    assert (lo, hi) == (pytest.approx(0.5 - 12.706204736174698 * 0.1 / math.sqrt(2)),
                        pytest.approx(0.5 + 12.706204736174698 * 0.1 / math.sqrt(2)))
    assert scaling.classes_text(None) == "all classes"
    assert scaling.classes_text((0, 1, 2, 3, 4, 7, 9, 10, 11)) == "classes 0–4, 7, 9–11"
