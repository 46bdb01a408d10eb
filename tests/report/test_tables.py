"""Exact numbers in the comparison and ablation tables (CSV) and their Markdown/LaTeX cells.

Expected numbers are computed by hand from the store's values (tests/report/store.py); where a
reference is used it is scipy on the by-seed pairs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import t as student_t
from scipy.stats import ttest_rel

from harness.report import figures, tables

SQRT2 = math.sqrt(2)
T975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 0.975 quantile of t with 2 df, closed form


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
    ("kd", "test/union_acc_bestval", 0.93, 0.01 * SQRT2, 2),
    ("cfl", "test/union_acc", 0.90, 0.01, 3),
    ("cka", "test/union_acc", 0.92, 0.02, 3),
    ("cka", "test/union_acc_bestval", 0.95, 0.01, 3),
    ("cka", "test/task_acc/1", 0.94, 0.02, 3),
    ("cka", "diag/probe_acc", 0.88, 0.0, 2),
    ("cka:wide", "test/union_acc", 0.94, 0.01, 3),
    ("teachers", "test/union_acc", 0.90, float("nan"), 1),
    ("teacher0", "test/task_acc/0", 0.99, float("nan"), 1),
    ("teacher1", "test/task_acc_bestval/1", 0.97, float("nan"), 1),
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
    assert set(abl["method"]) == {"cka"} and set(abl["metric"]) == {"test/union_acc", "test/union_acc_bestval"}


@pytest.mark.parametrize("variant, diffs, delta, sd, t", [
    ("-intra", (-0.02, -0.01, -0.03), -0.02, 0.01, -2 * math.sqrt(3)),
    # seed order and value order disagree: by seed -3, -12, -9 pp (by rank it would be -10, -7, -7)
    ("-task", (-0.03, -0.12, -0.09), -0.08, 0.01 * math.sqrt(21), -8 / math.sqrt(7)),
    ("-intra-inter", (-0.05, -0.06, -0.07), -0.06, 0.01, -6 * math.sqrt(3)),
])
def test_ablation_deltas_and_p_values(abl: pd.DataFrame, variant: str, diffs: tuple, delta: float, sd: float,
                                      t: float) -> None:
    r = _abl(abl, "2x5", variant)
    assert (r["n_paired"], r["paired_seeds"]) == (3, "0,1,2")
    assert r["delta"] == pytest.approx(delta, abs=1e-12)
    assert r["delta_std"] == pytest.approx(sd, abs=1e-12)
    assert r["t_stat"] == pytest.approx(t, rel=1e-9)
    assert r["p_ttest"] == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-9)  # t with 2 df
    half = T975_DF2 * sd / math.sqrt(3)  # t-interval
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(delta - half, abs=1e-12),
                                           pytest.approx(delta + half, abs=1e-12))
    assert r["ci_method"] == "t"
    assert math.isnan(r["p_wilcoxon"]) and r["test"] == "paired t-test"


def test_per_seed_differences_are_by_seed(study_data, abl: pd.DataFrame) -> None:
    d = tables.seed_differences(study_data, tables.ablation_frame(study_data))
    task = d[(d["split"] == "2x5") & (d["variant"] == "-task") & (d["metric"] == "test/union_acc")]
    assert list(task["seed"]) == [0, 1, 2]
    assert list(task["diff"]) == pytest.approx([-0.03, -0.12, -0.09])


def test_holm_within_each_table(abl: pd.DataFrame) -> None:
    """2x5, last epoch: three variants have a t-test (-inter: n too small, -align: equal Δs), raw p
    0.0742 (-intra), 0.0942 (-task), 0.00913 (-intra-inter). Holm by hand: 3 x 0.00913 = 0.0274,
    2 x 0.0742 = 0.1484, max(0.1484, 1 x 0.0942) = 0.1484."""
    expected = {"-intra": (0.0741799002, 0.1483598005), "-task": (0.0941783727, 0.1483598005),
                "-intra-inter": (0.0091326114, 0.0273978342)}
    for variant, (raw, holm) in expected.items():
        r = _abl(abl, "2x5", variant)
        assert (r["p_ttest"], r["p_ttest_holm"]) == (pytest.approx(raw, rel=1e-8), pytest.approx(holm, rel=1e-8))
    for variant in ("-inter", "-align"):
        assert math.isnan(_abl(abl, "2x5", variant)["p_ttest_holm"])
    # best-val. epoch is its own family: -intra and -intra-inter have equal Δs there, so two tests:
    # -task (by seed -7, -15, -11 pp: t = -11 sqrt(3) / 4, p = 0.04136) and -align (-2, -1, 0 pp:
    # t = -sqrt(3), p = 0.2254); Holm: 2 x 0.04136 = 0.08272, max(0.08272, 0.2254) = 0.2254
    best = _abl(abl, "2x5", "-task", "test/union_acc_bestval")
    align = _abl(abl, "2x5", "-align", "test/union_acc_bestval")
    assert (best["p_ttest"], best["p_ttest_holm"]) == (pytest.approx(0.0413617253, rel=1e-8),
                                                       pytest.approx(0.0827234505, rel=1e-8))
    assert (align["p_ttest"], align["p_ttest_holm"]) == (pytest.approx(0.2254033308, rel=1e-8),
                                                         pytest.approx(0.2254033308, rel=1e-8))


def test_six_seeds_add_wilcoxon(abl: pd.DataFrame) -> None:
    """3x3: per-seed differences -2, +1, -3, -5, -4, -6 pp (seed order and value order disagree)."""
    r = _abl(abl, "3x3", "-intra")
    assert r["n_paired"] == 6  # the RUNNING seed 6 of full is not paired
    assert r["delta"] == pytest.approx(-0.19 / 6)
    assert r["delta_std"] == pytest.approx(math.sqrt(37 / 6) * 0.01)
    assert r["t_stat"] == pytest.approx(-19 / math.sqrt(37), rel=1e-9)
    full = [0.84, 0.80, 0.83, 0.81, 0.85, 0.82]
    intra = [0.82, 0.81, 0.80, 0.76, 0.81, 0.76]
    assert r["p_ttest"] == pytest.approx(float(ttest_rel(intra, full).pvalue), rel=1e-9)
    assert r["p_ttest"] == pytest.approx(2 * student_t.sf(19 / math.sqrt(37), 5), rel=1e-9)
    assert r["p_wilcoxon"] == pytest.approx(1 / 16)  # W+ = 1 (the +1 pp has rank 1): 2 * 2/64
    half = student_t.ppf(0.975, 5) * math.sqrt(37 / 6) * 0.01 / math.sqrt(6)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(-0.19 / 6 - half), pytest.approx(-0.19 / 6 + half))
    assert r["p_ttest_holm"] == r["p_ttest"] and r["p_wilcoxon_holm"] == r["p_wilcoxon"]  # a family of one
    assert r["test"] == "paired t-test + Wilcoxon signed-rank"


def test_markdown_cells_bold_and_labels(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    assert "| scratch † | 3 | 96.0 ± 1.0 | 96.0 ± 1.0 | 97.0 ± 1.0 | 98.0 ± 1.0 |" in md
    assert "| kd | 2 of 3; 1 failed | 92.0 ± 1.4 | 93.0 ± 1.4 |" in md
    assert "| cka | 3 | 92.0 ± 2.0 | **95.0 ± 1.0** | 93.0 ± 2.0 | 94.0 ± 2.0 |" in md  # best on best-val
    assert "| cka:wide | 3 | **94.0 ± 1.0** | 94.0 ± 1.0 | **95.0 ± 1.0** | **96.0 ± 1.0** |" in md
    assert "| teacher 0 (own task) | 1 | – | – | 99.0 | – |" in md
    assert "| teachers (claiming ensemble) | 1 | 90.0 | 90.0 | 99.0 | 97.0 |" in md
    # t-intervals: -2.0 ± 4.303 x 1.0 / sqrt(3) = [-4.5, +0.5]; -task -8.0 ± 4.303 x 4.583 / sqrt(3)
    assert "| cka-intra | 3 | 90.0 ± 1.7 | -2.0 | [-4.5, +0.5] | 3 | 0.074 | 0.148 |" in md
    assert "| cka-inter | 2 of 3; 1 missing | 92.0 ± 1.4 | +1.0 | – | 2 | n too small | n too small |" in md
    assert "| cka-align | 3 | 94.0 ± 2.0 | +2.0 | [+2.0, +2.0] | 3 | equal Δs | equal Δs |" in md
    assert "| cka-task | 3 | 84.0 ± 3.6 | -8.0 | [-19.4, +3.4] | 3 | 0.094 | 0.148 |" in md
    assert "| cka-intra-inter | 3 | 86.0 ± 1.0 | -6.0 | [-8.5, -3.5] | 3 | 0.009 | 0.027 |" in md
    assert ("| Variant | n | Acc. (%) | Δ (pp) | 95% CI of Δ (pp; t, n=3) | Pairs | p (paired t) "
            "| p Holm (paired t) |") in md  # no Wilcoxon columns where no row has 6 pairs
    assert ("| cka-intra | 6 of 7; 1 missing | 79.3 ± 2.7 | -3.2 | [-5.8, -0.6] | 6 | 0.026 | 0.026 | 0.062 "
            "| 0.062 |") in md
    assert ("| 95% CI of Δ (pp; t, n=6) | Pairs | p (paired t) | p Holm (paired t) | p (Wilcoxon) "
            "| p Holm (Wilcoxon) |") in md
    assert "† marks methods trained with the true training labels (`scratch`" in md
    assert "weak evidence" in md and "scipy.stats.ttest_rel" in md and "scipy.stats.t.interval" in md


def _md_table(md: str, after: str) -> tuple[list[str], dict[str, list[str]]]:
    """(headings, {first cell: cells}) of the first Markdown table after the line ``after``."""
    lines = md.split(after, 1)[1].splitlines()
    rows = [line for line in lines[lines.index(next(x for x in lines if x.startswith("|"))):]]
    rows = rows[:next((i for i, x in enumerate(rows) if not x.startswith("|")), len(rows))]
    cells = [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]
    return cells[0], {c[0]: c for c in cells[2:]}


def _tex_table(tex: str, index: int) -> tuple[list[str], dict[str, list[str]]]:
    block = re.findall(r"\\toprule\n(.*?)\\bottomrule", tex, flags=re.S)[index]
    rows = [[c.strip() for c in line[:-2].split(" & ")] for line in block.splitlines() if line.endswith("\\\\")]
    return rows[0], {r[0]: r for r in rows[1:]}


def _under(heads: list[str], rows: dict[str, list[str]], row: str, *words: str) -> str:
    """The cell of ``row`` under the one heading that contains every word."""
    cols = [i for i, h in enumerate(heads) if all(w in h for w in words)]
    assert len(cols) == 1, (heads, words)
    return rows[row][cols[0]]


def test_last_and_best_headings_sit_over_their_own_metric(report_dir: Path, comp: pd.DataFrame) -> None:
    """The store gives cka 92 (last) vs 95 (best val.), kd 92 vs 93, cfl 90 vs 91: each heading must
    sit over its own metric in Markdown, LaTeX and CSV (comparison and ablation tables)."""
    md = (report_dir / "report.md").read_text()
    heads, rows = _md_table(md, "### Split `2x5`\n")
    assert heads[2:4] == ["Union acc., last epoch (%) [primary]", "Union acc., best-val. epoch (%) [secondary]"]
    for label, last, best in (("cka", "92.0 ± 2.0", "**95.0 ± 1.0**"), ("kd", "92.0 ± 1.4", "93.0 ± 1.4"),
                              ("cfl", "90.0 ± 1.0", "91.0 ± 1.0")):
        assert _under(heads, rows, label, "last epoch", "primary") == last
        assert _under(heads, rows, label, "best-val.", "secondary") == best
    assert _under(heads, rows, "cka", "Task 1", "last epoch") == "94.0 ± 2.0"  # test/task_acc/1, not _best (96)
    tex = (report_dir / "comparison.tex").read_text()
    heads, rows = _tex_table(tex, 0)
    assert _under(heads, rows, "cka", "last epoch", "primary") == "92.0 $\\pm$ 2.0"
    assert _under(heads, rows, "cka", "best-val.", "secondary") == r"\textbf{95.0 $\pm$ 1.0}"
    assert _under(heads, rows, "cfl", "best-val.", "secondary") == "91.0 $\\pm$ 1.0"
    cka = row(comp, "2x5", "cka")
    assert (cka["test/union_acc.mean"], cka["test/union_acc_bestval.mean"]) == (pytest.approx(0.92), pytest.approx(0.95))
    # ablation tables: -intra is 90 (Δ -2) at the last epoch, 91 (Δ -4) at the best-val. epoch
    for title, acc, delta in (("Union acc., last epoch (primary):\n", "90.0 ± 1.7", "-2.0"),
                              ("Union acc., best-val. epoch (secondary: epoch selected with validation labels):\n",
                               "91.0 ± 1.0", "-4.0")):
        heads, rows = _md_table(md.split("### Split `2x5`: `cka`")[1], title)
        assert (_under(heads, rows, "cka-intra", "Acc."), _under(heads, rows, "cka-intra", "Δ (pp)")) == (acc, delta)
    tex = (report_dir / "ablation.tex").read_text()
    captions = re.findall(r"^% (.*)$", tex, flags=re.M)
    assert captions[:2] == ["ablation, split 2x5, cka, Union acc., last epoch (primary)",
                            "ablation, split 2x5, cka, Union acc., best-val. epoch (secondary: epoch selected with "
                            "validation labels)"]
    for i, delta in ((0, "$-2.0$"), (1, "$-4.0$")):
        heads, rows = _tex_table(tex, i)
        assert _under(heads, rows, "cka-intra", r"$\Delta$ (pp)") == delta


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
    a = figures.palette(["teachers", "scratch", "kd", "cka", "mine", "cka-intra"])
    b = figures.palette(["cka", "cka-intra", "kd"])
    assert a["cka"] == b["cka"] and a["kd"] == b["kd"] and a["cka-intra"] == b["cka-intra"]
    assert len(set(a.values())) == len(a)


def _routing_frame(default: float, rule: float) -> pd.DataFrame:
    """A split with teachers at 97% and 95% on their own tasks, the claiming ensemble of the default
    rule (``teachers``, and ``kd``'s diagnostic) at ``default``, of one other rule at ``rule``."""
    rows = [("teacher0", "teacher", "teacher", "task0", math.nan, 0.97, math.nan, math.nan),
            ("teacher1", "teacher", "teacher", "task1", math.nan, math.nan, 0.95, math.nan),
            ("teachers", "reference", "teachers", "full", default, math.nan, math.nan, default),
            ("teachers:rmd/z/routed", "reference", "teachers", "rmd/z/routed", rule, math.nan, math.nan, rule),
            ("kd", "method", "kd", "full", 0.69, math.nan, math.nan, default),
            ("kd:rmd/z/routed", "method", "kd", "rmd/z/routed", 0.9, math.nan, math.nan, rule)]
    return pd.DataFrame(rows, columns=["row", "kind", "method", "variant", "test/union_acc.mean",
                                       "test/task_acc/0.mean", "test/task_acc/1.mean",
                                       "diag/ensemble_union_acc.mean"]).assign(split="3way")


def test_routing_caps_a_split_under_the_default_rule_though_another_rule_does_not() -> None:
    from harness.report.disclosure import routing_sentence

    comp = _routing_frame(default=0.714, rule=0.913)
    cap = tables.routing_caps(comp)["3way"]
    assert cap == (0.714, 0.95, 0.913, "teachers:rmd/z/routed") and cap.default_only
    (text,) = routing_sentence(comp, "3way")
    assert text.startswith("Routing caps this split under the default rule: its claiming-teacher ensemble reaches "
                           "71.4% union accuracy, 23.6 points below the weakest teacher on its own task (95.0%; "
                           "flagged when more than 10 points below).")
    assert "the best ensemble of this split reaches 91.3% (`teachers:rmd/z/routed`;" in text
    # without the reference rows, the default rule's ensemble is the diagnostic of the methods' default rows
    (text,) = routing_sentence(comp[comp["kind"] != "reference"], "3way")
    assert "under the default rule" in text and "71.4%" in text and "(`kd:rmd/z/routed`;" in text


def test_routing_caps_names_the_best_rule_when_every_rule_is_capped_and_nothing_when_none_is() -> None:
    from harness.report.disclosure import routing_sentence

    (text,) = routing_sentence(_routing_frame(default=0.714, rule=0.8), "3way")
    assert text.startswith("Routing caps this split: the best claiming-teacher ensemble reaches 80.0% union "
                           "accuracy, 15.0 points below the weakest teacher on its own task (95.0%;")
    assert tables.routing_caps(_routing_frame(default=0.9, rule=0.92)) == {}
    assert routing_sentence(_routing_frame(default=0.9, rule=0.92), "3way") == []


def test_the_jittered_dots_are_the_same_png_on_every_build_and_leave_numpy_alone(tmp_path: Path) -> None:
    """seaborn draws the strip plot's jitter from numpy's global generator: seeded per figure, the
    accuracy figure is byte-identical whatever state the caller's generator is in, and drawing it
    does not advance the caller's stream."""
    import numpy as np

    trials = pd.DataFrame({"split": "2x5", "label": ["kd"] * 5 + ["cka"] * 5,
                           "test/union_acc": [0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]})
    pal = figures.palette(["kd", "cka"])
    pngs = []
    for seed in (1, 2):
        np.random.seed(seed)
        before = np.random.get_state()[1].copy()
        out = tables.accuracy_plot(trials, {"2x5": ["kd", "cka"]}, pal, tmp_path / f"accuracy-{seed}.png")
        assert out is not None and (np.random.get_state()[1] == before).all()
        pngs.append(out.read_bytes())
    assert pngs[0] == pngs[1]
