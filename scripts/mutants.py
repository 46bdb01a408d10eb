#!/usr/bin/env python
"""Mutation check of the test suite (issue #19, item 2): does a realistic bug make a test fail?

Each mutant is one realistic bug: exact ``old`` snippets of one file replaced by ``new`` ones.
For every selected mutant the script

1. copies the code of ``--rev`` (a git revision, via ``git archive``; default: the working tree,
   i.e. the tracked and untracked-but-not-ignored files) to a scratch folder
   ``<--work>/<rev>/<mutant id>``;
2. applies the mutant's edits; an ``old`` snippet that is not found exactly once makes the
   mutant ``n/a`` (the code changed: update the snippet) and nothing is run;
3. runs the mutant's tests there: ``python -m pytest -x -q -p no:cacheprovider <tests>`` from the
   scratch folder with ``PYTHONPATH=<scratch>``, so the scratch copy imports its own ``harness``
   and ``baselines`` (the editable install's finder comes after ``sys.path``; entry points
   ``harness.methods`` name modules, ``baselines.kd`` ..., resolved through ``sys.path``; worker
   processes inherit ``PYTHONPATH``). A check at start-up prints where ``harness``, the methods'
   entry points and ``tests`` are imported from, and stops if any is outside the scratch copy;
4. records ``caught`` (pytest exit 1: a test failed), ``survived`` (exit 0), ``timeout``,
   ``error`` (pytest exit 2-5, e.g. the mutant breaks collection: the suite fails, but not by an
   assertion) or ``n/a``.

Before the mutants, a baseline run of the union of their tests on the unmutated copy checks that
those tests pass (``--no-baseline`` skips it); a mutant whose tests already fail unmutated is
reported ``caught*`` and means nothing.

Output: a Markdown table (id, category, file, description, result, first failing test) on
stdout, and a JSON file (``--json``, default ``<work>/<rev>.json``), rewritten after each mutant.

Usage (from the repository root)::

    python scripts/mutants.py --list                      # the mutants, nothing run
    python scripts/mutants.py --rev 4c07aeb               # all mutants against a commit
    python scripts/mutants.py                             # against the working tree
    python scripts/mutants.py --only B3,S1 --no-baseline  # some mutants
    python scripts/mutants.py --category seeds --timeout 600

Run it on a quiet machine: mutants run one at a time (``--jobs 1``), each only its own test
files with ``-x`` (about an hour for all of them on 2 busy cores). When the code moves, a mutant
whose snippets no longer match is ``n/a``: add the same bug for the new code as an ``alt`` edit
list (``--check`` says which apply, without running tests). New test files belong in the ``T_*``
selections below (or ``--add-tests``); ``--tests tests`` runs the whole suite for every mutant.

Categories (issue #19): best-epoch selection and restore (``B*``), seeds (``S*``), what the trial
key covers (``K*``), resume (``R*``), pairing by seed in the statistics (``P*``), method internals
(``M*``), frozen teachers (``F*``), report labels (``L*``). Tautological assertions are not
mutants: look for them by reading the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One seeded bug: ``edits`` are (old, new) pairs applied in order to ``file``; ``alt`` holds
    the same bug written for other versions of the code (tried in order when ``edits`` does not
    apply). ``tests``: test files or node ids; globs are expanded, absent files are left out."""

    id: str
    category: str
    file: str
    description: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    alt: tuple[tuple[tuple[str, str], ...], ...] = ()


def mutant(id: str, category: str, file: str, description: str, old: str, new: str, tests: str,
           more: tuple[tuple[str, str], ...] = (), alt: tuple[tuple[tuple[str, str], ...], ...] = ()) -> Mutant:
    return Mutant(id, category, file, description, ((old, new), *more), tuple(tests.split()), alt)


# test selections (files or node ids), kept to what exercises the mutated code
# (files absent from a revision are left out: e.g. tests/test_grid.py did not exist at 4c07aeb)
T_TRAIN = "tests/test_train.py tests/test_teachers.py tests/test_trial.py tests/test_e2e.py"
T_SEEDS = "tests/test_train.py tests/test_trial.py tests/test_e2e.py tests/test_runner.py"
T_KEY = "tests/test_grid.py tests/test_config.py tests/test_e2e.py tests/test_runner.py"
T_RESUME = "tests/test_runner.py tests/test_e2e.py"
T_STATS = "tests/report/test_stats.py tests/report/test_tables.py tests/report/test_build.py"
T_TABLES = ("tests/report/test_tables.py tests/report/test_build.py tests/report/test_frames.py "
            "tests/report/test_scope.py")
T_METHODS = "tests/methods/test_methods.py tests/test_losses.py tests/test_train.py"
T_TEACHERS = ("tests/methods/test_methods.py tests/test_train.py tests/test_teachers.py tests/test_trial.py "
              "tests/test_e2e.py")

BEST, SEEDS, KEY, RESUME, PAIR, METHOD, FROZEN, LABELS = (
    "best-epoch", "seeds", "trial-key", "resume", "pairing", "method", "frozen-teachers", "report-labels")

MUTANTS: list[Mutant] = [
    # --- best-epoch selection and restore ------------------------------------------------------
    mutant("B1", BEST, "harness/train.py", "best epoch chosen by the training loss, not validation accuracy",
           'score = val.get("union_acc", float(epoch))', 'score = -metrics["loss/total"]', T_TRAIN),
    mutant("B2", BEST, "harness/train.py", "best epoch chosen on the test split (per-epoch 'val/*' is test)",
           'evaluate(method.predict, data.parts["val"], sizes, offsets, device)',
           'evaluate(method.predict, data.parts["test"], sizes, offsets, device)', T_TRAIN),
    mutant("B3", BEST, "harness/train.py", "best-val. weights never restored: '*_best' evaluates the last model",
           "method.load_state_dict(res.best_state)", "method.load_state_dict(_state(method))", T_TRAIN),
    mutant("B4", BEST, "harness/train.py", "best snapshot not cloned: it aliases the live weights (best = last)",
           "{k: v.detach().clone() for k, v in", "{k: v.detach() for k, v in", T_TRAIN),
    mutant("B5", BEST, "harness/train.py", "final metrics swapped: test/union_acc is the best-val. model, *_best the last",
           '"test/{k}": v for k, v in last.items()}', '"test/{k}": v for k, v in best_m.items()}', T_TRAIN,
           more=(("_acc_best')}\": v for k, v in best_m.items()}", "_acc_best')}\": v for k, v in last.items()}"),)),
    mutant("B6", BEST, "harness/train.py", "val/union_acc_best read from the last epoch, not the best",
           'res.history[res.best_epoch - 1]["val/union_acc"]', 'res.history[-1]["val/union_acc"]', T_TRAIN),
    mutant("B7", BEST, "harness/train.py", "best epoch recorded 0-based (off by one; *_best from the wrong epoch)",
           "best, res.best_epoch, res.best_state = score, epoch, _state(method)",
           "best, res.best_epoch, res.best_state = score, epoch - 1, _state(method)", T_TRAIN),
    mutant("B8", BEST, "harness/teachers.py", "teacher cache keeps the last-epoch weights, not the best-val. ones",
           "method.load_state_dict(res.best_state)", "pass", T_TRAIN),
    mutant("B9", BEST, "harness/trial.py", "teacher run logs the last-epoch accuracy as test/own_task_acc (best-val. expected)",
           '"test/own_task_acc": rec.metrics.get("test/union_acc_best"', '"test/own_task_acc": rec.metrics.get("test/union_acc"',
           "tests/test_e2e.py tests/test_teachers.py tests/report/test_tables.py"),
    # --- seeds -------------------------------------------------------------------------------
    mutant("S1", SEEDS, "harness/trial.py", "student init ignores the trial seed (every seed: same init)",
           "torch.manual_seed(trial.seed)", "torch.manual_seed(0)", T_SEEDS),
    mutant("S2", SEEDS, "harness/train.py", "batch order ignores the seed (generator seeded with 0)",
           "gen = torch.Generator().manual_seed(seed)", "gen = torch.Generator().manual_seed(0)", T_SEEDS),
    mutant("S3", SEEDS, "harness/train.py", "generator re-seeded every epoch: the same batch order each epoch",
           "            gen = torch.Generator().manual_seed(seed)\n", "",
           T_SEEDS, more=(("                t0 = time.perf_counter()\n",
                           "                t0 = time.perf_counter()\n"
                           "                gen = torch.Generator().manual_seed(seed)\n"),)),
    mutant("S4", SEEDS, "harness/train.py", "batch order drawn from the global RNG (not the trial's generator)",
           "perm = torch.randperm(n, generator=gen)", "perm = torch.randperm(n)", T_SEEDS),
    mutant("S5", SEEDS, "harness/train.py", "augmentation draws from a fresh unseeded generator (same crops every seed)",
           "xb = augment(xb, gen)", "xb = augment(xb, torch.Generator())", T_SEEDS,
           alt=((("xb = augment(xb, gen, cfg.augment)", "xb = augment(xb, torch.Generator(), cfg.augment)"),),)),
    # --- what the trial key covers -------------------------------------------------------------
    mutant("K1", KEY, "harness/keys.py", "trial key ignores the training recipe (train:)",
           '            "train": study.train.model_dump(mode="json"),\n            "method": method,',
           '            "method": method,', T_KEY),
    mutant("K2", KEY, "harness/keys.py", "trial key ignores the student model",
           '            "student": study.student.model_dump(mode="json"),\n            "train"', '            "train"',
           T_KEY),
    mutant("K3", KEY, "harness/keys.py", "trial key keeps only the dataset name (val_fraction, root ... ignored)",
           'study.dataset.model_dump(mode="json", exclude={"stream"})',
           'study.dataset.model_dump(mode="json", include={"name"})', T_KEY,
           alt=((('study.dataset.model_dump(mode="json", exclude={"stream", "download"})',
                  'study.dataset.model_dump(mode="json", include={"name"})'),),)),
    mutant("K4", KEY, "harness/keys.py", "trial key uses the study-level teachers, not the split's own",
           '            "teachers": [t.model_dump(mode="json") for t in study.teachers_for(split)],',
           '            "teachers": [t.model_dump(mode="json") for t in study.teachers],', T_KEY,
           alt=((('            "teachers": [t.model_dump(mode="json") for t in study.teachers_for(split, seed)],',
                  '            "teachers": [t.model_dump(mode="json") for t in study.teachers],'),),)),
    mutant("K5", KEY, "harness/keys.py", "trial key ignores the method parameters",
           '"params": params,\n', "", T_KEY),
    # --- resume --------------------------------------------------------------------------------
    mutant("R1", RESUME, "harness/runner.py", "resume counts FAILED trials as done (never redone)",
           'runs = tracker.find(experiment_id, {f"{TAG}kind": "trial"}, ("FINISHED",))',
           'runs = tracker.find(experiment_id, {f"{TAG}kind": "trial"}, ("FINISHED", "FAILED"))', T_RESUME,
           alt=((('runs = tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("FINISHED",))',
                  'runs = tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("FINISHED", "FAILED"))'),),)),
    mutant("R2", RESUME, "harness/runner.py", "resume counts KILLED trials as done (never redone)",
           'runs = tracker.find(experiment_id, {f"{TAG}kind": "trial"}, ("FINISHED",))',
           'runs = tracker.find(experiment_id, {f"{TAG}kind": "trial"}, ("FINISHED", "KILLED"))', T_RESUME,
           alt=((('runs = tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("FINISHED",))',
                  'runs = tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("FINISHED", "KILLED"))'),),)),
    mutant("R3", RESUME, "harness/runner.py", "resume counts a trial with any run as done (status ignored)",
           'runs = tracker.find(experiment_id, {f"{TAG}kind": "trial"}, ("FINISHED",))',
           'runs = tracker.find(experiment_id, {f"{TAG}kind": "trial"})', T_RESUME,
           alt=((('runs = tracker.find(experiment_id, {KIND: KIND_TRIAL}, ("FINISHED",))',
                  'runs = tracker.find(experiment_id, {KIND: KIND_TRIAL})'),),)),
    mutant("R4", RESUME, "harness/runner.py", "stale RUNNING runs of a killed study are not marked KILLED",
           '            n += tracker.finish_if_running(r.info.run_id, "KILLED", reason)\n', "            pass\n",
           T_RESUME),
    # --- pairing by seed in the statistics -----------------------------------------------------
    mutant("P1", PAIR, "harness/report/stats.py", "paired Δ pairs values by sorted value, not by seed",
           "var = np.array([variant[s] for s in seeds], dtype=float)",
           "var = np.array(sorted(variant[s] for s in seeds), dtype=float)", T_STATS,
           more=(("ref = np.array([reference[s] for s in seeds], dtype=float)",
                  "ref = np.array(sorted(reference[s] for s in seeds), dtype=float)"),)),
    mutant("P2", PAIR, "harness/report/tables.py", "per-seed values keyed by sorted seed, not the row's own seed",
           'zip(rows["seed"], rows[metric])', 'zip(sorted(rows["seed"]), rows[metric])', T_TABLES),
    mutant("P3", PAIR, "harness/report/stats.py", "unpaired (Welch) t-test instead of the paired one",
           "stats.ttest_rel(var, ref)", "stats.ttest_ind(var, ref, equal_var=False)", T_STATS),
    # --- method internals ----------------------------------------------------------------------
    mutant("M1", METHOD, "harness/methods/cka.py", "CKA align: KL in the wrong direction (student as target)",
           "torch.stack([fn(h_s, h) for h in h_t]).mean()", "torch.stack([fn(h, h_s) for h in h_t]).mean()", T_METHODS),
    mutant("M2", METHOD, "harness/methods/cka.py", "CKA inter: teacher-anchored instead of student-anchored",
           "losses.cross_supcon(h_s[keep], h[keep], y[keep]", "losses.cross_supcon(h[keep], h_s[keep], y[keep]",
           T_METHODS),
    mutant("M3", METHOD, "harness/methods/cka.py", "CKA tau does nothing in L_intra (default 0.1 always)",
           "losses.supcon(h_s[keep], y[keep], p.tau)", "losses.supcon(h_s[keep], y[keep])", T_METHODS),
    mutant("M4", METHOD, "harness/methods/cka.py", "CKA intra_models: all silently drops the teachers' SupCon terms",
           'if p.intra_models == "all":', 'if p.intra_models == "both":', T_METHODS),
    mutant("M5", METHOD, "harness/methods/cka.py", "CKA symmetric: true does nothing",
           "y[keep], p.tau, p.symmetric)", "y[keep], p.tau)", T_METHODS),
    mutant("M6", METHOD, "harness/methods/cka.py", "CKA conf_threshold does nothing",
           "keep = conf >= p.conf_threshold", "keep = conf >= 0.0", T_METHODS),
    mutant("M7", METHOD, "harness/methods/cka.py", "CKA L_intra contrasts by claiming teacher, not pseudo-label",
           "losses.supcon(h_s[keep], y[keep], p.tau)", "losses.supcon(h_s[keep], k_star[keep], p.tau)", T_METHODS),
    mutant("M8", METHOD, "harness/methods/cka.py", "CKA align uses tau (contrastive) instead of tau_a",
           "losses.align_kl(a, b, p.tau_a)", "losses.align_kl(a, b, p.tau)", T_METHODS),
    mutant("M9", METHOD, "baselines/cfl.py", "CFL temperature T does nothing",
           "torch.cat(batch.teacher_logits, dim=1), z_s, p.T)", "torch.cat(batch.teacher_logits, dim=1), z_s)",
           T_METHODS),
    mutant("M10", METHOD, "baselines/cfl.py", "CFL MMD on the student's adapted features, skipping the shared extractor",
           "h_s = self.extractor(self.a_s(f_s))", "h_s = self.a_s(f_s)", T_METHODS),
    mutant("M11", METHOD, "harness/losses.py", "SupCon sign flipped (control: the loss tests should catch it)",
           "per_anchor = -pos_log_prob[anchors]", "per_anchor = pos_log_prob[anchors]", T_METHODS),
    # --- frozen teachers -----------------------------------------------------------------------
    mutant("F1", FROZEN, "harness/methods/base.py", "teachers follow method.train(): BatchNorm stats drift in training",
           "return super().train(False)", "return super().train(mode)", T_TEACHERS),
    mutant("F2", FROZEN, "harness/train.py", "train_epoch puts every submodule in train mode (teachers' BN included)",
           "    method.train()\n    n = len(x)", "    for mod in method.modules():\n        mod.train()\n    n = len(x)",
           T_TEACHERS),
    mutant("F3", FROZEN, "harness/methods/base.py", "teachers not frozen: gradients reach them and Adam updates them",
           "            p.requires_grad_(False)\n", "            pass\n", T_TEACHERS,
           more=(("    @torch.no_grad()\n    def outputs(", "    def outputs("),)),
    # --- report labels -------------------------------------------------------------------------
    mutant("L1", LABELS, "harness/report/tables.py", "comparison headings 'last' and 'best val.' swapped",
           '"test/union_acc": "Union acc., last (%)", "test/union_acc_best": "Union acc., best val. (%)"',
           '"test/union_acc": "Union acc., best val. (%)", "test/union_acc_best": "Union acc., last (%)"', T_TABLES,
           alt=((('PRIMARY: "Union acc., last epoch (%) [primary]"', 'PRIMARY: "Union acc., best-val. epoch (%) [secondary]"'),
                 ('SECONDARY: "Union acc., best-val. epoch (%) [secondary]"', 'SECONDARY: "Union acc., last epoch (%) [primary]"')),)),
    mutant("L2", LABELS, "harness/report/tables.py", "ablation/plot titles 'last epoch' and 'best-val. model' swapped",
           '"test/union_acc": "Union acc., last epoch", "test/union_acc_best": "Union acc., best-val. model"',
           '"test/union_acc": "Union acc., best-val. model", "test/union_acc_best": "Union acc., last epoch"',
           T_TABLES, alt=((('PRIMARY: "Union acc., last epoch (primary)"', 'PRIMARY: "Union acc., best-val. epoch (primary)"'),
                           ('SECONDARY: "Union acc., best-val. epoch (secondary', 'SECONDARY: "Union acc., last epoch (secondary'),
                           ('PRIMARY: "last epoch (primary)", SECONDARY: "best-val. epoch (secondary)"',
                            'PRIMARY: "best-val. epoch (primary)", SECONDARY: "last epoch (secondary)"')),)),
]


# ----------------------------------------------------------------------------------- snapshot
def snapshot(rev: str | None, dest: Path) -> None:
    """The code of ``rev`` (or the working tree) in ``dest``, without .git."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if rev:
        blob = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(dest, filter="data")
        return
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(m: Mutant, where: Path) -> str | None:
    """Apply the first of ``m.edits``, ``*m.alt`` whose every ``old`` snippet is in the file exactly
    once (in order); else the reason, and the file is left as it was."""
    path = where / m.file
    if not path.is_file():
        return f"{m.file} not found"
    original = path.read_text()
    reasons = []
    for v, edits in enumerate((m.edits, *m.alt)):
        text = original
        for i, (old, new) in enumerate(edits):
            n = text.count(old)
            if n != 1:
                reasons.append(f"{'edits' if v == 0 else f'alt {v}'}[{i}] found {n} times")
                break
            text = text.replace(old, new)
        else:
            path.write_text(text)
            return None
    return "; ".join(reasons)


def selection(tests: tuple[str, ...], where: Path) -> list[str]:
    """The tests present in ``where``: globs expanded, node ids kept when their file exists."""
    out: list[str] = []
    for t in tests:
        file = t.split("::")[0]
        if any(c in file for c in "*?["):
            out += sorted(str(p.relative_to(where)) for p in where.glob(file))
        elif (where / file).exists():
            out.append(t)
    return list(dict.fromkeys(out))


def env_for(where: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HARNESS_CACHE", "HARNESS_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


CHECK = """
import importlib.metadata as md, sys, harness, tests
from harness.methods.base import discover
mods = {ep.name: ep.load() for ep in md.entry_points(group="harness.methods")}
files = {"harness": harness.__file__, "tests": tests.__file__, **{f"entry point {k}": m.__file__ for k, m in mods.items()}}
for k, f in files.items():
    print(f"{k}: {f}")
bad = [k for k, f in files.items() if not f.startswith(sys.argv[1])]
sys.exit(f"imported from outside the scratch copy: {bad}" if bad else 0)
"""


def check_imports(where: Path) -> None:
    """Stop unless the scratch copy imports its own code (harness, tests, entry-point methods)."""
    r = subprocess.run([sys.executable, "-c", CHECK, str(where)], cwd="/", env=env_for(where),  # PYTHONPATH only
                       capture_output=True, text=True)
    print(r.stdout.strip(), file=sys.stderr)
    if r.returncode:
        sys.exit(f"import check failed: {r.stderr.strip() or r.stdout.strip()}")


def pytest(where: Path, tests: list[str], timeout: float, extra: list[str]) -> tuple[str, int, float, str]:
    """(result, exit code, seconds, output tail) of one pytest run in ``where``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *extra, *tests]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=where, env=env_for(where), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest we started and its workers (own session)
        out, _ = proc.communicate()
        return "timeout", -9, time.time() - t0, out[-3000:]
    rc = proc.returncode
    result = {0: "survived", 1: "caught"}.get(rc, "error")
    return result, rc, time.time() - t0, out[-3000:]


def failing(output: str) -> list[str]:
    """Test ids named by pytest's short summary (``FAILED x::y - ...`` / ``ERROR x::y``)."""
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)


# ----------------------------------------------------------------------------------- main
def run_one(m: Mutant, base: Path, work: Path, timeout: float, broken: set[str]) -> dict:
    where = work / m.id
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(base, where, symlinks=True)
    rec = {**asdict(m), "result": "n/a", "rc": None, "seconds": 0.0, "failed": [], "note": ""}
    why = apply(m, where)
    if why:
        rec["note"] = f"n/a (code changed): {why}"
    else:
        tests = selection(m.tests, where)
        if not tests:
            rec.update(result="error", note="none of its tests exists here")
            shutil.rmtree(where, ignore_errors=True)
            return rec
        rec["tests"] = tests
        result, rc, secs, out = pytest(where, tests, timeout, ["-x"])
        if result == "caught" and any(t.split("::")[0] in broken or t in broken for t in tests):
            result = "caught*"
        rec.update(result=result, rc=rc, seconds=round(secs, 1), failed=failing(out), output_tail=out[-1500:])
    shutil.rmtree(where, ignore_errors=True)
    return rec


def table(records: list[dict]) -> str:
    lines = ["| id | category | file | description | result | first failing test |",
             "|:---|:---|:---|:---|:---|:---|"]
    for r in records:
        first = r["failed"][0] if r.get("failed") else ""
        res = r["result"] + (f" ({r['seconds']:.0f} s)" if r.get("seconds") else "")
        lines.append(f"| {r['id']} | {r['category']} | `{r['file']}` | {r['description']} | {res} | "
                     f"{('`' + first + '`') if first else r.get('note', '')} |")
    counts: dict[str, int] = {}
    for r in records:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    lines.append("")
    lines.append("Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", help="git revision to mutate (default: the working tree)")
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--category", help="comma-separated categories: " + ", ".join(sorted({m.category for m in MUTANTS})))
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    ap.add_argument("--work", default="/tmp/mut", help="scratch folder (default /tmp/mut)")
    ap.add_argument("--json", help="result file (default <work>/<rev>.json)")
    ap.add_argument("--add-tests", default="",
                    help="space-separated test files/nodes added to every mutant's selection (e.g. new test files)")
    ap.add_argument("--tests", help="space-separated tests that replace every mutant's selection (e.g. 'tests')")
    ap.add_argument("--baseline-timeout", type=float, default=1800.0, help="seconds for the baseline run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every snippet applies to --rev")
    args = ap.parse_args(argv)

    chosen = MUTANTS
    if args.only:
        ids = args.only.split(",")
        unknown = set(ids) - {m.id for m in MUTANTS}
        if unknown:
            ap.error(f"--only: unknown mutant ids {sorted(unknown)}")
        chosen = [m for m in chosen if m.id in ids]
    if args.category:
        cats = args.category.split(",")
        chosen = [m for m in chosen if m.category in cats]
    if args.tests or args.add_tests:
        chosen = [replace(m, tests=tuple(args.tests.split()) if args.tests else (*m.tests, *args.add_tests.split()))
                  for m in chosen]
    if args.list:
        for m in chosen:
            print(f"{m.id:4} {m.category:16} {m.file:28} {m.description}\n     tests: {' '.join(m.tests)}")
        return 0
    label = args.rev or "worktree"
    work = Path(args.work) / re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    base = work / "_base"
    snapshot(args.rev, base)
    if args.check:
        bad = 0
        for m in chosen:
            where = work / m.id
            shutil.copytree(base / Path(m.file).parent, where / Path(m.file).parent, dirs_exist_ok=True)
            why = apply(m, where)
            if why is None:
                try:
                    compile((where / m.file).read_text(), m.file, "exec")
                except SyntaxError as e:
                    why = f"the mutated file does not compile: {e}"
            shutil.rmtree(where)
            bad += why is not None
            print(f"{m.id:4} {'n/a: ' + why if why else 'applies'}")
        return 1 if bad else 0
    check_imports(base)
    json_path = Path(args.json) if args.json else work.with_suffix(".json")

    broken: set[str] = set()
    baseline = None
    if not args.no_baseline:
        tests = selection(tuple(t for m in chosen for t in m.tests), base)
        result, rc, secs, out = pytest(base, tests, args.baseline_timeout, [])
        broken = set(failing(out)) | {t.split("::")[0] for t in failing(out)}
        baseline = {"result": "pass" if rc == 0 else result, "rc": rc, "seconds": round(secs, 1), "failed": sorted(broken)}
        print(f"baseline ({len(tests)} test files, unmutated): rc={rc} in {secs:.0f} s"
              + (f"; failing: {', '.join(sorted(broken))}" if broken else ""), file=sys.stderr)

    records: list[dict] = []

    def done(rec: dict) -> None:
        records.append(rec)
        print(f"{rec['id']}: {rec['result']} {rec.get('note', '')} ({rec['seconds']:.0f} s) {rec['failed'][:1]}",
              file=sys.stderr, flush=True)
        order = {m.id: i for i, m in enumerate(MUTANTS)}
        json_path.write_text(json.dumps({"rev": label, "baseline": baseline,
                                         "mutants": sorted(records, key=lambda r: order[r["id"]])}, indent=1))

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, m, base, work, args.timeout, broken) for m in chosen]
        for f in futures:
            done(f.result())
    order = {m.id: i for i, m in enumerate(MUTANTS)}
    print(table(sorted(records, key=lambda r: order[r["id"]])))
    print(f"\nresults: {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
