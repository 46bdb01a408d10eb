"""Seaborn figures of a study, written as PNG (no pyplot state: each figure is its own ``Figure``).

- :func:`accuracy_plot`: union accuracy per method, mean ± std over seeds with the seeds as dots;
- :func:`curves_plot`: validation union accuracy per epoch, mean and ± std band over seeds;
- :func:`loss_plot`: every logged loss term of one method, per epoch, one line per variant;
- :func:`ablation_plot`: Δ vs the full method with its 95% CI and the per-seed differences;
- :func:`decomposition_plot`: each label-free student's gap to the supervised one, split into
  the teachers' ceiling, routing and distillation (:mod:`.decomposition`);
- :func:`scaling_plot`: union accuracy vs the number of tasks K per method, 95% t-intervals
  (:mod:`.scaling`);
- :func:`tuning_history_plot`, :func:`tuning_curves_plot`, :func:`tuning_importance_plot`: the
  Optuna searches of ``harness tune`` (objective per trial, running objective, importances), one
  facet per Optuna study, coloured by trial state.

One palette (:func:`palette`) maps every row label (``cka``, ``cka:wide``, ``cka-intra``) to one
colour, so a method has the same colour in every figure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import seaborn as sns
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from harness.report import tuning
from harness.report.tables import METRIC_SHORT, METRIC_TITLES

DPI = 120
LOG_RATIO = 20  # a loss curve spanning more than this factor is drawn on a log scale
_BASE = {"teachers": 7, "kd": 0, "cfl": 1, "cka": 2, "scratch": 3}  # indices into tab10
_OTHER = [4, 5, 6, 8, 9]  # tab10 colours for other methods and named variants
# ablation variants: dark, saturated colours that differ from every tab10 colour
_ABLATION = ["#000000", "#c2189b", "#d4a000", "#0b1f65", "#800000", "#008b8b", "#6b8e23", "#ff4500"]
Palette = dict[str, tuple[float, float, float]]
STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#7f7f7f"}  # Optuna
STATE_MARKERS = {"COMPLETE": "o", "PRUNED": "v", "FAIL": "X", "RUNNING": "s"}


def palette(labels: Sequence[str]) -> Palette:
    """A fixed colour per label: known methods keep their colour, the others follow in order.

    ``labels`` are row labels (``cka``, ``cka:wide``, ``cka-intra``); ablation variants draw from
    a separate list so that they never look like a method of the comparison table.
    """
    tab10, tab20 = sns.color_palette("tab10", 10), sns.color_palette("tab20", 20)
    spare = [tab10[i] for i in _OTHER] + [tab20[i] for i in range(1, 20, 2)]
    ablation = [to_rgb(c) for c in _ABLATION]
    out: Palette = {}
    n_other = n_abl = 0
    for label in labels:
        if label in out:
            continue
        if label in _BASE:
            out[label] = tab10[_BASE[label]]
        elif "-" in label and not label.startswith("-") and ":" not in label:
            out[label] = ablation[n_abl % len(ablation)]
            n_abl += 1
        else:
            out[label] = spare[n_other % len(spare)]
            n_other += 1
    return out


def _figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, list[list]]:
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [list(r) for r in axes]


def _empty(ax) -> None:
    ax.text(0.5, 0.5, "no finished run has this metric", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def accuracy_plot(trials: pd.DataFrame, orders: dict[str, list[str]], pal: Palette, path: Path) -> Path | None:
    """Rows = splits, columns = last-epoch (primary) / best-validation (secondary) union accuracy (%)."""
    metrics = [m for m in METRIC_TITLES if m in trials and trials[m].notna().any()]
    orders = {s: o for s, o in orders.items() if o}
    if not metrics or not orders:
        return None
    rows = max(len(o) for o in orders.values())
    fig, axes = _figure(len(orders), len(metrics), 5.2 * len(metrics), 0.9 + 0.42 * rows * len(orders) + 0.5)
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
            sns.stripplot(**kw, size=4, alpha=0.55, jitter=0.12, zorder=1)
            sns.pointplot(**kw, errorbar="sd", linestyle="none", markers="D", markersize=6, capsize=0.25,
                          err_kws={"linewidth": 1.4}, zorder=3)
            ax.set_ylim(len(order) - 0.5, -0.5)
            ax.set_xlabel("union accuracy on the test split (%)")
            ax.set_ylabel("")
    fig.suptitle("Union accuracy per method (diamond: mean ± std over seeds; dots: seeds)")
    return _save(fig, path)


def curves_plot(history: pd.DataFrame, orders: dict[str, list[str]], pal: Palette, path: Path) -> Path | None:
    """Validation union accuracy per epoch (mean line, ± std band over seeds): all epochs on the
    left, the second half of training zoomed in on the right (where methods separate)."""
    h = history[history["metric"] == "val/union_acc"]
    splits = [s for s in orders if not h[(h["split"] == s) & h["label"].isin(orders[s])].empty]
    if not splits:
        return None
    fig, axes = _figure(len(splits), 2, 12.5, 3.6 * len(splits) + 0.4)
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
    return _save(fig, path)


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
    fig, axes = _figure(nrows, ncols, 4.4 * ncols + 1.6, 3.0 * nrows + 0.6)
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
    return _save(fig, path)


def ablation_plot(abl: pd.DataFrame, diffs: pd.DataFrame, pal: Palette, path: Path) -> Path | None:
    """Δ (pp) vs the full method: mean (diamond), 95% CI (bar: t-interval, bootstrap from 30 pairs),
    per-seed differences (dots)."""
    a = abl[abl["variant"] != "full"]
    if a.empty:
        return None
    blocks = list(dict.fromkeys(zip(a["split"], a["method"])))
    metrics = [m for m in METRIC_TITLES if m in set(a["metric"])]
    nvar = max(len(set(a[(a["split"] == s) & (a["method"] == m)]["variant"])) for s, m in blocks)
    fig, axes = _figure(len(blocks), len(metrics), 5.2 * len(metrics), 1.0 + (0.45 * nvar + 0.8) * len(blocks))
    for i, (split, method) in enumerate(blocks):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            d = a[(a["split"] == split) & (a["method"] == method) & (a["metric"] == metric)].reset_index(drop=True)
            order = list(d["row"])
            pts = diffs[(diffs["split"] == split) & (diffs["method"] == method) & (diffs["metric"] == metric)]
            if not pts.empty:
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
    return _save(fig, path)


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
    fig, axes = _figure(len(splits), 1, 7.5, 1.2 + (0.36 * rows + 0.9) * len(splits))
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
    return _save(fig, path)


#: K spanning more than this factor is drawn on a log axis; markers of the splits in the scaling view
SCALING_LOG_RATIO = 4
SCALING_MARKERS = "osD^vPXph*"


def scaling_plot(frame: pd.DataFrame, pal: Palette, path: Path) -> Path | None:
    """Union accuracy (%, last epoch) against the number of teachers K (:mod:`.scaling`), one facet
    per group of splits over the same classes: one line per comparison row through its points in K
    order, error bars = the 95% t-interval (none where n < 2), one marker per split. x on a log
    scale when K spans more than :data:`SCALING_LOG_RATIO`, ticks at the K values. Points are
    dodged sideways (by split where splits share a K, then by row) so that bars do not hide each
    other; the ticks mark the true K."""
    d = frame.dropna(subset=["mean"])
    if d.empty:
        return None
    groups = list(dict.fromkeys(d["group"]))
    every = list(dict.fromkeys(d["split"]))  # a split belongs to one group: one marker per split, figure-wide
    marker = {s: SCALING_MARKERS[i % len(SCALING_MARKERS)] for i, s in enumerate(every)}
    entries = len(set(d["row"])) + len(every)  # the legend's lines: it must fit beside the axes
    fig, axes = _figure(1, len(groups), 6.4 * len(groups) + 2.6, max(4.8, 1.4 + 0.26 * entries))
    handles: dict[str, Line2D] = {}
    for ax, group in zip(axes[0], groups):
        g = d[d["group"] == group]
        ks = sorted({int(k) for k in g["k"]})
        log = ks[-1] > SCALING_LOG_RATIO * ks[0]
        span = (math.log10(ks[-1] / ks[0]) if log else ks[-1] - ks[0]) or 1.0  # one K left: any width
        width = 0.06 * span
        splits = list(dict.fromkeys(g["split"]))  # K ascending, then the study's order
        rows = list(dict.fromkeys(g["row"]))
        k_of = {s: int(k) for s, k in zip(g["split"], g["k"])}
        same_k = {s: [t for t in splits if k_of[t] == k_of[s]] for s in splits}
        slots = {s: len(same_k[s]) * len(rows) for s in splits}

        def x_of(k: int, split: str, row: str) -> float:
            slot = same_k[split].index(split) * len(rows) + rows.index(row)
            off = (slot - (slots[split] - 1) / 2) * width / max(slots[split] - 1, 1)
            return k * 10 ** off if log else k + off

        for row in rows:
            r = g[g["row"] == row]
            colour = pal.get(row, (0.0, 0.0, 0.0))
            xs = [x_of(int(k), s, row) for k, s in zip(r["k"], r["split"])]
            ys = list(100 * r["mean"])
            ax.plot(xs, ys, color=colour, linewidth=1.6, zorder=2)
            ci = r["ci_low"].notna().to_numpy()
            if ci.any():
                yv = 100 * r.loc[ci, "mean"]
                ax.errorbar([x for x, c in zip(xs, ci) if c], yv,
                            yerr=[yv - 100 * r.loc[ci, "ci_low"], 100 * r.loc[ci, "ci_high"] - yv],
                            fmt="none", ecolor=colour, elinewidth=1.3, capsize=3, zorder=2)
            for x, y, s in zip(xs, ys, r["split"]):
                ax.plot([x], [y], marker=marker[s], color=colour, markersize=6, markeredgecolor="white",
                        markeredgewidth=0.5, zorder=3, linestyle="none")
            handles.setdefault(row, Line2D([], [], color=colour, linewidth=1.6))
        for s in splits:
            handles.setdefault(f"split {s} (K = {k_of[s]})", Line2D(
                [], [], marker=marker[s], color="grey", linestyle="none"))
        if log:
            ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        pad = 0.12 * span
        ax.set_xlim(*((ks[0] / 10 ** pad, ks[-1] * 10 ** pad) if log else (ks[0] - pad, ks[-1] + pad)))
        ax.set_title(f"Data set {group}")
        ax.set_xlabel("number of teachers K (tasks of the split)" + (", log scale" if log else ""))
        ax.set_ylabel("union accuracy on the test split (%)")
    fig.legend(list(handles.values()), list(handles), loc="outside right center", frameon=False)
    fig.suptitle("Union accuracy (last epoch) vs number of teachers K\n"
                 "mean over seeds; bars: 95% t-interval (none where n < 2)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- tuning
def _facets(n: int, width: float, height: float) -> tuple[Any, list]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, width * ncols + 1.8, height * nrows + 0.7)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _state_legend(fig: Any, states: list[str], extra: list[tuple[Line2D, str]], marker: bool = True) -> None:
    handles = [Line2D([], [], color=STATE_COLOURS[s], marker=STATE_MARKERS[s] if marker else None,
                      linestyle="none" if marker else "-") for s in states]
    labels = [tuning.STATE_WORDS[s] for s in states] + [label for _, label in extra]
    fig.legend(handles + [h for h, _ in extra], labels, loc="outside right center", frameon=False)


def tuning_history_plot(td: tuning.TuningData, path: Path) -> Path | None:
    """Objective (%) per trial number, one facet per Optuna study: points by state, the running
    best of the COMPLETE trials as a step line, the default trial circled, failed trials as
    crosses along the bottom."""
    studies = td.studies
    if not studies:
        return None
    fig, axes = _facets(len(studies), 4.6, 3.4)
    for ax, study in zip(axes, studies):
        t = td.of(study).sort_values("number")
        has = t[t["value"].notna()]
        for state in tuning.STATES:
            d = has[has["state"] == state]
            if not d.empty:
                sns.scatterplot(x=d["number"], y=100 * d["value"], color=STATE_COLOURS[state],
                                marker=STATE_MARKERS[state], s=36, ax=ax, zorder=3, edgecolor="white", linewidth=0.4)
        done = t[(t["state"] == "COMPLETE") & t["value"].notna()]
        last = int(t["number"].max())
        if not done.empty:
            xs, ys = list(done["number"]), list(100 * done["value"].cummax())
            ax.step(xs + [last], ys + ys[-1:], where="post", color="black", linewidth=1.2, zorder=2)
        none = t[t["value"].isna()]
        for state in ("FAIL", "RUNNING"):
            d = none[none["state"] == state]
            if not d.empty:
                ax.scatter(d["number"], [0.03] * len(d), transform=ax.get_xaxis_transform(), clip_on=False,
                           color=STATE_COLOURS[state], marker=STATE_MARKERS[state], s=30, zorder=3)
        d = tuning.default_trial(t)
        if d is not None and not pd.isna(d["value"]):
            ax.scatter([d["number"]], [100 * d["value"]], s=150, facecolors="none", edgecolors="black",
                       linewidths=1.3, zorder=4)
        ax.set_xlim(int(t["number"].min()) - 0.5, last + 0.5)
        ax.set_title(study)
        ax.set_xlabel("trial number")
        ax.set_ylabel("objective (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    states = [s for s in tuning.STATES if (td.trials["state"] == s).any()]
    _state_legend(fig, states, [(Line2D([], [], color="black", linewidth=1.2), "best so far"),
                                (Line2D([], [], marker="o", markersize=11, markerfacecolor="none",
                                        markeredgecolor="black", linestyle="none"), "default trial")])
    fig.suptitle("Objective per trial (failed and running trials: marks along the bottom)")
    return _save(fig, path)


def tuning_curves_plot(td: tuning.TuningData, path: Path) -> Path | None:
    """The running objective (%) of every trial against its step, one facet per Optuna study;
    pruned trials stop early (a cross at their last step); the best trial is drawn thick, the
    default trial dashed."""
    c = td.curves
    studies = [s for s in td.studies if (c["optuna_study"] == s).any()]
    if not studies:
        return None
    fig, axes = _facets(len(studies), 4.6, 3.4)
    for ax, study in zip(axes, studies):
        d = c[c["optuna_study"] == study].assign(pct=lambda x: 100 * x["value"])
        hue = [s for s in tuning.STATES if (d["state"] == s).any()]
        sns.lineplot(data=d, x="step", y="pct", hue="state", hue_order=hue, palette=STATE_COLOURS, units="number",
                     estimator=None, linewidth=0.9, alpha=0.55, ax=ax, legend=False)
        ends = d[d["state"] == "PRUNED"].sort_values("step").groupby("number").tail(1)
        ax.scatter(ends["step"], ends["pct"], marker="x", color=STATE_COLOURS["PRUNED"], s=28, zorder=3)
        t = td.of(study)
        for trial, style in ((tuning.best_trial(t), {"linewidth": 2.4, "color": "black"}),
                             (tuning.default_trial(t), {"linewidth": 1.6, "color": "black", "linestyle": "--"})):
            if trial is not None:
                one = d[d["number"] == trial["number"]].sort_values("step")
                ax.plot(one["step"], one["pct"], zorder=4, **style)
        ax.set_title(study)
        ax.set_xlabel("step (unit × epochs + epoch)")
        ax.set_ylabel("running objective (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    states = [s for s in tuning.STATES if (c["state"] == s).any()]
    _state_legend(fig, states, [(Line2D([], [], color="black", linewidth=2.4), "best trial"),
                                (Line2D([], [], color="black", linewidth=1.6, linestyle="--"), "default trial")],
                  marker=False)
    fig.suptitle("Running objective of each trial (pruned trials stop early)")
    return _save(fig, path)


def tuning_importance_plot(imps: dict[str, tuning.Importances], path: Path) -> Path | None:
    """fANOVA importance per parameter, one facet per Optuna study that has them."""
    have = {s: i for s, i in imps.items() if i.values}
    if not have:
        return None
    n = max(len(i.values) for i in have.values())
    fig, axes = _facets(len(have), 5.0, 0.9 + 0.38 * n)
    for ax, (study, imp) in zip(axes, have.items()):
        d = pd.DataFrame({"param": list(imp.values), "importance": list(imp.values.values())})
        sns.barplot(data=d, x="importance", y="param", color=STATE_COLOURS["COMPLETE"], ax=ax)
        ax.set_xlim(0, 1)
        ax.set_title(f"{study} ({imp.n_trials} complete trials)")
        ax.set_xlabel("importance (fANOVA, sums to 1)")
        ax.set_ylabel("")
    fig.suptitle("Parameter importances")
    return _save(fig, path)


# ----------------------------------------------------------------------------- leaderboard
def leaderboard_intervals_plot(frame: pd.DataFrame, names: dict[str, str], pal: Palette, axis: str,
                               path: Path) -> Path | None:
    """Interval estimates of the leaderboard (:mod:`.leaderboard`), ``rliable`` style: one panel
    per aggregate (IQM, mean), one row per method in the frame's order (top first), the 95%
    stratified bootstrap interval as a bar and the point estimate as a black tick (scores x 100)."""
    d = frame.dropna(subset=["iqm", "mean"])
    if d.empty:
        return None
    rows = list(d["row"])
    fig, axes = _figure(1, 2, 10.5, 1.3 + 0.42 * len(rows))
    for ax, (agg, title) in zip(axes[0], (("iqm", "IQM"), ("mean", "Mean"))):
        for y, (_, r) in enumerate(d.iterrows()):
            colour = pal.get(r["row"], (0.0, 0.0, 0.0))
            lo, hi, point = 100 * r[f"{agg}_low"], 100 * r[f"{agg}_high"], 100 * r[agg]
            ax.barh(y, hi - lo, left=lo, height=0.6, color=colour, alpha=0.75, edgecolor=colour, linewidth=1.0)
            ax.plot([point, point], [y - 0.3, y + 0.3], color="black", linewidth=2.0, zorder=3)
        ax.set_yticks(range(len(rows)), [names.get(r, r) for r in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(title)
        ax.set_xlabel(axis)
        ax.grid(axis="y", visible=False)
    axes[0][1].set_yticklabels([])
    fig.suptitle("Aggregate scores over every task: point estimate (black) and 95% stratified bootstrap interval")
    return _save(fig, path)


def performance_profile_plot(profiles: pd.DataFrame, names: dict[str, str], pal: Palette, axis: str,
                             path: Path) -> Path | None:
    """Performance profiles of the leaderboard: per method, the fraction of seed x task scores
    above τ against τ (x 100), with its pointwise 95% stratified bootstrap band; drawn as steps
    (the value at a grid point holds until the next one)."""
    if profiles.empty:
        return None
    fig, axes = _figure(1, 1, 8.2, 4.6)
    ax = axes[0][0]
    for row in dict.fromkeys(profiles["row"]):
        d = profiles[profiles["row"] == row]
        colour = pal.get(row, (0.0, 0.0, 0.0))
        tau = 100 * d["tau"].to_numpy()
        ax.fill_between(tau, d["low"], d["high"], color=colour, alpha=0.2, linewidth=0, step="post")
        ax.plot(tau, d["fraction"], color=colour, linewidth=1.8, label=names.get(row, row), drawstyle="steps-post")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"τ: {axis}")
    ax.set_ylabel("fraction of seed × task scores > τ")
    fig.legend(loc="outside right center", frameon=False)
    fig.suptitle("Performance profiles (bands: pointwise 95% stratified bootstrap intervals)")
    return _save(fig, path)
