"""Typed records of the runs in the MLflow store: what identifies a trial run, a teacher run and
the run of one invocation (``run-study``, ``tune``, ``benchmark``),
each with one writer (:meth:`to_tags`, used where the run is opened) and one reader
(:meth:`from_tags`, used by the report, the status, the results API and the runner's resume).

The tag names are :mod:`harness.store`'s; this module adds their types and the translation of
older runs (a run written before a tag existed reads as that field's "unknown": ``seeded`` None,
``seed`` and ``task`` -1, ``variant`` ``full``). Like the store's schema it stands on nothing above
it: no torch, no mlflow (``tests/test_layers.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from harness.store import (
    BACKEND, CACHED, CONFIG, HOST, KIND, KIND_BENCHMARK, KIND_TEACHER, KIND_TRIAL, METHOD, POOL, RUN, RUNNER_PID,
    SEED, SEEDED, SPLIT, STUDY, SUITE, TASK, TEACHER_DIGEST, TEACHER_KEY, TEACHER_SEED, TRIAL_KEY, USES_LABELS,
    VARIANT, VERSION,
)


def _int(value: str | None) -> int:
    """A tag's integer value, -1 when absent or not an integer."""
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return -1


def _flag(value: str | None) -> bool | None:
    """``true``/``false`` as a bool; None when the run did not say."""
    return None if value in (None, "") else str(value).lower() == "true"


def _text(flag: bool) -> str:
    return str(flag).lower()


@dataclass(frozen=True)
class TrialRunTags:
    """What identifies a trial run (kind ``trial``; a ``tune_run`` is trained the same way).

    ``config`` is what group-by averages over seeds (``kd:full``, ``cka-intra``), ``run`` the older
    full run name (``2x5/kd/seed0``), ``seeded`` False for a method whose result cannot depend on the
    seed (it runs once per split), None on runs older than the tag."""

    study: str
    split: str
    method: str
    variant: str = "full"
    config: str = ""
    run: str = ""
    seed: int = -1
    trial_key: str = ""
    uses_labels: bool = False
    seeded: bool | None = None
    version: str = ""

    def to_tags(self) -> dict[str, str]:
        return {
            STUDY: self.study, SPLIT: self.split, METHOD: self.method, VARIANT: self.variant,
            CONFIG: self.config, RUN: self.run, SEED: str(self.seed), TRIAL_KEY: self.trial_key,
            KIND: KIND_TRIAL, USES_LABELS: _text(self.uses_labels),
            SEEDED: "" if self.seeded is None else _text(self.seeded), VERSION: self.version,
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "TrialRunTags":
        """The record of any run's tags (a missing tag reads as its field's unknown value)."""
        return cls(
            study=tags.get(STUDY, ""), split=tags.get(SPLIT, ""), method=tags.get(METHOD, ""),
            variant=tags.get(VARIANT, "") or "full", config=tags.get(CONFIG, ""), run=tags.get(RUN, ""),
            seed=_int(tags.get(SEED)), trial_key=tags.get(TRIAL_KEY, ""),
            uses_labels=_flag(tags.get(USES_LABELS)) is True, seeded=_flag(tags.get(SEEDED)),
            version=tags.get(VERSION, ""),
        )


@dataclass(frozen=True)
class TeacherRunTags:
    """What identifies a teacher run (kind ``teacher``): one per teacher key, weights and split.

    Its method, variant, config and labels are fixed (``teacher``, ``full``, ``teacher:task<i>``, it
    learns from labels), so a teacher run reads like a trial run in the report's frames."""

    study: str
    split: str
    task: int
    teacher_key: str
    teacher_digest: str
    teacher_seed: int = -1
    cached: bool = False

    def to_tags(self) -> dict[str, str]:
        return {
            STUDY: self.study, SPLIT: self.split, KIND: KIND_TEACHER, TASK: str(self.task),
            TEACHER_KEY: self.teacher_key, TEACHER_DIGEST: self.teacher_digest, TEACHER_SEED: str(self.teacher_seed),
            METHOD: "teacher", VARIANT: "full", CONFIG: f"teacher:task{self.task}",
            RUN: f"{self.split}/teacher{self.task}", CACHED: _text(self.cached), USES_LABELS: "true",
        }

    def identity(self) -> dict[str, str]:
        """The tags that say two runs are the same teacher (key, weights, split): a cache hit logs
        no second run of it."""
        return {TEACHER_KEY: self.teacher_key, TEACHER_DIGEST: self.teacher_digest, SPLIT: self.split}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "TeacherRunTags":
        return cls(
            study=tags.get(STUDY, ""), split=tags.get(SPLIT, ""), task=_int(tags.get(TASK)),
            teacher_key=tags.get(TEACHER_KEY, ""), teacher_digest=tags.get(TEACHER_DIGEST, ""),
            teacher_seed=_int(tags.get(TEACHER_SEED)), cached=_flag(tags.get(CACHED)) is True,
        )


@dataclass(frozen=True)
class InvocationRunTags:
    """What identifies the run of one invocation: a study run (``run-study``, kind ``study``), a
    search run (``tune``, ``search``) or a benchmark run (``benchmark``): its kind, the study or
    suite it ran, and the process that ran it (host and pid), by which a later invocation on the
    same host tells a run still going from one left RUNNING by a process that is gone."""

    kind: str
    name: str
    host: str
    runner_pid: int = 0
    backend: str = ""
    pool: str = ""
    run: str = ""

    def to_tags(self) -> dict[str, str]:
        tags = {KIND: self.kind, SUITE if self.kind == KIND_BENCHMARK else STUDY: self.name, HOST: self.host,
                RUNNER_PID: str(self.runner_pid)}
        tags.update({tag: value for tag, value in ((BACKEND, self.backend), (POOL, self.pool), (RUN, self.run))
                     if value})
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "InvocationRunTags":
        kind = tags.get(KIND, "")
        pid = _int(tags.get(RUNNER_PID))
        return cls(kind=kind, name=tags.get(SUITE if kind == KIND_BENCHMARK else STUDY, ""), host=tags.get(HOST, ""),
                   runner_pid=max(pid, 0), backend=tags.get(BACKEND, ""), pool=tags.get(POOL, ""), run=tags.get(RUN, ""))

    def runner_on(self, host: str) -> int:
        """The pid of the process that ran it when that was on ``host``, else 0 (another host's, or unknown)."""
        return self.runner_pid if self.host == host else 0
