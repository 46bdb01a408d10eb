"""Error decomposition: where a label-free student loses its points against the supervised one.

Per split and routing rule (each label-free row of the comparison that logged the oracle
diagnostics), all union accuracies on the test split, means over the row's seeds:

- teachers' ceiling ``C``: the oracle ensemble, each test image sent to the teacher of its own
  task (``diag/oracle_ensemble_acc``);
- claiming ensemble ``E``: each image sent to the teacher that claims it under the row's rule
  (``diag/ensemble_union_acc``);
- student ``S``: the row's last-epoch union accuracy (the primary metric);
- supervised reference ``Sup``: the ``scratch`` student's, trained with the true labels.

The gap to the supervised student splits exactly into three terms:

    Sup - S = (Sup - C)  +  (C - E)  -  (S - E)
              teachers     routing      distillation
              vs labels    loss >= 0    gain (> 0) or loss (< 0)

``C - E >= 0`` image by image: a claim can only be right where the image's own teacher is right.
The *largest loss* is the largest of ``Sup - C`` (the teachers cap the student), ``C - E``
(routing) and ``E - S`` (distillation loses what the ensemble had). Reference rows (the claiming
ensemble of ``teachers``) have no student: their decomposition stops at ``C`` and ``E``.

:func:`decomposition_plot` draws the terms as stacked bars per split (``decomposition.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness.report.figures import figure, save
from harness.report.tables import PRIMARY, Fmt

ORACLE, ENSEMBLE = "diag/oracle_ensemble_acc", "diag/ensemble_union_acc"
SUPERVISED_METHOD = "scratch"
#: the three terms of the gap (frame column, display name, what a positive value means)
TERMS = (("teachers", "teachers' ceiling below supervised"), ("routing", "routing"),
         ("distillation_loss", "distillation"))
COLUMNS = ["split", "row", "kind", "method", "variant", "n", "ceiling", "ensemble", "student", "student_std",
           "supervised", "teachers", "routing", "distillation", "distillation_loss", "gap", "largest"]


def largest_loss(terms: dict[str, float]) -> str:
    """The name of the largest positive term (``teachers``, ``routing``, ``distillation``), or
    ``none`` when no term loses anything."""
    losses = {("distillation" if k == "distillation_loss" else k): v for k, v in terms.items() if not pd.isna(v)}
    if not losses or max(losses.values()) <= 0:
        return "none"
    return max(losses, key=lambda k: losses[k])


def _mean(row: pd.Series, metric: str) -> float:
    v = row.get(f"{metric}.mean", float("nan"))
    return float("nan") if pd.isna(v) else float(v)


def decomposition_frame(comp: pd.DataFrame) -> pd.DataFrame:
    """One row per split and label-free comparison row (methods and the teachers' reference rows)
    with both the oracle and the claiming-ensemble diagnostics; fractions, not percent."""
    rows: list[dict[str, Any]] = []
    if f"{ORACLE}.mean" not in comp or f"{ENSEMBLE}.mean" not in comp:
        return pd.DataFrame(columns=COLUMNS)
    for split, sub in comp.groupby("split", sort=False):
        sup_rows = sub[(sub["method"] == SUPERVISED_METHOD) & (sub["variant"] == "full")]
        sup = _mean(sup_rows.iloc[0], PRIMARY) if len(sup_rows) else float("nan")
        for _, r in sub[sub["kind"].isin(["method", "reference"]) & ~sub["uses_labels"].astype(bool)].iterrows():
            c, e = _mean(r, ORACLE), _mean(r, ENSEMBLE)
            if pd.isna(c) or pd.isna(e):
                continue
            s = _mean(r, PRIMARY) if r["kind"] == "method" else float("nan")
            terms = {"teachers": sup - c, "routing": c - e, "distillation_loss": e - s}
            rows.append({"split": split, "row": r["row"], "kind": r["kind"], "method": r["method"],
                         "variant": r["variant"], "n": int(r["n"]), "ceiling": c, "ensemble": e, "student": s,
                         "student_std": r.get(f"{PRIMARY}.std", float("nan")), "supervised": sup,
                         **terms, "distillation": s - e, "gap": sup - s, "largest": largest_loss(terms)})
    return pd.DataFrame(rows, columns=COLUMNS)


def decomposition_display(frame: pd.DataFrame, split: str, kind: str = "md") -> pd.DataFrame:
    """The split's decomposition as strings: accuracies in %, terms in percentage points."""
    f = Fmt(kind)
    sub = frame[frame["split"] == split]

    def pct(v: float) -> str:
        return f.dash if pd.isna(v) else f"{100 * v:.1f}"

    def pp(v: float) -> str:
        return f.dash if pd.isna(v) else f.num(100 * v, signed=True)

    return pd.DataFrame({
        "Method": [f.text(r if k == "method" else f"{r} (claiming ensemble)") for r, k in zip(sub["row"], sub["kind"])],
        "Teachers' ceiling C (%)": [pct(v) for v in sub["ceiling"]],
        "Claiming ensemble E (%)": [pct(v) for v in sub["ensemble"]],
        "Student S (%)": [pct(v) for v in sub["student"]],
        "Routing loss C − E (pp)": [pp(v) for v in sub["routing"]],
        "Distillation S − E (pp)": [pp(v) for v in sub["distillation"]],
        "Supervised − C (pp)": [pp(v) for v in sub["teachers"]],
        "Gap to supervised (pp)": [pp(v) for v in sub["gap"]],
        "Largest loss": [f.text(v) for v in sub["largest"]],
    })


def decomposition_sentence(frame: pd.DataFrame, split: str) -> str:
    """One sentence for the split's best label-free student (by the primary metric): what routing
    costs, what distillation gains or loses, where the teachers cap, and which loss is largest."""
    sub = frame[(frame["split"] == split) & (frame["kind"] == "method")].dropna(subset=["student"])
    if sub.empty:
        return ""
    r = sub.loc[sub["student"].idxmax()]
    dist = r["distillation"]
    verb = "gains" if dist >= 0 else "loses"
    sup = "" if pd.isna(r["supervised"]) else (
        f"; the supervised scratch student reaches {100 * r['supervised']:.1f}%, "
        f"{abs(100 * r['gap']):.1f} pt {'above' if r['gap'] >= 0 else 'below'} it")
    largest = {"routing": "routing", "teachers": "the teachers' own errors (their ceiling is below the supervised "
               "student)", "distillation": "distillation", "none": "none (the student matches or beats every "
               "reference)"}[r["largest"]]
    return (f"On `{split}`, for the best label-free student `{r['row']}` ({100 * r['student']:.1f}%), routing costs "
            f"{100 * r['routing']:.1f} pt (claiming ensemble {100 * r['ensemble']:.1f}% vs oracle routing "
            f"{100 * r['ceiling']:.1f}%), distillation {verb} {abs(100 * dist):.1f} pt over the claiming ensemble, "
            f"and the teachers cap at {100 * r['ceiling']:.1f}%{sup}. Largest loss: {largest}.\n")


def write_csv(frame: pd.DataFrame, path: Path) -> Path | None:
    if frame.empty:
        return None
    frame.to_csv(path, index=False)
    return path


#: colours of the decomposition's terms (teachers, routing, distillation)
DECOMPOSITION_COLOURS = {"teachers": "#7f7f7f", "routing": "#d62728", "distillation_loss": "#1f77b4"}


def decomposition_plot(frame: pd.DataFrame, path: Path) -> Path | None:
    """Per split, each label-free student's gap to the supervised student split into its three
    terms (:mod:`harness.report.decomposition`): stacked bars, losses right of 0, gains left of
    0; the diamond is the total gap, the sum of the bars."""
    d = frame[(frame["kind"] == "method")].dropna(subset=["student", "supervised"])
    if d.empty:
        return None
    splits = list(dict.fromkeys(d["split"]))
    rows = max(int((d["split"] == s).sum()) for s in splits)
    fig, axes = figure(len(splits), 1, 7.5, 1.2 + (0.36 * rows + 0.9) * len(splits))
    names = {"teachers": "supervised − teachers' ceiling", "routing": "routing loss (oracle − claiming)",
             "distillation_loss": "distillation loss (claiming ensemble − student)"}
    for i, split in enumerate(splits):
        ax = axes[i][0]
        sub = d[d["split"] == split].reset_index(drop=True)
        pos = [0.0] * len(sub)
        neg = [0.0] * len(sub)
        for term, colour in DECOMPOSITION_COLOURS.items():
            vals = [100 * float(v) for v in sub[term]]
            left = [p if v >= 0 else n + v for v, p, n in zip(vals, pos, neg)]
            ax.barh(range(len(sub)), [abs(v) for v in vals], left=left, color=colour, height=0.6,
                    label=names[term] if i == 0 else None, edgecolor="white", linewidth=0.5)
            pos = [p + max(v, 0) for v, p in zip(vals, pos)]
            neg = [n + min(v, 0) for v, n in zip(vals, neg)]
        ax.plot(100 * sub["gap"], range(len(sub)), "D", color="black", markersize=6, zorder=3,
                label="gap to supervised (sum)" if i == 0 else None)
        ax.axvline(0, color="black", linewidth=1)
        ax.set_yticks(range(len(sub)), list(sub["row"]))
        ax.set_ylim(len(sub) - 0.5, -0.5)
        ax.set_title(f"Split {split}: where the points go (supervised scratch: {100 * sub['supervised'].iloc[0]:.1f}%)")
        ax.set_xlabel("percentage points of union accuracy (right of 0: lost; left: gained)")
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle("Gap to the supervised student = teachers' ceiling + routing loss + distillation loss")
    return save(fig, path)
