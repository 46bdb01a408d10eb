"""Every committed study file parses, expands and builds its splits; the paper-scale ones (CIFAR,
fine-grained) on tiny data written in the real on-disk formats, with their roots pointed there.

What is checked is what a user with the real data sets would get before the first GPU-hour:
the study is valid, each split has the tasks the file promises (CIFAR-100 2x50 = classes 0-49 /
50-99; K tasks of 100/K classes), its teachers, and the number of trials; a dry run plans it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from harness.config import StudyConfig
from harness.grid import build_splits, expand
from harness.runner import run_study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))
PAPER = ("cifar100-2x50", "cifar100-scaling", "cifar100-ood", "finegrained")


def _cifar(root: Path, name: str, per_class: int = 10) -> None:
    """A tiny CIFAR-10/100 in the python-pickle layout: ``per_class`` training images of every class
    (so that every class survives the stratified validation hold-out), one test image each."""
    n_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(0)

    def batch(labels: list[int]) -> dict[bytes, Any]:
        key = b"labels" if name == "cifar10" else b"fine_labels"
        return {key: labels, b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                b"filenames": [f"{i}.png".encode() for i in range(len(labels))], b"batch_label": b"tiny"}

    train = [c for c in range(n_classes) for _ in range(per_class)]
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
        for i in range(5):
            (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch(train[i::5])))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(list(range(n_classes)))))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                                    b"coarse_label_names": [b"c"] * 20}))
        (folder / "train").write_bytes(pickle.dumps(batch(train)))
        (folder / "test").write_bytes(pickle.dumps(batch(list(range(n_classes)))))


def _image_folder(root: Path, classes: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for part, n in (("train", 10), ("test", 1)):
        for c in range(classes):
            d = root / part / f"class{c:03d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB").save(d / f"{i}.png")


def _localised(name: str, tmp: Path) -> Path:
    """The committed study file with its data roots pointed at tiny data under ``tmp``, nothing
    downloaded, the cache in ``tmp``."""
    spec = yaml.safe_load((ROOT / "studies" / f"{name}.yaml").read_text())
    if spec["dataset"]["name"] in ("cifar10", "cifar100"):
        _cifar(tmp / "data", spec["dataset"]["name"])
        spec["dataset"].update(root=str(tmp / "data"), download=False)
        for split in spec["splits"]:
            if "transfer" in split:
                _cifar(tmp / "transfer", split["transfer"]["dataset"])
                split["transfer"]["root"] = str(tmp / "transfer")
    else:  # image folders of the fine-grained template: 3 and 2 classes stand in for 200 and 120
        for split in spec["splits"]:
            for k, task in enumerate(split["tasks"]):
                _image_folder(tmp / f"task{k}", 3 - k)
                task["root"] = str(tmp / f"task{k}")
    spec["cache_dir"] = str(tmp / "cache")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_committed_study_file_is_valid(path: Path) -> None:
    study = StudyConfig.model_validate(yaml.safe_load(path.read_text()))
    trials = expand(study)
    assert trials and len({t.key for t in trials}) == len(trials)
    assert path.read_text().lstrip().startswith("#"), "a committed study says what it is for"


@pytest.mark.parametrize("name,tasks,n_trials", [
    ("cifar100-2x50", {"2x50": [(0, 50), (50, 100)]}, 32),
    ("cifar100-scaling", {f"k{k}": [(i * 100 // k, (i + 1) * 100 // k) for i in range(k)] for k in (2, 5, 10, 20)},
     68),
    ("cifar100-ood", {"2x50-cifar10": [(0, 50), (50, 100)]}, 20),
])
def test_cifar_studies_build_on_real_format_data(tmp_path: Path, name: str, tasks: dict, n_trials: int,
                                                 capsys: pytest.CaptureFixture) -> None:
    from harness.config import load_study

    path = _localised(name, tmp_path)
    study = load_study(path)
    trials = expand(study)
    assert len(trials) == n_trials
    splits = build_splits(study)
    assert {s: [list(t.classes) for t in d.tasks] for s, d in splits.items()} == {
        s: [list(range(a, b)) for a, b in spans] for s, spans in tasks.items()}
    for s in study.splits:
        cfgs = study.teachers_for(s)
        assert len(cfgs) == len(tasks[s.name])
        assert all(c.arch in ("wrn", "resnet32x4") and c.scheduler == "cosine" for c in cfgs)
    assert study.student.arch == "wrn" and study.student.options() == {"depth": 16, "width": 2}
    assert run_study(path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", dry_run=True) == 0
    assert f"{n_trials}" in capsys.readouterr().out


def test_finegrained_template_builds_on_image_folders(tmp_path: Path) -> None:
    from harness.config import load_study

    path = _localised("finegrained", tmp_path)
    study = load_study(path)
    splits = build_splits(study)
    data = splits["cub+dogs"]
    assert data.sizes == [3, 2] and data.in_shape == (3, 64, 64)  # resized to image_size
    assert [t.root for t in data.tasks] == [str(tmp_path / "task0"), str(tmp_path / "task1")]
    assert study.student.arch == "resnet18" and len(expand(study)) == 32


def _smoke(name: str, tmp: Path) -> Path:
    """The localised study shrunk to a smoke run on a CPU: two classes per task, 4x4 images (the
    study's architectures as written: their cost is the convolutions, so the images are what
    shrinks), two epochs for teachers and students, one seed, no ablation variants (the same code
    path as the full method with a weight at 0, tested elsewhere) and only the best routing rule
    (the default rule is every method's full row). The scaling study keeps K = 2 and 5 (K = 10 and
    20 are the same code with more teachers)."""
    path = _localised(name, tmp)
    spec = yaml.safe_load(path.read_text())
    spec["dataset"]["image_size"] = 4
    spec.update(seeds=[0], trials_per_device=1, ablations=[], routing=["rmd/z/routed"])
    spec["train"].update(epochs=2, batch_size=16)
    spec["splits"] = [s for s in spec["splits"] if s.get("partition", {}).get("k", 2) <= 5]
    for split in spec["splits"]:
        if "partition" in split:
            split["partition"]["classes"] = list(range(2 * split["partition"]["k"]))
        for t in split.get("teachers") or []:
            t.update(epochs=2, batch_size=16)
    for t in spec.get("teachers") or []:
        t.update(epochs=2, batch_size=16)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER)
def test_paper_scale_studies_run_end_to_end_as_smoke(tmp_path: Path, name: str) -> None:
    """Two epochs, two classes per task, every method of the file, with its teachers and the rmd
    routing rule: all trials finish, every trial logged the oracle diagnostics, and the report
    builds with its error decomposition."""
    from mlflow.tracking import MlflowClient

    from harness.config import load_study
    from harness.report.build import build_report

    path = _smoke(name, tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert run_study(path, tracking_uri=uri, report=False) == 0
    study = load_study(path)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study.name)
    runs = client.search_runs([exp.experiment_id], "tags.`harness.kind` = 'trial'", max_results=1000)
    assert len(runs) == len(expand(study)) and {r.info.status for r in runs} == {"FINISHED"}
    assert all("diag/oracle_ensemble_acc" in r.data.metrics for r in runs)
    out = build_report(study.name, tracking_uri=uri, out_dir=tmp_path / "report")
    md = (out / "report.md").read_text()
    assert "## Comparison" in md and "## Error decomposition" in md
