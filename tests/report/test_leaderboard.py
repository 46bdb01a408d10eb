"""``harness leaderboard`` on a real MLflow store of three studies: the normalised per-task cells,
IQM/mean/median rank (and the rank ranges of the verdicts) and P(cka > kd) by hand, a named variant on some tasks only (marked, no
aggregate), a split without its normaliser (left out, said on stderr and in the Markdown), the
other normalisers, the files (deterministic, no machine path) and one-line CLI errors."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

from harness.cli import main
from harness.report import leaderboard as lb
from harness.report.frames import load_study
from tests.report import store
from tests.report.conftest import _store_dir

T975 = 4.302652729911275  # t(0.975, 2), from tables
ORACLE = "diag/oracle_ensemble_acc"
# study -> split -> row -> last-epoch union accuracy per seed (0, 1, 2; teachers: one seed-independent run)
DATA = {
    "alpha": {
        "a1": {"scratch": [0.78, 0.80, 0.82], "kd": [0.60, 0.64, 0.68], "cka": [0.72, 0.76, 0.80],
               "teachers": [0.70], "cka:wide": [0.80, 0.80, 0.80]},
        "a2": {"scratch": [0.50, 0.50, 0.50], "kd": [0.35, 0.40, 0.45], "cka": [0.45, 0.46, 0.47],
               "teachers": [0.42], "cka:wide": [0.50, 0.50, 0.50]},
    },
    "beta": {
        "b1": {"scratch": [0.88, 0.90, 0.92], "kd": [0.81, 0.72, 0.90], "cka": [0.855, 0.900, 0.972],
               "teachers": [0.783]},
        "b2": {"scratch": [0.40, 0.40, 0.40], "kd": [0.30, 0.32, 0.34], "cka": [0.30, 0.36, 0.38],
               "teachers": [0.34]},
    },
    "gamma": {"g1": {"kd": [0.50, 0.60, 0.70], "cka": [0.60, 0.70, 0.80]}},  # no scratch: no normaliser
}
SCRATCH = {"a1": 0.80, "a2": 0.50, "b1": 0.90, "b2": 0.40}
# normalised by scratch (score / scratch mean), by hand
KD = {"a1": [0.75, 0.80, 0.85], "a2": [0.70, 0.80, 0.90], "b1": [0.90, 0.80, 1.00], "b2": [0.75, 0.80, 0.85]}
CKA = {"a1": [0.90, 0.95, 1.00], "a2": [0.90, 0.92, 0.94], "b1": [0.95, 1.00, 1.08], "b2": [0.75, 0.90, 0.95]}
TEACHERS = {"a1": 0.875, "a2": 0.84, "b1": 0.87, "b2": 0.85}
TASKS = ["alpha/a1", "alpha/a2", "beta/b1", "beta/b2"]


def _log_seed(client, exp: str, study: str, split: str, method: str, variant: str, seed: int, acc: float) -> None:
    if method == "teachers":  # trained nothing: seed-independent
        store.log_run(client, exp, store.trial_tags(split, method, variant, seed, False),
                      {"test/union_acc": acc, "best_epoch": 0.0})
    else:  # the oracle ensemble only on a1 (for --normalise teachers)
        store.trial(client, exp, split, method, variant, seed, method == "scratch", acc, acc,
                    **({ORACLE: 0.90} if split == "a1" else {}))


def _build_store(folder: Path) -> str:
    return store.log_studies(folder, DATA, _log_seed)


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = _store_dir(tmp_path_factory)
    yield _build_store(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["leaderboard", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(uri: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``harness leaderboard alpha beta gamma`` (default: normalised by scratch, 2000 replicates)."""
    out = tmp_path_factory.mktemp("lb") / "board"
    rc, stdout, stderr = _cli("alpha", "beta", "gamma", "--tracking-uri", uri, "--out", str(out))
    assert rc == 0, stderr
    assert stdout == f"leaderboard written to {out}\n"
    return out, stderr


def _row(csv: pd.DataFrame, row: str) -> pd.Series:
    return csv[csv["row"] == row].iloc[0]


def _t(values: list[float]) -> tuple[float, float, float]:
    """mean and 95% t-interval of three values, by hand."""
    m = sum(values) / 3
    half = T975 * math.sqrt(sum((v - m) ** 2 for v in values) / 2) / math.sqrt(3)
    return m, m - half, m + half


def test_normalised_cells_by_hand(built: tuple[Path, str]) -> None:
    csv = pd.read_csv(built[0] / "leaderboard.csv")
    assert [c[: -len(".mean")] for c in csv.columns if c.endswith(".mean")] == TASKS  # not gamma/g1
    for row, by_split in (("kd", KD), ("cka", CKA)):
        r = _row(csv, row)
        for task in TASKS:
            mean, lo, hi = _t(by_split[task.split("/")[1]])
            assert r[f"{task}.mean"] == pytest.approx(mean, abs=1e-12)
            assert (r[f"{task}.ci_low"], r[f"{task}.ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
            assert r[f"{task}.n"] == 3
    scratch, teach = _row(csv, "scratch"), _row(csv, "teachers")
    for task in TASKS:  # the normaliser's own row: mean 1 on every task
        assert scratch[f"{task}.mean"] == pytest.approx(1.0, abs=1e-12)
        assert teach[f"{task}.mean"] == pytest.approx(TEACHERS[task.split("/")[1]], abs=1e-12)
        assert teach[f"{task}.n"] == 1 and pd.isna(teach[f"{task}.ci_low"])
    assert bool(scratch["uses_labels"]) and teach["kind"] == "reference" and set(csv["normalise"]) == {"scratch"}


def test_aggregates_and_median_ranks_by_hand(built: tuple[Path, str]) -> None:
    csv = pd.read_csv(built[0] / "leaderboard.csv")
    # kd, all 12 sorted: .70 .75 .75 | .80 .80 .80 .80 .85 .85 | .90 .90 1.0
    # cka:              .75 .90 .90 | .90 .92 .94 .95 .95 .95 | 1.0 1.0 1.08
    expected = {"kd": (4.9 / 6, (0.8 + 0.8 + 0.9 + 0.8) / 4, 4.0),
                "cka": (5.61 / 6, (0.95 + 0.92 + 1.01 + 2.6 / 3) / 4, 2.0),
                "teachers": ((0.85 + 0.87) / 2, sum(TEACHERS.values()) / 4, 3.0),
                "scratch": (None, 1.0, 1.0)}
    for row, (iqm, mean, rank) in expected.items():
        r = _row(csv, row)
        if iqm is not None:
            assert r["iqm"] == pytest.approx(iqm, abs=1e-12), row
        assert r["mean"] == pytest.approx(mean, abs=1e-12), row
        assert r["median_rank"] == rank, row
        for a in ("iqm", "mean", "median", "optimality_gap"):
            assert r[f"{a}_low"] <= r[a] <= r[f"{a}_high"], (row, a)
        assert bool(r["complete"]) and r["n_tasks"] == 4
    teach = _row(csv, "teachers")  # one run per task: nothing to resample
    assert teach["iqm_low"] == teach["iqm"] == teach["iqm_high"]
    assert _row(csv, "kd")["iqm_low"] < _row(csv, "kd")["iqm_high"]
    assert list(csv["row"]) == ["scratch", "cka", "teachers", "kd", "cka:wide"]  # by IQM, incomplete last
    md = (built[0] / "leaderboard.md").read_text()
    kd = _row(csv, "kd")
    assert (f"| kd | 4/4 | 80.0 ± {100 * T975 * 0.05 / math.sqrt(3):.1f} | 80.0 ± 24.8 | 90.0 ± 24.8 | 80.0 ± 12.4 "
            f"| 81.7 [{100 * kd['iqm_low']:.1f}, {100 * kd['iqm_high']:.1f}] "
            f"| 82.5 [{100 * kd['mean_low']:.1f}, {100 * kd['mean_high']:.1f}] | 3–4 |") in md
    # never a bare rank where the verdicts do not order the rows: kd and the ensemble are not ordered
    # (P(teachers > kd) = 0.708, its interval reaches 0.5), everything else is
    ranges = {r: (_row(csv, r)["rank_best"], _row(csv, r)["rank_worst"]) for r in ("scratch", "cka", "teachers", "kd")}
    assert ranges == {"scratch": (1, 1), "cka": (2, 2), "teachers": (3, 4), "kd": (3, 4)}
    assert "| scratch † | 4/4 |" in md and md.split("| cka | 4/4 |")[1].split("\n")[0].endswith("| 2 |")
    assert ("| teachers (claiming ensemble) | 4/4 | 87.5 (n=1) | 84.0 (n=1) | 87.0 (n=1) | 85.0 (n=1) "
            "| 86.0 [86.0, 86.0]") in md
    assert "| scratch † | 4/4 | 100.0 ± " in md


def test_a_variant_on_some_tasks_is_marked_and_not_aggregated(built: tuple[Path, str]) -> None:
    csv = pd.read_csv(built[0] / "leaderboard.csv")
    wide = _row(csv, "cka:wide")
    assert (wide["n_tasks"], wide["n_tasks_total"], bool(wide["complete"])) == (2, 4, False)
    assert wide["alpha/a1.mean"] == pytest.approx(1.0) and wide["alpha/a2.mean"] == pytest.approx(1.0)
    assert pd.isna(wide["beta/b1.mean"]) and wide["beta/b1.n"] == 0
    for c in ("iqm", "mean", "median", "optimality_gap", "median_rank", "poi_cka"):
        assert pd.isna(wide[c]), c
    md = (built[0] / "leaderboard.md").read_text()
    assert "| cka:wide | 2/4 tasks ‡ | 100.0 ± 0.0 | 100.0 ± 0.0 | – | – | – | – | – |" in md
    assert "‡ rows without a score on every task have no aggregate, rank or probability of improvement" in md
    assert "| cka:wide | 2/4 tasks ‡ | – |" in md  # and no P(cka > cka:wide)


def test_probability_of_improvement_by_hand(built: tuple[Path, str]) -> None:
    # per task, pairs (cka seed, kd seed) won + ½ tied out of 9:
    # a1: 9; a2: 0.90 ties 0.90 -> 8.5; b1: 0.95 < 1.0, 1.0 ties 1.0 -> 7.5; b2: 0.75 ties 0.75 -> 6.5
    csv = pd.read_csv(built[0] / "leaderboard.csv")
    kd = _row(csv, "kd")
    assert kd["poi_cka"] == pytest.approx((9 + 8.5 + 7.5 + 6.5) / 36, abs=1e-12)
    assert kd["poi_cka_low"] <= kd["poi_cka"] <= kd["poi_cka_high"] <= 1.0
    teach = _row(csv, "teachers")  # cka beats the ensemble on every seed but 0.75 on b2: (3 + 2/3) / 4
    assert teach["poi_cka"] == pytest.approx((3 + 2 / 3) / 4, abs=1e-12)
    assert pd.isna(_row(csv, "cka")["poi_cka"])
    md = (built[0] / "leaderboard.md").read_text()
    assert f"| kd | 4/4 | 0.875 [{kd['poi_cka_low']:.3f}, {kd['poi_cka_high']:.3f}] |" in md


def test_a_split_without_its_normaliser_is_left_out_and_said(built: tuple[Path, str]) -> None:
    out, stderr = built
    line = ("gamma/g1: no finished scratch (full) run with the primary metric: left out of the leaderboard "
            "and its aggregates")
    assert stderr == f"harness: note: {line}\n"
    md = (out / "leaderboard.md").read_text()
    assert ("Left out: `gamma/g1`: no finished `scratch` (full) run with the primary metric: left out of the "
            "leaderboard and its aggregates.") in md
    assert "- `gamma` (experiment id 3): 6 finished trials, 0 tasks in the leaderboard" in md
    assert "| `alpha/a1` | `scratch` mean over 3 seeds | 80.0 |" in md


def test_files_are_deterministic_and_show_no_machine_path(built: tuple[Path, str], uri: str, tmp_path: Path) -> None:
    out, _ = built
    names = {"leaderboard.md", "leaderboard.csv", "leaderboard_pairs.csv", "leaderboard_ablations.csv",
             "leaderboard_intervals.png", "leaderboard_profiles.png"}
    assert {p.name for p in out.iterdir()} == names
    for png in ("leaderboard_intervals.png", "leaderboard_profiles.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "leaderboard_old.png").write_text("stale")  # an earlier build's figure is removed
    (tmp_path / "notes.txt").write_text("mine")
    lb.build_leaderboard(["alpha", "beta", "gamma"], uri, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == names | {"notes.txt"}
    for name in names:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    md = (out / "leaderboard.md").read_text()
    folder = uri.removeprefix("sqlite:///").rsplit("/", 1)[0]
    assert folder not in md and str(out) not in md and "sqlite:///<redacted>/mlflow.db" in md
    assert "![Performance profiles](leaderboard_profiles.png)" in md


def test_other_normalisers(uri: str) -> None:
    datas = [load_study(s, uri, history=False) for s in ("alpha", "beta", "gamma")]
    scores, tasks, left = lb.scores_frame(datas, "teachers")
    # a1: the oracle ensemble its runs logged; a2, b1, b2: the teachers' claiming ensemble; g1: neither
    assert [(t.label, t.scale) for t in tasks] == [("alpha/a1", 0.90), ("alpha/a2", 0.42), ("beta/b1", 0.783),
                                                   ("beta/b2", 0.34)]
    assert tasks[0].source.startswith("oracle ensemble") and "claiming ensemble" in tasks[1].source
    assert left == ["`gamma/g1`: no `diag/oracle_ensemble_acc` logged and no finished `teachers` run: left out of "
                    "the leaderboard and its aggregates"]
    ref = scores[scores["row"] == "teachers"].set_index("task")["score"]
    assert ref["alpha/a1"] == pytest.approx(0.70 / 0.90) and ref["alpha/a2"] == 1.0 and ref["beta/b2"] == 1.0
    raw, tasks, left = lb.scores_frame(datas, "none")
    assert len(tasks) == 5 and not left and (raw["score"] == raw["raw"]).all()
    g = raw[(raw["task"] == "gamma/g1") & (raw["row"] == "cka")]
    np.testing.assert_allclose(sorted(g["score"]), [0.6, 0.7, 0.8])
    # ablation variants never enter: the toy rows are methods and named variants only
    assert set(raw["row"]) == {"scratch", "kd", "cka", "teachers", "cka:wide"}


def test_cli_errors_are_one_line_and_write_nothing(uri: str, tmp_path: Path) -> None:
    out = tmp_path / "none"
    rc, _, err = _cli("alpha", "nope", "--tracking-uri", uri, "--out", str(out))
    assert rc == 2 and err.startswith("harness: error: leaderboard: no experiment 'nope' in ") and err.count("\n") == 1
    rc, _, err = _cli("alpha", "alpha", "--tracking-uri", uri, "--out", str(out))
    assert (rc, err) == (2, "harness: error: leaderboard: study 'alpha' given more than once\n")
    rc, _, err = _cli("gamma", "--tracking-uri", uri, "--out", str(out))
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("harness: error: leaderboard: no split has its normaliser (--normalise scratch; `gamma/g1`")
    assert err.endswith("--normalise none uses the raw accuracy\n")
    assert not out.exists()
