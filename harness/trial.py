"""One trial top to bottom: config -> data -> teachers (cached) -> method -> train loop -> MLflow.

This is the one place where the flow of a trial reads in order. Side effects (files, MLflow)
happen here and in :mod:`harness.tracking`; everything below is pure or module-local.
"""

from __future__ import annotations

import os
import platform
import resource
import time
import traceback
from typing import Any

import numpy as np
import torch
import yaml

from harness import __version__, losses
from harness.config import StudyConfig
from harness.data.splits import SplitData, build_split
from harness.grid import Trial, resolved_config
from harness.methods.base import SplitInfo, TeacherSet, get_method
from harness.models import build_model
from harness.teachers import TeacherRecord, get_teachers
from harness.tracking import TAG, Tracker
from harness.train import fit, predict_all


def trial_tags(trial: Trial, uses_labels: bool) -> dict[str, str]:
    return {
        f"{TAG}study": trial.study,
        f"{TAG}split": trial.split,
        f"{TAG}method": trial.method,
        f"{TAG}variant": trial.variant,
        f"{TAG}seed": str(trial.seed),
        f"{TAG}trial_key": trial.key,
        f"{TAG}kind": "trial",
        f"{TAG}uses_labels": str(uses_labels).lower(),
        f"{TAG}version": __version__,
    }


def log_teacher(tracker: Tracker, experiment_id: str, study: str, split: str, rec: TeacherRecord) -> None:
    """One FINISHED run per teacher key and experiment (a cache hit logs only if none exists)."""
    if tracker.find(experiment_id, {f"{TAG}teacher_key": rec.key, f"{TAG}split": split}, ("FINISHED",)):
        return
    tags = {
        f"{TAG}study": study, f"{TAG}split": split, f"{TAG}kind": "teacher", f"{TAG}task": str(rec.index),
        f"{TAG}teacher_key": rec.key, f"{TAG}method": "teacher", f"{TAG}variant": "full",
        f"{TAG}cached": str(rec.cached).lower(), f"{TAG}uses_labels": "true",
    }
    run_id = tracker.start(experiment_id, f"{split}/teacher{rec.index}", tags, rec.spec)
    for epoch, m in enumerate(rec.history, start=1):
        tracker.log_metrics(run_id, m, step=epoch)
    final = {
        "test/acc": rec.metrics.get("test/union_acc_best", float("nan")),
        "test/acc_last": rec.metrics.get("test/union_acc", float("nan")),
        "val/acc_best": rec.metrics.get("val/union_acc_best", float("nan")),
    }
    tracker.log_metrics(run_id, final, step=len(rec.history))
    tracker.finish(run_id)


def prepare_teachers(
    study: StudyConfig, split: SplitData, tracker: Tracker | None = None, experiment_id: str | None = None,
    device: str = "cpu",
) -> list[TeacherRecord]:
    """Train or load the split's teachers (and log each once to MLflow)."""
    cfg = next(s for s in study.splits if s.name == split.name)

    def on_ready(rec: TeacherRecord) -> None:
        if tracker is not None and experiment_id is not None:
            log_teacher(tracker, experiment_id, study.name, split.name, rec)

    return get_teachers(split, study.dataset, study.teachers_for(cfg), study.cache_dir, device, on_ready)


@torch.no_grad()
def diagnostics(method: Any, teachers: TeacherSet, data: SplitData, device: str) -> dict[str, float]:
    """Label-free quality measures; labels are read here only to *measure*, never to train.

    - ``diag/pseudo_label_acc``: accuracy of the pseudo-labels on the training images;
    - ``diag/ensemble_union_acc``: the claiming-teacher ensemble's union accuracy on the test split;
    - ``diag/probe_acc``: logistic regression on the student's features fitted to the training
      pseudo-labels, scored on the test split.
    """
    from sklearn.linear_model import LogisticRegression

    rule = getattr(method.params, "pl_rule", "confidence")
    temp = getattr(method.params, "T_pl", 1.0)
    out = {}
    pls = {}
    for part in ("train", "test"):
        x = data.parts[part].x.to(device)
        logits = [predict_all(t, x).cpu() for t in teachers.nets]
        pls[part] = losses.pseudo_labels(logits, data.offsets, T=temp, rule=rule)[0]
    out["diag/pseudo_label_acc"] = (pls["train"] == data.parts["train"].y).float().mean().item()
    out["diag/ensemble_union_acc"] = (pls["test"] == data.parts["test"].y).float().mean().item()
    if method.trains:
        feats = {p: predict_all(method.student.features, data.parts[p].x.to(device)).cpu().numpy() for p in pls}
        mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
        y_pl = pls["train"].numpy()
        if len(np.unique(y_pl)) > 1:
            clf = LogisticRegression(max_iter=300).fit((feats["train"] - mu) / sd, y_pl)
            pred = clf.predict((feats["test"] - mu) / sd)
            out["diag/probe_acc"] = float((pred == data.parts["test"].y.numpy()).mean())
    return out


def run_trial(
    study: StudyConfig, trial: Trial, tracker: Tracker, experiment_id: str, *, data: SplitData | None = None,
    parent_run_id: str | None = None, device: str = "cpu", extra_tags: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Run one trial and log it as a run; the run ends FAILED (reason tagged) on any exception."""
    cls = get_method(trial.method)
    tags = {**trial_tags(trial, cls.uses_labels), **(extra_tags or {})}
    tags.update({f"{TAG}pid": os.getpid(), f"{TAG}device": device, f"{TAG}host": platform.node()})
    cfg = resolved_config(study, trial)
    run_id = tracker.start(experiment_id, trial.run_name, tags, cfg, parent_run_id)
    t0 = time.time()
    tracker.set_tags(run_id, {f"{TAG}start": f"{t0:.3f}"})
    try:
        tracker.log_text(run_id, yaml.safe_dump(cfg, sort_keys=False), "trial.yaml")
        split_cfg = next((i, s) for i, s in enumerate(study.splits) if s.name == trial.split)
        data = data or build_split(split_cfg[1], study.dataset, f"splits[{split_cfg[0]}]")
        records = prepare_teachers(study, data, device=device)
        teachers = TeacherSet([r.net for r in records])
        torch.manual_seed(trial.seed)
        np.random.seed(trial.seed)
        student = build_model(study.student.arch, data.in_shape, data.num_classes, **study.student.options())
        params = cls.ParamsModel.model_validate(trial.params)
        method = cls(student, teachers, params, SplitInfo(tuple(data.sizes), tuple(data.offsets)))

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            tracker.log_metrics(run_id, metrics, step=epoch)

        res = fit(method, data, study.train, trial.seed, device, on_epoch)
        final = dict(res.final)
        final.update(diagnostics(method, teachers, data, device))
        final["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        final["trial_seconds"] = time.time() - t0
        tracker.log_metrics(run_id, final, step=study.train.epochs if cls.trains else 0)
        tracker.set_tags(run_id, {f"{TAG}end": f"{time.time():.3f}"})
        tracker.finish(run_id, "FINISHED")
        return final
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:500] if str(e) else type(e).__name__
        try:
            tracker.set_tags(run_id, {f"{TAG}failure": reason, f"{TAG}end": f"{time.time():.3f}",
                                      f"{TAG}traceback": traceback.format_exc()[-4000:]})
            tracker.finish(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        finally:
            raise
