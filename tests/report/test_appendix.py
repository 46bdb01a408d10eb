"""The report's appendix: the study file as written, comments kept, then only what the defaults filled in."""

from __future__ import annotations

import dataclasses
import re

import yaml
from mlflow.tracking import MlflowClient

from harness.config import dump_study, parse_study
from harness.report import appendix
from harness.report.build import _config_section
from harness.report.frames import load_study
from tests.report import store

SOURCE = """\
# Appendix study: this comment stays, word for word.
name: appendix
dataset: {name: digits, val_fraction: 0.1}
splits:
  - {name: 2x5, tasks: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
teachers:
  - {arch: cnn, width: 8, epochs: 3}   # a CNN teacher
  - {arch: mlp, hidden: 32, epochs: 3}
student: {arch: cnn, width: 8}
train: {epochs: 2, batch_size: 128}   # only two keys of the recipe
methods: {kd: {}}
seeds: [0, 1]
"""


def _resolved() -> str:
    return dump_study(parse_study(yaml.safe_load(SOURCE)))


def _filled(md: str) -> dict:
    """The YAML block under "Filled in by defaults", parsed."""
    block = md.split("Filled in by defaults")[1].split("```yaml\n")[1].split("```")[0]
    return yaml.safe_load(block), block


def test_the_file_as_written_then_only_the_defaults_in_flow_style() -> None:
    md = "\n".join(appendix.study_section(SOURCE, _resolved()))
    assert "```yaml\n" + SOURCE + "```" in md  # verbatim, comments kept
    assert "# Appendix study: this comment stays, word for word." in md and "# only two keys of the recipe" in md
    assert not re.search(r"^\s*- - ", md, re.M) and "- - 0" not in md  # no block-style dump of the tasks
    filled, block = _filled(md)
    assert "epochs" not in filled["train"] and "batch_size" not in filled["train"]  # written in the file
    assert filled["train"]["optimizer"] == "adam" and filled["train"]["momentum"] == 0.9
    assert re.search(r"^train: \{optimizer: adam, lr: ", block, re.M)  # one line per top-level block
    assert filled["dataset"] == {"root": None, "image_size": None, "stream": False, "download": False}
    assert filled["splits"] == [{"teachers": None}]
    assert [sorted(t) for t in filled["teachers"]][0][:3] == ["amp", "augment", "batch_size"]
    assert all("arch" not in t and "epochs" not in t for t in filled["teachers"])
    assert filled["teacher_seeds"] == "fixed" and filled["max_retries"] == 0
    assert {"name", "seeds", "methods", "student"}.isdisjoint(filled)  # the file sets them whole
    assert len(block.splitlines()) <= 20  # the resolved dump of this study is 79 lines


def test_defaults_filled_goes_below_keys_and_through_lists_of_mappings() -> None:
    written = {"a": 1, "b": {"c": 2}, "t": [{"x": 1}, {"x": 2, "y": 3}], "s": 3}
    resolved = {"a": 1, "b": {"c": 2, "d": 4}, "t": [{"x": 1, "y": 0}, {"x": 2, "y": 3}], "s": [0, 1, 2], "n": None}
    assert appendix.defaults_filled(written, resolved) == {"b": {"d": 4}, "t": [{"y": 0}, {}], "n": None}
    assert appendix.defaults_filled(resolved, resolved) is None


def test_an_older_store_shows_the_resolved_study_compactly() -> None:
    """Only ``study.yaml`` logged (the runner before ``study_source.yaml``): the resolved study whole,
    in flow style, said so."""
    md = "\n".join(appendix.study_section(None, _resolved()))
    assert "the store has no copy of the file as written" in md
    assert "- - 0" not in md and "tasks: [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]" in md
    assert "train: {epochs: 2, batch_size: 128, optimizer: adam," in md


def test_the_report_reads_the_logged_source_beside_the_resolved_study(store_uri: str, study_data) -> None:
    """A study run that logged both files (today's runner): the appendix of its report."""
    client = MlflowClient(store_uri)
    exp = client.create_experiment("appendix")
    run = store.log_run(client, exp, {"harness.kind": "study", "harness.study": "appendix"}, {})
    client.log_text(run, _resolved(), "study.yaml")
    client.log_text(run, SOURCE, "study_source.yaml")
    store.log_run(client, exp, {**store.trial_tags("2x5", "kd", "full", 0, False), "harness.study": "appendix"},
                  {"test/union_acc": 0.8})
    data = load_study("appendix", store_uri, history=False)
    assert data.study_source == SOURCE and data.study_yaml == SOURCE and data.study_resolved == _resolved()
    md = "\n".join(_config_section(data))
    assert md.startswith("## Study configuration") and "```yaml\n" + SOURCE + "```" in md
    assert _filled(md)[0]["train"]["optimizer"] == "adam"
    # a report of an older store: the resolved study only
    older = dataclasses.replace(study_data, study_yaml=_resolved(), study_source=None, study_resolved=_resolved())
    assert "- - 0" not in "\n".join(_config_section(older))


def test_a_file_given_for_a_store_without_the_resolved_study_says_so(study_data) -> None:
    """``harness report FILE`` over a store whose study run logged no ``study.yaml``: the file, and
    no claim about defaults."""
    data = dataclasses.replace(study_data, study_yaml=SOURCE, study_source=SOURCE, study_resolved=None)
    md = "\n".join(_config_section(data))
    assert "```yaml\n" + SOURCE + "```" in md and "Filled in by defaults" not in md
    assert "no default was filled in" not in md and "the store has no resolved study" in md.lower()
