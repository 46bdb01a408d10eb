"""What the numbers of a report rest on, said in report.md: which runs count (the trial-key
scope and the runs it leaves out), which labels each column used, what the seed std contains,
where routing caps the label-free methods, and which trials ran deterministically.

Each function returns Markdown (a line, a paragraph or a section) from a :class:`StudyData` and
the comparison frame; nothing here reads the store.
"""

from __future__ import annotations

import re

import pandas as pd

from harness.report.frames import REFERENCE_METHOD, StudyData, row_label
from harness.report.tables import ROUTING_GAP, markdown, routing_caps
from harness.store import DETERMINISTIC, TRIAL_KEY

OTHERS_TITLE = "Runs of other configurations in this experiment"
_TUNED_HEADER = re.compile(r"^# Tuned by `harness tune", re.M)
_TUNED_METHOD = re.compile(r"^# ([A-Za-z_][\w-]*): best trial #", re.M)


def scope_line(data: StudyData) -> str:
    """Which trial runs the tables use, and how many were left out."""
    if data.keys is None:
        return ("**Warning: this report is not scoped by trial key** "
                f"({data.scope}): the latest finished run of every split, method, variant and seed is used, "
                "whatever configuration it ran with, so runs of an edited study can be mixed in. Give the study "
                "file (`harness report path/to/study.yaml`) to scope it.\n")
    done = len(set(data.trials["trial_key"]) & data.keys)
    others = data.others
    left = (f"{len(others)} trial run{'s' if len(others) != 1 else ''} of other configurations in this experiment "
            f"{'are' if len(others) != 1 else 'is'} left out of every table, figure and statistic (section "
            f"*{OTHERS_TITLE}*)." if len(others) else "No trial run of another configuration is in this experiment.")
    return (f"Scope: only trial runs whose `{TRIAL_KEY}` is one of the {len(data.keys)} trial keys of the "
            f"study ({data.scope}); {done} of them have a finished run. {left}\n")


def others_section(data: StudyData) -> list[str]:
    """Runs of trial keys outside the study's, counted per split and method/variant."""
    md = [f"## {OTHERS_TITLE}\n"]
    if data.keys is None:
        return md + ["Unknown: the report is not scoped by trial key (see the warning at the top).\n"]
    o = data.others
    if o.empty:
        return md + ["None: every trial run in this experiment has one of this study's trial keys.\n"]
    md.append("Trial runs whose trial key is not one of this study's (a run of an earlier or later version of the "
              "study file, e.g. another parameter value or precision). Counted here, used nowhere else: "
              f"{len(o)} runs ({int((o['status'] == 'FINISHED').sum())} finished) of "
              f"{o['trial_key'].nunique()} trial keys.\n")
    o = o.assign(label=[row_label(m, v) for m, v in zip(o["method"], o["variant"])])
    rows: dict[str, list[str]] = {"Split": [], "Method": [], "Runs": [], "Finished": [],
                                  "Failed, killed or running": [], "Trial keys": []}
    for (split, label), g in o.groupby(["split", "label"], sort=True):
        fin = int((g["status"] == "FINISHED").sum())
        rows["Split"].append(f"`{split}`")
        rows["Method"].append(f"`{label}`")
        rows["Runs"].append(str(len(g)))
        rows["Finished"].append(str(fin))
        rows["Failed, killed or running"].append(str(len(g) - fin))
        rows["Trial keys"].append(str(g["trial_key"].nunique()))
    return md + [markdown(pd.DataFrame(rows), left=2)]


def tuned_methods(data: StudyData) -> list[str] | None:
    """Methods whose values ``harness tune`` chose (from the tuned file's header), [] when the study
    is a tuned one but the header is not in the store (a ``<name>-tuned`` study), None otherwise."""
    text = data.study_yaml or ""
    if _TUNED_HEADER.search(text):
        return sorted(set(_TUNED_METHOD.findall(text)))
    return [] if data.name.endswith("-tuned") else None


def labels_paragraph(data: StudyData, comp: pd.DataFrame) -> str:
    """Which labels each column used: training, validation (model selection, tuning) and test."""
    labelled = sorted({r for r, k, u in zip(comp["row"], comp["kind"], comp["uses_labels"]) if k == "method" and u})
    tuned = tuned_methods(data)
    text = ("Labels: † marks methods trained with the true training labels "
            f"({', '.join(f'`{x}`' for x in labelled) or 'none here'}; references, not amalgamation). Teachers saw "
            "the training labels of their own task only. No other method saw a training label. Validation labels: "
            "the *last epoch* columns used none (the recipe, i.e. epochs, learning rate and loss weights, is fixed "
            "in the study file); the *best-val. epoch* column reports the epoch chosen with validation labels")
    if tuned is not None:
        who = ", ".join(f"`{m}`" for m in tuned) if tuned else "the tuned methods"
        text += (f"; and this is a tuned study: the hyper-parameters of {who} were chosen by `harness tune` on "
                 "validation labels (objective: validation union accuracy), so for them every column, the last-epoch "
                 "one included, rests on validation labels")
    return text + ". Test labels are read only to measure.\n"


def teacher_sentence(data: StudyData, comp: pd.DataFrame) -> str:
    """Where the teacher rows come from, per split."""
    parts = []
    for split in data.splits:
        sub = comp[(comp["split"] == split) & (comp["kind"] == "teacher")]
        if sub.empty:
            continue
        if not (data.teachers["split"] == split).any():
            src = f"the own-task accuracies of this study's `{REFERENCE_METHOD}` reference run"
        elif data.keys is None:
            src = "the latest teacher run of each task (not scoped: it may be a teacher of another configuration)"
        else:
            src = "the runs of the teachers that this study's trial runs used"
        if (sub["n"] > 1).any():
            src += " (mean ± std over the n teachers of each task that the trials used, e.g. one per seed)"
        parts.append(f"on `{split}`, {src}")
    return ("Teacher rows: each cached teacher (the epoch with its best validation accuracy on its own task, i.e. the "
            "weights every method uses) on its own task's test images"
            + (f"; {'; '.join(parts)}" if parts else "")
            + ". Claiming ensemble: each test image routed to the teacher that claims it.\n")


def pool_sentence(data: StudyData) -> str:
    """Which splits' label-free students learned from a transfer set (tag ``harness.pool``), so
    that no reader takes their rows for students of the teachers' own training images."""
    t = data.trials
    if "pool" not in t:
        return ""
    free = t[~t["uses_labels"].astype(bool) & t["pool"].astype(str).str.startswith("transfer:")]
    if free.empty:
        return ""
    parts = []
    for split, pools in free.groupby("split", sort=True)["pool"]:
        for pool in sorted(set(pools)):
            _, name, fraction = pool.split(":", 2)
            sizes = sorted({int(v) for v in t.loc[(t["split"] == split) & (t["pool"] == pool), "pool_size"].dropna()}) \
                if "pool_size" in t else []
            n = f", {sizes[0]:,} images" if len(sizes) == 1 else ""
            share = "" if float(fraction) == 1.0 else f" ({float(fraction):g} of its training part)"
            parts.append(f"on `{split}` from the transfer set `{name}`{share}{n}")
    return ("Transfer sets: the label-free students learned " + "; ".join(parts) + ", not from the teachers' training "
            "images; teachers, their routing statistics and every evaluation stayed on the split's own data, and "
            "methods that use labels (†) trained on the split's labelled training images. Pseudo-label accuracies "
            "are not defined there (the transfer images have no labels of the union classes).\n")


def seed_std_sentence(data: StudyData) -> str:
    """What the std over seeds contains (``teacher_seeds`` of the logged study file)."""
    mode = data.study.get("teacher_seeds", "fixed") if data.study_yaml else None  # the field's default
    if mode == "per_seed":
        return ("Seed std: every seed trains its own teachers (`teacher_seeds: per_seed`), so the std over seeds "
                "includes teacher variance.\n")
    if mode == "fixed":
        return ("Seed std: every seed trains its own student with the same teachers (`teacher_seeds: fixed`), so "
                "the std over seeds excludes teacher variance (`teacher_seeds: per_seed` in the study file "
                "includes it).\n")
    return ("Seed std: the study file is not in the store; with the default `teacher_seeds: fixed` every seed "
            "shares the teachers and the std over seeds excludes teacher variance.\n")


def routing_sentence(comp: pd.DataFrame, split: str) -> list[str]:
    """One sentence when routing caps the split: the best ensemble far below the weakest teacher,
    or only the default rule's (then the sentence names the best rule's ensemble too)."""
    caps = routing_caps(comp)
    if split not in caps:
        return []
    cap = caps[split]
    gap = (f"{100 * (cap.own - cap.ensemble):.1f} points below the weakest teacher on its own task "
           f"({100 * cap.own:.1f}%; flagged when more than {100 * ROUTING_GAP:.0f} points below)")
    if cap.default_only:
        return [f"Routing caps this split under the default rule: its claiming-teacher ensemble reaches "
                f"{100 * cap.ensemble:.1f}% union accuracy, {gap}. Every label-free method that routes by the "
                "default rule learns from the teacher that claims each image, so routing bounds them here; the best "
                f"ensemble of this split reaches {100 * cap.best:.1f}% (`{cap.best_row}`; claim rules are compared "
                "with the `routing:` axis of the study file).\n"]
    return [f"Routing caps this split: the best claiming-teacher ensemble reaches {100 * cap.ensemble:.1f}% union "
            f"accuracy, {gap}. Every label-free method learns from the teacher "
            "that claims each image, so routing bounds them here: compare claim rules with the `routing:` axis of "
            "the study file.\n"]


def determinism_sentence(used: pd.DataFrame) -> str:
    """Which of these trial runs (the ones in the tables) ran deterministically, from their
    ``harness.deterministic`` tag: what the trial's own process read back from the flags it had
    really set (``train.deterministic``), not what the study file asked for."""
    flags = used["deterministic"].fillna("").astype(str)
    n, yes, known = len(used), int((flags == "true").sum()), int(flags.isin(["true", "false"]).sum())
    what = ("deterministic algorithms, cuDNN deterministic without autotuning and, on a GPU, the cuBLAS workspace "
            f"setting, as read back inside each trial's process (tag `{DETERMINISTIC}`)")
    if known == 0:
        return "Determinism: not recorded (the trials ran with a harness that did not tag it).\n"
    unknown = f"; {n - known} not recorded (an older harness)" if known < n else ""
    which = " that recorded it" if unknown else ""
    if yes == known:
        who = f"all {known} trials{which}" if known > 1 else f"the one trial{which}"
        return f"Determinism: {who} ran deterministically ({what}){unknown}.\n"
    if yes == 0:
        who = f"none of the {known} trials{which} ran" if known > 1 else f"the one trial{which} did not run"
        return (f"Determinism: {who} deterministically (`train.deterministic` off, or its flags not all set): "
                f"reruns on a GPU may differ slightly{unknown}.\n")
    labels = [row_label(m, v) for m, v in zip(used["method"], used["variant"])]
    frame = pd.DataFrame({"label": labels, "flag": flags.to_numpy()})
    parts = [f"`{label}` {int((g['flag'] == 'true').sum())} of {int(g['flag'].isin(['true', 'false']).sum())}"
             for label, g in frame.groupby("label", sort=True) if g["flag"].isin(["true", "false"]).any()]
    return (f"Determinism: {yes} of {known} trials ran deterministically ({what}); per method: "
            f"{', '.join(parts)}{unknown}.\n")
