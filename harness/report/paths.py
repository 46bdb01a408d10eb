"""Paths and URIs as a committed report may show them: never a path of the machine that built it.

- :func:`show_path`: a path inside the working directory becomes relative to it; any other
  absolute path becomes ``<redacted>/<its last part>``;
- :func:`show_uri`: a tracking URI or an Optuna storage without ``user:password@`` and with its
  local path shown by :func:`show_path` (``sqlite:////home/me/w/mlflow.db`` built in ``/home/me/w``
  -> ``sqlite:///mlflow.db``; ``postgresql://db.example/optuna`` stays);
- :func:`redact_paths`: every absolute path in a free text (a study file, a parameter value, a
  failure reason) shown by :func:`show_path`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

REDACTED = "<redacted>"
#: an absolute POSIX path not preceded by a word character, ``.``, ``:`` or ``/`` (so ``2x5/kd``,
#: ``loss/total`` and ``http://host/x`` are not paths)
_PATH = re.compile(r"(?<![\w.:/~<>-])/[\w.@+~=-]+(?:/[\w.@+~=-]+)*/?")
_CREDENTIALS = re.compile(r"//[^/@]*@")


def show_path(path: str, cwd: str | Path | None = None) -> str:
    """Relative to ``cwd`` (default: the working directory) when inside it, else ``<redacted>/name``;
    a relative path is returned as is."""
    p = PurePosixPath(path)
    if not p.is_absolute():
        return path
    base = PurePosixPath(os.path.abspath(cwd if cwd is not None else os.getcwd()))
    norm = PurePosixPath(os.path.normpath(str(p)))
    try:
        rel = norm.relative_to(base)
    except ValueError:
        return f"{REDACTED}/{norm.name}" if norm.name else REDACTED
    return str(rel) if str(rel) != "." else "."


def show_uri(uri: str, cwd: str | Path | None = None) -> str:
    """A tracking URI / storage without credentials and without a local absolute path."""
    uri = _CREDENTIALS.sub("//", uri)
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + show_path(uri[len("sqlite:///"):], cwd)
    if uri.startswith("file://"):
        rest = uri[len("file://"):]
        return "file:" + show_path(rest, cwd) if rest.startswith("/") else uri
    if uri.startswith("/"):
        return show_path(uri, cwd)
    return uri


def redact_paths(text: str, cwd: str | Path | None = None) -> str:
    """``text`` with every absolute path shown by :func:`show_path`."""
    return _PATH.sub(lambda m: show_path(m.group(0), cwd), text)
