"""What a study needs, for the estimate: every distinct teacher (once per cache key, cached or
not) and every trial, with the images each will see and its calibration key (the combination
:mod:`harness.estimate.calibration` times once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from harness.estimate.arithmetic import TeacherWork, TrialWork, images_per_epoch

if TYPE_CHECKING:
    from harness.config import Recipe, StudyConfig
    from harness.data.splits import SplitData
    from harness.grid import Trial


def _spec_label(arch: str, options: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{arch}({opts})" if opts else arch


def _recipe_label(shape: Sequence[int], r: "Recipe", precision: str) -> str:
    aug = f" aug={'+'.join(r.augment)}" if r.augment else ""
    return f"{'x'.join(map(str, shape))} bs{r.batch_size} {r.optimizer} {precision}{aug}"


def teacher_combo(cfg: Any, shape: Sequence[int], device: str) -> str:
    """The calibration key of a teacher config: architecture + options, image shape, batch size,
    optimiser, precision, augmentation."""
    from harness.train import effective_precision

    precision = effective_precision(cfg, device)
    return f"teacher {_spec_label(cfg.arch, cfg.options())} {_recipe_label(shape, cfg, precision)}"


def student_combo(study: "StudyConfig", split_index: int, method: str, shape: Sequence[int], device: str) -> str:
    """The calibration key of a trial: student architecture + options, method, image shape, batch
    size, optimiser, precision, augmentation, and the split's teachers (run or read per batch)."""
    from harness.train import effective_precision

    split = study.splits[split_index]
    teachers = ",".join(_spec_label(c.arch, c.options()) for c in study.teachers_for(split))
    return (f"{method} {_spec_label(study.student.arch, study.student.options())} "
            f"{_recipe_label(shape, study.train, effective_precision(study.train, device))} teachers=[{teachers}]")


def describe_work(
    study: "StudyConfig", data: dict[str, "SplitData"], trials: Sequence["Trial"], device: str
) -> tuple[list[TeacherWork], list[TrialWork]]:
    """Every distinct teacher the trials need (once per cache key, ``cached`` when its checkpoint
    exists) and every trial, with their image counts and calibration keys."""
    from harness.methods.base import get_method
    from harness.keys import stable_hash
    from harness.teachers import checkpoint_path, teacher_spec
    from harness.trial import teacher_seeds_of

    teachers: list[TeacherWork] = []
    seen: set[str] = set()
    for split in study.splits:
        mine = [t for t in trials if t.split == split.name]
        if not mine:
            continue
        d = data[split.name]
        for seed in teacher_seeds_of(study, [t.seed for t in mine]):
            for k, cfg in enumerate(study.teachers_for(split, seed)):
                key = stable_hash(teacher_spec(d, k, study.dataset, cfg))
                if key in seen:
                    continue
                seen.add(key)
                n = {p: int((d.parts[p].t == k).sum()) for p in ("train", "val", "test")}
                teachers.append(TeacherWork(
                    split.name, k, key, teacher_combo(cfg, d.in_shape, device), cfg.epochs,
                    images_per_epoch(n["train"], cfg.batch_size), n["val"], n["test"], n["train"] + n["val"],
                    len(d.pool_part), checkpoint_path(key, study.cache_dir).exists()))
    works = []
    index = {s.name: i for i, s in enumerate(study.splits)}
    for t in trials:
        cls = get_method(t.method)
        d = data[t.split]
        n_train = len(d.student_view(cls.uses_labels).parts["train"])
        works.append(TrialWork(
            t.split, t.run_name, student_combo(study, index[t.split], t.method, d.in_shape, device), cls.trains,
            study.train.epochs, images_per_epoch(n_train, study.train.batch_size), len(d.parts["val"]),
            len(d.parts["test"]), len(d.pool_part) + len(d.parts["test"])))
    return teachers, works
