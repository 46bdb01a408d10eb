"""The study file: schema (pydantic), loading and one-line validation errors.

A study file is YAML. Every field is documented in docs/study-files.md.
Problems are reported as one line naming the field, e.g.
``studies/x.yaml: train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from harness.data.catalog import ARCHIVES, DATASET_NAMES
from harness.errors import HarnessError
from harness.routing_schema import RoutingConfig
from harness.search_schema import SearchConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    """The study's data set: ``name`` from the dataset registry, ``root`` where it needs files."""

    name: str = "digits"
    root: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    image_size: int | None = Field(None, ge=4)
    #: ``image_folder`` only: keep the images on disk and decode them batch by batch through a
    #: DataLoader (workers, pinned memory) instead of loading the whole set into memory
    stream: bool = False
    #: ``cifar10``/``cifar100`` only: fetch, verify and extract the official archive into ``root``
    #: (an existing folder) before the data is loaded, unless already there
    #: (:func:`harness.data.download.ensure_downloaded`); not in the trial key
    download: bool = False

    @field_validator("download")
    @classmethod
    def _downloadable(cls, v: bool, info: Any) -> bool:  # info: pydantic.ValidationInfo
        name = info.data.get("name")
        if v and name is not None and name not in ARCHIVES:
            raise ValueError(
                f"only {' and '.join(ARCHIVES.names())} can be downloaded, not '{name}'; "
                "remove download: true"
            )
        if v and not info.data.get("root"):
            raise ValueError("needs dataset.root, the existing folder to download into")
        return v


class TaskSource(_Strict):
    """A task given as a whole data set (the "multiple tasks" form), optionally a class subset."""

    dataset: str
    root: str | None = None
    classes: list[int] | None = None

    @field_validator("classes")
    @classmethod
    def _classes_ok(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            _check_class_list(v)
        return v


def _class_subset(v: list[int] | None, when_empty: str) -> list[int] | None:
    """An optional class subset (``partition.classes``, ``transfer.classes``): None, or a non-empty
    list of distinct ids >= 0, returned sorted (so two orders are one configuration)."""
    if v is None:
        return v
    if not v:
        raise ValueError(f"empty: {when_empty}")
    if any(c < 0 for c in v):
        raise ValueError("class ids must be >= 0")
    if len(set(v)) != len(v):
        raise ValueError("a class is listed twice")
    return sorted(v)


def _check_class_list(v: list[int]) -> None:
    if not v:
        raise ValueError("a task needs at least one class")
    if any(c < 0 for c in v):
        raise ValueError("class ids must be >= 0")
    if len(set(v)) != len(v):
        raise ValueError("a class is listed twice in one task")


Task = Union[list[int], TaskSource]

#: "every class of the source": a ``{dataset: ...}`` task without ``classes``
_ALL = -1


def _check_disjoint_sources(split: "SplitConfig", dataset: "DatasetConfig", where: str) -> None:
    """No image may belong to two tasks: class lists (of the study's data set) and ``{dataset}``
    tasks are compared by source (data set name and root), a whole-set task overlaps any other
    task of its source."""
    seen: dict[tuple[str, str | None], dict[int, int]] = {}
    for k, task in enumerate(split.tasks or []):  # a partition is disjoint by construction
        if isinstance(task, list):
            src, classes = (dataset.name, dataset.root), task
        else:
            src, classes = (task.dataset, task.root), (task.classes if task.classes is not None else [_ALL])
        owners = seen.setdefault(src, {})
        for c in classes:
            clash = [j for j in ([owners.get(c)] if c != _ALL else owners.values()) if j is not None]
            clash += [owners[_ALL]] if _ALL in owners else []
            if clash:
                what = f"class {c} of {src[0]}" if c != _ALL else f"the whole of {src[0]}"
                note = " (a {dataset: ...} task without classes takes the whole set)" if _ALL in (c, *owners) else ""
                raise ValueError(f"{where}: {what} is in task {clash[0]} and task {k}: tasks must be disjoint{note}")
            owners[c] = k


class ModelSpec(BaseModel):
    """A network: ``arch`` from the model registry plus its options (e.g. ``width``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    arch: str

    def options(self) -> dict[str, Any]:
        """Model options: every key that is not a field of this class."""
        return dict(self.model_extra or {})


#: the augmentations ``train.augment`` may list, in the order they are applied
AUGMENTATIONS: tuple[str, ...] = ("crop", "flip")


class Recipe(BaseModel):
    """A training recipe, the same fields for the teachers (supervised) and the student."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=2)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["none", "cosine"] = "none"
    #: training-time augmentation: ``[crop]`` (padded random crop), ``[crop, flip]`` (and a
    #: horizontal flip: right for natural images, wrong for digits), ``true`` = both, ``false`` = none
    augment: tuple[Literal["crop", "flip"], ...] = ()
    #: GPU only: bf16 autocast, ``torch.compile`` of the features, and cudnn determinism
    amp: bool = True
    compile: bool = False
    deterministic: bool = False

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_ops(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return AUGMENTATIONS if v else ()
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            if len(set(v)) != len(v):
                raise ValueError("an augmentation is listed twice")
            return tuple(sorted(v, key=lambda op: AUGMENTATIONS.index(op) if op in AUGMENTATIONS else 99))
        return v


class TeacherConfig(ModelSpec, Recipe):
    """A teacher: architecture, options (any other key) and its own supervised recipe and seed."""

    seed: int = 0


class PartitionSpec(_Strict):
    """A generated split: the study data set's classes (or ``classes``, kept sorted) cut into ``k``
    near-equal disjoint tasks, sizes differing by at most 1, the larger tasks first.

    ``order: contiguous`` keeps class order (100 classes, k=2: 0-49 / 50-99); ``order: random``
    first permutes the classes with ``numpy.random.default_rng(seed).permutation`` and sorts each
    task's classes. ``seed`` only exists for ``random``: a non-zero seed with ``contiguous`` is an
    error, so one partition has one spec (and one trial key). ``k`` is checked against the class
    count when the data set is loaded (:func:`harness.data.splits.resolve_partition`)."""

    k: int = Field(ge=2)
    order: Literal["contiguous", "random"] = "contiguous"
    seed: int = 0
    classes: list[int] | None = None

    @field_validator("seed")
    @classmethod
    def _seed_needs_random(cls, v: int, info: Any) -> int:  # info: pydantic.ValidationInfo
        if v != 0 and info.data.get("order") == "contiguous":
            raise ValueError("only meaningful with order: random (contiguous takes the classes in order); remove it")
        return v

    @field_validator("classes")
    @classmethod
    def _classes_ok(cls, v: list[int] | None) -> list[int] | None:
        return _class_subset(v, "list the classes to partition, or remove it for all classes")


class TransferConfig(_Strict):
    """A transfer set: the unlabelled images the label-free students of a split learn from, when
    they are not the union of the teachers' training images (e.g. CIFAR-100 teachers, CIFAR-10
    images: out-of-distribution transfer).

    The pool is ``fraction`` of the transfer data set's training part (its training images less
    the fixed validation holdout every source gets, so never a validation or test image): a fixed
    subset drawn with ``numpy.random.default_rng(0)``, which reads no label. ``classes`` keeps
    only those classes of the transfer set first (e.g. to keep it disjoint from the teachers'
    classes); it is the only place the transfer set's labels are read, and the pool keeps none.
    Images are resized to the split's image size and converted to its channel count when loaded
    (:func:`harness.data.splits.load_pool`)."""

    dataset: str
    root: str | None = None
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    classes: list[int] | None = None

    @field_validator("dataset")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {v!r} (choose from: {', '.join(sorted(DATASET_NAMES))})")
        return v

    @field_validator("classes")
    @classmethod
    def _classes_ok(cls, v: list[int] | None) -> list[int] | None:
        return _class_subset(v, "list the transfer set's classes to keep, or remove it for all classes")

    @property
    def label(self) -> str:
        """``transfer:<dataset>:<fraction>`` (the ``harness.pool`` tag of a trial learning from it)."""
        return f"transfer:{self.dataset}:{self.fraction:g}"


class SplitConfig(_Strict):
    """A task split: explicit ``tasks`` (each a class list of the study data set or a whole data
    set), or a ``partition`` generator of the study data set's classes; exactly one of the two.
    Optionally a ``transfer`` set: the label-free students' unlabelled images (default: the
    split's own training images).

    Dumps (and so trial keys) carry only the fields given: a ``tasks`` split dumps exactly as it
    did before ``partition`` and ``transfer`` existed."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.+\-]+$")
    tasks: list[Task] | None = Field(None, min_length=2)
    partition: PartitionSpec | None = None
    #: optional per-split teachers (one per task, or one for all); else the study's ``teachers``
    teachers: list[TeacherConfig] | None = Field(None, min_length=1)
    #: optional transfer set: what label-free students learn from instead of the training images
    transfer: TransferConfig | None = None

    @model_serializer(mode="wrap")
    def _only_the_given_form(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for f in ("tasks", "partition", "transfer"):
            if getattr(self, f) is None:
                out.pop(f, None)
        return out

    @property
    def n_tasks(self) -> int:
        """The number of tasks (teachers), known before the data set is loaded."""
        return self.partition.k if self.partition is not None else len(self.tasks or [])

    @model_validator(mode="after")
    def _disjoint(self) -> "SplitConfig":
        if self.tasks is None and self.partition is None:
            raise ValueError(
                "tasks or partition: required (tasks lists each task's classes; partition: {k: N} "
                "generates N tasks)"
            )
        if self.tasks is not None and self.partition is not None:
            raise ValueError("tasks and partition: give one of them, not both")
        seen: dict[tuple[str, int], int] = {}
        for k, task in enumerate(self.tasks or []):
            if isinstance(task, list):
                _check_class_list(task)
                src, classes = "", task
            else:
                src, classes = f"{task.dataset}:{task.root}", task.classes or []
            for c in classes:
                if (src, c) in seen:
                    raise ValueError(f"class {c} is in task {seen[(src, c)]} and task {k}: tasks must be disjoint")
                seen[(src, c)] = k
        return self


class LrMult(_Strict):
    """``train.lr_mult``: learning-rate multipliers per parameter role
    (:meth:`harness.methods.base.Method.param_roles`). The student's body trains at ``train.lr``,
    its classifier head at ``lr * head``, the modules the method owns (projectors, the CFL block,
    CRD's embeddings) at ``lr * method``. Default 1 and 1: every method at one rate (parity);
    ``{head: 10, method: 10}`` is CFL's reference setting."""

    head: float = Field(1.0, gt=0, allow_inf_nan=False)
    method: float = Field(1.0, gt=0, allow_inf_nan=False)


class TrainConfig(Recipe):
    """The student's training recipe, shared by every method of the study."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: per-role learning-rate multipliers (:class:`LrMult`); the student's only (teachers train one group)
    lr_mult: LrMult = LrMult()


#: sbatch options the harness sets itself: ``slurm.extra`` may not give them
SLURM_MANAGED = ("array", "job-name", "comment", "output", "error", "open-mode", "dependency", "hold", "signal",
                 "kill-on-invalid-dep", "wrap", "parsable")
#: sbatch options with a field of their own in the ``slurm:`` block
SLURM_FIELDS = {"partition": "partition", "gpus-per-task": "gpus_per_task", "cpus-per-task": "cpus_per_task",
                "mem": "mem_gb", "time": "time_min"}


class SlurmConfig(_Strict):
    """How ``--backend slurm`` asks Slurm for each job (the study file's ``slurm:`` block; the
    ``--slurm-*`` options override it field by field). Not part of any trial key.

    Every trial is one task of a job array with ``cpus_per_task`` CPUs (its torch threads),
    ``gpus_per_task`` GPUs, ``mem_gb`` GB (the partition's default when None) and a time limit
    of ``time_min`` minutes, at most ``array_parallelism`` running at once; ``setup`` lines run in
    the batch script before the job (``module load ...``, ``source .../activate``); ``extra``
    holds any other sbatch option (``{account: lab, qos: high, constraint: a100}``). ``folder``
    (default ``.harness_slurm/<study>``) holds the job scripts, pickles and logs: a folder every
    node sees."""

    partition: str | None = None
    gpus_per_task: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    time_min: int = Field(60, ge=1)
    array_parallelism: int = Field(64, ge=1)
    setup: list[str] = []
    extra: dict[str, Union[bool, int, float, str]] = {}
    folder: str | None = Field(None, min_length=1)

    @field_validator("partition")
    @classmethod
    def _partition_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*", v):
            raise ValueError(f"{v!r} is not a partition name (letters, digits, _ . -; several joined by commas)")
        return v

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, v: list[str]) -> list[str]:
        for i, line in enumerate(v):
            if "\n" in line or "\r" in line:
                raise ValueError(f"line {i} holds a line break: give one shell line per entry")
        return v

    @field_validator("extra")
    @classmethod
    def _sbatch_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in v.items():
            opt = key.replace("_", "-")
            if not opt or not opt[0].isalpha() or not all(c.isalnum() or c == "-" for c in opt):
                raise ValueError(f"{key!r} is not an sbatch option name")
            if opt in SLURM_MANAGED:
                raise ValueError(f"{key}: set by the harness itself; remove it")
            if opt in SLURM_FIELDS:
                raise ValueError(f"{key}: give it as slurm.{SLURM_FIELDS[opt]}")
            if value is False:
                raise ValueError(f"{key}: false is no sbatch option (true gives the flag); remove it")
            if isinstance(value, str) and ("\n" in value or not value):
                raise ValueError(f"{key}: the value must be one non-empty line")
            out[opt] = value
        return out


#: the command-line option that overrides each ``slurm:`` field
SLURM_OPTIONS = {"partition": "--slurm-partition", "gpus_per_task": "--slurm-gpus-per-task",
                 "cpus_per_task": "--slurm-cpus-per-task", "mem_gb": "--slurm-mem-gb",
                 "time_min": "--slurm-time-min", "array_parallelism": "--slurm-array-parallelism",
                 "setup": "--slurm-setup", "extra": "--slurm-extra", "folder": "--slurm-folder"}


class StudyConfig(_Strict):
    """A whole study: data, splits, teachers, student, training, methods, ablations, seeds."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    #: the MLflow experiment the study logs to (default: its ``name``); ``harness benchmark`` puts
    #: every study of a suite into the suite's one experiment
    experiment: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    dataset: DatasetConfig = DatasetConfig()
    splits: list[SplitConfig] = Field(min_length=1)
    teachers: list[TeacherConfig] = []
    student: ModelSpec
    train: TrainConfig = TrainConfig()
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    ablations: list[str] = []
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    #: routing rules compared as a study axis ("score/standardize/targets"); every method with a
    #: ``routing`` parameter gets one variant per rule (named by the rule)
    routing: list[str] = []
    seeds: list[int] = Field([0], min_length=1)
    devices: Union[Literal["auto", "cpu"], list[str]] = "auto"
    trials_per_device: int = Field(1, ge=1)
    max_retries: int = Field(0, ge=0)
    #: ``fixed`` (default): each split's teachers are trained once, with their own ``seed``, and
    #: shared by every student seed, so the seed std measures student variance only;
    #: ``per_seed``: student seed s gets teachers trained with seed s (each cached), so the std
    #: also carries teacher variance
    teacher_seeds: Literal["fixed", "per_seed"] = "fixed"
    cache_dir: str | None = None
    #: what ``harness tune`` searches (ignored by ``run-study``); see :mod:`harness.search`
    search: SearchConfig | None = None
    #: how ``--backend slurm`` asks Slurm for each job (ignored by the other backends)
    slurm: SlurmConfig | None = None

    @field_validator("methods", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({} if p is None else p) for k, p in v.items()}
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be unique")
        return v

    @field_validator("routing")
    @classmethod
    def _routing_rules(cls, v: list[str]) -> list[str]:
        names = []
        for rule in v:
            try:
                names.append(RoutingConfig.parse(rule).name)
            except ValidationError as e:
                raise ValueError(f"{rule!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        if len(set(names)) != len(names):
            raise ValueError("routing rules must be unique")
        return names

    @field_validator("ablations")
    @classmethod
    def _ablation_names(cls, v: list[str]) -> list[str]:
        for a in v:
            parts = a.split("+")
            if not all(parts) or len(set(parts)) != len(parts):
                raise ValueError(f"ablation {a!r}: write one component ('intra') or several joined by '+'")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "StudyConfig":
        names = [s.name for s in self.splits]
        if len(set(names)) != len(names):
            raise ValueError("split names must be unique")
        for i, split in enumerate(self.splits):
            _check_disjoint_sources(split, self.dataset, f"splits[{i}].tasks")
        return self

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment of the study's runs: ``experiment``, else ``name``."""
        return self.experiment or self.name

    def teachers_for(self, split: SplitConfig, seed: int | None = None) -> list[TeacherConfig]:
        """One teacher config per task: the split's own ``teachers`` or else the study's
        (a single entry is used for every task). With ``teacher_seeds: per_seed`` and a student
        ``seed``, each teacher's ``seed`` is replaced by it."""
        cfgs = self._teacher_cfgs(split)
        if seed is not None and self.teacher_seeds == "per_seed":
            cfgs = [c.model_copy(update={"seed": seed}) for c in cfgs]
        return cfgs

    def teacher_seed_list(self) -> list[int | None]:
        """The student seeds that get teachers of their own (``[None]``: one set for all)."""
        return list(self.seeds) if self.teacher_seeds == "per_seed" else [None]

    def _teacher_cfgs(self, split: SplitConfig) -> list[TeacherConfig]:
        own = split.teachers is not None
        cfgs = split.teachers if own else self.teachers
        field = f"splits[{self.splits.index(split)}].teachers" if own else "teachers"
        if not cfgs:
            raise HarnessError(f"teachers: required (split '{split.name}' has no teachers of its own)")
        if len(cfgs) == 1:
            return [cfgs[0]] * split.n_tasks
        if len(cfgs) != split.n_tasks:
            raise HarnessError(
                f"{field}: {len(cfgs)} entries but split '{split.name}' has "
                f"{split.n_tasks} tasks (give one entry per task, or a single entry for all)"
            )
        return list(cfgs)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[int]", "TaskSource") or str(part).startswith(("list[", "literal[")):
            continue  # union-branch names that pydantic puts in the path
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: ``<file>: <field.path>: <message>`` for the first error (and a count of the rest)."""
    errors = err.errors()
    # For a union (task as list or mapping) report the branch that matches the input's shape.
    first = errors[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    loc = _loc(first["loc"])  # empty for whole-study checks, whose message names the field
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def parse_study(data: Any, source: str = "study") -> StudyConfig:
    """Validate a parsed YAML document; HarnessError with one line on any problem."""
    if not isinstance(data, dict):
        raise HarnessError(f"{source}: the study file must be a YAML mapping of fields")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        raise HarnessError(format_validation_error(e, source)) from None


def read_yaml(path: str | Path, what: str = "study") -> Any:
    """A YAML file's document (``yaml.safe_load``); a missing file or bad YAML is one line naming
    the file (``what``: the kind of file, for the message)."""
    p = Path(path)
    if not p.is_file():
        raise HarnessError(f"{p}: {what} file not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise HarnessError(f"{p}: not valid YAML{where}: {problem}") from None


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file (``yaml.safe_load``)."""
    return parse_study(read_yaml(path), str(Path(path)))


def dump_study(study: StudyConfig) -> str:
    """The study as YAML that :func:`load_study` accepts as is."""
    data = study.model_dump(mode="json", exclude_none=False)
    for optional in ("experiment", "search", "slurm"):
        if data.get(optional) is None:
            data.pop(optional, None)
    return yaml.safe_dump(data, sort_keys=False)


def slurm_config(study: StudyConfig, cli: dict[str, Any] | None = None) -> SlurmConfig:
    """The study's ``slurm:`` block with the command line's values on top (a value given there
    wins; ``extra`` entries are merged key by key). HarnessError with one line naming the
    ``--slurm-*`` option or the ``slurm.`` field of the first bad value."""
    base = study.slurm.model_dump() if study.slurm is not None else {}
    given = {k: v for k, v in (cli or {}).items() if v is not None and v != [] and v != {}}
    unknown = sorted(set(given) - set(SLURM_OPTIONS))
    if unknown:
        raise HarnessError(f"unknown Slurm option {unknown[0]!r} (known: {', '.join(SLURM_OPTIONS)})")
    merged = {**base, **given}
    if "extra" in given:
        merged["extra"] = {**base.get("extra", {}), **given["extra"]}
    try:
        return SlurmConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        where = SLURM_OPTIONS[field] if field in given else f"slurm.{_loc(err['loc'])}"
        raise HarnessError(f"{where}: {msg}") from None
