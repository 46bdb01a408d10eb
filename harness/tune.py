"""``harness tune STUDY.yaml``: Optuna searches over a study's loss weights, temperatures and
recipe, scored on the validation split only.

Order of a tuning invocation:

1. validate the study and its ``search:`` block (:mod:`harness.search`), the data and the device
   pool before anything is created;
2. open the storage: a journal file ``results/<study>/tune.journal`` by default (several
   processes on one machine or a shared file system can work on it), or any Optuna RDB URL
   (``--storage postgresql://...``) for clusters; one Optuna study ``<study>/<method>`` per tuned
   method, created once (its creator enqueues the study's own values as the first trial) and
   loaded by every later or concurrent invocation, so an interrupted search resumes;
3. trials left RUNNING by a dead invocation (same host and its process gone, or no heartbeat for
   ``--stale-after`` seconds) are failed and their configuration enqueued again;
4. an MLflow parent run (kind ``search``), the teachers (trained or loaded from the cache), then
   the loop: ask Optuna for a configuration, open its MLflow run (kind ``tune_trial``), and run it
   on a free slot of the device pool (``--workers``): a worker trains one seed run (kind
   ``tune_run``) per (split, seed) in order, reporting the running mean of the validation union
   accuracy after every epoch, so the pruner can stop a bad configuration after any epoch of any
   seed; the test split is removed from the data before training;
5. when every tuned method has ``search.trials`` counted trials (COMPLETE, PRUNED, or FAIL from
   its own error; not failures that were retried), the best configuration of each method is
   written as ``<study dir>/<name>.tuned.yaml`` (a study ``<name>-tuned`` for ``run-study``), and
   the report is rebuilt with its tuning section.

Optuna trial states map to MLflow: COMPLETE and PRUNED runs end FINISHED (tag
``harness.optuna_state``), FAIL runs FAILED, and runs of an interrupted or stale trial KILLED.

For optuna-dashboard (or any Optuna reader) each Optuna study names its value
(:data:`METRIC_NAMES`: ``val_union_acc``, the mean over splits x seeds of the validation union
accuracy) and carries the study file as user attributes (:func:`study_attrs`); each trial carries
its MLflow run as user attributes (:func:`run_links`: ``mlflow_run_id``, ``mlflow_run_path``
``#/experiments/<experiment id>/runs/<run id>`` to append to the MLflow UI's address, and
``mlflow_seed_run_ids``, one run per (split, seed) in training order).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.config import StudyConfig, dump_study, load_study
from harness.dispatch import dispatch
from harness.errors import HarnessError
from harness.grid import Trial, build_splits
from harness.files import process_alive
from harness.interrupts import sigterm_as_interrupt
from harness.keys import trial_key
from harness.records import InvocationRunTags
from harness.scheduler import PRELOAD, LocalPool, Outcome, Slot, WorkerContext, build_slots, warm_trial_worker
from harness.search import PrunerConfig, SamplerConfig, SearchPlan
from harness.store import (
    ATTEMPT, DEFAULT, FAILURE, FAILURE_KIND, HEARTBEAT, KIND, KIND_SEARCH, KIND_TUNE_RUN,
    KIND_TUNE_TRIAL, METHOD, OBJECTIVE, OPTUNA_DEFAULT, OPTUNA_DISTRIBUTIONS, OPTUNA_NUMBER,
    OPTUNA_PARAMS, OPTUNA_STATE, OPTUNA_STUDIES, OPTUNA_STUDY, OWNER, PRUNED, RETRY_OF,
    SLOT, STORAGE, STUDY, SURPLUS,
)
from harness.tracking import Tracker, git_tags, version_tags

# the user attributes of Optuna trials named harness.* (OWNER, HEARTBEAT, RETRY_OF, DEFAULT, SURPLUS,
# ATTEMPT, FAILURE) are harness.store's
HEARTBEAT_EVERY = 30.0
#: user attributes of Optuna trials that point at their MLflow runs
MLFLOW_RUN_ID, MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_PATH, MLFLOW_RUN_URL, MLFLOW_PARENT_RUN_ID, MLFLOW_SEED_RUN_IDS = (
    "mlflow_run_id", "mlflow_experiment_id", "mlflow_run_path", "mlflow_run_url", "mlflow_parent_run_id",
    "mlflow_seed_run_ids")
#: the name of an Optuna study's single value, per ``search.objective`` (optuna-dashboard shows it
#: instead of "Objective 0"; Optuna's ``study.metric_names``)
METRIC_NAMES = {"val_last": "val_union_acc", "val_best": "val_union_acc_best"}
_WHEN = {"val_last": "after the last epoch", "val_best": "at its best epoch"}
_CREDENTIALS = re.compile(r"//[^/@]*@")


# -- Optuna objects --------------------------------------------------------------------------
def storage_for(spec: str) -> Any:
    """An Optuna storage: an RDB URL (``sqlite:///x.db``, ``postgresql://...``) as is, a path as a
    journal file (created with its folder)."""
    if "://" in spec:
        return spec
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # Absolute: Optuna's lock is a symlink ``<journal>.lock -> <journal path as given>``; a relative
    # path makes it dangle, and a lock left by a killed process (SIGKILL inside a write) is then
    # never recognised as stale: the next search spins on it at 100% CPU instead of forcing it
    # open after Optuna's 30 s grace period.
    path = Path(spec).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def open_storage(spec: str) -> Any:
    """The storage, opened (and an RDB's schema created) now; HarnessError naming ``--storage``
    when it cannot be (an unwritable path, a missing database driver, an unreachable server)."""
    try:
        storage = storage_for(spec)
        return optuna.storages.RDBStorage(storage) if isinstance(storage, str) else storage
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HarnessError(f"--storage: cannot open {spec!r}: {type(e).__name__}: {reason}") from None


def make_sampler(cfg: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (``constant_liar`` on, so parallel workers spread out), random or QMC, seeded."""
    extra = dict(cfg.model_extra or {})
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
             "qmc": optuna.samplers.QMCSampler}
    if cfg.type == "tpe":
        extra.setdefault("constant_liar", True)
    return _construct(kinds[cfg.type], "search.sampler", cfg.type, seed=seed, **extra)


def make_pruner(cfg: PrunerConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The pruner (median by default: 4 complete trials first, then after half a seed's epochs)."""
    extra = dict(cfg.model_extra or {})
    p = optuna.pruners
    if cfg.type in ("median", "percentile"):
        extra.setdefault("n_startup_trials", 4)
        extra.setdefault("n_warmup_steps", max(0, epochs // 2))
    kinds = {"median": p.MedianPruner, "percentile": p.PercentilePruner, "successive_halving": p.SuccessiveHalvingPruner,
             "hyperband": p.HyperbandPruner, "threshold": p.ThresholdPruner, "none": p.NopPruner}
    return _construct(kinds[cfg.type], "search.pruner", cfg.type, **extra)


def _construct(cls: Any, where: str, kind: str, **kwargs: Any) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise HarnessError(f"{where}: {kind}: {str(e).splitlines()[0]}") from None


def optuna_name(study: str, method: str) -> str:
    return f"{study}/{method}"


def open_search(storage: Any, name: str, plan: SearchPlan, method: str, pruner: Any, seed: int) -> optuna.Study:
    """Create the Optuna study (and enqueue the default trial) or load it if it exists; only its
    creator enqueues, so concurrent invocations never run the default twice."""
    sampler_seed = seed
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner,
                                    sampler=make_sampler(plan.search.sampler, seed))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        # joining a search: another seed, or two processes would sample the same configurations
        sampler_seed = zlib.crc32(f"{seed}:{platform.node()}:{os.getpid()}".encode())
        study = optuna.load_study(storage=storage, study_name=name, pruner=pruner,
                                  sampler=make_sampler(plan.search.sampler, sampler_seed))
        created = False
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise HarnessError(f"--storage: Optuna study {name!r} exists and does not maximise")
    if created:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a default outside a searched range is used as is
            study.enqueue_trial(plan.defaults(method), user_attrs={DEFAULT: True})
    return study


def objective_text(plan: SearchPlan) -> str:
    """One sentence: what a trial's value (and each intermediate value) is."""
    n = len(plan.splits) * len(plan.seeds)
    return (f"mean over {n} run(s) (splits {', '.join(plan.splits)} x seeds {', '.join(map(str, plan.seeds))}) of "
            f"the validation union accuracy {_WHEN[plan.search.objective]} (a fraction; the test split is never "
            "evaluated); intermediate value at step k = the running mean after every epoch, k = run index x "
            f"{plan.study.train.epochs} epochs + epoch")


def public_uri(uri: str) -> str:
    """A tracking URI without a ``user:password@`` part (study attributes are shown to anyone)."""
    return _CREDENTIALS.sub("//", uri)


def study_attrs(plan: SearchPlan, method: str, source: str, tracking_uri: str, experiment_id: str,
                trials: int) -> dict[str, Any]:
    """The Optuna study's user attributes (JSON values): the study file (resolved YAML), the search
    space searched (as written, or the declared one with the study's entries on top), what the
    value is, and where the MLflow runs are."""
    search = plan.search
    return {
        "objective": search.objective, "objective_name": METRIC_NAMES[search.objective],
        "objective_description": objective_text(plan), "direction": "maximize",
        "method": method, "study": plan.study.name, "study_file": source, "study_yaml": dump_study(plan.study),
        "search_space": {p: plan.space[p].model_dump(mode="json", exclude_defaults=True) for p in plan.paths[method]},
        "trials": trials, "splits": list(plan.splits), "seeds": list(plan.seeds),
        "sampler": search.sampler.model_dump(mode="json"), "pruner": search.pruner.model_dump(mode="json"),
        "mlflow_tracking_uri": public_uri(tracking_uri), "mlflow_experiment": plan.study.experiment_name,
        "mlflow_experiment_id": experiment_id,
    }


def label_study(study: optuna.Study, objective: str, attrs: dict[str, Any]) -> None:
    """Name the study's value and set the user attributes that differ (a resumed search whose
    study file is unchanged writes nothing)."""
    if study.metric_names != [METRIC_NAMES[objective]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAMES[objective]])
    have = study.user_attrs
    for k, v in attrs.items():
        if have.get(k) != v:
            study.set_user_attr(k, v)


def run_links(tracking_uri: str, experiment_id: str, run_id: str, parent_run_id: str = "") -> dict[str, str]:
    """A trial's user attributes that find its MLflow run: the id, the MLflow UI route (and the full
    URL when the tracking URI is an MLflow server) and the invocation's search run."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    out = {MLFLOW_RUN_ID: run_id, MLFLOW_EXPERIMENT_ID: experiment_id, MLFLOW_RUN_PATH: path}
    if tracking_uri.startswith(("http://", "https://")):
        out[MLFLOW_RUN_URL] = f"{public_uri(tracking_uri).rstrip('/')}/{path}"
    if parent_run_id:
        out[MLFLOW_PARENT_RUN_ID] = parent_run_id
    return out


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that use the budget: all but surplus ones and failures that were enqueued again."""
    replaced = {t.user_attrs.get(RETRY_OF) for t in trials}
    return [t for t in trials
            if not (t.state == TrialState.FAIL and (t.user_attrs.get(SURPLUS) or t.number in replaced))]


def budget_left(study: optuna.Study, trials: int) -> int:
    """Configurations still to start (waiting ones are started first and count as started)."""
    return trials - len(counted(study.get_trials(deepcopy=False)))


def has_waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


# -- the worker side -------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneJob:
    """One Optuna trial as a worker receives it: its MLflow run is already open."""

    study: StudyConfig  # restricted to the method, with the trial's values applied
    method: str
    params: dict[str, Any]
    units: list[tuple[int, int]]
    number: int
    trial_id: int
    storage: str
    optuna_study: str
    pruner: PrunerConfig
    objective: str
    tracking_uri: str
    experiment_id: str
    run_id: str


def validation_only(data: Any) -> Any:
    """The split without its test part (empty tensors): tuning never sees a test image."""
    from harness.data.splits import PartData, SplitData

    test = data.parts["test"]
    empty = PartData(test.x[:0], test.y[:0], test.t[:0])
    return SplitData(data.name, data.tasks, {**data.parts, "test": empty})


def run_tune_job(job: TuneJob, slot: Slot) -> dict[str, Any]:
    """Train the configuration on every (split, seed) in order; report the running objective
    after each epoch; stop early when the pruner says so. Returns state, values and step."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=job.optuna_study, storage=storage_for(job.storage),
                              pruner=make_pruner(job.pruner, job.study.train.epochs))
    otrial = optuna.trial.Trial(study, job.trial_id)
    tracker = Tracker(job.tracking_uri)
    running = tracker.buffered(job.run_id)
    try:
        return _train_units(job, slot, otrial, tracker, running)
    finally:
        running.flush()


def _train_units(job: TuneJob, slot: Slot, otrial: optuna.trial.Trial, tracker: Tracker, running: Any) -> dict:
    from harness.data.splits import build_split
    from harness.train import EarlyStop, effective_precision
    from harness.trial import execute_trial, open_trial_run

    epochs = job.study.train.epochs
    values: list[float] = []
    seed_runs: list[str] = []
    state = {"step": 0, "value": float("nan"), "last": float("nan")}
    for i, (si, seed) in enumerate(job.units):
        split = job.study.splits[si]
        data = validation_only(build_split(split, job.study.dataset, f"splits[{si}]"))
        precision = effective_precision(job.study.train, slot.device)
        key = trial_key(job.study, si, job.method, job.params, seed, precision)
        trial = Trial(job.study.name, split.name, job.method, f"optuna{job.number}", seed, job.params, key,
                      precision)
        tags = {KIND: KIND_TUNE_RUN, OPTUNA_STUDY: job.optuna_study,
                OPTUNA_NUMBER: job.number}
        run_id = open_trial_run(tracker, job.experiment_id, job.study, trial, parent_run_id=job.run_id,
                                extra_tags=tags)
        seed_runs.append(run_id)
        otrial.set_user_attr(MLFLOW_SEED_RUN_IDS, list(seed_runs))

        def report(epoch: int, metrics: dict[str, float], i: int = i) -> None:
            acc = metrics.get("val/union_acc", float("nan"))
            state["last"] = acc
            state["step"] = i * epochs + epoch
            state["value"] = (sum(values) + acc) / (i + 1)
            otrial.report(state["value"], state["step"])
            running.log({"objective/running": state["value"]}, step=state["step"])
            if otrial.should_prune():
                raise EarlyStop(f"at step {state['step']} (split {split.name}, seed {seed}, epoch {epoch}): "
                                f"running objective {state['value']:.4f}")

        try:
            final = execute_trial(job.study, trial, tracker, run_id, data=data, device=slot.device,
                                  extra_tags={SLOT: slot.name}, epoch_hook=report, diagnose=False)
        except EarlyStop as e:
            return {"state": "PRUNED", "values": values, "value": state["value"], "step": state["step"],
                    "reason": f"pruned {e}"}
        values.append(state["last"] if job.objective == "val_last" else final.get("val/union_acc_best", math.nan))
    return {"state": "COMPLETE", "values": values, "value": float(sum(values) / len(values)), "step": state["step"]}


# -- the coordinator -------------------------------------------------------------------------
@dataclass
class _Flight:
    method: str
    trial: optuna.trial.Trial
    run_id: str
    values: dict[str, Any]
    attempt: int
    started: float = field(default_factory=time.time)


class Search:
    """One ``harness tune`` invocation: keeps the pool busy until every method's budget is used."""

    def __init__(self, plan: SearchPlan, storage_spec: str, tracker: Tracker, experiment_id: str, pool: LocalPool,
                 trials: int, stale_after: float, storage: Any = None, source: str = "") -> None:
        self.plan, self.storage_spec, self.tracker, self.exp = plan, storage_spec, tracker, experiment_id
        self.pool, self.trials, self.stale_after = pool, trials, stale_after
        self.owner = f"{platform.node()}:{os.getpid()}"
        storage = storage if storage is not None else storage_for(storage_spec)
        self.pruner = make_pruner(plan.search.pruner, plan.study.train.epochs)
        self.studies = {m: open_search(storage, optuna_name(plan.study.name, m), plan, m, self.pruner,
                                       plan.search.sampler.seed) for m in plan.methods}
        for m, study in self.studies.items():
            label_study(study, plan.search.objective,
                        study_attrs(plan, m, source, tracker.uri, experiment_id, trials))
        self.parent = ""
        self.inflight: dict[str, _Flight] = {}
        self.context = WorkerContext.capture(warm=((warm_trial_worker, (tracker.uri, plan.study)),))
        self.provenance = git_tags()
        self._beat = time.time()

    # stale trials of dead invocations -----------------------------------------------------
    def fail_stale(self) -> int:
        """Fail RUNNING trials whose owner is gone and enqueue their configuration again."""
        n = 0
        host, pid = platform.node(), os.getpid()
        for method, study in self.studies.items():
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                owner = str(t.user_attrs.get(OWNER, ""))
                o_host, _, o_pid = owner.rpartition(":")
                beat = float(t.user_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else 0))
                dead_here = o_host == host and o_pid.isdigit() and int(o_pid) != pid and not process_alive(int(o_pid))
                if not (dead_here or time.time() - beat > self.stale_after):
                    continue
                why = f"stale: its process {owner or '?'} is gone" if dead_here else \
                    f"stale: no heartbeat for {time.time() - beat:.0f}s"
                try:
                    study.tell(t.number, state=TrialState.FAIL)
                except (RuntimeError, ValueError):  # another invocation settled it first
                    continue
                study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number, ATTEMPT: t.user_attrs.get(ATTEMPT, 0)})
                self._kill_runs(study.study_name, t.number, why)
                print(f"[{method} #{t.number}] {why}; its configuration is queued again")
                n += 1
        self._close_orphan_runs()
        return n

    def _close_orphan_runs(self) -> None:
        """MLflow runs left RUNNING by an invocation killed after Optuna recorded their trial's end
        (between ``tell`` and the run's end) take the state Optuna has."""
        by_name = {s.study_name: s for s in self.studies.values()}
        host = platform.node()
        for r in self.tracker.find(self.exp, {KIND: KIND_TUNE_TRIAL}, ("RUNNING",)):
            tags = r.data.tags
            study = by_name.get(tags.get(OPTUNA_STUDY, ""))
            if study is None:
                continue
            o_host, _, o_pid = tags.get(OWNER, "").rpartition(":")
            trials = {t.number: t for t in study.get_trials(deepcopy=False)}
            t = trials.get(int(tags.get(OPTUNA_NUMBER, -1)))
            if t is None or t.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            ended = t.datetime_complete.timestamp() if t.datetime_complete else 0.0
            gone = (o_host == host and o_pid.isdigit() and not process_alive(int(o_pid))) or time.time() - ended > self.stale_after
            if not gone:
                continue
            if t.state == TrialState.COMPLETE and t.value is not None:
                self.tracker.log_metrics(r.info.run_id, {"objective": t.value})
            self.tracker.finish_if_running(r.info.run_id, "FAILED" if t.state == TrialState.FAIL else "FINISHED",
                                           {OPTUNA_STATE: t.state.name})
            self._kill_runs(study.study_name, t.number, "stale: the search running it was killed")

    def _kill_runs(self, optuna_study: str, number: int, why: str) -> None:
        tags = {OPTUNA_STATE: "FAIL", FAILURE: why, FAILURE_KIND: why.split(":")[0]}
        for r in self.tracker.find(self.exp, {OPTUNA_STUDY: optuna_study, OPTUNA_NUMBER: str(number)},
                                   ("RUNNING",)):
            self.tracker.finish_if_running(r.info.run_id, "KILLED", tags)

    # the loop -----------------------------------------------------------------------------
    def next_method(self) -> str | None:
        for m, study in self.studies.items():
            if budget_left(study, self.trials) > 0 or has_waiting(study):
                return m
        return None

    def run(self) -> None:
        """Refill the pool, settle what ended, beat, until every method's budget is used
        (:func:`harness.dispatch.dispatch`, this search its job source). Each start, settle and
        heartbeat runs whole, so every trial asked of Optuna is in ``inflight`` or told; on a stop,
        the ones in flight fail and are queued again (:meth:`stopped`)."""
        dispatch(self.pool, self)

    # the job source of harness.dispatch ---------------------------------------------------
    def start_next(self) -> bool:
        if (method := self.next_method()) is None:
            return False
        self.start(method)
        return True

    def in_flight(self) -> int:
        return len(self.inflight)

    def tick(self) -> None:
        if time.time() - self._beat > HEARTBEAT_EVERY:
            self._beat = time.time()
            for f in self.inflight.values():
                f.trial.set_user_attr(HEARTBEAT, self._beat)

    def start(self, method: str) -> None:
        """Ask for a configuration, open its MLflow run and hand it to a worker. If anything stops
        this midway (Ctrl-C included), the trial fails and its configuration is queued again."""
        study = self.studies[method]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's note on a fixed value outside its range
            trial = study.ask({p: self.plan.distributions[p] for p in self.plan.paths[method]})
        try:
            trial.set_user_attr(OWNER, self.owner)
            trial.set_user_attr(HEARTBEAT, time.time())
            attrs = trial.user_attrs
            if RETRY_OF not in attrs and DEFAULT not in attrs and self._surplus(study, trial.number):
                trial.set_user_attr(SURPLUS, True)
                study.tell(trial, state=TrialState.FAIL)
                return
            run_id = self._open_run(method, trial)
            for k, v in run_links(self.tracker.uri, self.exp, run_id, self.parent).items():
                trial.set_user_attr(k, v)
            job = self._job(method, trial, run_id)
            self.pool.submit(run_id, run_tune_job, job, self.context)
        except BaseException as e:
            if trial.number not in [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]:
                raise
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number,
                                                                ATTEMPT: trial.user_attrs.get(ATTEMPT, 0)})
            # its MLflow run, if created (maybe before ``run_id`` was assigned)
            self._kill_runs(study.study_name, trial.number, f"interrupted: not started ({type(e).__name__})")
            raise
        self.inflight[run_id] = _Flight(method, trial, run_id, dict(trial.params), int(attrs.get(ATTEMPT, 0)))

    def _open_run(self, method: str, trial: optuna.trial.Trial) -> str:
        """The Optuna trial's MLflow run (RUNNING), a child of this invocation's search run."""
        plan, attrs = self.plan, trial.user_attrs
        values = dict(trial.params)
        dists = {p: optuna.distributions.distribution_to_json(plan.distributions[p]) for p in plan.paths[method]}
        tags = {
            KIND: KIND_TUNE_TRIAL, STUDY: plan.study.name, METHOD: method,
            OPTUNA_STUDY: self.studies[method].study_name, OPTUNA_NUMBER: trial.number,
            OPTUNA_STATE: "RUNNING", OPTUNA_DEFAULT: str(bool(attrs.get(DEFAULT))).lower(),
            OPTUNA_PARAMS: json.dumps(values), OPTUNA_DISTRIBUTIONS: json.dumps(dists),
            OBJECTIVE: plan.search.objective, OWNER: self.owner,
            **({RETRY_OF: attrs[RETRY_OF]} if RETRY_OF in attrs else {}), **self.provenance,
        }
        return self.tracker.start(self.exp, f"{method}/optuna{trial.number}", tags, values, self.parent)

    def _job(self, method: str, trial: optuna.trial.Trial, run_id: str) -> TuneJob:
        plan = self.plan
        cfg = plan.study_for(method, dict(trial.params))
        return TuneJob(cfg, method, plan.params_for(method, cfg), plan.units(), trial.number, trial._trial_id,
                       self.storage_spec, self.studies[method].study_name, plan.search.pruner, plan.search.objective,
                       self.tracker.uri, self.exp, run_id)

    def _surplus(self, study: optuna.Study, number: int) -> bool:
        """True when earlier trials (of any invocation) already use the whole budget."""
        before = [t for t in study.get_trials(deepcopy=False) if t.number < number]
        return len(counted(before)) >= self.trials

    def settle(self, out: Outcome) -> None:
        f = self.inflight.pop(out.key)
        study = self.studies[f.method]
        seconds = time.time() - f.started
        tag = f"[{f.method} #{f.trial.number}]"
        if out.ok and out.result["state"] == "COMPLETE":
            value = out.result["value"]
            study.tell(f.trial, value)
            self._end_run(f, "COMPLETE", value, seconds)
            best = study.best_trial
            print(f"{tag} {value:.4f} in {seconds:.0f}s (best {best.value:.4f}, #{best.number})")
            return
        if out.ok:  # pruned
            study.tell(f.trial, state=TrialState.PRUNED)
            self._end_run(f, "PRUNED", out.result["value"], seconds, {PRUNED: out.result["reason"]})
            print(f"{tag} {out.result['reason']}")
            return
        retry = out.kind == "worker_died" and f.attempt < self.plan.search.retries
        f.trial.set_user_attr(FAILURE, out.error[:500])
        study.tell(f.trial, state=TrialState.FAIL)
        if retry:
            study.enqueue_trial(f.values, user_attrs={RETRY_OF: f.trial.number, ATTEMPT: f.attempt + 1})
        self._end_run(f, "FAIL", math.nan, seconds, {FAILURE: out.error, FAILURE_KIND: out.kind})
        print(f"{tag} failed: {out.error}{' (queued again)' if retry else ''}")

    def _end_run(self, f: _Flight, state: str, value: float, seconds: float, tags: dict[str, Any] | None = None,
                 status: str | None = None) -> None:
        if math.isfinite(value):
            self.tracker.log_metrics(f.run_id, {"objective": value})
        self.tracker.log_metrics(f.run_id, {"trial_seconds": seconds})
        self.tracker.set_tags(f.run_id, {OPTUNA_STATE: state, **(tags or {})})
        for r in self.tracker.find(self.exp, {OPTUNA_STUDY: self.studies[f.method].study_name,
                                              OPTUNA_NUMBER: str(f.trial.number), KIND: KIND_TUNE_RUN},
                                   ("RUNNING",)):  # seed runs of a worker that died
            self.tracker.finish_if_running(r.info.run_id, "FAILED" if state == "FAIL" and status != "KILLED" else "KILLED",
                                           tags)
        self.tracker.finish(f.run_id, status or ("FAILED" if state == "FAIL" else "FINISHED"))

    def stopped(self, keys: list[str]) -> None:
        """The pool was stopped: the trials in flight fail and are queued again for the next
        invocation, their runs end KILLED."""
        for f in list(self.inflight.values()):
            study = self.studies[f.method]
            try:
                study.tell(f.trial, state=TrialState.FAIL)
                study.enqueue_trial(f.values, user_attrs={RETRY_OF: f.trial.number, ATTEMPT: f.attempt})
            finally:
                tags = {FAILURE: "interrupted: the search was stopped", FAILURE_KIND: "interrupted"}
                self._end_run(f, "FAIL", math.nan, time.time() - f.started, tags, status="KILLED")
        self.inflight.clear()


# -- output ----------------------------------------------------------------------------------
def best_trials(studies: dict[str, optuna.Study]) -> dict[str, FrozenTrial | None]:
    """Each method's best COMPLETE trial (the lowest number among equal values), or None."""
    out: dict[str, FrozenTrial | None] = {}
    for m, study in studies.items():
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
        out[m] = max(done, key=lambda t: (t.value, -t.number)) if done else None
    return out


def tuned_study(plan: SearchPlan, best: dict[str, FrozenTrial], base: StudyConfig | None = None) -> StudyConfig:
    """The study (or ``base``) with every tuned method's best values, named ``<name>-tuned``, no
    search block."""
    from harness.search import apply_params

    values: dict[str, Any] = {}
    for t in best.values():
        values.update(t.params)
    tuned = apply_params(base or plan.study, values, "tuned study")
    return tuned.model_copy(update={"name": f"{plan.study.name}-tuned", "search": None})


def tuned_paths(plan: SearchPlan, path: Path) -> dict[str, Path]:
    """Where the tuned study goes, per tuned method: ``path`` for every method, or, when each
    method tuned its own recipe (:attr:`SearchPlan.per_method`), ``<stem>.<method>.yaml`` each."""
    if not plan.per_method:
        return {m: path for m in plan.methods}
    stem = str(path)[:-len(path.suffix)] if path.suffix in (".yaml", ".yml") else str(path)
    return {m: Path(f"{stem}.{m}.yaml") for m in plan.methods}


def write_tuned(plan: SearchPlan, studies: dict[str, optuna.Study], best: dict[str, FrozenTrial], path: Path,
                source: str, storage: str) -> list[Path]:
    """Write the tuned study file (atomically), with a header saying where each value came from;
    one file per method when each tuned its own recipe (:func:`tuned_paths`). Returns the files."""
    paths = tuned_paths(plan, path)
    if not plan.per_method:
        _write_tuned(plan, studies, best, path, source, storage, f"{plan.study.name}-tuned", plan.study)
        return [path]
    for m, p in paths.items():  # each the study restricted to its method
        _write_tuned(plan, {m: studies[m]}, {m: best[m]}, p, source, storage, f"{plan.study.name}-tuned-{m}",
                     plan.study_for(m, {}))
    return list(paths.values())


def _write_tuned(plan: SearchPlan, studies: dict[str, optuna.Study], best: dict[str, FrozenTrial], path: Path,
                 source: str, storage: str, name: str, base: StudyConfig) -> None:
    lines = [f"# Tuned by `harness tune {source}` on {time.strftime('%Y-%m-%d %H:%M')}",
             f"# Optuna storage: {storage}; objective: {plan.search.objective} (validation union accuracy, "
             f"mean over splits {', '.join(plan.splits)} and seeds {', '.join(map(str, plan.seeds))})"]
    for m, t in best.items():
        trials = studies[m].get_trials(deepcopy=False)
        default = next((x for x in trials if x.user_attrs.get(DEFAULT) and x.state == TrialState.COMPLETE), None)
        states = {s.name: sum(x.state == s for x in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED)}
        dflt = f"{default.value:.4f}" if default is not None else "n/a"
        lines.append(f"# {m}: best trial #{t.number} {t.value:.4f} (default {dflt}); "
                     f"{states['COMPLETE']} complete, {states['PRUNED']} pruned; "
                     + ", ".join(f"{k}={v!r}" for k, v in t.params.items()))
    tuned = tuned_study(plan, best, base).model_copy(update={"name": name})
    text = "\n".join(lines) + "\n" + dump_study(tuned)
    load_check = Path(str(path) + f".tmp{os.getpid()}")
    load_check.write_text(text)
    try:
        load_study(load_check)  # the file must be a valid study as is
    except BaseException:
        load_check.unlink()
        raise
    os.replace(load_check, path)


def default_storage(study: StudyConfig) -> str:
    return str(Path("results") / study.name / "tune.journal")


def tune(
    path: str | Path, storage: str | None = None, workers: int | None = None, tracking_uri: str | None = None,
    trials: int | None = None, out: str | Path | None = None, stale_after: float = 300.0, report: bool = True,
    backend: str = "local", slurm: dict[str, Any] | None = None,
) -> int:
    """Run (or resume, or join) the study's search; 0 when every tuned method has a best trial.

    ``backend="slurm"``: ``workers`` Slurm jobs join the search instead (:func:`tune_on_slurm`)."""
    if backend == "slurm":
        return tune_on_slurm(path, storage, workers, tracking_uri, trials, out, stale_after, report, slurm)
    if backend != "local":
        raise HarnessError(f"--backend must be local or slurm, got {backend!r}")
    if slurm:
        raise HarnessError(f"{'--slurm-' + next(iter(slurm)).replace('_', '-')} needs --backend slurm")
    study = load_study(path)
    plan = SearchPlan(study)
    make_sampler(plan.search.sampler, plan.search.sampler.seed)  # option errors before anything is created
    make_pruner(plan.search.pruner, study.train.epochs)
    splits = build_splits(study)
    budget = trials or plan.search.trials
    pool = LocalPool(build_slots(study.devices, study.trials_per_device), workers, preload=PRELOAD + ("harness.tune",))
    storage_spec = storage or default_storage(study)
    opened = open_storage(storage_spec)  # a bad --storage is an error before any MLflow store exists
    out_path = Path(out) if out else Path(path).with_name(f"{study.name}.tuned.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment(study.experiment_name)
    assert exp is not None
    search = Search(plan, storage_spec, tracker, exp, pool, budget, stale_after, opened, source=str(path))
    try:
        pool.warm()
        stale = search.fail_stale()
        left = {m: budget_left(s, budget) for m, s in search.studies.items()}
        print(f"search {study.name}: methods {', '.join(plan.methods)}, {budget} trials each "
              f"({', '.join(f'{m}: {n} to start' for m, n in left.items())}"
              f"{f'; {stale} stale trials queued again' if stale else ''}); storage {storage_spec}; "
              f"tracking at {tracker.uri}")
        print(f"pool: {pool.describe()}; each trial trains {len(plan.units())} run(s) "
              f"(splits {', '.join(plan.splits)} x seeds {', '.join(map(str, plan.seeds))})")
        search.parent = tracker.start(exp, f"search/{time.strftime('%Y%m%d-%H%M%S')}", {
            **InvocationRunTags(KIND_SEARCH, study.name, platform.node(), os.getpid(), pool=pool.describe()).to_tags(),
            STORAGE: storage_spec, OPTUNA_STUDIES: ",".join(s.study_name for s in search.studies.values()),
            **search.provenance, **version_tags(),
        })
        from harness.trial import prepare_teachers, study_split_dataset, teacher_seeds_of

        try:  # the splits' dataset inputs before any trial logs them (concurrent writers: tracking._retry)
            tracker.log_inputs(search.parent, [study_split_dataset(study, n, str(path)) for n in plan.splits])
            for name in plan.splits:
                for seed in teacher_seeds_of(study, plan.seeds):  # one set, or one per seed (per_seed)
                    prepare_teachers(study, splits[name], tracker, exp, device=pool.teacher_device, seed=seed)
            with sigterm_as_interrupt():
                search.run()
        except BaseException as e:
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"[:500]
            tracker.set_tags(search.parent, {FAILURE: reason})
            tracker.finish(search.parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    finally:
        pool.close()
    best = best_trials(search.studies)
    tracker.log_metrics(search.parent, {f"best/{m}": t.value for m, t in best.items() if t is not None})
    tracker.finish(search.parent)
    missing = [m for m, t in best.items() if t is None]
    if missing:
        print(f"no complete trial for {', '.join(missing)}: no tuned study written")
        return 1
    for written in write_tuned(plan, search.studies, best, out_path, str(path), storage_spec):  # type: ignore[arg-type]
        print(f"tuned study written to {written}")
    if report:
        _print_report(study.name, tracker.uri, study.experiment)
    return 0


def _print_report(name: str, uri: str, experiment: str | None = None) -> None:
    """Build the study's report (its tuning section included) when the report extra is importable."""
    try:
        from harness.report.build import build_report
    except ImportError:
        return
    from harness.report.reproduce import committed_line

    out = build_report(name, tracking_uri=uri, experiment=experiment)
    print(f"report written to {out}")
    if (line := committed_line(out)) is not None:  # over a committed report (digits-tune): does it reproduce?
        print(line)


# -- searches on Slurm -----------------------------------------------------------------------
@dataclass(frozen=True)
class TuneWorker:
    """What one Slurm job of a search runs: :func:`tune` on one slot, joining the shared storage."""

    path: str
    storage: str
    tracking_uri: str
    trials: int | None
    out: str
    stale_after: float


def run_tune_worker(job: TuneWorker, slot: Slot) -> int:
    """Job side: this job's own search loop, one trial at a time, on the shared storage (the
    stale-trial rules hold between jobs as between invocations: same host and process gone, or
    no heartbeat for ``stale_after`` seconds); its exit code."""
    return tune(job.path, storage=job.storage, workers=1, tracking_uri=job.tracking_uri, trials=job.trials,
                out=job.out, stale_after=job.stale_after, report=False)


def shared_storage(spec: str) -> str:
    """A storage every node reaches at the same name: a journal path made absolute (it must be
    on a shared file system), an RDB URL as is (a relative ``sqlite:///`` file resolves in the
    runner's directory, where the jobs run)."""
    return spec if "://" in spec else str(Path(spec).resolve())


def tune_on_slurm(
    path: str | Path, storage: str | None, workers: int | None, tracking_uri: str | None, trials: int | None,
    out: str | Path | None, stale_after: float, report: bool, slurm: dict[str, Any] | None,
) -> int:
    """``harness tune --backend slurm --workers N``: each split's teachers as a job, then N jobs
    (one array) that each run the search loop of :func:`tune` on the same Optuna storage until
    the budget is spent; then the tuned study (written by the last job to finish) and the
    report. 0 when every job ended with every tuned method's best trial."""
    from harness.config import slurm_config
    from harness.scheduler import SlurmPool, TeacherJob, check_slurm, run_teacher_job
    from harness.trial import teacher_seeds_of

    study = load_study(path)
    plan = SearchPlan(study)
    make_sampler(plan.search.sampler, plan.search.sampler.seed)  # option errors before anything is created
    make_pruner(plan.search.pruner, study.train.epochs)
    cfg = slurm_config(study, slurm)
    check_slurm(cfg)
    n = workers or 1
    storage_spec = shared_storage(storage or default_storage(study))
    open_storage(storage_spec)  # a bad --storage is an error before any job or MLflow store exists
    out_path = (Path(out) if out else Path(path).with_name(f"{study.name}.tuned.yaml")).resolve()
    tracker = Tracker(tracking_uri)
    exp = tracker.experiment(study.experiment_name)
    assert exp is not None
    pool = SlurmPool(cfg.model_copy(update={"array_parallelism": n}), study.name, check=False)
    ctx = WorkerContext.capture()
    started = time.time()
    try:
        teachers = [(name, TeacherJob(study, name, tuple(teacher_seeds_of(study, plan.seeds)), tracker.uri, exp))
                    for name in plan.splits]
        for (name, _), job_id in zip(teachers, pool.submit_teachers(teachers, run_teacher_job, ctx)):
            print(f"teachers of {name}: Slurm job {job_id}")
        job = TuneWorker(str(Path(path).resolve()), storage_spec, tracker.uri, trials, str(out_path), stale_after)
        for i in range(n):
            pool.submit(f"worker {i}", run_tune_worker, job, ctx)
        sub = pool.flush()
        assert sub is not None
        print(f"search {study.name}: {n} Slurm jobs (array {sub.job_id}) on storage {storage_spec}; "
              f"tracking at {tracker.uri}")
        codes: list[int] = []
        with sigterm_as_interrupt():
            while len(codes) < n:
                for o in pool.wait(timeout=5.0):
                    codes.append(o.result if o.ok else 1)
                    print(f"{o.key}: {'done' if o.ok else o.error}" + (f" (exit code {o.result})" if o.ok else ""))
    finally:
        pool.close()  # cancels what still runs (Ctrl-C)
    written = list(tuned_paths(plan, out_path).values())
    if any(codes) or any(not p.exists() or p.stat().st_mtime < started for p in written):
        print("the search is not complete: no tuned study from these jobs")
        return 1
    for p in dict.fromkeys(written):
        print(f"tuned study written to {p}")
    if report:
        _print_report(study.name, tracker.uri, study.experiment)
    return 0
