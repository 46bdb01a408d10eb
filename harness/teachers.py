"""Teachers: supervised training on their own task, cached on disk by a content hash.

The cache key hashes everything that determines a teacher (source data set, root, image size,
validation fraction, its classes, architecture and options, training recipe, seed). An entry is
``{"state_dict", "meta"}`` saved atomically and loaded with ``torch.load(weights_only=True)``;
``meta`` holds the key and the *digest* of the weights (:func:`state_digest`). An unreadable
entry, one of another key, or one whose weights do not match its digest is retrained, never
trusted.

What is derived from a teacher (its routing statistics, the teachers' outputs on a split's
training images) is keyed by the digest of the weights it was computed from, not by the config:
a retrained teacher whose weights differ (a corrupt entry retrained on a non-deterministic GPU,
an entry replaced by another) never meets the statistics or outputs of the old weights.

The *pool* is what the student learns from without labels: the split's training images (the
union of the tasks' training parts), or its transfer set when it has one (``splits[i].transfer``,
:attr:`harness.data.splits.SplitData.pool_part`). The routing statistics include a background
Gaussian fitted on the pool in each teacher's feature space (claim score ``rmd``), so they are
keyed by the teacher's weights *and* the pool: by the digest of the teacher's features on the pool
(:func:`pool_digest`), a content hash, so any change of the pool's images refits them. Everything
else about a teacher (its training, class means, standardisation) stays on its own labelled data.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor

from harness.config import DatasetConfig, Recipe, TeacherConfig, TrainConfig
from harness.data.splits import PartData, SplitData
from harness.files import save_torch, sweep_temporaries
from harness.keys import stable_hash
from harness.methods.base import SplitInfo, TeacherSet
from harness.methods.supervised import SupervisedCE
from harness.models import Net, build_model
from harness.routing.stats import RoutingStats, TeacherStats, fit_background, fit_stats
from harness.train import fit

CACHE_VERSION = 1


def cache_root(configured: str | None = None) -> Path:
    """``cache_dir`` of the study, else ``$HARNESS_CACHE``, else ``./.harness_cache``."""
    return Path(configured or os.environ.get("HARNESS_CACHE") or ".harness_cache")


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 (hex) of a state dict: for each entry in key order, its name, dtype, shape and raw
    bytes, read on the CPU from a contiguous copy (deterministic, whatever device trained it)."""
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    """A teacher with its cache key, the digest of its weights, whether it came from the cache,
    its own-task metrics, and its seed."""

    index: int
    key: str
    spec: dict[str, Any]
    net: Net
    cached: bool
    metrics: dict[str, float]
    history: list[dict[str, float]]
    stats: TeacherStats | None = None
    digest: str = ""
    seed: int = 0
    #: digest of the teacher's features on the pool its statistics' background was fitted on
    pool: str = ""


def checkpoint_path(key: str, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "teachers" / f"{key}.pt"


def _load(path: Path, net: Net) -> dict[str, Any] | None:
    """The entry's meta with the weights loaded into ``net``; None (with a warning) when the
    entry is unreadable, of another architecture, or its weights do not match its digest."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(blob["state_dict"])
        meta = blob["meta"]
        stored = meta.get("digest")
    except Exception as e:  # corrupt, truncated, or from another architecture
        warnings.warn(f"teacher cache entry {path} is unreadable ({type(e).__name__}); retraining", stacklevel=2)
        return None
    if stored != state_digest(net.state_dict()):
        why = "has no digest" if not stored else "does not match its digest"
        warnings.warn(f"teacher cache entry {path} {why} (weights not verified); retraining", stacklevel=2)
        return None
    return meta


def _save_atomic(path: Path, obj: Any) -> None:
    """Into the cache atomically (:func:`harness.files.save_torch`): a full or read-only cache is
    one line naming the entry, and no temporary stays."""
    save_torch(path, obj, "teacher cache entry")


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


def pool_digest(pool_feats: Tensor) -> str:
    """sha256 (hex) of one teacher's features on the pool: identifies the pool as this teacher
    sees it (its images, their order, the weights), whatever produced it."""
    return state_digest({"pool": pool_feats})


def stats_path(rec: TeacherRecord, cache_dir: str | None = None, settings: RoutingStats = RoutingStats()) -> Path:
    """``<key>-routing-<digest>-<pool>-<settings>.pt``: the teacher key (its own data), the digest
    of the weights the statistics were fitted with, the pool's (:func:`pool_digest`, kept in
    ``rec.pool``) and the settings."""
    name = f"{rec.key}-routing-{rec.digest[:16]}-{rec.pool[:16]}-{stable_hash(settings.model_dump())}.pt"
    return cache_root(cache_dir) / "teachers" / name


def routing_stats(
    rec: TeacherRecord, split: SplitData, pool_feats: Tensor, cache_dir: str | None = None,
    settings: RoutingStats = RoutingStats(),
) -> TeacherStats:
    """Teacher k's routing statistics: fitted on its own training/validation images, with the
    background of ``rmd`` fitted on ``pool_feats`` (its features on the pool, no label), cached
    next to its checkpoint keyed by its weights and the pool (:func:`stats_path`). Sets
    ``rec.pool``."""
    rec.pool = pool_digest(pool_feats)
    path = stats_path(rec, cache_dir, settings)
    if path.exists():
        try:
            return TeacherStats.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:
            warnings.warn(f"routing statistics {path} are unreadable ({type(e).__name__}); refitting", stacklevel=2)
    x_tr, y_tr = split.task_part(rec.index, "train")
    x_va, _ = split.task_part(rec.index, "val")
    stats = fit_stats(rec.net, x_tr, y_tr, x_va, settings, background=fit_background(pool_feats))
    _save_atomic(path, stats.to_dict())
    return stats


def get_teachers(
    split: SplitData, dataset: DatasetConfig, cfgs: list[TeacherConfig], cache_dir: str | None = None,
    device: str = "cpu", on_ready: Callable[[TeacherRecord], None] | None = None,
) -> list[TeacherRecord]:
    """Train or load every teacher of a split (``on_ready`` is called for each, e.g. to log it),
    then their outputs on the pool (:func:`cached_outputs`: the transfer set when the split has
    one) and their routing statistics (own data, with the ``rmd`` background fitted on the pool)."""
    records = []
    sweep_temporaries(cache_root(cache_dir) / "teachers")  # temporaries of writers that died (kill -9)
    for k, cfg in enumerate(cfgs):
        spec = teacher_spec(split, k, dataset, cfg)
        key = stable_hash(spec)
        path = checkpoint_path(key, cache_dir)
        net = build_model(cfg.arch, split.in_shape, split.tasks[k].n, **cfg.options())
        meta = _load(path, net) if path.exists() else None
        if meta is not None and meta.get("key") == key:
            rec = TeacherRecord(k, key, spec, net.eval(), True, meta["metrics"], meta.get("history", []),
                                digest=meta["digest"], seed=cfg.seed)
        else:
            net, metrics, history = train_teacher(task_data(split, k), cfg, device)
            digest = state_digest(net.state_dict())
            _save_atomic(path, {"state_dict": net.state_dict(),
                                "meta": {"key": key, "digest": digest, "metrics": metrics, "history": history}})
            rec = TeacherRecord(k, key, spec, net, False, metrics, history, digest=digest, seed=cfg.seed)
        if on_ready is not None:
            on_ready(rec)
        records.append(rec)
    _, pool_feats = cached_outputs(records, split, cache_dir, "pool")
    for rec, feats in zip(records, pool_feats):
        rec.stats = routing_stats(rec, split, feats, cache_dir)
    return records


#: which images teachers' outputs are cached for: the student's ``pool`` or the ``train`` part
OutputsOf = Literal["pool", "train"]


def outputs_path(
    records: list[TeacherRecord], split: SplitData, cache_dir: str | None = None, part: OutputsOf = "pool"
) -> Path:
    """``outputs-<hash>.pt``, the hash over the teachers' keys and weight digests (which cover
    image size and validation fraction) and the split's tasks, sources and training-set size; for
    the pool of a split with a transfer set also the transfer set (its config, the split's image
    shape it was converted to, its size). Without one, the pool is the training part: one file."""
    desc: dict[str, Any] = {"teachers": [[r.key, r.digest] for r in records], "split": split.describe()["tasks"],
                            "sources": [(t.dataset, t.root) for t in split.tasks], "n": len(split.parts["train"])}
    if part == "pool" and split.pool is not None:
        assert split.transfer is not None
        desc["transfer"] = {**split.transfer.model_dump(mode="json"), "in_shape": list(split.in_shape),
                            "n": len(split.pool)}
    return cache_root(cache_dir) / "teachers" / f"outputs-{stable_hash(desc)}.pt"


def cache_files(records: list[TeacherRecord], split: SplitData, cache_dir: str | None = None) -> list[Path]:
    """The cache files of these teachers that exist now: checkpoints, routing statistics of the
    current weights, and the split's teacher outputs (what a worker without this file system needs)."""
    paths = [checkpoint_path(r.key, cache_dir) for r in records]
    paths += [stats_path(r, cache_dir) for r in records] + [outputs_path(records, split, cache_dir)]
    return [p for p in paths if p.exists()]


def cached_outputs(
    records: list[TeacherRecord], split: SplitData, cache_dir: str | None = None, part: OutputsOf = "pool"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The frozen teachers' (logits, features) on the split's pool (``part="pool"``: the transfer
    set if the split has one, else the training images) or on its training images
    (``part="train"``: what a method that uses labels trains on), computed once per split and
    stored next to the checkpoints (keyed by the digests of the teachers' weights and the split,
    :func:`outputs_path`), so every method, variant and seed of the split reuses them."""
    from harness.methods.base import TeacherSet
    from harness.train import teacher_outputs

    images = split.pool_part if part == "pool" else split.parts["train"]
    n = len(images)
    path = outputs_path(records, split, cache_dir, part)
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if len(blob["logits"]) == len(records) and all(len(t) == n for t in blob["logits"]):
                return blob["logits"], blob["feats"]
        except Exception as e:
            warnings.warn(f"teacher-output cache {path} is unreadable ({type(e).__name__}); recomputing", stacklevel=2)
    logits, feats = teacher_outputs(TeacherSet([r.net for r in records]), images.x)
    _save_atomic(path, {"logits": logits, "feats": feats})
    return logits, feats
