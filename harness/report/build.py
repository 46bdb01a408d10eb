"""``harness report STUDY``: rebuild ``results/<study>/`` from the MLflow store alone.

Outputs: ``report.md`` (tables, figures, statistics notes, the hyper-parameter searches of
``harness tune`` when there are any, failed/duplicate runs, the study configuration, the
parameters that vary between runs, software versions, build date), ``comparison.csv``/
``ablation.csv``/``decomposition.csv``/``scaling.csv`` (raw fractions; the error decomposition
of :mod:`.decomposition` where the trials logged oracle diagnostics, the scaling view of
:mod:`.scaling` where splits of one data set differ in their number of tasks K), ``comparison.tex``/``ablation.tex`` (booktabs tabulars),
``tuning.csv`` and the PNG figures. An experiment that holds only ``harness tune`` searches gets
a report with the tuning section alone. Every table is sorted and every random draw seeded, so
two builds from the same store differ only in the one ``Built:`` line of ``report.md``.

Only the study's trial runs count (scoped by trial key, see :mod:`.frames`); report.md says what
each number rests on (:mod:`.disclosure`) and shows no path of the machine that built it
(:mod:`.paths`).
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from typing import Collection

from harness.report import appendix, decomposition, disclosure, scaling, stats
from harness.report.figures import palette
from harness.report.frames import KeyExpander, StudyData, load_study, row_label
from harness.report.paths import redact_paths, show_uri
from harness.report.tuning import (
    TuningData, load_tuning, param_importances, tuning_curves_plot, tuning_frame, tuning_history_plot,
    tuning_importance_plot, tuning_markdown,
)
from harness.report.tables import (
    METRIC_TITLES, ablation_display, ablation_frame, ablation_plot, accuracy_plot, comparison_display, comparison_frame,
    curves_plot, diagnostics_display, latex, loss_plot, markdown, seed_differences,
)

BUILT_PREFIX = "_Built:"
PACKAGES = ("ka-harness", "mlflow", "pandas", "numpy", "scipy", "matplotlib", "seaborn", "torch")
SKIP_PARAMS = ("seed", "method", "variant", "study")


def build_report(study: str, tracking_uri: str | None = None, out_dir: str | Path | None = None,
                 keys: Collection[str] | None = None, expand: KeyExpander | None = None,
                 experiment: str | None = None) -> Path:
    """Build the report of ``study`` (a name or a study file) and return its folder.

    ``keys``/``expand``: the study's trial keys, or how to expand a study file into them;
    ``experiment``: where its runs are when not in the experiment of its name
    (:func:`harness.report.frames.load_study`)."""
    data = load_study(study, tracking_uri, allow_empty=True, keys=keys, expand=expand, experiment=experiment)
    tuning = load_tuning(data.uri, data.experiment_id)
    if data.trials.empty and tuning.empty:
        n = len(data.others)
        if data.keys is not None and n:
            raise HarnessError(
                f"report: experiment '{data.name}' has no finished trial run of the study's {len(data.keys)} trial "
                f"keys ({data.scope}) in {data.uri}, only {n} run{'s' if n != 1 else ''} of other configurations "
                "(another version of the study file, or another precision: see --precision)")
        raise HarnessError(f"report: experiment '{data.name}' has no finished trial runs in {data.uri}")
    out = Path(out_dir) if out_dir is not None else Path("results") / data.name
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    tuning_md = _tuning(tuning, out)
    if data.trials.empty:
        (out / "report.md").write_text(_tuning_only_markdown(data, tuning, tuning_md))
        return out
    comp = comparison_frame(data)
    abl = ablation_frame(data)
    dec = decomposition.decomposition_frame(comp)
    comp.to_csv(out / "comparison.csv", index=False)
    decomposition.write_csv(dec, out / "decomposition.csv")
    abl.to_csv(out / "ablation.csv", index=False)
    (out / "comparison.tex").write_text("\n".join(
        latex(comparison_display(comp, s, "tex"), f"comparison, split {s} (union / per-task accuracy, %)")
        for s in data.splits if (comp["split"] == s).any()))
    (out / "ablation.tex").write_text("\n".join(
        latex(ablation_display(abl, s, m, metric, "tex"), f"ablation, split {s}, {m}, {METRIC_TITLES[metric]}")
        for s, m, metric in _ablation_tables(abl)))
    figures = _figures(data, comp, abl, out)
    if (fig := decomposition.decomposition_plot(dec, out / "decomposition.png")) is not None:
        figures["decomposition"] = fig
    if (fig := _scaling_figure(data, comp, abl, out)) is not None:
        figures["scaling"] = fig
    (out / "report.md").write_text(_markdown(data, comp, abl, dec, figures, tuning, tuning_md))
    return out


#: what a build writes (and so removes first: a rebuild never leaves a figure or table of an
#: earlier build, e.g. a decomposition the store no longer supports, next to the new report)
GENERATED = ("report.md", "comparison.*", "ablation.*", "decomposition.*", "scaling.*", "tuning.csv",
             "tuning_*.png", "accuracy.png", "curves.png", "losses_*.png")


def _clear_outputs(out: Path) -> None:
    for pattern in GENERATED:
        for f in out.glob(pattern):
            if f.is_file():
                f.unlink()


def _tuning(tuning: TuningData, out: Path) -> list[str]:
    """``tuning.csv`` and the tuning figures; the Markdown of the section (nothing without tuning runs)."""
    if tuning.empty:
        return []
    tuning_frame(tuning).to_csv(out / "tuning.csv", index=False)
    imps = {s: param_importances(tuning, s) for s in tuning.studies}
    figs = [(tuning_history_plot(tuning, out / "tuning_history.png"), "Objective per trial"),
            (tuning_curves_plot(tuning, out / "tuning_curves.png"), "Running objective per trial"),
            (tuning_importance_plot(imps, out / "tuning_importance.png"), "Parameter importances")]
    return tuning_markdown(tuning, imps, [f"![{alt}]({p.name})\n" for p, alt in figs if p is not None])


def _ablation_blocks(abl: pd.DataFrame) -> list[tuple[str, str]]:
    """(split, method) of every ablation table, in the frame's order."""
    return list(dict.fromkeys(zip(abl["split"], abl["method"])))


def _ablation_tables(abl: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(split, method, metric) of every ablation table: one per metric of each block."""
    have = set(zip(abl["split"], abl["method"], abl["metric"]))
    return [(s, m, metric) for s, m in _ablation_blocks(abl) for metric in METRIC_TITLES if (s, m, metric) in have]


def _orders(comp: pd.DataFrame, kinds: tuple[str, ...] = ("reference", "method")) -> dict[str, list[str]]:
    """Per split, the comparison table's row labels of these kinds, in the table's order."""
    rows = comp[comp["kind"].isin(kinds)]
    return {s: list(g["row"]) for s, g in rows.groupby("split", sort=False)}


def _figures(data: StudyData, comp: pd.DataFrame, abl: pd.DataFrame, out: Path) -> dict[str, Path]:
    trials = data.trials.assign(label=[row_label(m, v) for m, v in zip(data.trials["method"], data.trials["variant"])])
    labels = list(comp.loc[comp["kind"] != "teacher", "row"]) + list(abl["row"])
    pal = palette(labels)
    figs: dict[str, Path | None] = {
        "accuracy": accuracy_plot(trials, _orders(comp), pal, out / "accuracy.png"),
        "curves": curves_plot(data.history, _orders(comp, ("method",)), pal, out / "curves.png"),
        "ablation": ablation_plot(abl, seed_differences(data, abl), pal, out / "ablation.png"),
    }
    for split, method in _loss_blocks(data, abl):
        order = [row_label(method, v) for v in dict.fromkeys(
            ["full"] + list(abl.loc[(abl["split"] == split) & (abl["method"] == method), "variant"]))]
        ran = trials.loc[(trials["split"] == split) & (trials["method"] == method), "label"]
        order += sorted(set(ran) - set(order))
        figs[f"losses/{split}/{method}"] = loss_plot(data.history, split, method, order, pal,
                                                     out / f"losses_{split}_{method}.png")
    return {k: v for k, v in figs.items() if v is not None}


def _loss_blocks(data: StudyData, abl: pd.DataFrame) -> list[tuple[str, str]]:
    """Loss-term figures: every method with ablations, and ``cka`` wherever it ran."""
    blocks = _ablation_blocks(abl)
    t = data.trials
    blocks += [(s, "cka") for s in data.splits if ((t["split"] == s) & (t["method"] == "cka")).any()]
    return list(dict.fromkeys(blocks))


# ----------------------------------------------------------------------------- report.md
def _markdown(data: StudyData, comp: pd.DataFrame, abl: pd.DataFrame, dec: pd.DataFrame, figs: dict[str, Path],
              tuning: TuningData, tuning_md: list[str]) -> str:
    att = data.attempts
    bad = att[att["status"] != "FINISHED"]
    md = [f"# Study `{data.name}`: results\n",
          f"{BUILT_PREFIX} {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}_\n",
          f"Rebuilt from the MLflow store alone: `{show_uri(data.uri)}`, experiment `{data.name}` (id {data.experiment_id}). "
          f"{len(data.trials)} trials used ({len(att[att['status'] == 'FINISHED'])} finished trial runs, "
          f"{len(bad)} failed, killed or still running), {len(data.teachers)} teacher runs; "
          f"splits: {', '.join(f'`{s}`' for s in data.splits)}"
          + (f"; {_tuning_count(tuning)}" if not tuning.empty else "") + ".\n",
          disclosure.scope_line(data)]
    md += _comparison_section(data, comp, figs)
    md += _aggregate_section(data)
    md += _decomposition_section(data, dec, figs)
    md += _scaling_section(data, comp, figs)
    md += _ablation_section(data, abl, figs)
    md += tuning_md
    md += _problems_section(data)
    md += disclosure.others_section(data)
    md += _params_section(data)
    md += _config_section(data)
    md += _software_section(data)
    return "\n".join(md)


def _tuning_count(tuning: TuningData) -> str:
    n = len(tuning.studies)
    return f"{len(tuning.trials)} trials of `harness tune` in {n} Optuna stud{'ies' if n != 1 else 'y'}"


def _tuning_only_markdown(data: StudyData, tuning: TuningData, tuning_md: list[str]) -> str:
    """The report of an experiment without a finished trial run of ``harness run-study``."""
    att = data.attempts
    md = [f"# Study `{data.name}`: results\n",
          f"{BUILT_PREFIX} {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}_\n",
          f"Rebuilt from the MLflow store alone: `{show_uri(data.uri)}`, experiment `{data.name}` "
          f"(id {data.experiment_id}). Hyper-parameter searches only: {_tuning_count(tuning)}; "
          + (f"no finished trial run of `harness run-study` ({len(att)} failed, killed or still running)"
             if len(att) else "no trial run of `harness run-study`") + ", so no comparison or ablation tables.\n"]
    md += tuning_md
    if not att.empty:
        md += _problems_section(data)
    if data.study_yaml:
        md += _config_section(data)
    md += _software_section(data, tuning.trials)
    return "\n".join(md)


def _fig(figs: dict[str, Path], key: str, alt: str) -> list[str]:
    return [f"![{alt}]({figs[key].name})\n"] if key in figs else []


def _comparison_section(data: StudyData, comp: pd.DataFrame, figs: dict[str, Path]) -> list[str]:
    md = ["## Comparison\n",
          "**Primary metric: union accuracy of the model after the last epoch** (*last epoch*). Secondary: "
          "*best-val. epoch*, the model at the epoch with the best validation union accuracy. Task columns: last "
          "epoch. Cells: mean ± std over seeds (sample std, ddof = 1) of the accuracy on the test split, in %. "
          "n = finished seeds (failed, killed, running and missing seeds are named). A cell whose n differs from "
          "its row's n shows its own. **Bold**: best label-free amalgamation method per column.\n",
          disclosure.labels_paragraph(data, comp),
          disclosure.teacher_sentence(data, comp),
          disclosure.seed_std_sentence(data)]
    md += [s for s in (disclosure.pool_sentence(data),) if s]
    for split in data.splits:
        if not (comp["split"] == split).any():
            continue
        md += [f"### Split `{split}`\n", markdown(comparison_display(comp, split, "md"))]
        md += disclosure.routing_sentence(comp, split)
        diag = diagnostics_display(comp, split)
        if diag is not None:
            md += ["Diagnostics (labels read only to measure): accuracy of the pseudo-labels on the training "
                   "images, the claiming ensemble on the test split, each also under oracle routing (every image "
                   "sent to the teacher of its own task), a linear probe on the student's features "
                   "fitted to pseudo-labels; best epoch and wall time per trial, and its peak GPU memory "
                   "(`gpu_peak_mb`) when it ran on a GPU.\n", markdown(diag)]
    md += _fig(figs, "accuracy", "Union accuracy per method")
    if "curves" in figs:
        md += ["### Learning curves\n"] + _fig(figs, "curves", "Validation union accuracy per epoch")
    return md


def _aggregate_section(data: StudyData) -> list[str]:
    """With two or more splits: the leaderboard's aggregate block over this study's splits
    (:mod:`.leaderboard`: scores normalised by the split's supervised ``scratch`` student, IQM and
    mean with stratified bootstrap intervals, rank ranges from the pairwise verdicts, P(cka > other)).
    Nothing otherwise, or when fewer than two splits have a ``scratch`` student to normalise by."""
    from harness.report import leaderboard as lb

    if len(data.splits) < 2:
        return []
    scores, tasks, left = lb.scores_frame([data], "scratch")
    if len(tasks) < 2:
        return []
    frame = lb.leaderboard_frame(scores, tasks)
    md = ["## Aggregate over splits\n",
          f"Each seed's last-epoch union accuracy as % of its split's supervised `scratch` student (mean over "
          f"seeds), over the {len(tasks)} splits: per split mean ± the half-width of its 95% t-interval; IQM and "
          "mean over every seed x split score with 95% stratified bootstrap intervals (2,000 replicates, seeded); "
          "rank: the range the pairwise verdicts allow (1 + the rows ahead of it to the number of rows minus those "
          "it is ahead of, *ahead* when the 95% interval of P(X > Y) lies above 0.5), never a bare rank where they "
          "are inconclusive. A row without every split gets no aggregate. The same estimators as `harness "
          "leaderboard` (Agarwal et al. 2021).\n"]
    if left:
        md.append("Left out: " + "; ".join(left) + ".\n")
    md.append(markdown(lb.leaderboard_display(frame, tasks), left=2))
    md += lb.poi_section(frame, len(tasks))[1:]
    return md


def _decomposition_section(data: StudyData, dec: pd.DataFrame, figs: dict[str, Path]) -> list[str]:
    """Where each label-free student loses its points (only when the trials logged the oracle)."""
    if dec.empty:
        return []
    md = ["## Error decomposition: teachers, routing, distillation\n",
          "Labels read only to measure. Per split and routing rule (means over seeds, union accuracy on the test "
          "split): the teachers' ceiling C is the oracle ensemble, each image sent to the teacher of its own task; "
          "the claiming ensemble E sends it to the teacher that claims it under the row's rule; S is the student "
          "(last epoch). The gap to the supervised scratch student splits exactly: "
          "Supervised − S = (Supervised − C) + (C − E) − (S − E): the teachers' own errors, the routing loss "
          "(≥ 0 image by image) and the distillation gain (negative: a loss). *Largest loss* names the largest "
          "positive term.\n"]
    for split in data.splits:
        if not (dec["split"] == split).any():
            continue
        md += [f"### Split `{split}`\n"]
        sentence = decomposition.decomposition_sentence(dec, split)
        md += [sentence] if sentence else []
        md += [markdown(decomposition.decomposition_display(dec, split, "md"))]
    md += _fig(figs, "decomposition", "Gap to the supervised student per term")
    return md


def _scaling_figure(data: StudyData, comp: pd.DataFrame, abl: pd.DataFrame, out: Path) -> Path | None:
    """``scaling.csv`` and ``scaling.png``: only when splits cut the same classes into different K."""
    frame = scaling.scaling_frame(comp, data)
    if scaling.write_csv(frame, out / "scaling.csv") is None:
        return None
    labels = list(comp.loc[comp["kind"] != "teacher", "row"]) + list(abl["row"])  # the palette of _figures
    return scaling.scaling_plot(frame, palette(labels), out / "scaling.png")


def _scaling_section(data: StudyData, comp: pd.DataFrame, figs: dict[str, Path]) -> list[str]:
    """Union accuracy against the number of teachers K (only when splits cut the same classes into
    different K)."""
    frame = scaling.scaling_frame(comp, data)
    if frame.empty:
        return []
    ns = frame.loc[frame["kind"] == "method", "n"]
    n = int(ns.mode().iloc[0]) if len(ns) else 0
    width = (f" With n = {n} seeds the interval is mean ± {scaling.t_half_width(n):.2f} × std."
             if n >= 2 else "")
    md = ["## Scaling with the number of teachers K\n",
          "Union accuracy of the model after the last epoch (the primary metric) against K, the number of tasks "
          "(one teacher each) that a split cuts the same classes into. Cells: mean ± std over seeds "
          "[95% t-interval of the mean: mean ± t(0.975, n − 1) · std / √n] (n seeds), in %; n = 1 (the "
          f"seed-independent claiming ensemble) has no interval.{width} One column per split: splits with "
          "the same K are different partitions and are not pooled. † uses labels.\n"]
    for group in dict.fromkeys(frame["group"]):
        md += [f"### Data set {group}\n", markdown(scaling.scaling_display(frame, group))]
        md += ["".join(f"- {s}\n" for s in scaling.scaling_sentences(frame, group))]
    out = scaling.left_out(frame, scaling.split_infos(comp, data))
    if out:
        md.append(f"Not in this view: {'; '.join(out)}.\n")
    md += _fig(figs, "scaling", "Union accuracy vs number of teachers K")
    return md


def _ablation_section(data: StudyData, abl: pd.DataFrame, figs: dict[str, Path]) -> list[str]:
    if abl.empty:
        return ["## Ablations\n", "No method of this study has ablation variants.\n"]
    md = ["## Ablations\n",
          "Each variant switches one component (or a pair) off. Acc.: mean ± std over seeds, in %. "
          "Δ in percentage points. " + stats.TEST_DESCRIPTION + "\n"]
    for split, method in _ablation_blocks(abl):
        md.append(f"### Split `{split}`: `{method}`\n")
        for s, m, metric in _ablation_tables(abl):
            if (s, m) == (split, method):
                md += [f"{METRIC_TITLES[metric]}:\n", markdown(ablation_display(abl, split, method, metric, "md"))]
    md += _fig(figs, "ablation", "Ablation deltas with 95% intervals")
    losses = [k for k in figs if k.startswith("losses/")]
    if losses:
        md.append("### Loss terms per epoch\n")
        md.append("Every logged term (unweighted means over the epoch's batches; `loss/total` is the weighted sum "
                  "that was optimised). A switched-off component is not computed, so its curve is absent.\n")
        for k in losses:
            md += _fig(figs, k, f"Loss terms of {k.split('/')[2]} on split {k.split('/')[1]}")
    return md


def _problems_section(data: StudyData) -> list[str]:
    md = ["## Failed, missing and duplicate runs\n"]
    att = data.attempts
    bad = att[att["status"] != "FINISHED"]
    done = set(zip(data.trials["split"], data.trials["method"], data.trials["variant"], data.trials["seed"]))
    if bad.empty:
        md.append("No trial run failed, was killed or is still running.\n")
    else:
        rows = {"Run": [], "Status": [], "Reason": [], "Redone": []}
        for r in bad.itertuples(index=False):
            rows["Run"].append(f"`{r.run_name or r.run_id}`")
            rows["Status"].append(r.status + (f" ({r.failure_kind})" if r.failure_kind else ""))
            rows["Reason"].append(redact_paths(r.failure or "–").replace("|", "/").replace("\n", " ")[:160])
            rows["Redone"].append("yes (another run finished it)" if (r.split, r.method, r.variant, r.seed) in done
                                  else "no: not in the tables")
        md += ["Only FINISHED runs give numbers; these runs did not finish:\n", markdown(pd.DataFrame(rows), left=4)]
    dup = data.duplicates()
    if dup.empty:
        md.append("No trial has more than one finished run.\n")
    else:
        md.append("**Warning**: these trials have several FINISHED runs of the same trial key (only by mistake: two "
                  "invocations of the study at once, or a run repeated by hand); the latest run of each is used:\n")
        md.append(markdown(pd.DataFrame({
            "Trial": [f"`{r.split}/{row_label(r.method, r.variant)}/seed{r.seed}`" for r in dup.itertuples()],
            "Finished runs": dup["n_finished"].astype(str), "Used run": [f"`{x}`" for x in dup["used_run_id"]]}),
            left=3))
    return md


def _params_section(data: StudyData) -> list[str]:
    p = data.params.drop(columns=[c for c in SKIP_PARAMS if c in data.params.columns])
    where = {rid: (s, row_label(m, v)) for rid, s, m, v in
             zip(data.trials["run_id"], data.trials["split"], data.trials["method"], data.trials["variant"])}
    rows: dict[str, list[str]] = {"Parameter": [], "Value": [], "Runs (method, on every split unless named)": []}
    for col in p.columns:
        vals = p[col].dropna()
        if vals.nunique() < 2:
            continue
        counts = vals.value_counts()
        common = sorted(counts.index[counts == counts.max()], key=str)[0]
        for value in sorted(vals.unique(), key=lambda v: (v == common, str(v))):
            runs = "every other run that has it" if value == common else _runs_text(
                [where[r] for r in vals.index[vals == value]], [where[r] for r in vals.index], data.splits)
            rows["Parameter"].append(f"`{col}`")
            rows["Value"].append(f"`{_short(value)}`")
            rows["Runs (method, on every split unless named)"].append(runs)
    md = ["## Parameters that vary between runs\n",
          "Flattened trial configs (MLflow params); seed, method and variant are left out (they are the tables' "
          "rows). A parameter that only some methods have counts as varying only if its values differ.\n"]
    md.append(markdown(pd.DataFrame(rows), left=3) if rows["Parameter"] else "None besides method, variant and seed.\n")
    return md


def _runs_text(pairs: list[tuple[str, str]], having: list[tuple[str, str]], splits: list[str]) -> str:
    """``cka-intra, 2x5/kd``: a label alone when it has this value on every split, a whole split
    when every run of that split (that has the parameter) has it."""
    whole = [s for s in splits if {p for p in having if p[0] == s} <= set(pairs) and any(p[0] == s for p in pairs)]
    by_label: dict[str, set[str]] = {}
    for split, label in pairs:
        if split not in whole:
            by_label.setdefault(label, set()).add(split)
    parts = [f"every run on split {s}" for s in whole]
    for label in sorted(by_label):
        on = by_label[label]
        parts += [label] if on >= set(splits) else [f"{s}/{label}" for s in splits if s in on]
    return ", ".join(parts)


def _short(value: object, n: int = 60) -> str:
    s = redact_paths(str(value)).replace("|", "/").replace("`", "'")
    return s if len(s) <= n else s[: n - 1] + "…"


def _config_section(data: StudyData) -> list[str]:
    md = ["## Study configuration\n"]
    resolved = data.study_resolved if data.study_source else data.study_resolved or data.study_yaml
    study = appendix.study_section(data.study_source, resolved)
    if study:
        return md + study
    p = data.params
    common = [c for c in p.columns if p[c].nunique() == 1 and c not in SKIP_PARAMS]
    body = "\n".join(f"{c}: {_short(p[c].dropna().iloc[0], 200)}" for c in common) or "(none)"
    return md + ["The study file is not in the store (run `harness report` with the study file to include it). "
                 "Parameters with a single value across the trials that have them:\n", f"```\n{body}\n```\n"]


def _software_section(data: StudyData, fallback: pd.DataFrame | None = None) -> list[str]:
    versions = []
    for pkg in PACKAGES:
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    used = data.attempts[data.attempts["run_id"].isin(data.trials["run_id"])]
    whose = "tags of the runs in the tables"
    if used.empty and fallback is not None:
        used, whose = fallback, "tags of the tuning trial runs"  # no trial in the comparison tables
    logged = []
    for col, name in (("version", "harness"), ("torch_version", "torch"), ("mlflow_version", "mlflow"),
                      ("numpy_version", "numpy"), ("python_version", "Python")):
        values = sorted({v for v in used[col] if v})
        if values:
            logged.append(f"{name} {' / '.join(values)}")
    commits = sorted({(c, d) for c, d in zip(used["git_commit"], used["git_dirty"]) if c})
    if commits:
        logged.append("git commit " + " / ".join(f"{c[:12]}{' (uncommitted changes)' if d == 'true' else ''}"
                                                   for c, d in commits))
    md = ["## Software\n",
          f"Report built with Python {platform.python_version()} ({platform.system()}); {', '.join(versions)}.\n",
          f"Trials run with {', '.join(logged) or 'unrecorded versions'} ({whose}).\n"]
    if not used.empty and "deterministic" in used:
        md.append(disclosure.determinism_sentence(used))
    return md
