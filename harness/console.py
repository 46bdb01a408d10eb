"""A quiet console: what the harness prints is its own progress and one line per error.

MLflow prints a ``🏃 View run … at: …`` and a ``🧪 View experiment …`` line after every run it
ends against a server, an INFO line when it creates a store, and an ERROR log with a traceback
before it raises a database error (which the CLI reports as one line when it is a full or
read-only disk). :func:`quiet` turns these off in the runner and in every worker, and with them
every :class:`NotedWarning`: a warning the runner has already said once, as a line of its plan,
that each trial would otherwise print again with a source path."""

from __future__ import annotations

import logging
import os
import warnings


class NotedWarning(UserWarning):
    """A warning the runner says once per study in its plan (``note: ...``, from
    :meth:`harness.methods.base.Method.plan_note`), not again from every trial's worker; code that
    builds a method outside the runner still sees it."""


def quiet() -> None:
    """Silence MLflow's per-run URL lines, its chatty loggers and :class:`NotedWarning` (idempotent)."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    warnings.filterwarnings("ignore", category=NotedWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # logged (with a traceback) right before MLflow raises the same error, which we report
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
