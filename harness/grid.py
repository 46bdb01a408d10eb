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
from harness.methods.base import get_method
from harness.models import model_options
from harness.teachers import stable_hash


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

    @property
    def run_name(self) -> str:
        v = "" if self.variant == "full" else ("" if self.variant.startswith("-") else ":") + self.variant
        return f"{self.split}/{self.method}{v}/seed{self.seed}"


def _check_model(spec: Any, field: str) -> None:
    opts = model_options(spec.arch)
    for k in spec.options():
        if k not in opts:
            accepts = ", ".join(opts) or "none"
            raise HarnessError(f"{field}.{k}: unknown option for model '{spec.arch}' (accepts: {accepts})")


def method_variants(study: StudyConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, variant, resolved params) for every method and variant of the study."""
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
        for rule in study.routing:
            params = cls.parse_params({**overrides, "routing": rule}, "routing").model_dump(mode="json")
            if params != own:
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


def trial_key(study: StudyConfig, split_index: int, method: str, params: dict, seed: int) -> str:
    """Hash of the resolved trial config (data, split, teachers, student, recipe, method, seed)."""
    split = study.splits[split_index]
    return stable_hash(
        {
            # ``stream`` only says how images are read (same batches, same results): not in the key
            "dataset": study.dataset.model_dump(mode="json", exclude={"stream"}),
            "split": split.model_dump(mode="json"),
            "teachers": [t.model_dump(mode="json") for t in study.teachers_for(split)],
            "student": study.student.model_dump(mode="json"),
            "train": study.train.model_dump(mode="json"),
            "method": method,
            "params": params,
            "seed": seed,
        }
    )


def expand(study: StudyConfig) -> list[Trial]:
    """Every trial of the study, validating methods, parameters and model options on the way."""
    _check_model(study.student, "student")
    for i, t in enumerate(study.teachers):
        _check_model(t, f"teachers[{i}]")
    for si, split in enumerate(study.splits):
        for i, t in enumerate(split.teachers or []):
            _check_model(t, f"splits[{si}].teachers[{i}]")
    variants = method_variants(study)
    trials = []
    for si, split in enumerate(study.splits):
        study.teachers_for(split)
        for method, variant, params in variants:
            seeds = study.seeds if get_method(method).seeded else study.seeds[:1]
            for seed in seeds:
                key = trial_key(study, si, method, params, seed)
                trials.append(Trial(study.name, split.name, method, variant, seed, params, key))
    return trials


def build_splits(study: StudyConfig) -> dict[str, SplitData]:
    """Load and check every split's data (class ranges, shapes) before anything is created."""
    return {s.name: build_split(s, study.dataset, f"splits[{i}]") for i, s in enumerate(study.splits)}


def resolved_config(study: StudyConfig, trial: Trial) -> dict[str, Any]:
    """The complete config of one trial (logged as params and as a YAML artifact)."""
    split = next(s for s in study.splits if s.name == trial.split)
    return {
        "study": study.name,
        "dataset": study.dataset.model_dump(mode="json"),
        "split": split.model_dump(mode="json"),
        "teachers": [t.model_dump(mode="json") for t in study.teachers_for(split)],
        "student": study.student.model_dump(mode="json"),
        "train": study.train.model_dump(mode="json"),
        "method": trial.method,
        "variant": trial.variant,
        "params": trial.params,
        "seed": trial.seed,
    }
