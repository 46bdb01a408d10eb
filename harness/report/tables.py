"""Comparison and ablation tables: numeric frames (the CSVs), their Markdown/LaTeX renderings and
the sections' figures.

Numeric frames keep raw fractions (``<metric>.mean``, ``<metric>.std``, ``<metric>.n``); the
renderings show percentages with one decimal, ``mean ± std`` over seeds. Row order: teachers
(each on its own task), the claiming-teacher ensemble, then methods in the preferred order
(``scratch``, ``kd``, ``cfl``, ``cka``, then any other alphabetically), each method's ``full``
run first and its named variants after it. Ablation variants (``-intra`` ...) go to the
ablation table, which compares each with its method's ``full`` run over matching seeds.

Figures (PNG, in the shared style of :mod:`.figures`):

- :func:`accuracy_plot`: union accuracy per method, mean ± std over seeds with the seeds as dots;
- :func:`curves_plot`: validation union accuracy per epoch, mean and ± std band over seeds;
- :func:`loss_plot`: every logged loss term of one method, per epoch, one line per variant;
- :func:`ablation_plot`: Δ vs the full method with its 95% CI and the per-seed differences.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from harness.report import stats
from harness.report.figures import Palette, figure, save, seeded_jitter
from harness.report.frames import REFERENCE_METHOD, StudyData, is_final, natural_key, row_label

PREFERRED = (REFERENCE_METHOD, "scratch", "kd", "cfl", "cka")
PREFERRED_COMPONENTS = ("intra", "inter", "align", "task")  # ablation order when the study file is unknown
ABLATION_METRICS = ("test/union_acc", "test/union_acc_bestval")
_METRIC_GROUPS = ("test/union_acc", "test/union_acc_bestval", "test/task_acc/", "test/task_acc_bestval/",
                  "val/union_acc_best", "diag/", "best_epoch", "trial_seconds", "peak_rss_mb", "gpu_peak_mb")
PRIMARY, SECONDARY = "test/union_acc", "test/union_acc_bestval"
#: the primary metric is the last-epoch union accuracy (no label of any kind chose the model); the
#: best-validation one is secondary: its epoch was selected with validation labels
METRIC_TITLES = {PRIMARY: "Union acc., last epoch (primary)",
                 SECONDARY: "Union acc., best-val. epoch (secondary: epoch selected with validation labels)"}
METRIC_SHORT = {PRIMARY: "last epoch (primary)", SECONDARY: "best-val. epoch (secondary)"}
COMPARISON_HEADS = {PRIMARY: "Union acc., last epoch (%) [primary]",
                    SECONDARY: "Union acc., best-val. epoch (%) [secondary]"}
#: a split whose best claiming-teacher ensemble is more than this below its weakest teacher's
#: own-task accuracy is capped by routing (fractions: 0.10 = 10 percentage points)
ROUTING_GAP = 0.10


# ----------------------------------------------------------------------------- ordering
def method_rank(method: str) -> tuple:
    return (PREFERRED.index(method), "") if method in PREFERRED else (len(PREFERRED), method)


def variant_rank(variant: str, order: list[str] | None = None) -> tuple:
    """``full``, then named variants (alphabetically), then ablations (singles, pairs, ...)."""
    if variant == "full":
        return (0, 0, 0, "")
    if not variant.startswith("-"):
        return (1, 0, 0, variant)
    pos = order.index(variant) if order and variant in order else len(order or [])
    return (2, variant.count("-"), pos, variant)


def metric_rank(metric: str) -> tuple:
    for i, g in enumerate(_METRIC_GROUPS):
        if metric == g or (g.endswith("/") and metric.startswith(g)):
            return (i, natural_key(metric))
    return (len(_METRIC_GROUPS), natural_key(metric))


def ablation_order(data: StudyData) -> list[str]:
    """Ablation variant names in the study file's order (``intra+inter`` -> ``-intra-inter``),
    else the preferred component order; variants in neither sort alphabetically after them."""
    listed = data.study.get("ablations") or list(PREFERRED_COMPONENTS)
    return ["".join(f"-{p}" for p in str(a).split("+")) for a in listed]


# ----------------------------------------------------------------------------- seeds and counts
def seed_independent(data: StudyData, split: str, method: str) -> bool:
    """A method run once per split whatever the seeds (e.g. ``teachers``): its runs say so with
    ``harness.seeded=false``, or, without that tag, it trained nothing (``best_epoch`` 0) and was
    run with a single seed."""
    a = data.attempts
    att = a[(a["split"] == split) & (a["method"] == method)]
    flags = set(att["seeded"]) - {""}
    if flags:
        return flags == {"false"}
    t = data.trials[(data.trials["split"] == split) & (data.trials["method"] == method)]
    return (att["seed"].nunique() == 1 and not t.empty and "best_epoch" in t
            and bool((t["best_epoch"] == 0).all()))


def expected_seeds(data: StudyData, split: str, method: str) -> list[int]:
    """The seeds a row should have: the study's seeds (file, else every seed seen in the split),
    or its one seed for a seed-independent method."""
    att = data.attempts[data.attempts["split"] == split]
    if seed_independent(data, split, method):
        return sorted(set(att.loc[att["method"] == method, "seed"]))
    listed = [int(s) for s in data.study.get("seeds", []) if isinstance(s, int)]
    return sorted(set(listed) | set(att["seed"]))


def seed_counts(data: StudyData, split: str, method: str, variant: str) -> dict[str, Any]:
    """Finished seeds of a row, and why the others are absent (failed, killed, running, missing)."""
    expected = expected_seeds(data, split, method)
    t = data.trials
    done = sorted(t.loc[(t["split"] == split) & (t["method"] == method) & (t["variant"] == variant), "seed"])
    a = data.attempts
    att = a[(a["split"] == split) & (a["method"] == method) & (a["variant"] == variant)]
    out = {"seeds": ",".join(map(str, done)), "n": len(done), "n_expected": len(set(expected) | set(done)),
           "n_failed": 0, "n_killed": 0, "n_running": 0, "n_missing": 0}
    for seed in sorted(set(expected) - set(done)):
        last = att[att["seed"] == seed].tail(1)["status"].tolist()  # attempts are sorted by start time
        out[f"n_{_WHY.get(last[0] if last else '', 'missing')}"] += 1
    return out


_WHY = {"FAILED": "failed", "KILLED": "killed", "RUNNING": "running"}


def n_text(row: pd.Series | dict[str, Any]) -> str:
    """``3``, or ``2 of 3; 1 failed``."""
    if row["n"] == row["n_expected"]:
        return str(row["n"])
    why = [f"{row[f'n_{k}']} {k}" for k in ("failed", "killed", "running", "missing") if row[f"n_{k}"]]
    return f"{row['n']} of {row['n_expected']}" + (f"; {', '.join(why)}" if why else "")


# ----------------------------------------------------------------------------- numeric frames
def _values(data: StudyData, split: str, method: str, variant: str, metric: str) -> dict[int, float]:
    t = data.trials
    rows = t[(t["split"] == split) & (t["method"] == method) & (t["variant"] == variant)]
    if metric not in rows:
        return {}
    return {int(s): float(v) for s, v in zip(rows["seed"], rows[metric]) if not pd.isna(v)}


def _cells(values: dict[int, float], metric: str) -> dict[str, Any]:
    s = stats.summarize([values[k] for k in sorted(values)])
    return {f"{metric}.mean": s.mean, f"{metric}.std": s.std, f"{metric}.n": s.n}


def _teacher_rows(data: StudyData, split: str) -> list[dict[str, Any]]:
    """Teacher k on its own task: its teacher runs (``test/own_task_acc``: the cached best-val weights; mean ±
    std when several, e.g. ``teacher_seeds: per_seed``), else the task accuracies of the
    ``teachers`` reference run(s)."""
    accs: dict[int, list[float]] = {}
    tr = data.teachers[data.teachers["split"] == split]
    if not tr.empty and "test/own_task_acc" in tr:
        for k, a in zip(tr["task"], tr["test/own_task_acc"]):
            accs.setdefault(int(k), []).append(float(a))
    else:  # one reference run, or one per seed with ``teacher_seeds: per_seed``
        t = data.trials
        ref = t[(t["split"] == split) & (t["method"] == REFERENCE_METHOD) & (t["variant"] == "full")]
        accs = {int(c.rsplit("/", 1)[1]): [float(v) for v in ref[c]] for c in ref.columns
                if c.startswith("test/task_acc/")}
    out = []
    for k, values in sorted(accs.items()):
        s = stats.summarize(values)
        if not s.n:
            continue
        row = {"split": split, "row": f"teacher{k}", "kind": "teacher", "method": "teacher", "variant": f"task{k}",
               "uses_labels": True, "seeds": "", "n": s.n, "n_expected": s.n, "n_failed": 0, "n_killed": 0,
               "n_running": 0, "n_missing": 0}
        for m in (f"test/task_acc/{k}", f"test/task_acc_bestval/{k}"):
            row.update({f"{m}.mean": s.mean, f"{m}.std": s.std, f"{m}.n": s.n})
        out.append(row)
    return out


def comparison_frame(data: StudyData) -> pd.DataFrame:
    """One row per split and teacher / reference / method (variant), every final metric's stats."""
    metrics = sorted((c for c in data.trials.columns if is_final(c)), key=metric_rank)
    rows: list[dict[str, Any]] = []
    for split in data.splits:
        rows.extend(_teacher_rows(data, split))
        a = data.attempts[(data.attempts["split"] == split) & ~data.attempts["variant"].str.startswith("-")]
        keys = sorted(set(zip(a["method"], a["variant"])), key=lambda k: (method_rank(k[0]), variant_rank(k[1])))
        for method, variant in keys:
            uses_labels = a.loc[(a["method"] == method) & (a["variant"] == variant), "uses_labels"].any()
            row = {"split": split, "row": row_label(method, variant),
                   "kind": "reference" if method == REFERENCE_METHOD else "method",
                   "method": method, "variant": variant, "uses_labels": bool(uses_labels),
                   **seed_counts(data, split, method, variant)}
            for m in metrics:
                row.update(_cells(_values(data, split, method, variant, m), m))
            rows.append(row)
    df = pd.DataFrame(rows)
    stat_cols = [f"{m}.{s}" for m in sorted({c.rsplit(".", 1)[0] for c in df.columns if c.endswith(".mean")},
                                            key=metric_rank) for s in ("mean", "std", "n")]
    head = ["split", "row", "kind", "method", "variant", "uses_labels", "seeds", "n", "n_expected", "n_failed",
            "n_killed", "n_running", "n_missing"]
    df = df.reindex(columns=head + stat_cols)
    for c in df.columns:
        if c.endswith(".n"):
            df[c] = df[c].fillna(0).astype(int)
    return df


def ablation_frame(data: StudyData) -> pd.DataFrame:
    """Every method with ``-component`` variants: full and each variant, Δ vs full and its evidence."""
    order = ablation_order(data)
    rows = []
    for split in data.splits:
        a = data.attempts[data.attempts["split"] == split]
        for method in sorted(set(a.loc[a["variant"].str.startswith("-"), "method"]), key=method_rank):
            variants = sorted({"full"} | {v for v in a.loc[a["method"] == method, "variant"] if v.startswith("-")},
                              key=lambda v: variant_rank(v, order))
            for metric in [m for m in ABLATION_METRICS if m in data.trials]:
                full = _values(data, split, method, "full", metric)
                for variant in variants:
                    vals = _values(data, split, method, variant, metric)
                    s = stats.summarize([vals[k] for k in sorted(vals)])
                    row = {"split": split, "method": method, "variant": variant, "row": row_label(method, variant),
                           "metric": metric, **seed_counts(data, split, method, variant),
                           "mean": s.mean, "std": s.std, "n_metric": s.n}
                    if variant != "full":
                        p = stats.paired_delta(full, vals)
                        row.update({"n_paired": p.n, "paired_seeds": ",".join(map(str, p.seeds)), "delta": p.delta,
                                    "delta_std": p.delta_std, "ci_low": p.ci_low, "ci_high": p.ci_high,
                                    "ci_method": p.ci_method, "t_stat": p.t_stat, "p_ttest": p.p_ttest,
                                    "p_wilcoxon": p.p_wilcoxon, "test": p.test, "note": p.note})
                    rows.append(row)
    cols = ["split", "method", "variant", "row", "metric", "seeds", "n", "n_expected", "n_failed", "n_killed",
            "n_running", "n_missing", "n_metric", "mean", "std", "n_paired", "paired_seeds", "delta", "delta_std",
            "ci_low", "ci_high", "ci_method", "t_stat", "p_ttest", "p_ttest_holm", "p_wilcoxon", "p_wilcoxon_holm",
            "test", "note"]
    df = pd.DataFrame(rows).reindex(columns=cols)
    df["n_paired"] = df["n_paired"].astype("Int64")
    for (_, _, _), family in df.groupby(["split", "method", "metric"], sort=False):  # one table = one family
        for raw in ("p_ttest", "p_wilcoxon"):
            df.loc[family.index, f"{raw}_holm"] = stats.holm(family[raw].astype(float).tolist())
    return df


def seed_differences(data: StudyData, abl: pd.DataFrame) -> pd.DataFrame:
    """Per-seed Δ (variant − full) behind every ablation row (for plots)."""
    rows = []
    for r in abl[abl["variant"] != "full"].itertuples(index=False):
        full = _values(data, r.split, r.method, "full", r.metric)
        var = _values(data, r.split, r.method, r.variant, r.metric)
        rows += [{"split": r.split, "method": r.method, "variant": r.variant, "row": r.row, "metric": r.metric,
                  "seed": s, "diff": var[s] - full[s]} for s in sorted(set(full) & set(var))]
    return pd.DataFrame(rows, columns=["split", "method", "variant", "row", "metric", "seed", "diff"])


# ----------------------------------------------------------------------------- rendering
def tex_escape(s: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(c, c) for c in s)


class Fmt:
    """How a cell is written in Markdown (``md``) or LaTeX (``tex``)."""

    def __init__(self, kind: str) -> None:
        self.tex = kind == "tex"
        self.pm = r" $\pm$ " if self.tex else " ± "
        self.dagger = r"$^\dagger$" if self.tex else " †"
        self.dash = "--" if self.tex else "–"

    def text(self, s: str) -> str:
        return tex_escape(s) if self.tex else s.replace("|", r"\|")

    def bold(self, s: str) -> str:
        return rf"\textbf{{{s}}}" if self.tex else f"**{s}**"

    def num(self, x: float, signed: bool = False) -> str:
        if x is None or pd.isna(x):
            return self.dash
        v = round(x, 1) + 0.0  # no "-0.0"
        s = f"{v:+.1f}" if signed else f"{v:.1f}"
        return f"${s}$" if self.tex and signed else s

    def pct(self, mean: float, std: float, n: int, row_n: int | None = None, bold: bool = False) -> str:
        if not n or pd.isna(mean):
            return self.dash
        s = f"{100 * mean:.1f}" + ("" if pd.isna(std) else f"{self.pm}{100 * std:.1f}")
        s = self.bold(s) if bold else s
        return s + (f" (n={n})" if row_n is not None and n != row_n else "")

    def p(self, p: float, n: int, minimum: int, constant: bool = False) -> str:
        if n < minimum:
            return f"n {'$<$' if self.tex else '<'} {minimum}" if minimum > stats.MIN_TEST_N else "n too small"
        if pd.isna(p):
            if constant:
                return r"equal $\Delta$s" if self.tex else "equal Δs"
            return self.dash
        return (f"{'$<$' if self.tex else '<'} 0.001") if p < 0.001 else f"{p:.3f}"


def task_ids(comp: pd.DataFrame, split: str) -> list[int]:
    sub = comp[comp["split"] == split]
    cols = [c for c in comp.columns if c.startswith("test/task_acc/") and c.endswith(".mean")]
    return sorted(int(c.split("/")[2].split(".")[0]) for c in cols if sub[c].notna().any())


def comparison_display(comp: pd.DataFrame, split: str, kind: str = "md") -> pd.DataFrame:
    """The comparison table of one split as strings; best label-free method per column in bold."""
    f = Fmt(kind)
    sub = comp[comp["split"] == split]
    metrics = [m for m in (PRIMARY, SECONDARY) if f"{m}.mean" in sub]
    metrics += [f"test/task_acc/{k}" for k in task_ids(comp, split)]
    heads = COMPARISON_HEADS
    amalg = (sub["kind"] == "method") & ~sub["uses_labels"].astype(bool)
    best = {m: sub.loc[amalg, f"{m}.mean"].max() for m in metrics}
    out: dict[str, list[str]] = {"Method": [], "n": []}
    for _, r in sub.iterrows():
        name = {"teacher": f"teacher {r['row'][7:]} (own task)", "reference": f"{r['row']} (claiming ensemble)"}
        dagger = f.dagger if r["kind"] == "method" and r["uses_labels"] else ""
        out["Method"].append(f.text(name.get(r["kind"], r["row"])) + dagger)
        out["n"].append(f.text(n_text(r)))
        for m in metrics:
            head = f.text(heads.get(m, f"Task {m.rsplit('/', 1)[1]} acc., last epoch (%)"))
            is_best = bool(amalg[r.name]) and r[f"{m}.mean"] == best[m]
            out.setdefault(head, []).append(f.pct(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.n"],
                                                  None if r["kind"] == "teacher" else r["n"], is_best))
    return pd.DataFrame(out)


def diagnostics_display(comp: pd.DataFrame, split: str) -> pd.DataFrame | None:
    """Label-free diagnostics (Markdown only): pseudo-label, ensemble and probe accuracy, time."""
    f = Fmt("md")
    sub = comp[(comp["split"] == split) & (comp["kind"] != "teacher")]
    cols = {"diag/pseudo_label_acc": "Pseudo-label acc. (%)",
            "diag/oracle_pseudo_label_acc": "Oracle pseudo-label acc. (%)",
            "diag/ensemble_union_acc": "Ensemble union acc. (%)", "diag/oracle_ensemble_acc": "Oracle ensemble acc. (%)",
            "diag/probe_acc": "Linear probe acc. (%)"}
    have = [m for m in cols if f"{m}.mean" in sub and sub[f"{m}.mean"].notna().any()]
    sub = sub[sub[[f"{m}.mean" for m in have]].notna().any(axis=1)] if have else sub.iloc[:0]
    if sub.empty:
        return None
    out: dict[str, list[str]] = {"Method": [f.text(r) for r in sub["row"]]}
    for m in have:
        out[cols[m]] = [f.pct(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.n"], r["n"]) for _, r in sub.iterrows()]
    heads = (("best_epoch", "Best epoch"), ("trial_seconds", "Trial time (s)"), ("gpu_peak_mb", "GPU peak (MB)"))
    for m, head in heads:
        if f"{m}.mean" in sub:
            out[head] = [_plain(r[f"{m}.mean"], r[f"{m}.std"], f.dash) for _, r in sub.iterrows()]
    return pd.DataFrame(out)


def _plain(mean: float, std: float, dash: str) -> str:
    if pd.isna(mean):
        return dash
    return f"{mean:.1f}" + ("" if pd.isna(std) else f" ± {std:.1f}")


ABLATION_HEADS = {  # Markdown header -> LaTeX header
    "Variant": "Variant", "n": "n", "Acc. (%)": r"Acc.\ (\%)", "Δ (pp)": r"$\Delta$ (pp)",
    "Pairs": "Pairs", "p (paired t)": r"$p$ (paired $t$)", "p Holm (paired t)": r"$p$ Holm (paired $t$)",
    "p (Wilcoxon)": r"$p$ (Wilcoxon)", "p Holm (Wilcoxon)": r"$p$ Holm (Wilcoxon)",
}


def ci_heading(sub: pd.DataFrame, kind: str = "md") -> str:
    """``95% CI of Δ (pp; t, n=3)``: the interval's method and the n of the rows that have one."""
    tex = kind == "tex"
    has = sub[sub["ci_method"].fillna("").astype(str) != ""] if "ci_method" in sub else sub.iloc[:0]
    methods = sorted(set(has["ci_method"]))
    ns = sorted({int(n) for n in has["n_paired"]})
    n_txt = "" if not ns else (f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}")
    if tex:
        n_txt = n_txt.replace("–", "--").replace("n=", "$n$=")
    if len(methods) == 1:
        name = r"$t$" if tex and methods[0] == stats.CI_T else methods[0]
        what = f"; {name}, {n_txt}"
    elif methods:
        what = (f"; $t$ if $n<{stats.BOOTSTRAP_MIN_N}$, else bootstrap" if tex
                else f"; t if n < {stats.BOOTSTRAP_MIN_N}, else bootstrap")
    else:
        what = ""
    return (r"95\% CI of $\Delta$ (pp" if tex else "95% CI of Δ (pp") + what + ")"


def ablation_display(abl: pd.DataFrame, split: str, method: str, metric: str, kind: str = "md") -> pd.DataFrame:
    """One split/method/metric block of the ablation table as strings (one family of tests:
    Holm-adjusted p next to the raw p; Wilcoxon columns only when a row has n >= 6 pairs)."""
    f = Fmt(kind)
    sub = abl[(abl["split"] == split) & (abl["method"] == method) & (abl["metric"] == metric)]
    ci = ci_heading(sub, kind)
    wilcoxon = bool((sub["n_paired"].fillna(0) >= stats.MIN_WILCOXON_N).any())
    heads = ["Variant", "n", "Acc. (%)", "Δ (pp)", ci, "Pairs", "p (paired t)", "p Holm (paired t)"]
    heads += ["p (Wilcoxon)", "p Holm (Wilcoxon)"] if wilcoxon else []
    out: dict[str, list[str]] = {k: [] for k in heads}
    for _, r in sub.iterrows():
        full = r["variant"] == "full"
        out["Variant"].append(f.text(f"{method} (full)" if full else r["row"]))
        out["n"].append(f.text(n_text(r)))
        out["Acc. (%)"].append(f.pct(r["mean"], r["std"], r["n_metric"], r["n"]))
        if full:
            for k in heads[3:]:
                out[k].append(f.dash)
            continue
        n = int(r["n_paired"])
        out["Δ (pp)"].append(f.num(100 * r["delta"], signed=True))
        lo, hi = f.num(100 * r["ci_low"], signed=True), f.num(100 * r["ci_high"], signed=True)
        out[ci].append(f.dash if pd.isna(r["ci_low"]) else f"[{lo}, {hi}]")
        out["Pairs"].append(str(n))
        constant = r["note"] == stats.CONSTANT_NOTE
        out["p (paired t)"].append(f.p(r["p_ttest"], n, stats.MIN_TEST_N, constant=constant))
        out["p Holm (paired t)"].append(f.p(r["p_ttest_holm"], n, stats.MIN_TEST_N, constant=constant))
        if wilcoxon:
            out["p (Wilcoxon)"].append(f.p(r["p_wilcoxon"], n, stats.MIN_WILCOXON_N))
            out["p Holm (Wilcoxon)"].append(f.p(r["p_wilcoxon_holm"], n, stats.MIN_WILCOXON_N))
    df = pd.DataFrame(out)
    return df.rename(columns=ABLATION_HEADS) if f.tex else df


class RoutingCap(NamedTuple):
    """A split where routing caps the label-free methods: the ensemble that is capped (the best one
    when every rule is; else the default rule's), the weakest teacher on its own task, and the best
    claiming-teacher ensemble with the row it belongs to."""

    ensemble: float
    own: float
    best: float
    best_row: str

    @property
    def default_only(self) -> bool:
        """Only the default rule is capped: another rule's ensemble is within :data:`ROUTING_GAP`."""
        return self.best >= self.own - ROUTING_GAP


def routing_caps(comp: pd.DataFrame) -> dict[str, RoutingCap]:
    """Splits capped by routing: a claiming-teacher ensemble (the ``teachers`` reference rows'
    union accuracy, or a row's ``diag/ensemble_union_acc``) more than :data:`ROUTING_GAP` below
    the lowest teacher row (each teacher on its own task). Checked for the best ensemble (over
    every routing rule of the study) and for the default rule's (the ``full`` reference row, else
    the best ``full`` row's diagnostic): a split is capped when either is."""
    out = {}
    for split, sub in comp.groupby("split", sort=False):
        teach = sub[sub["kind"] == "teacher"]
        own = [r[f"test/task_acc/{r['row'][7:]}.mean"] for _, r in teach.iterrows()
               if f"test/task_acc/{r['row'][7:]}.mean" in sub]
        # (accuracy, row, the default rule's, a reference row)
        ens: list[tuple[float, str, bool, bool]] = []
        for col, kinds in ((f"{PRIMARY}.mean", ("reference",)),
                           ("diag/ensemble_union_acc.mean", ("reference", "method"))):
            if col in sub:
                rows = sub[sub["kind"].isin(kinds)]
                ens += [(float(x), r, v in ("", "full"), k == "reference")
                        for x, r, v, k in zip(rows[col], rows["row"], rows["variant"], rows["kind"]) if not pd.isna(x)]
        own = [float(x) for x in own if not pd.isna(x)]
        if not own or not ens:
            continue
        best = max(ens, key=lambda e: e[0])
        default = max([e for e in ens if e[2] and e[3]] or [e for e in ens if e[2]] or [best], key=lambda e: e[0])
        weakest = min(own)
        capped = best if best[0] < weakest - ROUTING_GAP else default
        if capped[0] < weakest - ROUTING_GAP:
            out[str(split)] = RoutingCap(capped[0], weakest, best[0], best[1])
    return out


def markdown(df: pd.DataFrame, left: int = 1) -> str:
    """A GitHub pipe table: the first ``left`` columns left-aligned, the others right-aligned."""
    cols = [str(c).replace("|", r"\|") for c in df.columns]
    align = [":---" if i < left else "---:" for i in range(len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def latex(df: pd.DataFrame, caption: str) -> str:
    """A booktabs ``tabular`` (cells already escaped), preceded by a comment naming it."""
    body = df.style.hide(axis="index").to_latex(hrules=True, column_format="l" + "r" * (len(df.columns) - 1))
    return f"% {caption}\n{body}"


# ----------------------------------------------------------------------------- figures
LOG_RATIO = 20  # a loss curve spanning more than this factor is drawn on a log scale


def _empty(ax) -> None:
    ax.text(0.5, 0.5, "no finished run has this metric", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def accuracy_plot(trials: pd.DataFrame, orders: dict[str, list[str]], pal: Palette, path: Path) -> Path | None:
    """Rows = splits, columns = last-epoch (primary) / best-validation (secondary) union accuracy (%)."""
    metrics = [m for m in METRIC_TITLES if m in trials and trials[m].notna().any()]
    orders = {s: o for s, o in orders.items() if o}
    if not metrics or not orders:
        return None
    rows = max(len(o) for o in orders.values())
    fig, axes = figure(len(orders), len(metrics), 5.2 * len(metrics), 0.9 + 0.42 * rows * len(orders) + 0.5)
    for i, (split, order) in enumerate(orders.items()):
        df = trials[(trials["split"] == split) & trials["label"].isin(order)]
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            d = df.assign(acc=100 * df[m]).dropna(subset=["acc"])
            ax.set_title(f"Split {split}: union accuracy, {METRIC_SHORT[m]}")
            if d.empty:
                _empty(ax)
                continue
            kw = dict(data=d, x="acc", y="label", order=order, hue="label", hue_order=order, palette=pal, ax=ax,
                      legend=False)
            with seeded_jitter():
                sns.stripplot(**kw, size=4, alpha=0.55, jitter=0.12, zorder=1)
            sns.pointplot(**kw, errorbar="sd", linestyle="none", markers="D", markersize=6, capsize=0.25,
                          err_kws={"linewidth": 1.4}, zorder=3)
            ax.set_ylim(len(order) - 0.5, -0.5)
            ax.set_xlabel("union accuracy on the test split (%)")
            ax.set_ylabel("")
    fig.suptitle("Union accuracy per method (diamond: mean ± std over seeds; dots: seeds)")
    return save(fig, path)


def curves_plot(history: pd.DataFrame, orders: dict[str, list[str]], pal: Palette, path: Path) -> Path | None:
    """Validation union accuracy per epoch (mean line, ± std band over seeds): all epochs on the
    left, the second half of training zoomed in on the right (where methods separate)."""
    h = history[history["metric"] == "val/union_acc"]
    splits = [s for s in orders if not h[(h["split"] == s) & h["label"].isin(orders[s])].empty]
    if not splits:
        return None
    fig, axes = figure(len(splits), 2, 12.5, 3.6 * len(splits) + 0.4)
    for i, split in enumerate(splits):
        d = h[(h["split"] == split) & h["label"].isin(orders[split])]
        d = d.assign(acc=100 * d["value"])
        order = [o for o in orders[split] if o in set(d["label"])]
        last = int(d["step"].max())
        for j, (part, title) in enumerate(((d, "all epochs"), (d[d["step"] >= max(1, last // 2)], "second half"))):
            ax = axes[i][j]
            sns.lineplot(data=part, x="step", y="acc", hue="label", hue_order=order, palette=pal, errorbar="sd",
                         ax=ax, linewidth=1.6, legend=j == 1)
            ax.set_title(f"Split {split}: {title}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("validation union accuracy (%)")
        axes[i][1].legend(title="method", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle("Validation union accuracy per epoch (line: mean, band: ± std over seeds)")
    return save(fig, path)


def loss_plot(
    history: pd.DataFrame, split: str, method: str, order: list[str], pal: Palette, path: Path
) -> Path | None:
    """Every ``loss/*`` term of ``method`` on ``split`` (unweighted batch means), one line per variant."""
    h = history[(history["split"] == split) & (history["method"] == method) & history["metric"].str.startswith("loss/")]
    if h.empty:
        return None
    terms = sorted(set(h["metric"]), key=lambda t: (t == "loss/total", t))
    ncols = min(3, len(terms))
    nrows = math.ceil(len(terms) / ncols)
    fig, axes = figure(nrows, ncols, 4.4 * ncols + 1.6, 3.0 * nrows + 0.6)
    hue_order = [o for o in order if o in set(h["label"])]
    for idx, term in enumerate(terms):
        ax = axes[idx // ncols][idx % ncols]
        d = h[h["metric"] == term]
        sns.lineplot(data=d, x="step", y="value", hue="label", hue_order=hue_order, palette=pal, errorbar="sd",
                     ax=ax, linewidth=1.4, legend=idx == 0)
        title = term + (" (weighted sum)" if term == "loss/total" else " (unweighted)")
        if (d["value"] > 0).all() and d["value"].max() > LOG_RATIO * d["value"].min():
            ax.set_yscale("log")  # a first-epoch spike would flatten the rest of the curve
            title += ", log scale"
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss (mean over batches)")
    for idx in range(len(terms), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    leg = axes[0][0].get_legend()
    if leg is not None:
        handles, labels = axes[0][0].get_legend_handles_labels()
        leg.remove()
        fig.legend(handles, labels, title="variant", loc="outside right center", frameon=False)
    fig.suptitle(f"Split {split}: loss terms of {method} per epoch (mean, band = ± std over seeds)")
    return save(fig, path)


def ablation_plot(abl: pd.DataFrame, diffs: pd.DataFrame, pal: Palette, path: Path) -> Path | None:
    """Δ (pp) vs the full method: mean (diamond), 95% CI (bar: t-interval, bootstrap from 30 pairs),
    per-seed differences (dots)."""
    a = abl[abl["variant"] != "full"]
    if a.empty:
        return None
    blocks = list(dict.fromkeys(zip(a["split"], a["method"])))
    metrics = [m for m in METRIC_TITLES if m in set(a["metric"])]
    nvar = max(len(set(a[(a["split"] == s) & (a["method"] == m)]["variant"])) for s, m in blocks)
    fig, axes = figure(len(blocks), len(metrics), 5.2 * len(metrics), 1.0 + (0.45 * nvar + 0.8) * len(blocks))
    for i, (split, method) in enumerate(blocks):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            d = a[(a["split"] == split) & (a["method"] == method) & (a["metric"] == metric)].reset_index(drop=True)
            order = list(d["row"])
            pts = diffs[(diffs["split"] == split) & (diffs["method"] == method) & (diffs["metric"] == metric)]
            if not pts.empty:
                with seeded_jitter():
                    sns.stripplot(data=pts.assign(pp=100 * pts["diff"]), x="pp", y="row", order=order, hue="row",
                                  hue_order=order, palette=pal, ax=ax, size=4, alpha=0.55, jitter=0.1, legend=False,
                                  zorder=1)
            ax.set_yticks(range(len(order)), order)
            for y, r in d.iterrows():
                colour = pal.get(r["row"], "black")
                if not pd.isna(r["ci_low"]):
                    ax.plot([100 * r["ci_low"], 100 * r["ci_high"]], [y, y], color=colour, linewidth=2.2, zorder=2)
                if not pd.isna(r["delta"]):
                    ax.plot([100 * r["delta"]], [y], marker="D", color=colour, markersize=7, zorder=3,
                            markeredgecolor="black", markeredgewidth=0.6)
            ax.axvline(0, color="black", linewidth=1, linestyle="--")
            ax.set_ylim(len(order) - 0.5, -0.5)
            ax.set_title(f"Split {split} · {method}: {METRIC_SHORT[metric]}")
            ax.set_xlabel(f"Δ union accuracy vs full {method} (percentage points)")
            ax.set_ylabel("")
    fig.suptitle("Ablations: mean Δ (diamond), 95% CI (bar, n ≥ 3 only; t-interval below 30 pairs), "
                 "per-seed Δ (dots)")
    return save(fig, path)
