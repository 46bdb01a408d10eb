"""The report says which trials ran deterministically (tag ``harness.deterministic``, read back in
each trial's process) and shows the peak GPU memory (``gpu_peak_mb``) of trials that had one."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.report.disclosure import determinism_sentence
from harness.report.frames import load_study
from harness.report.tables import comparison_frame, diagnostics_display
from tests.report import store

WHAT = ("deterministic algorithms, cuDNN deterministic without autotuning and, on a GPU, the cuBLAS workspace "
        "setting, as read back inside each trial's process (tag `harness.deterministic`)")


def _study(client: MlflowClient, name: str, flags: dict[tuple[str, int], str], peaks: dict[str, float]) -> None:
    """One experiment: a trial per (method, seed) with its ``harness.deterministic`` tag ("" = none)."""
    exp = client.create_experiment(name)
    for (method, seed), flag in flags.items():
        tags = {**store.trial_tags("2x5", method, "full", seed, False), "harness.study": name}
        if flag:
            tags["harness.deterministic"] = flag
        final = {"test/union_acc": 0.9, "test/union_acc_best": 0.9, "diag/pseudo_label_acc": 0.8,
                 "trial_seconds": 10.0, **({"gpu_peak_mb": peaks[method] + seed} if method in peaks else {})}
        store.log_run(client, exp, tags, final, params={"seed": str(seed), "method": method})


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder: Path = tmp_path_factory.mktemp("determinism")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    _study(client, "all", {("kd", 0): "true", ("cka", 0): "true", ("cka", 1): "true"}, {"cka": 1000.0})
    _study(client, "none", {("kd", 0): "false", ("kd", 1): "false"}, {})
    _study(client, "mixed", {("kd", 0): "true", ("kd", 1): "false", ("cka", 0): "true", ("cfl", 0): ""}, {})
    _study(client, "older", {("kd", 0): ""}, {})
    _study(client, "one", {("kd", 0): "true"}, {})
    return uri


def _sentence(uri: str, name: str) -> str:
    data = load_study(name, uri, history=False)
    return determinism_sentence(data.attempts[data.attempts["run_id"].isin(data.trials["run_id"])])


def test_all_none_mixed_and_unrecorded(uri: str) -> None:
    assert _sentence(uri, "all") == f"Determinism: all 3 trials ran deterministically ({WHAT}).\n"
    assert _sentence(uri, "one") == f"Determinism: the one trial ran deterministically ({WHAT}).\n"
    assert _sentence(uri, "none") == ("Determinism: none of the 2 trials ran deterministically (`train.deterministic` "
                                      "off, or its flags not all set): reruns on a GPU may differ slightly.\n")
    assert _sentence(uri, "mixed") == (f"Determinism: 2 of 3 trials ran deterministically ({WHAT}); per method: "
                                       "`cka` 1 of 1, `kd` 1 of 2; 1 not recorded (an older harness).\n")
    assert _sentence(uri, "older") == "Determinism: not recorded (the trials ran with a harness that did not tag it).\n"


def test_the_report_says_it_in_the_software_section_and_shows_gpu_peaks(uri: str, tmp_path: Path) -> None:
    from harness.report.build import build_report

    md = (build_report("all", tracking_uri=uri, out_dir=tmp_path / "all") / "report.md").read_text()
    software = md[md.index("## Software"):]
    assert f"Determinism: all 3 trials ran deterministically ({WHAT})." in software
    diag = diagnostics_display(comparison_frame(load_study("all", uri, history=False)), "2x5")
    assert diag is not None
    peaks = dict(zip(diag["Method"], diag["GPU peak (MB)"]))
    assert peaks["cka"] == "1000.5 ± 0.7" and peaks["kd"] == "–"  # mean ± std over seeds 0 and 1; kd: no GPU


def test_the_toy_report_says_determinism_was_not_recorded(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    assert "Determinism: not recorded (the trials ran with a harness that did not tag it)." in md
    assert "GPU peak (MB)" not in md  # no trial of the toy store ran on a GPU
