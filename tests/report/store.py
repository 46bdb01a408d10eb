"""A small MLflow store with known metric values, logged through MlflowClient in the harness schema.

Study ``toy``. Split ``2x5`` (2 tasks, seeds 0-2) has every kind of row and mishap; split ``3x3``
(3 tasks, seeds 0-5) has six paired seeds (Wilcoxon), no teacher runs (teacher rows then come
from the ``teachers`` reference run) and a claiming ensemble far below its teachers (routing).
The latest study run logged ``trial_keys.json`` (no ``study.yaml``); runs of other trial keys
(``OTHER``: an edited study) are logged last, so that only scoping by key keeps them out.
Metrics are logged under the names of the harness before its one vocabulary (``test/acc``,
``test/union_acc_best``; :func:`today` gives today's). Seed order and value order disagree (``-task`` on 2x5, both variants on 3x3): pairing by sorted
value instead of by seed changes every spread, t, p and CI. The expected numbers are in the tests.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Callable, Mapping

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

STUDY = "toy"
EPOCHS = 3
_clock = itertools.count(1_700_000_000_000, 1000)  # distinct, increasing start times

# (method, variant, uses_labels) -> per-seed (test/union_acc, test/union_acc_best) on split 2x5
SPLIT_A = {
    ("scratch", "full", True): {0: (0.95, 0.95), 1: (0.96, 0.96), 2: (0.97, 0.97)},
    ("kd", "full", False): {0: (0.91, 0.92), 2: (0.93, 0.94)},  # seed 1 FAILED
    ("cfl", "full", False): {0: (0.89, 0.90), 1: (0.90, 0.91), 2: (0.91, 0.92)},  # seed 2 KILLED, then redone
    ("cka", "full", False): {0: (0.90, 0.94), 1: (0.92, 0.95), 2: (0.94, 0.96)},
    ("cka", "-intra", False): {0: (0.88, 0.90), 1: (0.91, 0.91), 2: (0.91, 0.92)},
    ("cka", "-inter", False): {0: (0.91, 0.91), 1: (0.93, 0.93)},  # seed 2 never ran
    ("cka", "-align", False): {0: (0.92, 0.92), 1: (0.94, 0.94), 2: (0.96, 0.96)},  # Δ = +0.02 on every seed
    ("cka", "-task", False): {0: (0.87, 0.87), 1: (0.80, 0.80), 2: (0.85, 0.85)},  # not in seed order
    ("cka", "-intra-inter", False): {0: (0.85, 0.85), 1: (0.86, 0.86), 2: (0.87, 0.87)},
    ("cka", "wide", False): {0: (0.93, 0.93), 1: (0.94, 0.94), 2: (0.95, 0.95)},
}
SPLIT_B_FULL = [0.84, 0.80, 0.83, 0.81, 0.85, 0.82]  # seeds 0-5
SPLIT_B_DIFF = [-0.02, +0.01, -0.03, -0.05, -0.04, -0.06]  # -intra minus full, per seed
SPLIT_B_INTRA = [round(f + d, 10) for f, d in zip(SPLIT_B_FULL, SPLIT_B_DIFF)]
TEACHER_KEYS = {"2x5": ("tkey0", "tkey1")}  # the teachers the 2x5 trials used (tags), digests "d<key>"
#: runs of other trial keys (an earlier version of the study): (method, variant, seed, last, status)
OTHER = [("cka", "full", 0, 0.10, "FINISHED"), ("kd", "full", 1, 0.99, "FINISHED"), ("kd", "full", 0, 0.5, "FAILED")]
TERMS = {"cka": ["task", "intra", "inter", "align"], "kd": ["kd"], "cfl": ["kd", "mmd", "recon"], "scratch": ["ce"]}
#: the store logs the metric names of the harness before its one vocabulary (the report reads both);
#: today's name of each (``test/union_acc_bestval``, ``test/own_task_acc`` ...)
TODAY = {"test/union_acc_best": "test/union_acc_bestval", "test/acc": "test/own_task_acc",
         "test/acc_last": "test/own_task_acc_last", "val/acc_best": "val/own_task_acc_best"}


def today(key: str) -> str:
    """Today's name of a metric this store logs under its older name."""
    return TODAY.get(key) or re.sub(r"^test/task_acc_best/", "test/task_acc_bestval/", key)


def log_run(
    client: MlflowClient, exp_id: str, tags: dict[str, str], final: dict[str, float],
    history: dict[str, list[float]] | None = None, status: str = "FINISHED", params: dict[str, str] | None = None,
) -> str:
    """One run in the harness schema: tags, then params, per-epoch history (step = epoch) and final
    metrics (step = last epoch) in one batch, then the status."""
    start = next(_clock)
    variant = tags.get("harness.variant", "full")
    suffix = "" if variant == "full" else variant if variant.startswith("-") else f":{variant}"
    name = f"{tags.get('harness.split')}/{tags.get('harness.method')}{suffix}/seed{tags.get('harness.seed')}"
    if status in ("FAILED", "KILLED"):
        kind = "exception" if status == "FAILED" else "interrupted"
        tags = {**tags, "harness.failure": f"RuntimeError: {status.lower()} on purpose", "harness.failure_kind": kind}
    run = client.create_run(exp_id, start_time=start, tags=tags, run_name=name)
    rid = run.info.run_id
    history = history or {}
    n = max((len(v) for v in history.values()), default=0)
    metrics = [Metric(k, v[e - 1], start + e, e) for e in range(1, n + 1) for k, v in history.items()]
    metrics += [Metric(k, v, start + 100, n) for k, v in final.items()]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in (params or {}).items()])
    if status != "RUNNING":
        client.set_terminated(rid, status=status, end_time=start + 500)
    return rid


def key(split: str, method: str, variant: str, seed: int) -> str:
    """The toy trial key of one trial of the study."""
    return f"{split}{method}{variant}{seed}"


def trial_tags(split: str, method: str, variant: str, seed: int, uses_labels: bool) -> dict[str, str]:
    teachers = TEACHER_KEYS.get(split, ())
    return {"harness.study": STUDY, "harness.split": split, "harness.method": method, "harness.variant": variant,
            "harness.seed": str(seed), "harness.kind": "trial", "harness.trial_key": key(split, method, variant, seed),
            **({"harness.teacher_keys": ",".join(teachers),
                "harness.teacher_digests": ",".join(f"d{k}" for k in teachers)} if teachers else {}),
            "harness.uses_labels": str(uses_labels).lower(), "harness.version": "0.1.0",
            "harness.torch_version": "2.5.0", "harness.python_version": "3.11.7",
            "harness.git_commit": "0123456789abcdef0123", "harness.git_dirty": "false"}


def _history(method: str, acc: float) -> dict[str, list[float]]:
    h = {f"loss/{t}": [1.0 / e + 0.1 * i for e in range(1, EPOCHS + 1)] for i, t in enumerate(TERMS.get(method, []))}
    h["loss/total"] = [2.0 / e for e in range(1, EPOCHS + 1)]
    h["val/union_acc"] = [acc - 0.1 / e for e in range(1, EPOCHS + 1)]
    h["epoch_seconds"] = [1.0] * EPOCHS
    return h


def _params(split: str, method: str, variant: str, seed: int) -> dict[str, str]:
    p = {"seed": str(seed), "method": method, "variant": variant, "study": STUDY, "train.epochs": str(EPOCHS),
         "split.name": split}
    if method == "cka":
        p.update({"params.w_intra": "0.0" if "intra" in variant else "0.1", "params.w_align": "1.0"})
    return p


def trial(client: MlflowClient, exp_id: str, split: str, method: str, variant: str, seed: int, uses_labels: bool,
          last: float, best: float, ntasks: int = 2, status: str = "FINISHED", **extra: float) -> str:
    final = {"test/union_acc": last, "test/union_acc_best": best, "val/union_acc_best": best, "best_epoch": 2.0,
             **{f"test/task_acc/{k}": last + 0.01 * (k + 1) for k in range(ntasks)},
             **{f"test/task_acc_best/{k}": best + 0.01 * (k + 1) for k in range(ntasks)},
             "diag/pseudo_label_acc": 0.91, "diag/ensemble_union_acc": 0.90, "trial_seconds": 10.0 + seed, **extra}
    return log_run(client, exp_id, trial_tags(split, method, variant, seed, uses_labels), final,
                   _history(method, best), status, _params(split, method, variant, seed))


def study_keys() -> list[str]:
    """The trial keys of the toy study as run (``trial_keys.json``)."""
    keys = [key("2x5", m, v, s) for (m, v, _), _ in SPLIT_A.items() for s in range(3)]
    keys += [key("2x5", "teachers", "full", 0), key("3x3", "teachers", "full", 0)]
    return keys + [key("3x3", "cka", v, s) for v in ("full", "-intra") for s in range(7)]


def teacher_run(client: MlflowClient, exp_id: str, split: str, task: int, acc: float, teacher_key: str) -> str:
    tags = {"harness.study": STUDY, "harness.split": split, "harness.kind": "teacher", "harness.task": str(task),
            "harness.method": "teacher", "harness.variant": "full", "harness.uses_labels": "true",
            "harness.teacher_key": teacher_key, "harness.teacher_digest": f"d{teacher_key}"}
    return log_run(client, exp_id, tags, {"test/acc": acc, "test/acc_last": acc - 0.01, "val/acc_best": acc})


def build(uri: str, artifacts: Path) -> MlflowClient:
    """Log the whole known store at ``uri`` (a fresh sqlite file), artifacts in ``artifacts``."""
    client = MlflowClient(uri)
    exp = client.create_experiment(STUDY, artifact_location=artifacts.as_uri())
    log_run(client, exp, {"harness.kind": "study", "harness.study": STUDY}, {}, status="FAILED")
    study_run = log_run(client, exp, {"harness.kind": "study", "harness.study": STUDY}, {})
    client.log_text(study_run, json.dumps(study_keys()), "trial_keys.json")
    for k, acc in enumerate([0.99, 0.97]):
        teacher_run(client, exp, "2x5", k, acc, TEACHER_KEYS["2x5"][k])
    ref = {"test/union_acc": 0.90, "test/union_acc_best": 0.90, "test/task_acc/0": 0.99, "test/task_acc/1": 0.97,
           "diag/ensemble_union_acc": 0.90, "best_epoch": 0.0}  # trained nothing: seed-independent
    log_run(client, exp, trial_tags("2x5", "teachers", "full", 0, False), ref,
            params=_params("2x5", "teachers", "full", 0))
    # mishaps first, so that the good runs are the latest
    trial(client, exp, "2x5", "scratch", "full", 0, True, 0.50, 0.50)  # duplicate FINISHED, superseded
    trial(client, exp, "2x5", "kd", "full", 1, False, 0.10, 0.10, status="FAILED")  # partial metrics must not count
    trial(client, exp, "2x5", "cfl", "full", 2, False, 0.20, 0.20, status="KILLED")
    for (method, variant, labels), seeds in SPLIT_A.items():
        for seed, (last, best) in seeds.items():
            trial(client, exp, "2x5", method, variant, seed, labels, last, best,
                  **({"diag/probe_acc": 0.88} if method == "cka" and seed < 2 else {}))
    ref3 = {"test/union_acc": 0.75, "test/union_acc_best": 0.75, "test/task_acc/0": 0.95, "test/task_acc/1": 0.94,
            "test/task_acc/2": 0.93, "best_epoch": 0.0}
    log_run(client, exp, trial_tags("3x3", "teachers", "full", 0, False), ref3)
    ens = {"diag/ensemble_union_acc": 0.75}  # the ensemble of 3x3 is 18 points below its weakest teacher (0.93)
    for seed, (full, intra) in enumerate(zip(SPLIT_B_FULL, SPLIT_B_INTRA)):
        trial(client, exp, "3x3", "cka", "full", seed, False, full, full, ntasks=3, **ens)
        trial(client, exp, "3x3", "cka", "-intra", seed, False, intra, intra, ntasks=3, **ens)
    trial(client, exp, "3x3", "cka", "full", 6, False, 0.0, 0.0, ntasks=3, status="RUNNING")
    # an earlier version of the study, logged last: the latest runs of their (split, method, seed)
    teacher_run(client, exp, "2x5", 0, 0.50, "tkey-old")
    for method, variant, seed, acc, status in OTHER:
        tags = {**trial_tags("2x5", method, variant, seed, False), "harness.trial_key": f"old-{method}{seed}",
                "harness.teacher_keys": "tkey-old,tkey1", "harness.teacher_digests": "dtkey-old,dtkey1"}
        log_run(client, exp, tags, {"test/union_acc": acc, "test/union_acc_best": acc}, status=status,
                params=_params("2x5", method, variant, seed))
    return client


# ----------------------------------------------------------------------------- harness tune
def tune_trial(
    client: MlflowClient, exp_id: str, optuna_study: str, method: str, number: int, state: str, value: float | None,
    params: dict, space: dict, default: bool = False, objective: str = "val_last", steps: int = 6,
    status: str | None = None, end_offset: int = 500,
) -> str:
    """One Optuna trial run in the schema of ``harness tune``: ``space`` maps each parameter path
    to an Optuna distribution; ``objective/running`` rises to ``value`` over ``steps`` steps."""
    import json

    from optuna.distributions import distribution_to_json

    start = next(_clock)
    status = status or {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}.get(state, "RUNNING")
    tags = {"harness.kind": "tune_trial", "harness.study": optuna_study.split("/")[0], "harness.method": method,
            "harness.optuna_study": optuna_study, "harness.optuna_number": str(number),
            "harness.optuna_state": state, "harness.optuna_default": str(default).lower(),
            "harness.optuna_params": json.dumps(params),
            "harness.optuna_distributions": json.dumps({k: distribution_to_json(d) for k, d in space.items()}),
            "harness.objective": objective, "harness.version": "0.1.0", "harness.python_version": "3.11.7"}
    if state == "FAIL":
        tags["harness.failure"] = "RuntimeError: trial failed on purpose"
    rid = client.create_run(exp_id, start_time=start, tags=tags, run_name=f"{optuna_study}/trial{number}").info.run_id
    metrics = []
    if value is not None:
        metrics = [Metric("objective/running", value * (1 - 0.05 * (steps - 1 - s)), start + s, s)
                   for s in range(steps)]
        if state in ("COMPLETE", "PRUNED"):
            metrics += [Metric("objective", value, start + 100, 0), Metric("trial_seconds", 5.0 + number, start, 0)]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    if status != "RUNNING":
        client.set_terminated(rid, status=status, end_time=start + end_offset)
    return rid


def search_run(client: MlflowClient, exp_id: str, storage: str, optuna_studies: list[str]) -> str:
    """The parent run of one ``harness tune`` invocation."""
    tags = {"harness.kind": "search", "harness.study": optuna_studies[0].split("/")[0], "harness.storage": storage,
            "harness.optuna_studies": ",".join(optuna_studies)}
    return log_run(client, exp_id, tags, {})


#: logs one seed's trial run: (client, experiment id, study, split, method, variant, seed, accuracy)
SeedLogger = Callable[[MlflowClient, str, str, str, str, str, int, float], None]


def log_studies(folder: Path, data: Mapping[str, Mapping[str, Mapping[str, list[float]]]], log_seed: SeedLogger) -> str:
    """A store of constructed studies ``{study: {split: {"method[:variant]": [accuracy per seed]}}}``:
    each seed's trial run logged by ``log_seed``, then each study's run with the trial keys it ran
    (what a report scopes by). Returns the store's URI."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    for study, splits in data.items():
        exp = client.create_experiment(study, artifact_location=(folder / study).as_uri())
        keys = []
        for split, rows in splits.items():
            for row, values in rows.items():
                method, _, variant = row.partition(":")
                variant = variant or "full"
                for seed, acc in enumerate(values):
                    log_seed(client, exp, study, split, method, variant, seed, acc)
                    keys.append(key(split, method, variant, seed))
        run = log_run(client, exp, {"harness.kind": "study", "harness.study": study}, {})
        client.log_text(run, json.dumps(keys), "trial_keys.json")
    return uri
