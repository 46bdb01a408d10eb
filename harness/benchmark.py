"""``harness benchmark SUITE.yaml``: every method tuned with the same budget on the validation
split, then evaluated on fresh seeds beside its defaults, with verdicts that say when a
difference is not resolved.

A suite (:class:`SuiteConfig`) lists tasks (a study file or an inline study, and one of its
splits), the methods, the tuning budget and two disjoint sets of seeds. Each task becomes study
files written under ``results/<suite>/studies/`` (readable, and runnable by hand with
``harness tune`` / ``harness run-study``), all logging into the suite's one MLflow experiment
(the studies' ``experiment:``). The phases, in order, each resumable by running the command again
(finished work is found by trial key in MLflow and by trial state in the Optuna storage):

1. **tune**: per task one search (``harness tune``) over every tuned method, ``scratch`` (the
   normaliser) included: each method searches its declared space plus the recipe space
   (``search.declared``), with the same number of counted trials, the same seeded sampler and
   pruner, on the tuning seeds, scored on the validation split only (the test split is removed
   from the data before training); one Optuna study ``<task>/<method>`` each, in the suite's
   journal ``results/<suite>/tune.journal``;
2. **evaluate**: each method's best configuration per task (the best COMPLETE trial, as
   ``harness tune`` picks it), run by ``harness run-study`` on the evaluation seeds with the
   task's ablations and routing rules;
3. **defaults**: every method at its declared defaults (what the suite fixes, nothing else) on the
   same evaluation seeds, with the teachers' reference rows;
4. **report**: the leaderboard over the tuned configurations and the one over the defaults
   (:mod:`harness.report.leaderboard`: verdicts, tasks needed, ablations), the chosen
   configuration per method and task, and the budget actually spent, read from the Optuna storage
   (:mod:`harness.report.benchmark`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.config import StudyConfig, dump_study, format_validation_error, parse_study, read_yaml
from harness.errors import HarnessError
from harness.search_schema import PrunerConfig, SamplerConfig

PHASES = ("tune", "evaluate", "defaults", "report")
NAME = r"^[A-Za-z0-9_.\-]+$"
#: rows every task has besides the suite's methods: the supervised normaliser and the teachers
SCRATCH, TEACHERS = "scratch", "teachers"
MIN_EVAL_SEEDS = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """One task: a split of a study (a file, relative to the suite file, or an inline mapping)."""

    #: default: ``<study name>-<split>``
    name: str | None = Field(None, pattern=NAME)
    study: Union[str, dict[str, Any]]
    #: default: the study's only split (a study with several needs it named)
    split: str | None = None


class BudgetConfig(_Strict):
    """What every (method, task) search gets: the same for all."""

    trials: int = Field(8, ge=1)
    #: search the recipe (``train.lr``, ``train.lr_mult.head``) too, per method
    recipe: bool = True
    objective: Literal["val_last", "val_best"] = "val_last"
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    retries: int = Field(1, ge=0)


class SeedsConfig(_Strict):
    tune: list[int] = Field([0], min_length=1)
    #: fresh seeds for the evaluation and defaults phases, disjoint from ``tune``
    evaluate: list[int] = Field([100, 101, 102, 103, 104], min_length=MIN_EVAL_SEEDS)

    @model_validator(mode="after")
    def _disjoint(self) -> "SeedsConfig":
        for name, seeds in (("tune", self.tune), ("evaluate", self.evaluate)):
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds.{name}: seeds must be unique")
        both = sorted(set(self.tune) & set(self.evaluate))
        if both:
            raise ValueError(f"seeds.evaluate: seed {both[0]} is also a tuning seed; evaluation seeds must be "
                             "fresh (disjoint from seeds.tune)")
        return self


class SuiteConfig(_Strict):
    """A benchmark suite (see the module docstring)."""

    name: str = Field(min_length=1, pattern=NAME)
    tasks: list[TaskSpec] = Field(min_length=1)
    #: the compared methods, each with the parameters the suite fixes (also in the defaults; a
    #: declared tunable one is then searched over that one value only); ``scratch`` and
    #: ``teachers`` are always added
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    #: CKA's ablations evaluated at its tuned configuration (default: each task study's own)
    ablations: list[str] | None = None
    #: routing rules evaluated as variants (default: each task study's own)
    routing: list[str] | None = None
    #: overrides of every task's ``train`` block (e.g. ``epochs``), before tuning
    train: dict[str, Any] = {}
    budget: BudgetConfig = BudgetConfig()
    seeds: SeedsConfig = SeedsConfig()

    @model_validator(mode="before")
    @classmethod
    def _drop_extensions(cls, data: Any) -> Any:
        """Top-level ``x-*`` keys hold YAML anchors shared by the tasks (as in docker-compose)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
        return data

    @field_validator("methods", mode="before")
    @classmethod
    def _listed(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(set(map(str, v))) != len(v):
                raise ValueError("a method is listed twice")
            return {m: {} for m in v}
        if isinstance(v, dict):
            return {k: ({} if p is None else p) for k, p in v.items()}
        return v


def load_suite(path: str | Path) -> SuiteConfig:
    """Read and validate a suite file (``yaml.safe_load``); one line naming the field on any error."""
    p = Path(path)
    data = read_yaml(p, "suite")
    if not isinstance(data, dict):
        raise HarnessError(f"{p}: the suite file must be a YAML mapping of fields")
    try:
        return SuiteConfig.model_validate(data)
    except ValidationError as e:
        raise HarnessError(format_validation_error(e, str(p))) from None


# -- the studies of a task -----------------------------------------------------------------------
class Task:
    """One task of a suite: its base study (one split, the suite's methods) and the study of
    each phase, with the files they are written to."""

    def __init__(self, suite: SuiteConfig, index: int, spec: TaskSpec, suite_dir: Path, out: Path) -> None:
        from harness.methods.base import get_method

        where = f"tasks[{index}]"
        base = _task_study(spec, suite_dir, where)
        names = [s.name for s in base.splits]
        if spec.split is None and len(names) > 1:
            raise HarnessError(f"{where}.split: study '{base.name}' has splits {', '.join(names)}; name one")
        split_name = spec.split or names[0]
        if split_name not in names:
            raise HarnessError(f"{where}.split: no split '{split_name}' in study '{base.name}' "
                               f"(splits: {', '.join(names)})")
        self.name = spec.name or f"{base.name}-{split_name}"
        if re.match(NAME, self.name) is None:
            raise HarnessError(f"{where}.name: '{self.name}' may use letters, digits, '_', '.' and '-' only; name it")
        methods: dict[str, dict[str, Any]] = {}
        for i, (m, fixed) in enumerate(suite.methods.items()):
            try:
                get_method(m)
            except HarnessError as e:
                raise HarnessError(f"methods.{m}: {e}") from None
            methods[m] = dict(fixed)
        methods.setdefault(SCRATCH, {})
        methods.setdefault(TEACHERS, {})
        self.tuned = [m for m in methods if get_method(m).trains]
        data = base.model_dump(mode="json")
        data["train"] = {**data["train"], **suite.train}
        ablations = suite.ablations if suite.ablations is not None else list(base.ablations)
        data.update(name=self.name, experiment=suite.name, splits=[s for s in data["splits"] if s["name"] == split_name],
                    methods=methods, variants={}, search=None,
                    routing=suite.routing if suite.routing is not None else list(base.routing),
                    ablations=[a for a in ablations if any(
                        all(p in get_method(m).ablations for p in a.split("+")) for m in methods)])
        self.data = data
        self.where = where
        self.dir = out / "studies"
        #: the defaults phase: every method at the parameters the suite fixes, evaluation seeds
        self.defaults = self._study({**data, "seeds": suite.seeds.evaluate}, "defaults")
        b = suite.budget
        from harness.search import declared_space

        # a parameter the suite fixes stays fixed: a one-choice distribution where it is declared
        pinned = {path: {"type": "categorical", "choices": [value]} for m in self.tuned
                  for p, value in methods[m].items()
                  if (path := f"methods.{m}.{p}") in declared_space(m, recipe=False)}
        #: the tune phase: one search over every tuned method on the tuning seeds, no ablations
        self.tune = self._study({
            **data, "seeds": suite.seeds.tune, "ablations": [], "routing": [],
            "search": {"declared": True, "recipe": b.recipe, "methods": self.tuned, "trials": b.trials, "space": pinned,
                       "seeds": suite.seeds.tune, "objective": b.objective, "sampler": b.sampler.model_dump(),
                       "pruner": b.pruner.model_dump(), "retries": b.retries}}, "tune")
        self.eval_seeds = list(suite.seeds.evaluate)

    def _study(self, data: dict[str, Any], phase: str) -> StudyConfig:
        return parse_study(data, f"{self.where} ({phase} study)")

    def path(self, phase: str, method: str | None = None) -> Path:
        return self.dir / (f"{self.name}.{phase}.yaml" if method is None else f"{self.name}.{phase}.{method}.yaml")

    def evaluation(self, method: str, values: dict[str, Any]) -> StudyConfig:
        """The evaluation study of ``method``: its best values (Optuna's ``params``: study paths)
        on the evaluation seeds, with the task's ablations and routing rules."""
        from harness.methods.base import get_method
        from harness.search import apply_params

        data = {**self.data, "methods": {method: self.data["methods"][method]}, "seeds": self.eval_seeds}
        data["ablations"] = [a for a in data["ablations"] if _has_component(method, a)]
        if "routing" not in get_method(method).ParamsModel.model_fields:  # the routing axis is not its
            data["routing"] = []
        base = self._study(data, f"evaluate {method}")
        return apply_params(base, values, f"{self.where} (best {method} configuration)")




def _has_component(method: str, ablation: str) -> bool:
    from harness.methods.base import get_method

    return all(p in get_method(method).ablations for p in ablation.split("+"))


def _task_study(spec: TaskSpec, suite_dir: Path, where: str) -> StudyConfig:
    from harness.config import load_study

    if isinstance(spec.study, dict):
        return parse_study(spec.study, f"{where}.study")
    p = Path(spec.study)
    for cand in ([p] if p.is_absolute() else [suite_dir / p, p]):
        if cand.is_file():
            return load_study(cand)
    raise HarnessError(f"{where}.study: study file {spec.study} not found (relative to the suite file or here)")


def write_study(study: StudyConfig, path: Path, header: str) -> None:
    """Write a phase's study file (atomically), unless it already holds exactly this text."""
    text = f"# {header}\n# written by `harness benchmark`; runnable as is\n" + dump_study(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- the benchmark -------------------------------------------------------------------------------
class Benchmark:
    """A loaded suite: its tasks, where its files go, its Optuna storage."""

    def __init__(self, path: str | Path, out: str | Path | None = None) -> None:
        self.path = Path(path)
        self.suite = load_suite(self.path)
        self.out = Path(out) if out is not None else Path("results") / self.suite.name
        self.tasks = [Task(self.suite, i, t, self.path.parent, self.out) for i, t in enumerate(self.suite.tasks)]
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tasks):
            if t.name in seen:
                raise HarnessError(f"tasks[{i}].name: '{t.name}' is also the name of tasks[{seen[t.name]}]; "
                                   "give each task its own name")
            seen[t.name] = i
        self.storage = str(self.out / "tune.journal")

    # -- phases -----------------------------------------------------------------------------
    def run_tune(self, tracking_uri: str | None, workers: int | None, backend: str, slurm: dict | None) -> int:
        from harness.tune import tune

        code = 0
        for t in self.tasks:
            path = t.path("tune")
            write_study(t.tune, path, f"suite {self.suite.name}, task {t.name}: the tune phase")
            print(f"\n== tune {t.name}: {', '.join(t.tuned)}, {self.suite.budget.trials} trials each")
            code |= tune(path, storage=self.storage, workers=workers, tracking_uri=tracking_uri,
                         out=t.path("tuned"), report=False, backend=backend, slurm=slurm)
        return code

    def best(self, task: Task) -> dict[str, Any]:
        """``{method: best FrozenTrial or None}`` of the task's searches in the storage."""
        import optuna

        from harness.tune import best_trials, open_storage, optuna_name

        storage = open_storage(self.storage)
        out: dict[str, Any] = {}
        for m in task.tuned:
            try:
                study = optuna.load_study(study_name=optuna_name(task.name, m), storage=storage)
            except KeyError:
                out[m] = None
                continue
            out[m] = best_trials({m: study})[m]
        return out

    def evaluation_studies(self, task: Task) -> dict[str, StudyConfig]:
        """Each tuned method's evaluation study (methods without a complete trial are left out)."""
        return {m: task.evaluation(m, dict(t.params)) for m, t in self.best(task).items() if t is not None}

    def run_evaluate(self, tracking_uri: str | None, workers: int | None, backend: str, address: str | None,
                     slurm: dict | None) -> int:
        from harness.runner import run_study

        code = 0
        for t in self.tasks:
            studies = self.evaluation_studies(t)
            missing = [m for m in t.tuned if m not in studies]
            if missing:
                print(f"task {t.name}: no complete tuning trial of {', '.join(missing)} (run the tune phase)")
                code = 1
            for m, study in studies.items():
                path = t.path("evaluate", m)
                write_study(study, path, f"suite {self.suite.name}, task {t.name}: {m} at its best configuration")
                print(f"\n== evaluate {t.name} / {m}")
                code |= run_study(path, tracking_uri=tracking_uri, workers=workers, report=False, backend=backend,
                                  address=address, slurm=slurm)
        return code

    def run_defaults(self, tracking_uri: str | None, workers: int | None, backend: str, address: str | None,
                     slurm: dict | None) -> int:
        from harness.runner import run_study

        code = 0
        for t in self.tasks:
            path = t.path("defaults")
            write_study(t.defaults, path, f"suite {self.suite.name}, task {t.name}: every method at its defaults")
            print(f"\n== defaults {t.name}")
            code |= run_study(path, tracking_uri=tracking_uri, workers=workers, report=False, backend=backend,
                              address=address, slurm=slurm)
        return code

    def keys(self, task: Task) -> tuple[list[str], list[str]]:
        """(trial keys of the tuned board, of the defaults board) of a task: the tuned board takes
        the teachers' reference rows from the defaults study (the same teachers)."""
        from harness.grid import expand

        defaults = expand(task.defaults)
        tuned = [tr.key for s in self.evaluation_studies(task).values() for tr in expand(s)]
        tuned += [tr.key for tr in defaults if tr.method == TEACHERS]
        return tuned, [tr.key for tr in defaults]

    def run_report(self, tracking_uri: str | None) -> Path:
        from harness.report.benchmark import SuiteInfo, TaskKeys, build_benchmark_report

        b, s = self.suite.budget, self.suite.seeds
        info = SuiteInfo(self.suite.name, b.trials, tuple(s.tune), tuple(s.evaluate), f"{b.sampler.type} (seed "
                         f"{b.sampler.seed})", b.pruner.type, b.objective, str(self.path))
        tasks = [TaskKeys(t.name, tuple(t.tuned), *map(tuple, self.keys(t))) for t in self.tasks]
        return build_benchmark_report(info, tasks, self.out, tracking_uri)

    # -- plan -------------------------------------------------------------------------------
    def dry_run(self) -> int:
        from harness.grid import expand

        b, s = self.suite.budget, self.suite.seeds
        print(f"suite {self.suite.name}: {len(self.tasks)} tasks, experiment {self.suite.name}, "
              f"Optuna storage {self.storage}; tuning seeds {s.tune}, evaluation seeds {s.evaluate}")
        rows = []
        for t in self.tasks:
            defaults = expand(t.defaults)
            per_eval = {m: len(expand(t.evaluation(m, {}))) for m in t.tuned}
            rows.append((t, len(t.tuned) * b.trials, len(t.tuned) * b.trials * len(s.tune),
                         sum(per_eval.values()), len(defaults)))
        print("| task | tuned methods | tune trials | tune runs | evaluate trials | defaults trials |")
        print("|---|---|---:|---:|---:|---:|")
        for t, trials, runs, ev, df in rows:
            print(f"| {t.name} | {', '.join(t.tuned)} | {trials} | {runs} | {ev} | {df} |")
        print(f"phases: tune {sum(r[1] for r in rows)} trials ({sum(r[2] for r in rows)} training runs, "
              f"{b.trials} per method and task, sampler {b.sampler.type} seed {b.sampler.seed}, pruner "
              f"{b.pruner.type}); evaluate {sum(r[3] for r in rows)} trials; defaults {sum(r[4] for r in rows)} "
              "trials (trials of one configuration in both are run once); report")
        return 0

    def estimate(self, workers: int | None, tracking_uri: str | None) -> int:
        """Each task's defaults study calibrated and planned (:func:`harness.estimate.estimate_study`);
        the tune phase as the tuned methods' full variants on the tuning seeds times the budget (no
        pruning: an upper bound); the evaluate phase as the defaults study (tuned recipes move it).
        Every ``harness tune`` / ``run-study`` invocation of a phase (one per task for tune and
        defaults, one per task and tuned method for evaluate) adds the measured fixed cost of one
        invocation: start-up, the worker pool and its first workers' set-up."""
        from harness.estimate import estimate_study, format_duration

        b, s = self.suite.budget, self.suite.seeds
        total = {"tune": 0.0, "evaluate": 0.0, "defaults": 0.0, "teachers": 0.0}
        print("| task | teachers | tune (upper bound) | evaluate | defaults |")
        print("|---|---:|---:|---:|---:|")
        for t in self.tasks:
            probe = t.tune.model_copy(update={"search": None, "methods": {m: t.data["methods"][m] for m in t.tuned}})
            write_study(t.defaults, t.path("defaults"), f"suite {self.suite.name}, task {t.name}: every method "
                        "at its defaults")
            write_study(probe, t.path("estimate"), f"suite {self.suite.name}, task {t.name}: one tuning trial "
                        "per method (the estimate's probe)")
            d = estimate_study(t.path("defaults"), workers, tracking_uri)
            p = estimate_study(t.path("estimate"), workers, tracking_uri, overheads=False)
            fixed = d.wall_seconds - d.makespan_seconds - d.teacher_stage_seconds  # one invocation's own cost
            tune_s = fixed + p.makespan_seconds * b.trials
            eval_s, dflt_s = fixed * len(t.tuned) + d.makespan_seconds, fixed + d.makespan_seconds
            total["tune"] += tune_s
            total["evaluate"] += eval_s
            total["defaults"] += dflt_s
            total["teachers"] += d.teacher_stage_seconds
            print(f"| {t.name} | {format_duration(d.teacher_stage_seconds)} | {format_duration(tune_s)} | "
                  f"{format_duration(eval_s)} | {format_duration(dflt_s)} |")
        wall = sum(total.values())
        print(f"total: about {format_duration(wall)} of wall time on this machine's pool (teachers "
              f"{format_duration(total['teachers'])}, tune {format_duration(total['tune'])} at {b.trials} trials x "
              f"{len(s.tune)} seed(s) without pruning, evaluate {format_duration(total['evaluate'])}, defaults "
              f"{format_duration(total['defaults'])}; trials shared by evaluate and defaults counted in both)")
        return 0


def benchmark(path: str | Path, phases: list[str] | None = None, tracking_uri: str | None = None,
              workers: int | None = None, backend: str = "local", address: str | None = None,
              slurm: dict[str, Any] | None = None, dry_run: bool = False, estimate: bool = False,
              out: str | Path | None = None) -> int:
    """Run the suite's phases (default: all, in order); 0 when every phase completed."""
    bench = Benchmark(path, out)
    if dry_run:
        return bench.dry_run()
    if estimate:
        return bench.estimate(workers, tracking_uri)
    chosen = list(phases or PHASES)
    for p in chosen:
        if p not in PHASES:
            raise HarnessError(f"--phase: one of {', '.join(PHASES)}, got {p!r}")
    if backend == "ray" and "tune" in chosen:
        raise HarnessError("--backend ray: the tune phase runs on the local pool or Slurm (harness tune)")
    import os
    import platform

    from harness.records import InvocationRunTags
    from harness.store import FAILURE, KIND, KIND_BENCHMARK
    from harness.store import PHASES as PHASES_TAG
    from harness.tracking import Tracker, version_tags

    tracker = Tracker(tracking_uri)
    exp = tracker.experiment(bench.suite.name)
    assert exp is not None
    from harness.files import process_alive

    for r in tracker.find(exp, {KIND: KIND_BENCHMARK}, ("RUNNING",)):  # invocations killed here
        pid = InvocationRunTags.from_tags(r.data.tags).runner_on(platform.node())
        if pid and pid != os.getpid() and not process_alive(pid):
            tracker.finish_if_running(r.info.run_id, "KILLED", {FAILURE: "stale: the invocation was killed"})
    # this invocation: its phases' wall times as metrics ``phase_seconds/<phase>`` (the report sums them)
    run = tracker.start(exp, f"benchmark/{time.strftime('%Y%m%d-%H%M%S')}", {
        **InvocationRunTags(KIND_BENCHMARK, bench.suite.name, platform.node(), os.getpid()).to_tags(),
        PHASES_TAG: ",".join(chosen), **version_tags()})
    code = 0
    walls: dict[str, float] = {}
    try:
        for p in PHASES:
            if p not in chosen:
                continue
            t0 = time.perf_counter()
            if p == "tune":
                code |= bench.run_tune(tracking_uri, workers, backend, slurm)
            elif p == "evaluate":
                code |= bench.run_evaluate(tracking_uri, workers, backend, address, slurm)
            elif p == "defaults":
                code |= bench.run_defaults(tracking_uri, workers, backend, address, slurm)
            walls[p] = time.perf_counter() - t0
            if p != "report":
                tracker.log_metrics(run, {f"phase_seconds/{p}": walls[p]})
            elif code == 0:
                print(f"report written to {bench.run_report(tracking_uri)}")
                walls[p] = time.perf_counter() - t0
            else:
                print("report not built: a phase did not complete (rerun the command to resume it)")
    except BaseException as e:
        tracker.finish(run, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish(run, "FINISHED" if code == 0 else "FAILED")
    print("phase wall times: " + ", ".join(f"{p} {s:.0f}s" for p, s in walls.items()))
    return code
