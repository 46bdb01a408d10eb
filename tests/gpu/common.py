"""What the GPU checks share: the device under test, tiny digits studies, running one on the
local pool with its own MLflow store, and reading its trial runs back.

``HARNESS_GPU_REHEARSAL=1`` runs the suite on the CPU instead, to check the suite's own logic on
a machine without a GPU (it proves nothing about CUDA; the checks that only mean something on a
GPU skip themselves then)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.tracking import MlflowClient

from harness.methods.base import discover
from harness.routing import SCORES, STANDARDIZE, TARGETS
from harness.runner import run_study
from harness.store import TAG
from harness.tracking import tag_seconds

CUDA = torch.cuda.is_available()
REHEARSAL = os.environ.get("HARNESS_GPU_REHEARSAL") == "1"
#: the device the trials run on: the first GPU (the CPU in a rehearsal)
DEVICE = "cuda:0" if CUDA and not REHEARSAL else "cpu"
ON_GPU = DEVICE.startswith("cuda")
#: what ``train.amp: true`` trains at on DEVICE (bf16 on GPUs that have it: every GPU since Ampere)
AMP_PRECISION = "bf16" if ON_GPU and torch.cuda.is_bf16_supported() else "fp32"
SKIP_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False; HARNESS_GPU_REHEARSAL=1 rehearses on the CPU)"
gpu_only = __import__("pytest").mark.skipif(not ON_GPU, reason="means something on a GPU only (not in a rehearsal)")

#: every claim score under every standardisation, both target forms (alternating), a sum of
#: scores and a pseudo-label temperature: 23 rules
RULES = [f"{s}/{z}/{TARGETS[(i + j) % 2]}" for i, s in enumerate(SCORES) for j, z in enumerate(STANDARDIZE)]
RULES += ["max_logit+mahalanobis/z/routed", "entropy/none/routed@T_pl=2"]
#: the default rule, the routing study's best (a feature-space rule) and a bank rule
FEW_RULES = ["confidence/none/concat", "mahalanobis/z/routed", "knn/percentile/concat"]
#: test images of digits (1797 x 0.25): one image is 1/450 of union accuracy
TEST_IMAGES = 450


def methods() -> list[str]:
    """Every shipped method (entry points and built-ins, not the test suite's own)."""
    reg = discover()
    return [m for m in reg.names() if not reg.get(m).__module__.startswith("tests.")]


def has_routing(method: str) -> bool:
    return "routing" in discover().get(method).ParamsModel.model_fields


def trains(method: str) -> bool:
    return bool(discover().get(method).trains)


def study(name: str, work: Path, **over: Any) -> dict[str, Any]:
    """A digits study on DEVICE: two teachers (a CNN and an MLP, cached in ``work/cache`` and
    shared by every study here), a width-8 CNN student, 2 epochs, seed 0. ``train`` entries in
    ``over`` update the recipe; other keys replace the study's."""
    train = {"epochs": 2, "batch_size": 128, **over.pop("train", {})}
    return {
        "name": name,
        "dataset": {"name": "digits", "val_fraction": 0.1},
        "splits": [{"name": "2x5", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}],
        "teachers": [{"arch": "cnn", "width": 16, "epochs": 10}, {"arch": "mlp", "hidden": 64, "epochs": 10}],
        "student": {"arch": "cnn", "width": 8},
        "train": train,
        "methods": {"kd": {}},
        "seeds": [0],
        "devices": [DEVICE],
        "cache_dir": str(work / "cache"),
        **over,
    }


def run(spec: dict[str, Any], work: Path, workers: int | None = None) -> list[Any]:
    """Run the study on the local pool (its own store ``work/<name>.db``); every trial run."""
    path = work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    uri = store(spec["name"], work)
    run_study(path, tracking_uri=uri, workers=workers, report=False, live=False)
    return trial_runs(spec["name"], work)


def store(name: str, work: Path) -> str:
    return f"sqlite:///{work}/{name}.db"


def trial_runs(name: str, work: Path) -> list[Any]:
    client = MlflowClient(store(name, work))
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`{TAG}kind` = 'trial'", max_results=10000)


def label(r: Any) -> str:
    t = r.data.tags
    return f"{t[f'{TAG}method']}:{t[f'{TAG}variant']}/seed{t[f'{TAG}seed']}"


def failures(runs: list[Any]) -> str:
    """Every trial that did not finish, with its reason and the end of its traceback."""
    out = []
    for r in runs:
        if r.info.status != "FINISHED":
            t = r.data.tags
            tb = t.get(f"{TAG}traceback", "").strip().splitlines()[-6:]
            out.append(f"{label(r)} {r.info.status}: {t.get(f'{TAG}failure', '?')}\n    " + "\n    ".join(tb))
    return "\n".join(out)


def assert_all_finished(runs: list[Any], expected: int) -> None:
    bad = failures(runs)
    assert not bad, f"{len(bad.splitlines())} lines of failures:\n{bad}"
    assert len(runs) == expected, sorted(label(r) for r in runs)


def by(runs: list[Any], key: str = "trial_key") -> dict[str, Any]:
    """Runs by a tag (``trial_key``) or by ``label`` (method:variant/seed, same across precisions)."""
    return {label(r) if key == "label" else r.data.tags[f"{TAG}{key}"]: r for r in runs}


def metric(r: Any, name: str) -> float:
    value = r.data.metrics.get(name, float("nan"))
    assert math.isfinite(value), f"{label(r)}: {name} = {value}"
    return value


#: every method's own routing rule: its ``full`` row
DEFAULT_RULE = "confidence/none/concat"


def expected_trials(methods_: list[str], rules: list[str], seeds: int = 1) -> int:
    """Trials of a study: a method with a routing parameter has its ``full`` row (the default
    rule) and one row per other rule, any other method one row; per seed for seeded methods (the
    teachers' row is seed-independent)."""
    n = 0
    for m in methods_:
        per = len(set(rules) | {DEFAULT_RULE}) if has_routing(m) else 1
        n += per * (seeds if discover().get(m).seeded else 1)
    return n


def slot_names(k: int) -> set[str]:
    """The slot tags of DEVICE with ``trials_per_device: k``."""
    if ON_GPU:
        return {DEVICE} if k == 1 else {f"{DEVICE}#{j}" for j in range(k)}
    return {f"cpu#{j}" for j in range(k)}


def peak_concurrency(runs: list[Any]) -> int:
    """Most trials running at one moment (from their start/end tags; an end sorts before a start)."""
    events = sorted([(tag_seconds(r.data.tags[f"{TAG}start"]), 1) for r in runs]
                    + [(tag_seconds(r.data.tags[f"{TAG}end"]), -1) for r in runs])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak
