"""Teachers: supervised training on their own task, cached on disk by a content hash.

The cache key hashes everything that determines a teacher (source data set, root, image size,
validation fraction, its classes, architecture and options, training recipe, seed). An entry is
``{"state_dict", "meta"}`` saved atomically and loaded with ``torch.load(weights_only=True)``;
an unreadable or mismatching entry is retrained, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from harness.config import DatasetConfig, Recipe, TeacherConfig, TrainConfig
from harness.data.splits import PartData, SplitData
from harness.methods.base import SplitInfo, TeacherSet
from harness.methods.supervised import SupervisedCE
from harness.models import Net, build_model
from harness.routing import RoutingStats, TeacherStats, fit_stats
from harness.train import fit

CACHE_VERSION = 1


def cache_root(configured: str | None = None) -> Path:
    """``cache_dir`` of the study, else ``$HARNESS_CACHE``, else ``./.harness_cache``."""
    return Path(configured or os.environ.get("HARNESS_CACHE") or ".harness_cache")


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of canonical JSON (sorted keys), the basis of every cache and trial key."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def teacher_spec(split: SplitData, k: int, dataset: DatasetConfig, cfg: TeacherConfig) -> dict[str, Any]:
    """Everything that determines teacher k (its hash is the cache key)."""
    task = split.tasks[k]
    return {
        "version": CACHE_VERSION,
        "dataset": task.dataset,
        "root": task.root,
        "image_size": dataset.image_size,
        "val_fraction": dataset.val_fraction,
        "classes": list(task.classes),
        "in_shape": list(split.in_shape),
        "teacher": cfg.model_dump(mode="json"),
    }


def task_data(split: SplitData, k: int) -> SplitData:
    """Task k alone, with local labels: a one-task split (so the common loop can train it)."""
    parts = {}
    for name in ("train", "val", "test"):
        x, y = split.task_part(k, name)  # type: ignore[arg-type]
        parts[name] = PartData(x, y, torch.zeros_like(y))
    return SplitData(f"{split.name}/teacher{k}", [split.tasks[k]], parts)


@dataclass
class TeacherRecord:
    """A teacher with its cache key, whether it came from the cache, and its own-task metrics."""

    index: int
    key: str
    spec: dict[str, Any]
    net: Net
    cached: bool
    metrics: dict[str, float]
    history: list[dict[str, float]]
    stats: TeacherStats | None = None


def _load(path: Path, net: Net) -> dict[str, Any] | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(blob["state_dict"])
        return blob["meta"]
    except Exception as e:  # corrupt, truncated, or from another architecture
        warnings.warn(f"teacher cache entry {path} is unreadable ({type(e).__name__}); retraining", stacklevel=2)
        return None


def _save(path: Path, net: Net, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": net.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)


def train_teacher(data: SplitData, cfg: TeacherConfig, device: str = "cpu") -> tuple[Net, dict, list]:
    """Supervised cross-entropy on the task's own training images; best-validation weights."""
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.arch, data.in_shape, data.num_classes, **cfg.options())
    method = SupervisedCE(net, TeacherSet([]), SupervisedCE.ParamsModel(), SplitInfo(tuple(data.sizes), (0,)))
    recipe = TrainConfig.model_validate(cfg.model_dump(include=set(Recipe.model_fields)))
    res = fit(method, data, recipe, seed=cfg.seed, device=device)
    if res.best_state is not None:
        method.load_state_dict(res.best_state)
    metrics = {k: v for k, v in res.final.items()}
    return net.cpu().eval(), metrics, res.history


def routing_stats(
    rec: TeacherRecord, split: SplitData, cache_dir: str | None = None, settings: RoutingStats = RoutingStats()
) -> TeacherStats:
    """Teacher k's routing statistics, fitted on its own training/validation images only and
    cached next to its checkpoint (the file name hashes the teacher key and the settings)."""
    path = cache_root(cache_dir) / "teachers" / f"{rec.key}-routing-{stable_hash(settings.model_dump())}.pt"
    if path.exists():
        try:
            return TeacherStats.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            warnings.warn(f"routing statistics {path} are unreadable ({type(e).__name__}); refitting", stacklevel=2)
    x_tr, y_tr = split.task_part(rec.index, "train")
    x_va, _ = split.task_part(rec.index, "val")
    stats = fit_stats(rec.net, x_tr, y_tr, x_va, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(stats.to_dict(), tmp)
    os.replace(tmp, path)
    return stats


def get_teachers(
    split: SplitData, dataset: DatasetConfig, cfgs: list[TeacherConfig], cache_dir: str | None = None,
    device: str = "cpu", on_ready: Callable[[TeacherRecord], None] | None = None,
) -> list[TeacherRecord]:
    """Train or load every teacher of a split, with its routing statistics. ``on_ready`` is
    called for each (e.g. to log it)."""
    records = []
    for k, cfg in enumerate(cfgs):
        spec = teacher_spec(split, k, dataset, cfg)
        key = stable_hash(spec)
        path = cache_root(cache_dir) / "teachers" / f"{key}.pt"
        net = build_model(cfg.arch, split.in_shape, split.tasks[k].n, **cfg.options())
        meta = _load(path, net) if path.exists() else None
        if meta is not None and meta.get("key") == key:
            rec = TeacherRecord(k, key, spec, net.eval(), True, meta["metrics"], meta.get("history", []))
        else:
            net, metrics, history = train_teacher(task_data(split, k), cfg, device)
            _save(path, net, {"key": key, "metrics": metrics, "history": history})
            rec = TeacherRecord(k, key, spec, net, False, metrics, history)
        rec.stats = routing_stats(rec, split, cache_dir)
        if on_ready is not None:
            on_ready(rec)
        records.append(rec)
    return records


def cached_outputs(
    records: list[TeacherRecord], split: SplitData, cache_dir: str | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The frozen teachers' (logits, features) on the split's training images, computed once per
    split and stored next to the checkpoints (keyed by the teachers' keys and the split's tasks),
    so every method, variant and seed of the split reuses them."""
    from harness.methods.base import TeacherSet
    from harness.train import teacher_outputs

    desc = {"teachers": [r.key for r in records], "split": split.describe()["tasks"],
            "sources": [(t.dataset, t.root) for t in split.tasks], "n": len(split.parts["train"])}
    path = cache_root(cache_dir) / "teachers" / f"outputs-{stable_hash(desc)}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if len(blob["logits"]) == len(records) and all(len(t) == desc["n"] for t in blob["logits"]):
                return blob["logits"], blob["feats"]
        except Exception as e:
            warnings.warn(f"teacher-output cache {path} is unreadable ({type(e).__name__}); recomputing", stacklevel=2)
    logits, feats = teacher_outputs(TeacherSet([r.net for r in records]), split.parts["train"].x)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"logits": logits, "feats": feats}, tmp)
    os.replace(tmp, path)
    return logits, feats
