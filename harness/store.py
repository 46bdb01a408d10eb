"""The schema of the MLflow store: the name of every ``harness.*`` tag the harness writes or
reads, the run kinds, the artifact names, and the Optuna user attributes named ``harness.*``.

One constant per name, grouped by the runs that carry it (a name carried by several kinds is
defined once, in the group of the first, and its comment says where else). Every module of
``harness/`` and ``baselines/`` spells a tag through these: ``tests/test_store_schema.py`` fails
on a ``"harness.xxx"`` string or an ``f"{TAG}xxx"`` anywhere else. What the runs are and how they
hang together: the docstring of :mod:`harness.tracking` and docs/mlflow.md.

A ground-floor module (docs/layers.md): it imports nothing, so the report, the status and the
results API read the store by these names without torch (and this module without mlflow).
"""

from __future__ import annotations

#: the prefix of every tag the harness writes (MLflow's own are ``mlflow.*``)
TAG = "harness."

# -- run kinds: the values of KIND ------------------------------------------------------------
KIND_STUDY = "study"  # one ``run-study`` invocation: parent of its trial runs and teacher stage
KIND_TEACHER_STAGE = "teacher_stage"  # "teacher training": parent of an invocation's teacher runs
KIND_TEACHER = "teacher"  # one teacher (per teacher key, weights and split)
KIND_TRIAL = "trial"  # one student trial: a method variant on one split with one seed
KIND_SEARCH = "search"  # one ``harness tune`` invocation: parent of its tune_trial runs
KIND_TUNE_TRIAL = "tune_trial"  # one Optuna trial (one configuration of one method)
KIND_TUNE_RUN = "tune_run"  # one (split, seed) run of a tune_trial, trained like a trial
KIND_BENCH = "bench"  # ``harness bench``'s store-overhead run (a throwaway store)
KIND_BENCHMARK = "benchmark"  # one ``harness benchmark`` invocation: metrics ``phase_seconds/<phase>``

# -- every run kind ---------------------------------------------------------------------------
KIND = TAG + "kind"  # the run kind: one of the KIND_* values above
STUDY = TAG + "study"  # the study's name (every run but tune_run's own; also an experiment tag)

# -- the study's experiment (experiment tags) -------------------------------------------------
DATASET = TAG + "dataset"  # the study's data set name
SPLITS = TAG + "splits"  # the study's split names, comma-joined
METHODS = TAG + "methods"  # the study's methods, comma-joined
SEEDS = TAG + "seeds"  # the study's seeds, comma-joined

# -- study runs (KIND_STUDY) ------------------------------------------------------------------
RUN = TAG + "run"  # the older full run name: ``study/<time>``; trials ``2x5/kd/seed0``; teachers ``2x5/teacher0``
HOST = TAG + "host"  # the machine that ran it (also search runs, and trial runs: where the trial ran)
RUNNER_PID = TAG + "runner_pid"  # pid of the runner process (also search runs): a live one is not stale
BACKEND = TAG + "backend"  # the backend the invocation ran on: ``local``, ``ray`` or ``slurm``
POOL = TAG + "pool"  # study and search runs: the device pool; trial runs: what the student learned from
DETACHED = TAG + "detached"  # ``true`` when a Slurm submission returned before its jobs ended
SLURM_JOBS = TAG + "slurm_jobs"  # the Slurm jobs a detached submission left running
FAILURE = TAG + "failure"  # why the run did not finish (every kind; also the Optuna trial's user attribute)

# -- teacher-stage runs (KIND_TEACHER_STAGE): KIND and STUDY only -----------------------------

# -- teacher runs (KIND_TEACHER); also SPLIT, METHOD, VARIANT, CONFIG, USES_LABELS below -------
TASK = TAG + "task"  # the teacher's task index in its split
TEACHER_KEY = TAG + "teacher_key"  # the teacher's cache key (hash of everything that determines it)
TEACHER_DIGEST = TAG + "teacher_digest"  # sha256 of the teacher's weights
TEACHER_SEED = TAG + "teacher_seed"  # the seed the teacher trained with
CACHED = TAG + "cached"  # ``true`` when the teacher was loaded from the cache, not trained

# -- trial runs (KIND_TRIAL, and KIND_TUNE_RUN: trained the same way) ---------------------------
SPLIT = TAG + "split"  # the split's name (also teacher runs)
METHOD = TAG + "method"  # the method (teacher runs: ``teacher``; also tune_trial runs)
VARIANT = TAG + "variant"  # ``full``, ``-intra`` (ablation) or a named variant (also teacher runs)
CONFIG = TAG + "config"  # what group-by averages over seeds: ``kd:full``, ``cka-intra`` (also teacher runs)
SEED = TAG + "seed"  # the student seed
TRIAL_KEY = TAG + "trial_key"  # hash of everything that determines the trial's numbers (harness.keys)
USES_LABELS = TAG + "uses_labels"  # ``true`` when the method learns from labels (also teacher runs)
SEEDED = TAG + "seeded"  # ``false`` when the result cannot depend on the seed (runs once per split)
TEACHER_KEYS = TAG + "teacher_keys"  # the trial's teachers' cache keys, comma-joined in task order
TEACHER_DIGESTS = TAG + "teacher_digests"  # the trial's teachers' weight digests, comma-joined in task order
PRECISION = TAG + "precision"  # ``fp32``/``bf16``: the arithmetic the trial really trained in
DETERMINISTIC = TAG + "deterministic"  # ``true``/``false``: deterministic algorithms really on
PID = TAG + "pid"  # pid of the worker process that ran the trial
DEVICE = TAG + "device"  # the device the trial ran on (``cpu``, ``cuda:0``)
SLOT = TAG + "slot"  # the pool slot the trial ran in
START = TAG + "start"  # when the trial started (ISO-8601 UTC; older runs: unix seconds)
END = TAG + "end"  # when the trial ended (ISO-8601 UTC; older runs: unix seconds)
ATTEMPT = TAG + "attempt"  # 0 for the first try, then each retry (also the Optuna trial's user attribute)
FAILURE_KIND = TAG + "failure_kind"  # ``exception``, ``nonfinite``, ``oom``, ``worker_died``, ``stale`` ...
TRACEBACK = TAG + "traceback"  # the last 4000 characters of the failure's traceback
SLURM_JOB = TAG + "slurm_job"  # the Slurm job that ran it: ``12_3`` (array job 12, index 3) or ``12``
SLURM_JOB_ID = TAG + "slurm_job_id"  # the Slurm job id (``12``)
SLURM_ARRAY_INDEX = TAG + "slurm_array_index"  # the index in the Slurm array job, "" for a single job
SLURM_RESTARTS = TAG + "slurm_restarts"  # how often Slurm requeued the job (only when it did)

# -- trial runs of one method: what really ran (Method.run_tags) -------------------------------
CFL_SPACE = TAG + "cfl_space"  # cfl: the space its loss ran in (and why, after a fallback)
CRD_NEGATIVES = TAG + "crd_negatives"  # crd: which negatives ran (drawn, every other row, batch)

# -- provenance (trial, study, search and tune_trial runs) ---------------------------------------
VERSION = TAG + "version"  # the harness's version (ka-harness)
TORCH_VERSION = TAG + "torch_version"  # torch's version
MLFLOW_VERSION = TAG + "mlflow_version"  # mlflow's version
NUMPY_VERSION = TAG + "numpy_version"  # numpy's version
PYTHON_VERSION = TAG + "python_version"  # Python's version
GIT_COMMIT = TAG + "git_commit"  # the harness checkout's commit ("" outside a git checkout)
GIT_DIRTY = TAG + "git_dirty"  # ``true`` when that checkout had uncommitted changes

#: the provenance tags by the report's column names (``harness.results``, the tuning tables)
PROVENANCE_TAGS = {
    "version": VERSION, "torch_version": TORCH_VERSION, "mlflow_version": MLFLOW_VERSION,
    "numpy_version": NUMPY_VERSION, "python_version": PYTHON_VERSION, "git_commit": GIT_COMMIT,
    "git_dirty": GIT_DIRTY,
}

# -- search runs (KIND_SEARCH); also HOST, RUNNER_PID, POOL, FAILURE --------------------------------
STORAGE = TAG + "storage"  # the Optuna storage searched (a journal file or an RDB URL)
OPTUNA_STUDIES = TAG + "optuna_studies"  # the Optuna studies searched, comma-joined

# -- benchmark runs (KIND_BENCHMARK); also HOST, RUNNER_PID, FAILURE -----------------------------------
SUITE = TAG + "suite"  # the benchmark suite's name (its experiment)
PHASES = TAG + "phases"  # the phases this invocation was asked to run, comma-joined

# -- tune_trial runs (KIND_TUNE_TRIAL); tune_run runs carry OPTUNA_STUDY and OPTUNA_NUMBER too -------
OPTUNA_STUDY = TAG + "optuna_study"  # the Optuna study's name (``<study>/<method>``)
OPTUNA_NUMBER = TAG + "optuna_number"  # the Optuna trial's number
OPTUNA_STATE = TAG + "optuna_state"  # the Optuna trial's state: RUNNING, COMPLETE, PRUNED or FAIL
OPTUNA_DEFAULT = TAG + "optuna_default"  # ``true`` for the trial of the study's own values
OPTUNA_PARAMS = TAG + "optuna_params"  # the configuration (JSON: parameter path -> value)
OPTUNA_DISTRIBUTIONS = TAG + "optuna_distributions"  # the space it was drawn from (JSON, Optuna's form)
OBJECTIVE = TAG + "objective"  # what the value is: ``search.objective`` (``val_last``, ``val_best``)
OWNER = TAG + "owner"  # ``host:pid`` of the search running it (also the Optuna trial's user attribute)
RETRY_OF = TAG + "retry_of"  # the number of the failed trial this one reruns (also a user attribute)
PRUNED = TAG + "pruned"  # why the pruner stopped it (where, and the running objective)

# -- Optuna trials' user attributes (besides OWNER, RETRY_OF, ATTEMPT, FAILURE above) ----------------
HEARTBEAT = TAG + "heartbeat"  # unix time of the running search's last sign of life
DEFAULT = TAG + "default"  # True on the trial enqueued with the study's own values
SURPLUS = TAG + "surplus"  # True on a trial asked for beyond the budget (failed at once, never run)

# -- the split's dataset input -----------------------------------------------------------------------
STUDY_FILE = TAG + "study_file"  # the dataset source's key when the study file is not known

# -- artifacts ----------------------------------------------------------------------------------------
STUDY_ARTIFACT = "study.yaml"  # study runs: the resolved study
SOURCE_ARTIFACT = "study_source.yaml"  # study runs: the study file as written (comments kept)
TRIAL_KEYS_ARTIFACT = "trial_keys.json"  # study runs: the keys of the whole study as run (its report's scope)
REPORT_ARTIFACTS = "report"  # study runs: the folder ``harness report`` logs its files in
TRIAL_ARTIFACT = "trial.yaml"  # trial runs: the trial's resolved config


def probe_tag(group: int, i: int) -> str:
    """A filler tag of ``harness estimate``'s store probe (a throwaway store): ``harness.t<group>_<i>``."""
    return f"{TAG}t{group}_{i}"
