"""The keys that name results: :func:`stable_hash` (the basis of every cache and trial key),
:data:`RESULTS_VERSION` and :func:`trial_key`.

A ground-floor module (docs/layers.md): it imports no harness module at run time, only
:class:`~harness.config.StudyConfig` for its type, so anything that needs a key (the grid, the
teacher cache, the tuner, the estimator) can name one without importing torch or the trainer.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.config import StudyConfig

#: Version of everything that moves a result but is not in the study file: the losses, the models,
#: data handling (loading, splitting, normalisation, augmentation), the training loop, routing and
#: evaluation. Bump it (one integer) in the same commit as any change that can move a logged
#: number for an unchanged study file; every trial key changes with it, so runs of the old code
#: no longer count as finished and a rerun recomputes them. Refactors that give bitwise the same
#: results do not bump it. History: 1 = up to the trust review; 2 = log-space confidence routing
#: with continuous tie-breaks, opaque batch ids, augmentation ops, digest-keyed teacher caches;
#: 3 = learning rates from ``train.lr_mult`` only (cfl's head and block no longer at 10x by
#: default), ``mmd2``'s norms from the Gram diagonal, ``crd`` drawing its negatives also from small
#: pools, ``rkd``'s 1e-6 floor on distances (each as the authors' code).
RESULTS_VERSION = 3


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of canonical JSON (sorted keys), the basis of every cache and trial key."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def trial_key(
    study: StudyConfig, split_index: int, method: str, params: dict, seed: int, precision: str = "fp32"
) -> str:
    """Hash of everything that determines a trial's numbers, and only that.

    In the key: the data set (name, root, validation fraction, image size), the split's tasks,
    the teachers of this trial (architecture, options, recipe, seed: with
    ``teacher_seeds: per_seed`` the student seed's own), the student, the training recipe, the
    method and its resolved parameters, the seed, the effective numeric ``precision`` (bf16
    autocast changes numbers) and :data:`RESULTS_VERSION` (code changes that move numbers).

    Deliberately left out, because they do not change a number: ``dataset.stream`` (how images
    are read: same batches, bitwise the same results); ``dataset.download`` (whether the files
    are fetched before they are read); the study ``name`` (runs live in the
    study's experiment anyway); the variant's name (two names for one configuration are one
    trial, and a study-file error); ``devices``, ``trials_per_device``, ``--workers`` and the
    backend (where and beside what a trial runs: CPU slots are single-threaded, and GPU packing
    does not change a trial's arithmetic; the device type enters through ``precision``);
    ``max_retries``, ``cache_dir`` and ``search`` (how often, where cached, what is tuned);
    the ``routing``/``ablations``/``variants`` blocks as such (they enter through the resolved
    ``params``).
    """
    split = study.splits[split_index]
    return stable_hash(
        {
            "results_version": RESULTS_VERSION,
            "precision": precision,
            # ``stream``/``download`` only say how images are read or fetched: not in the key
            "dataset": study.dataset.model_dump(mode="json", exclude={"stream", "download"}),
            "split": split.model_dump(mode="json"),
            "teachers": [t.model_dump(mode="json") for t in study.teachers_for(split, seed)],
            "student": study.student.model_dump(mode="json"),
            "train": study.train.model_dump(mode="json"),
            "method": method,
            "params": params,
            "seed": seed,
        }
    )
