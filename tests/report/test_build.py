"""The report folder: files, Markdown sections, LaTeX validity, determinism, no torch, the CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.report.build import BUILT_PREFIX
from tests.report import store

REPO = Path(__file__).resolve().parents[2]
TABLES = ("comparison.csv", "ablation.csv", "comparison.tex", "ablation.tex")
PNGS = ("accuracy.png", "curves.png", "ablation.png", "losses_2x5_cka.png", "losses_3x3_cka.png")


def test_outputs_exist_and_pngs_are_shown(report_dir: Path) -> None:
    for name in TABLES + PNGS + ("report.md",):
        assert (report_dir / name).stat().st_size > 0, name
    for name in PNGS:
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (report_dir / "report.md").read_text()
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(shown) == sorted(PNGS)


def test_markdown_sections(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    assert sum(line.startswith(BUILT_PREFIX) for line in md.splitlines()) == 1
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## Comparison", "## Ablations", "## Failed, missing and duplicate runs",
                     "## Runs of other configurations in this experiment", "## Parameters that vary between runs",
                     "## Study configuration", "## Software"]
    for head in ("### Split `2x5`", "### Split `3x3`: `cka`"):
        assert head in md, head
    assert "| `2x5/kd/seed1` | FAILED (exception) | RuntimeError: failed on purpose | no: not in the tables |" in md
    assert ("| `2x5/cfl/seed2` | KILLED (interrupted) | RuntimeError: killed on purpose "
            "| yes (another run finished it) |") in md
    assert "| `3x3/cka/seed6` | RUNNING |" in md
    assert "**Warning**" in md and "| `2x5/scratch/seed0` | 2 |" in md
    assert "| `params.w_intra` | `0.0` | cka-intra, 2x5/cka-intra-inter |" in md
    assert "| `split.name` | `3x3` | every run on split 3x3 |" in md
    assert "train.epochs: 3" in md  # no study file in the store: the shared parameters instead
    assert re.search(r"mlflow \d", md)
    assert "Trials run with harness 0.1.0, torch 2.5.0, Python 3.11.7, git commit 0123456789ab (tags" in md


def _tabulars(tex: str) -> list[str]:
    return re.findall(r"\\begin\{tabular\}.*?\\end\{tabular\}", tex, flags=re.S)


def check_tabular(block: str) -> None:
    """A parse check of one booktabs tabular fragment (what pdflatex would reject)."""
    assert block.isascii()
    spec = re.match(r"\\begin\{tabular\}\{([lrc]+)\}", block)
    assert spec, block[:80]
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert block.count(rule) == 1, rule
    plain = re.sub(r"\\[{}&%$#_]", "", block)  # escaped characters
    assert plain.count("{") == plain.count("}")
    rows = [line for line in block.splitlines() if line.endswith(r"\\")]
    assert len(rows) >= 2
    for line in rows:
        body = re.sub(r"\\[{}&%$#_]", "", line)
        assert body.count("&") == len(spec.group(1)) - 1, line
        assert body.count("$") % 2 == 0, line
        assert "%" not in body, line
        outside_math = re.sub(r"\$[^$]*\$", "", body)
        assert not re.search(r"[_^~]", outside_math), line


def test_latex_fragments_parse(report_dir: Path, tmp_path: Path) -> None:
    comp = (report_dir / "comparison.tex").read_text()
    abl = (report_dir / "ablation.tex").read_text()
    assert len(_tabulars(comp)) == 2 and len(_tabulars(abl)) == 4  # 2 splits; 2 splits x 2 metrics
    for block in _tabulars(comp) + _tabulars(abl):
        check_tabular(block)
    assert r"\textbf{94.0 $\pm$ 1.0}" in comp and r"scratch$^\dagger$" in comp
    assert r"$\Delta$ (pp)" in abl and "[$-4.5$, $+0.5$]" in abl and r"95\% CI of $\Delta$ (pp; $t$, $n$=3)" in abl
    for tex in (comp, abl):  # outside the tabulars: only comments and blank lines
        rest = re.sub(r"\\begin\{tabular\}.*?\\end\{tabular\}", "", tex, flags=re.S)
        assert all(line.startswith("%") or not line.strip() for line in rest.splitlines())
    if shutil.which("pdflatex"):
        doc = tmp_path / "doc.tex"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
                       f"\\input{{{report_dir / 'comparison.tex'}}}\n\\input{{{report_dir / 'ablation.tex'}}}\n"
                       "\\end{document}\n")
        res = subprocess.run(["pdflatex", "-halt-on-error", "-interaction=nonstopmode", doc.name], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:]


def test_rebuild_from_the_cli_is_identical_and_never_imports_torch(report_dir: Path, store_uri: str,
                                                                  tmp_path: Path) -> None:
    code = ("import sys\nfrom harness.cli import main\n"
            f"rc = main(['report', {store.STUDY!r}, '--tracking-uri', {store_uri!r}])\n"
            "assert 'torch' not in sys.modules, 'the report imported torch'\nsys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    again = tmp_path / "results" / store.STUDY  # the default output folder
    assert f"report written to {Path('results') / store.STUDY}" in res.stdout
    for name in TABLES:
        assert (again / name).read_bytes() == (report_dir / name).read_bytes(), name

    def body(p: Path) -> list[str]:
        return [line for line in p.read_text().splitlines() if not line.startswith(BUILT_PREFIX)]

    assert body(again / "report.md") == body(report_dir / "report.md")


def test_report_command_errors_are_one_line(store_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    assert main(["report", "nope", "--tracking-uri", store_uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"harness: error: report: no experiment 'nope' in {store_uri}"


def test_report_and_status_of_an_unknown_study_create_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """No tracking store yet: ``report``/``status`` of a study name say so in one line (exit 2)
    and leave no file behind (MLflow creates an empty sqlite store when one is opened)."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["report", "nosuch"]) == 2
    assert capsys.readouterr().err == (f"harness: error: report: no experiment 'nosuch' in sqlite:///{tmp_path}/"
                                       "mlflow.db (no tracking store there)\n")
    assert main(["status", "nosuch"]) == 2
    assert capsys.readouterr().err == \
        f"harness: error: status: no experiment 'nosuch' in sqlite:///{tmp_path}/mlflow.db\n"
    assert not (tmp_path / "mlflow.db").exists() and list(tmp_path.iterdir()) == []
    from tests.conftest import write_study

    study = write_study(tmp_path.parent / f"{tmp_path.name}-study.yaml", name="nosuch")
    assert main(["status", str(study)]) == 0  # a study file: every trial not started (kd, scratch: 2 seeds)
    assert capsys.readouterr().out.startswith("study nosuch: 5 trials: 0 finished, 0 running, 0 pending, 0 failed, "
                                              "5 not started\n")
    assert list(tmp_path.iterdir()) == []


def test_sparse_study_with_only_failures_and_a_logged_study_file(store_uri: str, tmp_path: Path) -> None:
    """No teachers, no history, no ablations, a method whose every seed failed, one seed missing,
    and the study file logged as an artifact of the study run (then shown in report.md, without the
    absolute paths in it); no trial_keys.json and no expansion: not scoped, and said so."""
    from mlflow.tracking import MlflowClient

    from harness.report.build import build_report

    uri = store_uri  # another experiment in the same store (a new sqlite file costs seconds)
    client = MlflowClient(uri)
    exp = client.create_experiment("edge", artifact_location=(tmp_path / "artifacts").as_uri())
    study_run = store.log_run(client, exp, {"harness.kind": "study", "harness.study": "edge"}, {})
    text = f"name: edge\nseeds: [0, 1]\nteacher_seeds: per_seed\ncache_dir: /home/someone/cache\nroot: {REPO}/data/x\n"
    client.log_text(study_run, text, "study.yaml")
    store.log_run(client, exp, store.trial_tags("s", "kd", "full", 0, False), {"test/union_acc": 0.8, "best_epoch": 3})
    for seed in (0, 1):
        store.log_run(client, exp, store.trial_tags("s", "cka", "full", seed, False), {}, status="FAILED")
    store.log_run(client, exp, {**store.trial_tags("s", "zoo", "full", 0, False), "harness.seeded": "false"},
                  {"test/union_acc": 0.7, "best_epoch": 3})
    out = build_report("edge", tracking_uri=uri, out_dir=tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "| kd | 1 of 2; 1 missing | **80.0** |" in md
    assert "| cka | 0 of 2; 2 failed | – |" in md
    assert "| zoo | 1 | 70.0 |" in md  # tagged seed-independent
    assert "No method of this study has ablation variants." in md
    assert ("```yaml\nname: edge\nseeds: [0, 1]\nteacher_seeds: per_seed\ncache_dir: <redacted>/cache\n"
            "root: data/x\n```") in md  # built with the repository as working directory
    assert "/home/someone" not in md and str(REPO) not in md
    assert "so the std over seeds includes teacher variance" in md
    assert ("**Warning: this report is not scoped by trial key** (the store has no `trial_keys.json` and the study "
            "file was not expanded): the latest finished run") in md
    assert "Unknown: the report is not scoped by trial key (see the warning at the top)." in md
    assert (out / "accuracy.png").exists() and not (out / "curves.png").exists()
    assert (out / "ablation.tex").read_text() == ""


def test_scope_and_runs_of_other_configurations(report_dir: Path) -> None:
    """The toy study's 46 keys (trial_keys.json); three runs of an earlier version are counted only."""
    md = (report_dir / "report.md").read_text()
    assert ("Scope: only trial runs whose `harness.trial_key` is one of the 46 trial keys of the study "
            "(`trial_keys.json` of the latest study run); 42 of them have a finished run. 3 trial runs of other "
            "configurations in this experiment are left out of every table, figure and statistic") in md
    assert "3 runs (2 finished) of 3 trial keys." in md
    assert "| `2x5` | `cka` | 1 | 1 | 0 | 1 |" in md and "| `2x5` | `kd` | 2 | 1 | 1 | 2 |" in md
    assert "not scoped" not in md


def test_what_the_numbers_rest_on(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    assert "**Primary metric: union accuracy of the model after the last epoch** (*last epoch*)." in md
    assert ("Validation labels: the *last epoch* columns used none (the recipe, i.e. epochs, learning rate and loss "
            "weights, is fixed in the study file); the *best-val. epoch* column reports the epoch chosen with "
            "validation labels. Test labels are read only to measure.") in md
    assert "every other method saw no label" not in md
    assert ("on `2x5`, the runs of the teachers that this study's trial runs used; on `3x3`, the own-task "
            "accuracies of this study's `teachers` reference run.") in md
    assert "the std over seeds excludes teacher variance" in md  # no study file: the default, said so
    # routing: 3x3's ensemble (75.0) is 18 points below its weakest teacher (93.0); 2x5's (90.0) 7 below 97.0
    assert md.count("Routing caps this split") == 1
    split_3x3 = md.split("### Split `3x3`\n")[1].split("### ")[0]
    assert ("Routing caps this split: the best claiming-teacher ensemble reaches 75.0% union accuracy, 18.0 points "
            "below the weakest teacher on its own task (93.0%; flagged when more than 10 points below).") in split_3x3
    assert "`routing:` axis of the study file" in split_3x3


def test_no_path_of_the_building_machine(report_dir: Path, store_uri: str) -> None:
    md = (report_dir / "report.md").read_text()
    folder = store_uri[len("sqlite:///"):].rsplit("/", 1)[0]
    assert "Rebuilt from the MLflow store alone: `sqlite:///<redacted>/mlflow.db`" in md
    for name in os.listdir(report_dir):
        if not name.endswith(".png"):
            text = (report_dir / name).read_text()
            assert folder not in text and str(REPO) not in text and "/tmp/" not in text, name


def test_tuned_study_says_its_values_rest_on_validation_labels(store_uri: str, tmp_path: Path,
                                                               report_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    from harness.report.build import build_report

    client = MlflowClient(store_uri)
    exp = client.create_experiment("mini-tuned")
    store.log_run(client, exp, store.trial_tags("s", "cka", "full", 0, False), {"test/union_acc": 0.8})
    md = (build_report("mini-tuned", tracking_uri=store_uri, out_dir=tmp_path / "a") / "report.md").read_text()
    assert ("; and this is a tuned study: the hyper-parameters of the tuned methods were chosen by `harness tune` on "
            "validation labels (objective: validation union accuracy), so for them every column, the last-epoch one "
            "included, rests on validation labels. Test labels") in md
    f = tmp_path / "mini.tuned.yaml"  # the file harness tune writes, header included
    f.write_text("# Tuned by `harness tune studies/mini.yaml` on 2026-01-01 10:00\n"
                 "# cka: best trial #3 0.9000 (default 0.8800); 4 complete, 0 pruned; methods.cka.T=2.0\n"
                 "name: mini-tuned\nseeds: [0]\n")
    md = (build_report(str(f), tracking_uri=store_uri, out_dir=tmp_path / "b") / "report.md").read_text()
    assert "the hyper-parameters of `cka` were chosen by `harness tune` on validation labels" in md
    assert "tuned study" not in (report_dir / "report.md").read_text()
