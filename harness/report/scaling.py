"""Scaling view: union accuracy against the number of teachers K.

A study may cut the same classes of its data set into K = 2, 5, 10, ... tasks (one teacher per
task). Per such split and comparison row (label-free methods and their named variants, the
supervised ``scratch`` reference, the teachers' claiming ensemble), the primary metric
(``test/union_acc``, last epoch) over the row's seeds: mean, sample std (ddof = 1), n and the
95% t-interval of the mean

    mean ± t(0.975, n − 1) · std / √n          (scipy.stats.t; none when n < 2)

**K of a split**, the first source that has it: the trial runs' params (``split.partition.k``, else
the length of ``split.tasks``; every run of the split must agree), the study file's split, else
the task-accuracy columns ``test/task_acc/<k>`` (largest k + 1: a lower bound, as a task without
test images logs none; such a split's classes are unknown too, so it is named, never compared).
A split whose task-accuracy columns name a task k >= K is left out (its numbers contradict its
config).

**Same classes**: splits are compared only when they cut the same classes of the same data set
(``dataset.name`` and ``dataset.root``) with the same other split settings (a ``transfer`` set:
every ``split.*`` param but the name, tasks, partition and teachers): the classes as written, the
union of the task lists or the ``classes`` of the partition (its ``order`` and ``seed`` only
permute them); a partition without ``classes`` covers *all classes*. The store
does not record a data set's number of classes, so an explicit list that happens to cover all of
them is not matched with *all classes* (write every split the same way). Splits whose tasks are
whole data sets, and splits whose classes are unknown (no params, no study file), are left out.
A group of splits is shown only when it has at least two different K.

**Splits that share a K** (two different K = 5 partitions) stay separate points, each labelled by
its split: pooling their seeds would mix the spread between partitions into a spread over seeds
and give an interval that describes neither. Sentences name each split at the smallest and largest
K when several share it.

:func:`scaling_plot` draws the view (``scaling.png``): union accuracy vs K per row, 95% t-intervals.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

import pandas as pd
import yaml
from matplotlib.lines import Line2D
from scipy import stats as sps

from harness.report.figures import Palette, figure, save
from harness.report.frames import StudyData
from harness.report.paths import redact_paths
from harness.report.stats import CONFIDENCE
from harness.report.tables import PRIMARY, Fmt, task_ids
from harness.tracking import flatten

NAN = float("nan")
KINDS = ("reference", "method")  # comparison rows in the view (teachers on their own task are not)
NO_CI = "n < 2: no interval"
COLUMNS = ["group", "dataset", "classes", "split", "k", "k_source", "row", "kind", "method", "variant",
           "uses_labels", "n", "mean", "std", "ci_low", "ci_high", "note"]


@dataclass(frozen=True)
class SplitInfo:
    """What one split cuts: its K (and where K came from), its data set and classes; ``group`` is
    None (and ``note`` says why) when it cannot be compared with other splits."""

    split: str
    k: int | None
    k_source: str
    dataset: str
    classes: str
    group: Hashable | None
    note: str = ""


def t_interval(mean: float, std: float, n: int) -> tuple[float, float]:
    """95% t-interval of the mean: mean ± t(0.975, n − 1) · std / √n; (NaN, NaN) when n < 2;
    the point interval when every seed has the same value."""
    if n < 2 or pd.isna(mean) or pd.isna(std):
        return NAN, NAN
    if std == 0:
        return float(mean), float(mean)
    lo, hi = sps.t.interval(CONFIDENCE, n - 1, loc=float(mean), scale=float(std) / math.sqrt(n))
    return float(lo), float(hi)


def classes_text(classes: tuple[int, ...] | None) -> str:
    """``all classes``, ``classes 0–9``, ``classes 0–4, 7, 9–11``."""
    if classes is None:
        return "all classes"
    runs: list[list[int]] = []
    for c in classes:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "classes " + ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)


def _literal(value: Any) -> Any:
    """A logged param (a list or null in YAML flow style, or in older runs' Python form) as its
    value; None when not one."""
    if not isinstance(value, str):
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return None


Cut = tuple[int, tuple[int, ...] | None, str]  # K, the classes (None: all), why not comparable


def _cut(tasks: Any, partition: Any) -> Cut | None:
    """(K, classes or None for all, note) of a split given as ``tasks`` or ``partition``; None when
    neither says. A note means: not comparable (tasks are whole data sets)."""
    if isinstance(partition, dict) and isinstance(partition.get("k"), int):
        classes = partition.get("classes")
        return partition["k"], (tuple(sorted(int(c) for c in classes)) if classes else None), ""
    if isinstance(tasks, list) and tasks:
        if all(isinstance(t, list) and all(isinstance(c, int) for c in t) for t in tasks):
            return len(tasks), tuple(sorted({c for t in tasks for c in t})), ""
        return len(tasks), None, "its tasks are whole data sets"
    return None


#: the ``split.*`` params that say how the classes are cut and who teaches them; every other one (a
#: transfer set, ...) changes what the students learn from and must be equal for splits to be compared
CUT_PARAMS = ("split.name", "split.tasks", "split.partition.", "split.teachers")


def _setting(flat: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in flat.items()
                        if k.startswith("split.") and not k.startswith(CUT_PARAMS) and v not in ("None", "null")))


def _from_params(p: dict[str, str]) -> tuple[Cut, str, tuple[str, str], tuple] | None:
    """(cut, K source, data set (name, root), other split settings) from one trial run's params."""
    if "split.partition.k" in p:
        try:
            k = int(p["split.partition.k"])
        except ValueError:
            return None
        cut = _cut(None, {"k": k, "classes": _literal(p.get("split.partition.classes"))})
        source = "split.partition.k"
    else:
        cut, source = _cut(_literal(p.get("split.tasks")), None), "split.tasks"
    if cut is None:
        return None
    root = p.get("dataset.root", "null")
    return cut, source, (p.get("dataset.name", ""), "" if root in ("None", "null") else root), _setting(p)


def _from_study(data: StudyData, split: str) -> tuple[Cut, str, tuple[str, str], tuple] | None:
    """The same from the study file's split (runs without split params)."""
    listed = [s for s in data.study.get("splits", []) if isinstance(s, dict) and s.get("name") == split]
    cut = _cut(listed[0].get("tasks"), listed[0].get("partition")) if listed else None
    if cut is None:
        return None
    ds = data.study.get("dataset") if isinstance(data.study.get("dataset"), dict) else {}
    root = ds.get("root")
    return cut, "study file", (str(ds.get("name", "")), "" if root is None else str(root)), \
        _setting(flatten(listed[0], "split."))


def _run_params(data: StudyData, split: str) -> list[dict[str, str]]:
    ids = [r for r in data.trials.loc[data.trials["split"] == split, "run_id"] if r in data.params.index]
    return [{k: v for k, v in data.params.loc[r].items() if isinstance(v, str)} for r in ids]


def split_info(comp: pd.DataFrame, data: StudyData, split: str) -> SplitInfo:
    """K, data set and classes of one split (see the module docstring for the sources)."""
    found = {x for x in (_from_params(p) for p in _run_params(data, split)) if x is not None}
    if len(found) > 1:
        ks = sorted({c[0] for c, _, _, _ in found})
        what = f"K = {', '.join(map(str, ks))}" if len(ks) > 1 else "on their classes, data set or settings"
        return SplitInfo(split, None, "params", "", "", None, f"its runs disagree ({what})")
    spec = next(iter(found)) if found else _from_study(data, split)
    ids = task_ids(comp, split)
    if spec is None:
        k = max(ids) + 1 if ids else None
        return SplitInfo(split, k, "task-accuracy columns" if ids else "", "", "", None,
                         "its classes are not recorded (no split params, no study file)")
    (k, classes, note), source, dataset, setting = spec
    if ids and max(ids) >= k:
        return SplitInfo(split, k, source, dataset[0], "", None,
                         f"it has an accuracy of task {max(ids)} but K = {k}")
    if note or not dataset[0]:
        return SplitInfo(split, k, source, dataset[0], "", None, note or "its data set is not recorded")
    label = dataset[0] + (f" ({redact_paths(dataset[1])})" if dataset[1] else "")
    text = classes_text(classes) + "".join(f", {name[6:]} = {redact_paths(v)}" for name, v in setting)
    return SplitInfo(split, k, source, label, text, (dataset, classes, setting))


def split_infos(comp: pd.DataFrame, data: StudyData) -> list[SplitInfo]:
    """:func:`split_info` of every split that has a row in the comparison, in the study's order."""
    return [split_info(comp, data, s) for s in data.splits if (comp["split"] == s).any()]


def shown_groups(infos: list[SplitInfo]) -> dict[Hashable, list[SplitInfo]]:
    """Groups of splits over the same classes with at least two different K; each group's splits
    sorted by K (then the study's order)."""
    groups: dict[Hashable, list[SplitInfo]] = {}
    for info in infos:
        if info.group is not None:
            groups.setdefault(info.group, []).append(info)
    return {g: sorted(v, key=lambda i: i.k or 0) for g, v in groups.items() if len({i.k for i in v}) >= 2}


def scaling_frame(comp: pd.DataFrame, data: StudyData) -> pd.DataFrame:
    """One row per group, split (K ascending) and comparison row (references and methods, in the
    comparison's order): the primary metric's mean, std, n and 95% t-interval; fractions, not
    percent. Empty when no group of splits has two different K (then the report has no view)."""
    rows: list[dict[str, Any]] = []
    m = PRIMARY
    if f"{m}.mean" not in comp:
        return pd.DataFrame(columns=COLUMNS)
    labels: list[str] = []
    for infos in shown_groups(split_infos(comp, data)).values():
        group = f"{infos[0].dataset}, {infos[0].classes}"
        group += f" [{labels.count(group) + 1}]" if group in labels else ""  # same text, other data set
        labels.append(group)
        for info in infos:
            sub = comp[(comp["split"] == info.split) & comp["kind"].isin(KINDS)]
            for _, r in sub.iterrows():
                n = int(r[f"{m}.n"])
                mean, std = float(r[f"{m}.mean"]), float(r[f"{m}.std"])
                lo, hi = t_interval(mean, std, n)
                rows.append({"group": group, "dataset": info.dataset, "classes": info.classes, "split": info.split,
                             "k": info.k, "k_source": info.k_source, "row": r["row"], "kind": r["kind"],
                             "method": r["method"], "variant": r["variant"], "uses_labels": bool(r["uses_labels"]),
                             "n": n, "mean": mean, "std": std, "ci_low": lo, "ci_high": hi,
                             "note": "no finished seed" if n == 0 else NO_CI if n < 2 else ""})
    return pd.DataFrame(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------- rendering
def row_name(row: str, kind: str, uses_labels: bool, dagger: str = "") -> str:
    """``teachers (claiming ensemble)``, ``scratch †``, ``kd``."""
    if kind == "reference":
        return f"{row} (claiming ensemble)"
    return row + (dagger if uses_labels else "")


def columns(frame: pd.DataFrame, group: str) -> list[tuple[int, str]]:
    """(K, split) of the group's columns, K ascending."""
    sub = frame[frame["group"] == group]
    return list(dict.fromkeys(zip(sub["k"].astype(int), sub["split"])))


def cell(mean: float, std: float, n: int, lo: float, hi: float, dash: str = "–") -> str:
    """``92.0 ± 2.0 [87.0, 97.0] (n=3)``; ``91.0 (n=1; no CI)``; a dash without a finished seed."""
    if not n or pd.isna(mean):
        return dash
    if n < 2 or pd.isna(lo):
        return f"{100 * mean:.1f} (n={n}; no CI)"
    return f"{100 * mean:.1f} ± {100 * std:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"


def scaling_display(frame: pd.DataFrame, group: str) -> pd.DataFrame:
    """The group's table as Markdown strings: rows = methods, columns = K ascending (one per split)."""
    f = Fmt("md")
    sub = frame[frame["group"] == group]
    cols = columns(frame, group)
    out: dict[str, list[str]] = {"Method": []}
    heads = [f"K = {k} (`{s}`)" for k, s in cols]
    for h in heads:
        out[h] = []
    for row, rows in sub.groupby("row", sort=False):
        first = rows.iloc[0]
        out["Method"].append(f.text(row_name(str(row), first["kind"], bool(first["uses_labels"]), f.dagger)))
        for (k, split), h in zip(cols, heads):
            r = rows[rows["split"] == split]
            out[h].append(f.dash if r.empty else cell(*(r.iloc[0][c] for c in ("mean", "std", "n", "ci_low",
                                                                                 "ci_high"))))
    return pd.DataFrame(out)


def _pt(x: float) -> str:
    """Signed percentage points with a true minus sign: ``−28.2``, ``+1.0``."""
    return f"{round(100 * x, 1) + 0.0:+.1f}".replace("-", "−")


def _at(points: pd.DataFrame) -> str:
    """``63.0%``, or ``63.0% (`k10`) and 62.0% (`k10r`)`` when several splits share the K."""
    several = len(points) > 1
    return " and ".join(f"{100 * v:.1f}%" + (f" (`{s}`)" if several else "")
                        for v, s in zip(points["mean"], points["split"]))


def scaling_sentences(frame: pd.DataFrame, group: str) -> list[str]:
    """One sentence per row of the group: its union accuracy at its smallest and its largest K and
    the change in percentage points (each split named where several share that K; the change is
    then a range over their pairs)."""
    sub = frame[(frame["group"] == group)].dropna(subset=["mean"])
    out = []
    for row, rows in sub.groupby("row", sort=False):
        lo_k, hi_k = int(rows["k"].min()), int(rows["k"].max())
        if lo_k == hi_k:
            continue
        first, last = rows[rows["k"] == lo_k], rows[rows["k"] == hi_k]
        deltas = sorted({round(b - a, 10) for a in first["mean"] for b in last["mean"]})
        change = _pt(deltas[0]) if len(deltas) == 1 else f"{_pt(deltas[0])} to {_pt(deltas[-1])}"
        r = rows.iloc[0]
        out.append(f"{row_name(str(row), r['kind'], False)}: {_at(first)} at K = {lo_k} to {_at(last)} at "
                   f"K = {hi_k} ({change} pt).")
    return out


def left_out(frame: pd.DataFrame, infos: list[SplitInfo]) -> list[str]:
    """Why each split outside the view is not in it: ```sub` (K = 2): no other split cuts classes
    0–4 of digits into a different K``."""
    shown = set(frame["split"])
    out = []
    for i in infos:
        if i.split in shown:
            continue
        why = i.note or f"no other split cuts {i.classes} of {i.dataset} into a different K"
        out.append(f"`{i.split}`" + (f" (K = {i.k})" if i.k else "") + f": {why}")
    return out


def t_half_width(n: int) -> float:
    """t(0.975, n − 1) / √n: the half-width of the interval in units of the std over seeds."""
    return float(sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) / math.sqrt(n) if n >= 2 else NAN


def write_csv(frame: pd.DataFrame, path: Path) -> Path | None:
    if frame.empty:
        return None
    frame.to_csv(path, index=False)
    return path


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
    fig, axes = figure(1, len(groups), 6.4 * len(groups) + 2.6, max(4.8, 1.4 + 0.26 * entries))
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
    return save(fig, path)
