"""Whether a rebuilt report reproduces the committed one: accuracy cells only, against ``git HEAD``."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from harness.report import reproduce
from tests.report import store

COMPARISON = pd.DataFrame({
    "split": ["2x5", "2x5", "3x3"], "row": ["teachers", "cka", "cka"], "kind": ["reference", "method", "method"],
    "test/union_acc.mean": [0.9, 0.915, 0.7], "test/union_acc.std": [math.nan, 0.004, 0.01],
    "diag/probe_acc.mean": [math.nan, 0.8, 0.6], "trial_seconds.mean": [1.0, 7.5, 8.0],
})
ABLATION = pd.DataFrame({
    "split": ["2x5"] * 3, "row": ["cka", "cka-intra", "cka-intra"], "metric": ["test/union_acc"] * 2 + ["loss"],
    "mean": [0.915, 0.918, 0.5], "delta": [math.nan, 0.003, 0.1], "p_ttest": [math.nan, 0.27, 0.5],
})


def test_equal_accuracy_cells_reproduce_and_timings_are_not_compared() -> None:
    later = COMPARISON.assign(**{"trial_seconds.mean": [2.0, 9.0, 9.5]})
    n, diff = reproduce.compare(COMPARISON, later)
    assert (n, diff) == (7, [])  # 9 accuracy cells, two of them empty on both sides
    assert reproduce.line([("comparison.csv", n, diff)]) == \
        "reproduced: every accuracy cell equals the committed report (7 cells)"


def test_a_changed_cell_is_named_with_both_values() -> None:
    later = COMPARISON.copy()
    later.loc[1, "test/union_acc.mean"] = 0.92
    later.loc[2, "diag/probe_acc.mean"] = math.nan  # emptied
    n, diff = reproduce.compare(COMPARISON, later)
    assert n == 7 and [(d.row, d.column) for d in diff] == [("2x5/cka", "test/union_acc.mean"),
                                                          ("3x3/cka", "diag/probe_acc.mean")]
    assert reproduce.line([("comparison.csv", n, diff)]) == (
        "differs from the committed report in 2 of 7 accuracy cells: 2x5/cka test/union_acc.mean: 0.915 → 0.92; "
        "3x3/cka diag/probe_acc.mean: 0.6 → –")


def test_a_search_table_compares_each_trials_objective_and_not_its_duration() -> None:
    tuning = pd.DataFrame({"optuna_study": ["d/cka", "d/cka", "d/kd"], "method": ["cka", "cka", "kd"],
                           "number": [0, 1, 0], "state": ["COMPLETE", "PRUNED", "COMPLETE"],
                           "value": [0.9037, 0.81, 0.95], "duration": [5.5, 2.0, 4.0], "methods.cka.T": [1.0, 1.9, None]})
    later = tuning.assign(duration=[9.0, 9.0, 9.0])
    assert reproduce.compare(tuning, later) == (3, [])
    later.loc[1, "value"] = 0.8
    n, diff = reproduce.compare(tuning, later)
    assert n == 3 and [(d.row, d.column, d.committed, d.now) for d in diff] == [("d/cka/1", "value", 0.81, 0.8)]


def test_the_ablation_table_compares_the_values_of_its_accuracy_rows() -> None:
    """Long form: the rows whose metric is an accuracy, their value columns; never a p-value's
    column or a non-accuracy metric."""
    cells = reproduce.accuracy_cells(ABLATION)
    assert set(cells) == {("2x5/cka/test/union_acc", "mean"), ("2x5/cka/test/union_acc", "delta"),
                          ("2x5/cka-intra/test/union_acc", "mean"), ("2x5/cka-intra/test/union_acc", "delta")}
    later = ABLATION.assign(p_ttest=[0.0, 0.0, 0.0], mean=[0.915, 0.918, 0.7])
    assert reproduce.compare(ABLATION, later) == (3, [])
    n, diff = reproduce.compare(ABLATION, ABLATION.iloc[:1])  # a row gone
    assert n == 3 and [d.text() for d in diff] == ["2x5/cka-intra/test/union_acc mean: 0.918 → –",
                                                   "2x5/cka-intra/test/union_acc delta: 0.003 → –"]


def test_the_line_names_the_first_three_and_counts_the_rest() -> None:
    later = COMPARISON.assign(**{"test/union_acc.mean": [0.1, 0.2, 0.3], "diag/probe_acc.mean": [0.4, 0.5, 0.6]})
    n, diff = reproduce.compare(COMPARISON, later)
    text = reproduce.line([("comparison.csv", n, diff)])
    assert text == ("differs from the committed report in 5 of 8 accuracy cells: 2x5/teachers "
                           "test/union_acc.mean: 0.9 → 0.1; 2x5/teachers diag/probe_acc.mean: – → 0.4; "
                           "2x5/cka test/union_acc.mean: 0.915 → 0.2; and 2 more")
    assert text.count("→") == 3


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout with a committed report in ``results/toy``."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    repo = tmp_path / "repo"
    (repo / "results" / "toy").mkdir(parents=True)
    _git(repo, "init", "-q")
    COMPARISON.to_csv(repo / "results" / "toy" / "comparison.csv", index=False)
    ABLATION.to_csv(repo / "results" / "toy" / "ablation.csv", index=False)
    _git(repo, "add", "results")
    _git(repo, "commit", "-q", "-m", "report")
    return repo / "results" / "toy"


def test_a_committed_report_rebuilt_unchanged_is_reproduced(checkout: Path) -> None:
    COMPARISON.assign(**{"trial_seconds.mean": [3.0, 3.0, 3.0]}).to_csv(checkout / "comparison.csv", index=False)
    assert reproduce.committed_line(checkout) == \
        "reproduced: every accuracy cell equals the committed report (10 cells)"  # 7 + 3


def test_a_committed_report_rebuilt_with_another_number_names_the_cell(checkout: Path) -> None:
    later = COMPARISON.copy()
    later.loc[2, "test/union_acc.mean"] = 0.75
    later.to_csv(checkout / "comparison.csv", index=False)
    assert reproduce.committed_line(checkout) == (
        "differs from the committed report in 1 of 10 accuracy cells: 3x3/cka test/union_acc.mean: 0.7 → 0.75")


def test_no_line_outside_a_checkout_or_for_files_never_committed(checkout: Path, tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    shutil.copytree(checkout, loose)
    assert reproduce.committed_line(loose) is None  # no git checkout
    fresh = checkout.parent / "fresh"
    shutil.copytree(checkout, fresh)
    assert reproduce.committed_line(fresh) is None  # in the checkout, never committed


def test_report_command_says_whether_it_reproduced_a_committed_report(
        checkout: Path, report_dir: Path, store_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``harness report`` over a committed report of the same store: one line, every cell equal."""
    from harness.cli import main

    for name in ("comparison.csv", "ablation.csv"):
        shutil.copy(report_dir / name, checkout / name)
    _git(checkout, "commit", "-q", "-am", "the toy report")
    n = sum(reproduce.compare(pd.read_csv(report_dir / f), pd.read_csv(report_dir / f))[0]
            for f in ("comparison.csv", "ablation.csv"))
    assert main(["report", store.STUDY, "--tracking-uri", store_uri, "--out", str(checkout)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"reproduced: every accuracy cell equals the committed report ({n} cells)"
