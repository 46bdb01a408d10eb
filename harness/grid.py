"""Expand a study into trials: splits x (methods + their variants) x seeds, each with a key.

A *variant* is a named set of parameter overrides of one method: ``full`` (the study's own
parameters), ``-intra`` (ablation: that component's weight set to 0), ``-intra-inter`` (pairs,
written ``intra+inter`` in the study), or a name from the study's ``variants:`` block.
The trial key hashes everything that determines the trial's result, so resume can skip
finished trials and any change of a parameter reruns exactly the affected ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.config import StudyConfig
from harness.data.splits import SplitData, build_split
from harness.errors import HarnessError
from harness.keys import RESULTS_VERSION, stable_hash, trial_key
from harness.methods.base import get_method
from harness.models import build_model, model_options
from harness.tracking import row_label


@dataclass(frozen=True)
class Trial:
    """One unit of work: one method variant on one split with one seed."""

    study: str
    split: str
    method: str
    variant: str
    seed: int
    params: dict[str, Any] = field(hash=False, compare=False)
    key: str = ""
    #: numeric precision the trial trains at (``bf16`` autocast on CUDA with ``train.amp``, else ``fp32``)
    precision: str = "fp32"

    @property
    def run_name(self) -> str:
        return f"{self.split}/{row_label(self.method, self.variant)}/seed{self.seed}"


def _check_model(spec: Any, field: str) -> None:
    """Option names, then values: the model is built once on the meta device (no memory, no
    data needed; a 3x32x32 input stands in for the split's), so a bad value (``wrn`` depth 41)
    is one line naming the field when the study is loaded, not a failed teacher hours later."""
    import torch

    opts = model_options(spec.arch)
    for k in spec.options():
        if k not in opts:
            accepts = ", ".join(opts) or "none"
            raise HarnessError(f"{field}.{k}: unknown option for model '{spec.arch}' (accepts: {accepts})")
    try:
        with torch.device("meta"):
            build_model(spec.arch, (3, 32, 32), 2, **spec.options())
    except HarnessError as e:
        raise HarnessError(f"{field}: {e}") from None


def method_variants(study: StudyConfig, notes: list[str] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, variant, resolved params) for every method and variant of the study.

    A rule of the ``routing`` axis under which a method would train exactly like one of its
    variants already listed (:meth:`~harness.methods.base.Method.training_params`: e.g. ``kd``
    with ``concat`` targets, where the rule changes only diagnostics) is not a variant of that
    method: it would compute the same numbers twice under two names. It is left out and said so
    in ``notes`` (printed with the plan); the rule's claiming diagnostics are the ``teachers``
    row of the same name. Written ``variants`` that train identically are refused
    (:func:`_check_distinct`)."""
    out = []
    components: dict[str, set[str]] = {}
    for name, overrides in study.methods.items():
        cls = get_method(name)
        base = cls.parse_params(overrides, f"methods.{name}")
        out.append((name, "full", base.model_dump(mode="json")))
        components[name] = set(cls.ablations)
        for i, abl in enumerate(study.ablations):
            parts = abl.split("+")
            if all(p in cls.ablations for p in parts):
                zeroed = {cls.ablations[p]: 0.0 for p in parts}
                params = cls.parse_params({**overrides, **zeroed}, f"ablations[{i}]")
                out.append((name, "".join(f"-{p}" for p in parts), params.model_dump(mode="json")))
    for i, abl in enumerate(study.ablations):
        if not any(all(p in comp for p in abl.split("+")) for comp in components.values()):
            have = "; ".join(f"{m}: {', '.join(sorted(c))}" for m, c in components.items() if c) or "none"
            raise HarnessError(f"ablations[{i}]: '{abl}' is not a component of any method in the study ({have})")
    for mname, overrides in study.methods.items():
        cls = get_method(mname)
        if "routing" not in cls.ParamsModel.model_fields:
            continue
        own = cls.parse_params(overrides, f"methods.{mname}").model_dump(mode="json")
        trains = {stable_hash(cls.training_params(own), 32): row_label(mname, "full")}
        for rule in study.routing:
            params = cls.parse_params({**overrides, "routing": rule}, "routing").model_dump(mode="json")
            if params == own:
                continue
            like = trains.setdefault(stable_hash(cls.training_params(params), 32), row_label(mname, rule))
            if like != row_label(mname, rule):
                if notes is not None:
                    notes.append(f"{row_label(mname, rule)} not run: it would train exactly like {like} (with its "
                                 f"targets the rule changes only {mname}'s diagnostics); the teachers row "
                                 f"'{rule}' shows the rule's claiming accuracy")
                continue
            out.append((mname, rule, params))
    if study.routing and not any("routing" in get_method(m).ParamsModel.model_fields for m in study.methods):
        raise HarnessError("routing: no method in the study has a routing parameter")
    for mname, variants in study.variants.items():
        if mname not in study.methods:
            raise HarnessError(f"variants.{mname}: method is not in the study's methods")
        cls = get_method(mname)
        for vname, overrides in variants.items():
            if vname == "full" or vname.startswith("-"):
                raise HarnessError(f"variants.{mname}.{vname}: name must not be 'full' or start with '-'")
            params = cls.parse_params({**study.methods[mname], **(overrides or {})}, f"variants.{mname}.{vname}")
            out.append((mname, vname, params.model_dump(mode="json")))
    return out


def study_precision(study: StudyConfig) -> str:
    """The effective precision of the study's trials on the devices its pool would use:
    ``bf16`` when ``train.amp`` and the pool's devices are CUDA GPUs with bf16, else ``fp32``."""
    from harness.train import effective_precision

    devices = study.devices
    if devices == "auto":
        from harness.devices import visible_gpus

        device = "cuda" if visible_gpus() else "cpu"
    elif devices == "cpu":
        device = "cpu"
    else:
        device = "cuda" if any(str(d).startswith("cuda") for d in devices) else "cpu"
    return effective_precision(study.train, device)


def _check_distinct(variants: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Two variants of one method with the same resolved parameters would be one trial twice; two
    with the same *training* parameters (:meth:`~harness.methods.base.Method.training_params`)
    would train the same student twice under two keys."""
    seen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for method, variant, params in variants:
        sig = (method, stable_hash(get_method(method).training_params(params), 32))
        if sig in seen:
            first, first_params = seen[sig]
            a, b = row_label(method, first), row_label(method, variant)
            if first_params == params:
                raise HarnessError(
                    f"methods.{method}: variants '{a}' and '{b}' resolve to the same parameters (the same "
                    "trials); remove one, or make them differ"
                )
            differ = ", ".join(k for k in sorted(params) if params[k] != first_params.get(k))
            raise HarnessError(
                f"methods.{method}: variants '{a}' and '{b}' would train exactly alike (they differ only in "
                f"{differ}, which does not change what {method} trains, only its diagnostics); remove one"
            )
        seen[sig] = (variant, params)


def _check_reference_bank(study: StudyConfig, variants: list[tuple[str, str, dict[str, Any]]]) -> None:
    """``knn`` and ``percentile`` read each teacher's own validation images: none with val_fraction 0."""
    if study.dataset.val_fraction > 0:
        return
    from harness.routing import RoutingConfig

    for method, variant, params in variants:
        if not isinstance(params.get("routing"), dict):
            continue
        rule = RoutingConfig.model_validate(params["routing"])
        if "knn" in rule.scores or rule.standardize == "percentile":
            raise HarnessError(
                f"dataset.val_fraction: 0 leaves no validation images, but routing rule '{rule.name}' "
                f"({row_label(method, variant)}) needs them as its reference bank; set val_fraction > 0"
            )


def expand(study: StudyConfig, precision: str | None = None) -> list[Trial]:
    """Every trial of the study, validating methods, parameters and model options on the way.

    ``precision`` (``fp32``/``bf16``) overrides the one the study's devices give here, e.g. to
    compute the keys of a study that ran on GPUs from a machine without one."""
    _check_model(study.student, "student")
    for i, t in enumerate(study.teachers):
        _check_model(t, f"teachers[{i}]")
    for si, split in enumerate(study.splits):
        for i, t in enumerate(split.teachers or []):
            _check_model(t, f"splits[{si}].teachers[{i}]")
    variants = method_variants(study)
    _check_distinct(variants)
    _check_reference_bank(study, variants)
    precision = study_precision(study) if precision is None else precision
    per_seed = study.teacher_seeds == "per_seed"
    trials = []
    for si, split in enumerate(study.splits):
        study.teachers_for(split)
        for method, variant, params in variants:
            # a seed-independent method (the teachers' reference rows) still depends on the
            # teachers, which differ per seed under ``teacher_seeds: per_seed``
            seeds = study.seeds if get_method(method).seeded or per_seed else study.seeds[:1]
            for seed in seeds:
                key = trial_key(study, si, method, params, seed, precision)
                trials.append(Trial(study.name, split.name, method, variant, seed, params, key, precision))
    return trials


def study_keys(text: str, source: str, precision: str | None = None) -> list[str]:
    """The trial keys of a study file's text (``source`` names it in errors), at ``precision``
    (``fp32``/``bf16``) if given, else the one this machine's devices give: how ``harness report
    FILE``, the leaderboard and :mod:`harness.results` scope a study by its file (this imports
    torch; the report itself never does)."""
    import yaml

    from harness.config import parse_study

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise HarnessError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    return [t.key for t in expand(parse_study(data, source), precision=precision)]


def build_splits(study: StudyConfig) -> dict[str, SplitData]:
    """Load and check every split's data (class ranges, shapes) before anything is created;
    ``dataset.download: true`` fetches the data set first (here, in the main process, once)."""
    from harness.data.download import ensure_downloaded

    ensure_downloaded(study.dataset)
    return {s.name: build_split(s, study.dataset, f"splits[{i}]") for i, s in enumerate(study.splits)}


def resolved_config(study: StudyConfig, trial: Trial) -> dict[str, Any]:
    """The complete config of one trial (logged as params and as a YAML artifact)."""
    split = next(s for s in study.splits if s.name == trial.split)
    return {
        "study": study.name,
        "dataset": study.dataset.model_dump(mode="json"),
        "split": split.model_dump(mode="json"),
        "teachers": [t.model_dump(mode="json") for t in study.teachers_for(split, trial.seed)],
        "teacher_seeds": study.teacher_seeds,
        "student": study.student.model_dump(mode="json"),
        "train": study.train.model_dump(mode="json"),
        "method": trial.method,
        "variant": trial.variant,
        "params": trial.params,
        "seed": trial.seed,
        "precision": trial.precision,
        "results_version": RESULTS_VERSION,
    }
