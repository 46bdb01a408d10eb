"""``harness run-study``: validate, expand, train teachers, run trials, summarise.

Validation (study file, methods, parameters, model options, class ranges, data roots) happens
before anything is created, so bad input leaves no experiment, cache entry or run behind.
Resume: a trial whose key already has a FINISHED run is skipped; RUNNING runs of the same key
(left by a killed study) are marked KILLED and the trial is redone.
"""

from __future__ import annotations

import time
from pathlib import Path

from harness.config import StudyConfig, load_study
from harness.grid import Trial, build_splits, expand
from harness.tracking import TAG, Tracker
from harness.trial import prepare_teachers, run_trial


def finished_keys(tracker: Tracker, experiment_id: str) -> set[str]:
    runs = tracker.find(experiment_id, {f"{TAG}kind": "trial"}, ("FINISHED",))
    return {r.data.tags.get(f"{TAG}trial_key", "") for r in runs}


def mark_stale(tracker: Tracker, experiment_id: str, keys: set[str]) -> int:
    """Runs left RUNNING by a killed study for these keys become KILLED."""
    n = 0
    for r in tracker.find(experiment_id, {f"{TAG}kind": "trial"}, ("RUNNING",)):
        if r.data.tags.get(f"{TAG}trial_key") in keys:
            tracker.set_tags(r.info.run_id, {f"{TAG}failure": "stale: the study running it was killed"})
            tracker.finish(r.info.run_id, "KILLED")
            n += 1
    return n


def print_table(trials: list[Trial], done: set[str]) -> None:
    print(f"{'split':<12} {'method':<10} {'variant':<16} {'seed':>4}  {'trial key':<16}  cached")
    for t in trials:
        print(f"{t.split:<12} {t.method:<10} {t.variant:<16} {t.seed:>4}  {t.key:<16}  {'yes' if t.key in done else 'no'}")
    print(f"{len(trials)} trials, {sum(t.key in done for t in trials)} already finished")


def run_study(
    path: str | Path, tracking_uri: str | None = None, dry_run: bool = False, workers: int | None = None,
    report: bool = True,
) -> int:
    study: StudyConfig = load_study(path)
    trials = expand(study)
    splits = build_splits(study)
    tracker = Tracker(tracking_uri)
    exp_id = tracker.experiment(study.name)
    done = finished_keys(tracker, exp_id)
    if dry_run:
        print_table(trials, done)
        return 0
    todo = [t for t in trials if t.key not in done]
    mark_stale(tracker, exp_id, {t.key for t in todo})
    parent = tracker.start(exp_id, f"study/{time.strftime('%Y%m%d-%H%M%S')}",
                           {f"{TAG}kind": "study", f"{TAG}study": study.name})
    print(f"study {study.name}: {len(trials)} trials, {len(trials) - len(todo)} already finished, "
          f"tracking at {tracker.uri}")
    for name, data in splits.items():
        recs = prepare_teachers(study, data, tracker, exp_id)
        accs = ", ".join(f"{r.metrics.get('test/union_acc_best', float('nan')):.3f}" for r in recs)
        print(f"teachers of {name}: {'cached' if all(r.cached for r in recs) else 'trained'} (test acc {accs})")
    failed: list[tuple[Trial, str]] = []
    t0 = time.time()
    for i, trial in enumerate(todo, 1):
        try:
            final = run_trial(study, trial, tracker, exp_id, data=splits[trial.split], parent_run_id=parent)
            print(f"[{i}/{len(todo)}] {trial.run_name}: union acc {final.get('test/union_acc', float('nan')):.4f} "
                  f"({time.time() - t0:.0f}s)")
        except Exception as e:
            failed.append((trial, f"{type(e).__name__}: {e}"))
            print(f"[{i}/{len(todo)}] {trial.run_name}: FAILED ({type(e).__name__}: {e})")
    tracker.finish(parent, "FAILED" if failed else "FINISHED")
    print(f"done: {len(todo) - len(failed)} finished, {len(failed)} failed, {len(trials) - len(todo)} skipped")
    if report and not failed:
        try:
            from harness.report.build import build_report
        except ImportError:
            pass
        else:
            print(f"report written to {build_report(study.name, tracking_uri=tracker.uri)}")
    return 1 if failed else 0
