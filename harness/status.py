"""``harness status STUDY``: which trials of a study are finished, running, pending or failed.

Read from MLflow (the trial runs: FINISHED, FAILED/KILLED with ``harness.failure``) and, where
Slurm's commands are on PATH, from ``squeue`` (the study's jobs pending or running now, found by
the trial key in their comment) and ``sacct`` (why a job ended: a run left RUNNING by a job, its
``harness.slurm_job``, that was cancelled, timed out, ran out of memory or lost its node is
*failed*, with Slurm's reason).

The trials are those the latest study run logged (``trial_keys.json``), else those of the study
file given, else every trial run of the experiment. A trial's state:

| state | when |
|---|---|
| finished | its key has a FINISHED run |
| running / pending | a Slurm job of the study carries its key (with the job id, node or reason) |
| failed | its latest run is FAILED or KILLED, or RUNNING while its Slurm job has ended |
| running | its latest run is RUNNING and no ended Slurm job says otherwise (a local runner's trial) |
| not started | no run and no job |
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.scheduler import JobInfo, active_trials, ended_text, sacct, squeue
from harness.store import (
    ATTEMPT, FAILURE, HOST, KIND, KIND_STUDY, KIND_TRIAL, SLURM_JOB, TRIAL_KEY,
    TRIAL_KEYS_ARTIFACT,
)
from harness.tracking import Tracker, missing_store, resolve_uri

_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
STATES = ("finished", "running", "pending", "failed", "not started")


@dataclass
class TrialState:
    key: str
    name: str
    state: str  # one of STATES
    detail: str = ""


def _study_name(study: str) -> tuple[str, str, Path | None]:
    """(study name, its experiment's name, its file or None)."""
    path = Path(study)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        from harness.config import load_study

        cfg = load_study(path)
        return cfg.name, cfg.experiment_name, path
    return study, study, None


def _logged_keys(tracker: Tracker, experiment_id: str) -> list[str] | None:
    """The trial keys the latest study run logged (None when it logged none)."""
    run = tracker.latest(experiment_id, KIND_STUDY)
    if run is None:
        return None
    old = os.environ.get(_BAR)
    os.environ[_BAR] = "false"  # MLflow's download progress bar
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = tracker.client.download_artifacts(run.info.run_id, TRIAL_KEYS_ARTIFACT, tmp)
            return [str(k) for k in json.loads(Path(local).read_text())]
    except Exception:  # no such artifact (an older run), an unreachable artifact store
        return None
    finally:
        if old is None:
            os.environ.pop(_BAR, None)
        else:
            os.environ[_BAR] = old


def _slurm_view(study: str, running: dict[str, str]) -> tuple[dict[str, JobInfo], dict[str, JobInfo], str]:
    """(key -> its job in the queue, key -> its ended job for the keys whose run is RUNNING, by
    their ``running`` job ids, a note when Slurm does not answer); empty without Slurm's commands."""
    if shutil.which("squeue") is None or shutil.which("sacct") is None:
        return {}, {}, ""
    try:
        queue = active_trials(study, squeue())
        ask = {key: job for key, job in running.items() if key not in queue}
        records = sacct(list(ask.values())) if ask else {}
        ended = {key: records[job] for key, job in ask.items() if job in records and records[job].final}
        return queue, ended, ""
    except HarnessError as e:
        return {}, {}, f"Slurm not asked: {e}"


def trial_states(study: str, tracking_uri: str | None = None) -> tuple[str, list[TrialState], str]:
    """(study name, one state per trial, a note) for a study file or name."""
    name, experiment, path = _study_name(study)
    uri = resolve_uri(tracking_uri)
    tracker = Tracker(uri) if not missing_store(uri) else None  # a status creates no store
    exp = tracker.experiment(experiment, create=False) if tracker is not None else None
    runs = tracker.find(exp, {KIND: KIND_TRIAL}) if tracker is not None and exp is not None else []
    by_key: dict[str, list] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        by_key.setdefault(r.data.tags.get(TRIAL_KEY, ""), []).append(r)
    names: dict[str, str] = {}
    # an experiment shared by several studies (a benchmark suite's): the latest study run may be another's
    shared = experiment != name
    keys = _logged_keys(tracker, exp) if tracker is not None and exp is not None and not shared else None
    if path is not None:
        from harness.config import load_study
        from harness.grid import expand

        trials = expand(load_study(path))
        names = {t.key: t.run_name for t in trials}
        keys = keys if keys is not None else [t.key for t in trials]
    if keys is None:
        if exp is None:
            raise HarnessError(f"status: no experiment {name!r} in {uri}")
        keys = list(by_key)
    running = {key: rs[-1].data.tags[SLURM_JOB] for key, rs in by_key.items()
               if rs[-1].info.status == "RUNNING" and rs[-1].data.tags.get(SLURM_JOB)}
    queue, ended, note = _slurm_view(name, running)
    out = []
    for key in keys:
        mine = by_key.get(key, [])
        label = mine[-1].info.run_name if mine else names.get(key, key)
        out.append(_state(key, label, mine, queue.get(key), ended.get(key)))
    return name, out, note


def _state(key: str, name: str, runs: list, queued: JobInfo | None, ended: JobInfo | None) -> TrialState:
    if any(r.info.status == "FINISHED" for r in runs):
        return TrialState(key, name, "finished")
    if queued is not None:
        if queued.state == "PENDING":
            why = f" ({queued.reason})" if queued.reason else ""
            return TrialState(key, name, "pending", f"Slurm job {queued.job_id}{why}")
        return TrialState(key, name, "running", f"Slurm job {queued.job_id} on {queued.node or '?'}, {queued.elapsed}")
    if not runs:
        return TrialState(key, name, "not started")
    last = runs[-1]
    tags = last.data.tags
    attempt = f"attempt {tags.get(ATTEMPT, '0')}: "
    if last.info.status == "RUNNING":
        if ended is not None:  # its job ended without ending the run: Slurm says why
            return TrialState(key, name, "failed", attempt + ended_text(ended, ended.job_id))
        where = tags.get(SLURM_JOB) and f"Slurm job {tags[SLURM_JOB]}" or tags.get(HOST, "")
        return TrialState(key, name, "running", where)
    return TrialState(key, name, "failed",
                      attempt + f"{last.info.status}: {tags.get(FAILURE, 'no reason recorded')}")


def study_status(study: str, tracking_uri: str | None = None, show_all: bool = False) -> int:
    """Print the counts and one line per trial that is not finished (every trial with
    ``show_all``); 0."""
    name, states, note = trial_states(study, tracking_uri)
    counts = {s: sum(t.state == s for t in states) for s in STATES}
    print(f"study {name}: {len(states)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    width = max((len(t.name) for t in states), default=0)
    order = {s: i for i, s in enumerate(("failed", "running", "pending", "not started", "finished"))}
    for t in sorted(states, key=lambda t: order[t.state]):
        if t.state != "finished" or show_all:
            print(f"  {t.state:<11} {t.name:<{width}}  {t.key}  {t.detail}".rstrip())
    if note:
        print(f"note: {note}")
    return 0
