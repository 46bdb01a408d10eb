"""Error decomposition: hand-computed terms, the identity Sup - S = (Sup - C) + (C - E) - (S - E),
the largest loss, the sentence, and the report section built from a real MLflow store."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from harness.report import decomposition as dec
from tests.report import store

ORACLE, ENS = "diag/oracle_ensemble_acc", "diag/ensemble_union_acc"
# split s: (method, variant, uses_labels) -> per seed (student last-epoch acc, claiming ensemble E, oracle C)
ROWS_S = {
    ("scratch", "full", True): {0: (0.95, 0.80, 0.97), 1: (0.96, 0.80, 0.97), 2: (0.97, 0.80, 0.97)},
    ("kd", "full", False): {0: (0.84, 0.80, 0.97), 1: (0.86, 0.80, 0.97)},
    ("kd", "rmd", False): {0: (0.91, 0.90, 0.97), 1: (0.93, 0.90, 0.97)},
    ("cka", "full", False): {0: (0.89, 0.95, 0.97), 1: (0.91, 0.95, 0.97)},
}
# split t: the teachers cap (C = 0.90 far below the supervised 0.96)
ROWS_T = {
    ("scratch", "full", True): {0: (0.96, 0.89, 0.90)},
    ("kd", "full", False): {0: (0.895, 0.89, 0.90)},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A real store of two splits with oracle diagnostics, and the report built from it."""
    from harness.report.build import build_report

    logging.getLogger("alembic").setLevel(logging.WARNING)
    folder = tmp_path_factory.mktemp("dec")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(store.STUDY, artifact_location=(folder / "art").as_uri())
    keys = []
    for split, rows in (("s", ROWS_S), ("t", ROWS_T)):
        for (method, variant, labels), seeds in rows.items():
            for seed, (s, e, c) in seeds.items():
                store.trial(client, exp, split, method, variant, seed, labels, s, s, **{ENS: e, ORACLE: c})
                keys.append(store.key(split, method, variant, seed))
    ref = {"test/union_acc": 0.90, "test/union_acc_best": 0.90, ENS: 0.90, ORACLE: 0.97, "best_epoch": 0.0}
    store.log_run(client, exp, store.trial_tags("s", "teachers", "rmd", 0, False), ref)
    keys.append(store.key("s", "teachers", "rmd", 0))
    run = store.log_run(client, exp, {"harness.kind": "study", "harness.study": store.STUDY}, {})
    client.log_text(run, json.dumps(keys), "trial_keys.json")
    out = build_report(store.STUDY, tracking_uri=uri, out_dir=folder / "report")
    return out, pd.read_csv(out / "decomposition.csv")


def _row(frame: pd.DataFrame, split: str, row: str) -> pd.Series:
    return frame[(frame["split"] == split) & (frame["row"] == row)].iloc[0]


def test_terms_by_hand_and_the_identity(built) -> None:
    _, frame = built
    r = _row(frame, "s", "kd:rmd")  # S = 0.92, E = 0.90, C = 0.97, Sup = 0.96
    assert r["student"] == pytest.approx(0.92) and r["supervised"] == pytest.approx(0.96)
    assert (r["ceiling"], r["ensemble"]) == (pytest.approx(0.97), pytest.approx(0.90))
    assert r["routing"] == pytest.approx(0.07) and r["distillation"] == pytest.approx(0.02)
    assert r["teachers"] == pytest.approx(-0.01) and r["gap"] == pytest.approx(0.04)
    assert r["largest"] == "routing"
    assert _row(frame, "s", "kd")["routing"] == pytest.approx(0.17)
    assert _row(frame, "s", "cka")["distillation"] == pytest.approx(-0.05)
    assert _row(frame, "s", "cka")["largest"] == "distillation"  # routing 2 pt, distillation loses 5
    assert _row(frame, "t", "kd")["largest"] == "teachers"  # C 6 pt below the supervised student
    for _, r in frame[frame["kind"] == "method"].iterrows():  # exact, for every row
        assert r["gap"] == pytest.approx(r["teachers"] + r["routing"] - r["distillation"])
    # the scratch student (labels) has no row; the teachers' reference row stops at C and E
    assert "scratch" not in set(frame["row"])
    ref = _row(frame, "s", "teachers:rmd")
    assert ref["routing"] == pytest.approx(0.07) and pd.isna(ref["student"]) and ref["largest"] == "routing"


def test_report_section_sentence_and_figure(built) -> None:
    out, _ = built
    md = (out / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads.index("## Error decomposition: teachers, routing, distillation") == heads.index("## Comparison") + 2
    assert ("On `s`, for the best label-free student `kd:rmd` (92.0%), routing costs 7.0 pt (claiming ensemble "
            "90.0% vs oracle routing 97.0%), distillation gains 2.0 pt over the claiming ensemble, and the teachers "
            "cap at 97.0%; the supervised scratch student reaches 96.0%, 4.0 pt above it. Largest loss: routing.") in md
    assert "Largest loss: the teachers' own errors" in md  # split t
    assert "| kd:rmd | 97.0 | 90.0 | 92.0 | +7.0 | +2.0 | -1.0 | +4.0 | routing |" in md
    assert "| teachers:rmd (claiming ensemble) | 97.0 | 90.0 | – | +7.0 | – | -1.0 | – | routing |" in md
    assert (out / "decomposition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Gap to the supervised student per term](decomposition.png)" in md
    # the oracle columns sit next to the claiming ones in the diagnostics table
    assert re.search(r"\| Ensemble union acc\. \(%\) \| Oracle ensemble acc\. \(%\) \|", md)


def test_no_oracle_diagnostics_no_section(report_dir: Path) -> None:
    """Runs of a harness before the oracle diagnostics (the toy store): no decomposition at all,
    rather than one from partial numbers."""
    assert "Error decomposition" not in (report_dir / "report.md").read_text()
    assert not (report_dir / "decomposition.csv").exists() and not (report_dir / "decomposition.png").exists()


def test_largest_loss() -> None:
    assert dec.largest_loss({"teachers": 0.01, "routing": 0.03, "distillation_loss": -0.02}) == "routing"
    assert dec.largest_loss({"teachers": -0.01, "routing": 0.0, "distillation_loss": -0.02}) == "none"
    assert dec.largest_loss({"teachers": 0.05, "routing": 0.01, "distillation_loss": float("nan")}) == "teachers"


def test_a_rebuild_leaves_no_output_of_an_earlier_build(built, store_uri) -> None:
    """Built into a folder that holds a decomposition (and a stray scaling view) from an earlier
    build, a report of a store without oracle diagnostics removes them: no stale table or figure
    next to the new report. Files that are not the report's stay."""
    import shutil

    from harness.report.build import build_report

    out, _ = built
    folder = out.parent / "rebuilt"
    shutil.copytree(out, folder)
    (folder / "scaling.csv").write_text("stale")
    (folder / "notes.txt").write_text("mine")
    build_report(store.STUDY, tracking_uri=store_uri, out_dir=folder)
    left = {p.name for p in folder.iterdir()}
    assert not {"decomposition.csv", "decomposition.png", "scaling.csv"} & left
    assert {"notes.txt", "report.md", "comparison.csv", "accuracy.png"} <= left


def test_a_report_of_two_splits_has_the_aggregate_block(built) -> None:
    """Two splits with a scratch student each: the leaderboard's block over this study's splits,
    placed after the comparison. kd: 0.85 / 0.96 on s and 0.895 / 0.96 on t; cka ran on s only,
    so it is marked and gets no aggregate (never one over fewer splits)."""
    out, _ = built
    md = (out / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads.index("## Aggregate over splits") == heads.index("## Comparison") + 1
    block = md.split("## Aggregate over splits")[1].split("\n## ")[0]
    kd = next(line for line in block.splitlines() if line.startswith("| kd |"))
    assert kd.startswith(f"| kd | 2/2 | {100 * 0.85 / 0.96:.1f} ± ")
    assert f"| {100 * 0.895 / 0.96:.1f} (n=1) |" in kd  # one seed on t: no interval
    iqm = 100 * (0.84 / 0.96 + 0.86 / 0.96 + 0.895 / 0.96) / 3  # trim_mean(0.25) of 3 scores trims none
    assert f"| {iqm:.1f} [" in kd
    cka = next(line for line in block.splitlines() if line.startswith("| cka |"))
    assert "1/2 tasks ‡" in cka and cka.rstrip().endswith("| – | – | – |")
