"""Exact numbers in the comparison and ablation tables (CSV) and their Markdown/LaTeX cells."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import t as student_t

from harness.report import plots, tables
from harness.report.stats import CONSTANT_NOTE

SQRT2 = math.sqrt(2)


@pytest.fixture(scope="module")
def comp(report_dir: Path) -> pd.DataFrame:
    return pd.read_csv(report_dir / "comparison.csv", keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def abl(report_dir: Path) -> pd.DataFrame:
    return pd.read_csv(report_dir / "ablation.csv", keep_default_na=False, na_values=[""],
                       dtype={"seeds": str, "paired_seeds": str})


def row(df: pd.DataFrame, split: str, label: str) -> pd.Series:
    sel = df[(df["split"] == split) & (df["row"] == label)]
    assert len(sel) == 1, (split, label)
    return sel.iloc[0]


def test_comparison_rows_and_order(comp: pd.DataFrame) -> None:
    assert comp.loc[comp["split"] == "2x5", "row"].tolist() == [
        "teacher0", "teacher1", "teachers", "scratch", "kd", "cfl", "cka", "cka:wide"]
    assert comp.loc[comp["split"] == "3x3", "row"].tolist() == ["teacher0", "teacher1", "teacher2", "teachers", "cka"]
    assert not comp["row"].str.contains("-").any()  # ablations have their own table


@pytest.mark.parametrize("label, metric, mean, std, n", [
    ("scratch", "test/union_acc", 0.96, 0.01, 3),  # the duplicate (0.50) is ignored
    ("kd", "test/union_acc", 0.92, 0.01 * SQRT2, 2),  # the failed seed (0.10) is ignored
    ("kd", "test/union_acc_best", 0.93, 0.01 * SQRT2, 2),
    ("cfl", "test/union_acc", 0.90, 0.01, 3),
    ("cka", "test/union_acc", 0.92, 0.02, 3),
    ("cka", "test/union_acc_best", 0.95, 0.01, 3),
    ("cka", "test/task_acc/1", 0.94, 0.02, 3),
    ("cka", "diag/probe_acc", 0.88, 0.0, 2),
    ("cka:wide", "test/union_acc", 0.94, 0.01, 3),
    ("teachers", "test/union_acc", 0.90, float("nan"), 1),
    ("teacher0", "test/task_acc/0", 0.99, float("nan"), 1),
    ("teacher1", "test/task_acc_best/1", 0.97, float("nan"), 1),
])
def test_comparison_means_stds_and_n(comp: pd.DataFrame, label: str, metric: str, mean: float, std: float,
                                     n: int) -> None:
    r = row(comp, "2x5", label)
    assert r[f"{metric}.mean"] == pytest.approx(mean, abs=1e-12)
    assert r[f"{metric}.std"] == pytest.approx(std, abs=1e-12, nan_ok=True)
    assert r[f"{metric}.n"] == n


def test_comparison_counts_failed_killed_running_and_missing(comp: pd.DataFrame) -> None:
    kd = row(comp, "2x5", "kd")
    assert (kd["n"], kd["n_expected"], kd["n_failed"], kd["seeds"]) == (2, 3, 1, "0,2")
    cfl = row(comp, "2x5", "cfl")
    assert (cfl["n"], cfl["n_killed"]) == (3, 0)  # killed, then redone
    cka3 = row(comp, "3x3", "cka")
    assert (cka3["n"], cka3["n_expected"], cka3["n_running"]) == (6, 7, 1)
    assert cka3["test/union_acc.mean"] == pytest.approx(0.825)
    assert cka3["test/union_acc.std"] == pytest.approx(math.sqrt(3.5) * 0.01)
    ref = row(comp, "3x3", "teachers")
    assert (ref["n"], ref["n_expected"]) == (1, 1)  # seed-independent reference: not "1 of 7"
    assert row(comp, "3x3", "teacher2")["test/task_acc/2.mean"] == 0.93  # from the reference run
    assert tables.n_text(kd) == "2 of 3; 1 failed"
    assert tables.n_text(cka3) == "6 of 7; 1 running"


def _abl(abl: pd.DataFrame, split: str, variant: str, metric: str = "test/union_acc") -> pd.Series:
    sel = abl[(abl["split"] == split) & (abl["variant"] == variant) & (abl["metric"] == metric)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_ablation_rows_and_order(abl: pd.DataFrame) -> None:
    sub = abl[(abl["split"] == "2x5") & (abl["metric"] == "test/union_acc")]
    assert sub["variant"].tolist() == ["full", "-intra", "-inter", "-align", "-task", "-intra-inter"]
    assert set(abl["method"]) == {"cka"} and set(abl["metric"]) == {"test/union_acc", "test/union_acc_best"}


@pytest.mark.parametrize("variant, delta, sd, t, ci", [
    ("-intra", -0.02, 0.01, -2 * math.sqrt(3), (-0.03, -0.01)),
    ("-task", -0.08, 0.01 * math.sqrt(3), -8.0, (-0.10, -0.07)),
    ("-intra-inter", -0.06, 0.01, -6 * math.sqrt(3), (-0.07, -0.05)),
])
def test_ablation_deltas_and_p_values(abl: pd.DataFrame, variant: str, delta: float, sd: float, t: float,
                                      ci: tuple[float, float]) -> None:
    r = _abl(abl, "2x5", variant)
    assert (r["n_paired"], r["paired_seeds"]) == (3, "0,1,2")
    assert r["delta"] == pytest.approx(delta, abs=1e-12)
    assert r["delta_std"] == pytest.approx(sd, abs=1e-12)
    assert r["t_stat"] == pytest.approx(t, rel=1e-9)
    assert r["p_ttest"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)  # t with 2 df
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(ci[0], abs=1e-12), pytest.approx(ci[1], abs=1e-12))
    assert math.isnan(r["p_wilcoxon"]) and r["test"] == "paired t-test"


def test_ablation_full_row_missing_seed_and_constant_delta(abl: pd.DataFrame) -> None:
    full = _abl(abl, "2x5", "full")
    assert (full["mean"], full["std"], full["n"]) == (pytest.approx(0.92), pytest.approx(0.02), 3)
    assert math.isnan(full["delta"])
    inter = _abl(abl, "2x5", "-inter")
    assert (inter["n"], inter["n_missing"], inter["n_paired"]) == (2, 1, 2)
    assert inter["delta"] == pytest.approx(0.01)
    assert math.isnan(inter["p_ttest"]) and math.isnan(inter["ci_low"]) and "n too small" in inter["note"]
    align = _abl(abl, "2x5", "-align")
    assert align["delta"] == pytest.approx(0.02) and math.isnan(align["p_ttest"]) and align["note"] == CONSTANT_NOTE
    best = _abl(abl, "2x5", "-intra", "test/union_acc_best")
    assert best["delta"] == pytest.approx(-0.04) and best["mean"] == pytest.approx(0.91)


def test_six_seeds_add_wilcoxon(abl: pd.DataFrame) -> None:
    r = _abl(abl, "3x3", "-intra")
    assert r["n_paired"] == 6  # the RUNNING seed 6 of full is not paired
    assert r["delta"] == pytest.approx(-0.035)
    t = -0.035 / (math.sqrt(3.5) * 0.01 / math.sqrt(6))
    assert r["t_stat"] == pytest.approx(t, rel=1e-9)
    assert r["p_ttest"] == pytest.approx(2 * student_t.sf(abs(t), 5), rel=1e-9)
    assert r["p_wilcoxon"] == pytest.approx(1 / 32)
    assert r["test"] == "paired t-test + Wilcoxon signed-rank"


def test_markdown_cells_bold_and_labels(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    assert "| scratch † | 3 | 96.0 ± 1.0 | 96.0 ± 1.0 | 97.0 ± 1.0 | 98.0 ± 1.0 |" in md
    assert "| kd | 2 of 3; 1 failed | 92.0 ± 1.4 | 93.0 ± 1.4 |" in md
    assert "| cka | 3 | 92.0 ± 2.0 | **95.0 ± 1.0** | 93.0 ± 2.0 | 94.0 ± 2.0 |" in md  # best on best-val
    assert "| cka:wide | 3 | **94.0 ± 1.0** | 94.0 ± 1.0 | **95.0 ± 1.0** | **96.0 ± 1.0** |" in md
    assert "| teacher 0 (own task) | 1 | – | – | 99.0 | – |" in md
    assert "| teachers (claiming ensemble) | 1 | 90.0 | 90.0 | 99.0 | 97.0 |" in md
    assert "| cka-intra | 3 | 90.0 ± 1.7 | -2.0 | [-3.0, -1.0] | 3 | 0.074 | n < 6 |" in md
    assert "| cka-inter | 2 of 3; 1 missing | 92.0 ± 1.4 | +1.0 | – | 2 | n too small | n < 6 |" in md
    assert "| cka-align | 3 | 94.0 ± 2.0 | +2.0 | [+2.0, +2.0] | 3 | equal Δs | n < 6 |" in md
    assert "| cka-intra | 6 of 7; 1 missing | 79.0 ± 0.0 | -3.5 | [-4.8, -2.2] | 6 | 0.006 | 0.031 |" in md
    assert "† marks methods trained with the true training labels (`scratch`" in md
    assert "weak evidence" in md and "scipy.stats.ttest_rel" in md


def test_cell_formats_and_escaping() -> None:
    md, tex = tables.Fmt("md"), tables.Fmt("tex")
    assert md.pct(0.9684, 0.0061, 3, 3) == "96.8 ± 0.6"
    assert md.pct(0.9684, float("nan"), 1, 3) == "96.8 (n=1)"
    assert tex.pct(0.9684, 0.0061, 3, 3, bold=True) == r"\textbf{96.8 $\pm$ 0.6}"
    assert md.num(-0.04, signed=True) == "+0.0" and tex.num(-2.0, signed=True) == "$-2.0$"
    assert tables.tex_escape("a_b 50% & {x} #1 $") == r"a\_b 50\% \& \{x\} \#1 \$"
    assert md.p(0.0004, 3, 3) == "< 0.001" and md.p(0.5, 2, 3) == "n too small" and md.p(0.5, 5, 6) == "n < 6"


def test_orders_and_palette() -> None:
    assert sorted(["zeta", "cka", "alpha", "kd", "teachers", "cfl", "scratch"], key=tables.method_rank) == [
        "teachers", "scratch", "kd", "cfl", "cka", "alpha", "zeta"]
    variants = ["-task", "wide", "-intra-inter", "full", "-intra", "-zz"]
    assert sorted(variants, key=lambda v: tables.variant_rank(v, ["-intra", "-task"])) == [
        "full", "wide", "-intra", "-task", "-zz", "-intra-inter"]
    a = plots.palette(["teachers", "scratch", "kd", "cka", "mine", "cka-intra"])
    b = plots.palette(["cka", "cka-intra", "kd"])
    assert a["cka"] == b["cka"] and a["kd"] == b["kd"] and a["cka-intra"] == b["cka-intra"]
    assert len(set(a.values())) == len(a)
