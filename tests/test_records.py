"""The typed records of the store (harness.records): each writes the tags its readers read back,
older runs read with each missing field as its unknown value, and the places that open runs and
the report that reads them go through these records."""

from __future__ import annotations

import dataclasses

import pytest

from harness.records import TeacherRunTags, TrialRunTags
from harness.store import (
    CACHED, CONFIG, KIND, KIND_TEACHER, KIND_TRIAL, METHOD, RUN, SEED, SEEDED, SPLIT, STUDY, TASK, TEACHER_DIGEST,
    TEACHER_KEY, TEACHER_SEED, TRIAL_KEY, USES_LABELS, VARIANT, VERSION,
)

TRIAL = TrialRunTags(study="digits", split="2x5", method="cka", variant="-intra", config="cka-intra",
                     run="2x5/cka-intra/seed3", seed=3, trial_key="0123456789abcdef", uses_labels=False,
                     seeded=True, version="0.9.0")
TEACHER = TeacherRunTags(study="digits", split="2x5", task=1, teacher_key="k" * 16, teacher_digest="d" * 64,
                         teacher_seed=7, cached=True)


def test_a_trial_run_record_round_trips_through_its_tags():
    tags = TRIAL.to_tags()
    assert tags == {STUDY: "digits", SPLIT: "2x5", METHOD: "cka", VARIANT: "-intra", CONFIG: "cka-intra",
                    RUN: "2x5/cka-intra/seed3", SEED: "3", TRIAL_KEY: "0123456789abcdef", KIND: KIND_TRIAL,
                    USES_LABELS: "false", SEEDED: "true", VERSION: "0.9.0"}
    assert all(isinstance(v, str) for v in tags.values())  # MLflow tags are strings
    assert TrialRunTags.from_tags(tags) == TRIAL
    for seeded in (False, None):
        r = dataclasses.replace(TRIAL, seeded=seeded, uses_labels=True)
        assert TrialRunTags.from_tags(r.to_tags()) == r


def test_a_teacher_run_record_round_trips_and_names_its_identity():
    tags = TEACHER.to_tags()
    assert tags[KIND] == KIND_TEACHER and tags[TASK] == "1" and tags[TEACHER_SEED] == "7" and tags[CACHED] == "true"
    assert (tags[METHOD], tags[VARIANT], tags[CONFIG], tags[RUN], tags[USES_LABELS]) == \
        ("teacher", "full", "teacher:task1", "2x5/teacher1", "true")
    assert TeacherRunTags.from_tags(tags) == TEACHER
    assert TEACHER.identity() == {TEACHER_KEY: "k" * 16, TEACHER_DIGEST: "d" * 64, SPLIT: "2x5"}
    # a teacher run reads like a trial run in the report's frames (one reader for both)
    as_trial = TrialRunTags.from_tags(tags)
    assert (as_trial.split, as_trial.method, as_trial.variant, as_trial.uses_labels, as_trial.seed) == \
        ("2x5", "teacher", "full", True, -1)


@pytest.mark.parametrize("tags, field, value", [
    ({}, "variant", "full"), ({VARIANT: ""}, "variant", "full"), ({}, "seed", -1), ({SEED: "x"}, "seed", -1),
    ({}, "seeded", None), ({SEEDED: ""}, "seeded", None), ({}, "uses_labels", False),
    ({USES_LABELS: "True"}, "uses_labels", True), ({}, "trial_key", ""),
])
def test_older_trial_runs_read_each_missing_tag_as_unknown(tags, field, value):
    assert getattr(TrialRunTags.from_tags(tags), field) == value


def test_older_teacher_runs_read_missing_numbers_as_minus_one():
    old = TeacherRunTags.from_tags({SPLIT: "2x5", TEACHER_KEY: "k", TEACHER_DIGEST: "d"})
    assert (old.task, old.teacher_seed, old.cached) == (-1, -1, False)


def test_the_writers_and_readers_go_through_the_records():
    """trial.trial_tags and trial.log_teacher write the records' tags; the report's frames read
    them with the records' readers (no tag of an identity spelled or parsed elsewhere)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def names(path: str) -> set[str]:
        tree = ast.parse((root / path).read_text())
        return {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
                if isinstance(n, (ast.Name, ast.Attribute))}

    for path, reader_or_writer in (("harness/trial.py", {"TrialRunTags", "TeacherRunTags", "to_tags"}),
                                   ("harness/report/frames.py", {"TrialRunTags", "TeacherRunTags", "from_tags"})):
        used = names(path)
        assert reader_or_writer <= used, path
        assert not {"SEED", "SEEDED", "VARIANT", "USES_LABELS", "TASK", "TEACHER_SEED", "CACHED"} & used, path


@pytest.mark.parametrize("kind, name_tag", [("study", "harness.study"), ("search", "harness.study"),
                                            ("benchmark", "harness.suite")])
def test_an_invocation_run_record_round_trips_and_says_whose_process_it_was(kind, name_tag):
    from harness.records import InvocationRunTags
    from harness.store import HOST, RUNNER_PID

    rec = InvocationRunTags(kind, "digits", "node7", 4242, backend="local" if kind == "study" else "",
                            pool="cpu x2", run="study/20261207-101500" if kind == "study" else "")
    tags = rec.to_tags()
    assert tags[KIND] == kind and tags[name_tag] == "digits" and tags[HOST] == "node7" and tags[RUNNER_PID] == "4242"
    assert ("harness.backend" in tags) == (kind == "study") and ("harness.run" in tags) == (kind == "study")
    assert InvocationRunTags.from_tags(tags) == rec
    assert rec.runner_on("node7") == 4242 and rec.runner_on("elsewhere") == 0
    assert InvocationRunTags.from_tags({KIND: kind}).runner_on("") == 0  # an older run that recorded no pid
