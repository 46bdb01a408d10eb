"""Whether a rebuilt report reproduces the committed one: its accuracy cells against ``git HEAD``.

``harness run-study studies/digits.yaml`` rebuilds ``results/digits/`` in place, over committed
files. When a report lands where a committed report is (its folder inside a git checkout, its
``comparison.csv``/``ablation.csv``/``tuning.csv`` in ``HEAD``), :func:`committed_line` says in one
line whether every accuracy cell equals the committed one, or which differ. Accuracy cells
(:func:`accuracy_cells`): the columns whose name contains ``acc`` (``test/union_acc.mean``,
``diag/probe_acc.std``, ...) and a search's objective (``value`` of ``tuning.csv``, per Optuna
study and trial number), and
in a long table with a ``metric`` column (the ablation table) the value columns of the rows whose
metric is an accuracy; never timings or memory. Cells are equal when both are empty or both hold
the same number (the CSV's own text, read back the same way on both sides).

:func:`compare` works on two frames and needs no git; only :func:`committed_csv` runs
``git show HEAD:<file>`` (no git, not a checkout, a file not committed: no line).
"""

from __future__ import annotations

import io
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

#: the committed tables a rebuild is compared with (a search's report has only ``tuning.csv``)
TABLES = ("comparison.csv", "ablation.csv", "tuning.csv")
#: columns that name a row (the ones present, in this order)
ROW_KEYS = ("split", "row", "metric", "optuna_study", "number")
#: columns that are accuracies without saying so: a search's objective (a validation accuracy)
OBJECTIVE = ("value",)
#: value columns of a long table's accuracy rows (``metric`` names the accuracy)
LONG_VALUES = ("mean", "std", "delta", "delta_std", "ci_low", "ci_high")
#: how many differing cells the line names
SHOWN = 3

Cell = tuple[str, str]  # (row, column)


@dataclass(frozen=True)
class Difference:
    """One accuracy cell that differs: where, and the committed and the new value (None: absent or empty)."""

    row: str
    column: str
    committed: float | None
    now: float | None

    def text(self) -> str:
        return f"{self.row} {self.column}: {_show(self.committed)} → {_show(self.now)}"


def _show(v: float | None) -> str:
    return "–" if v is None else f"{v:.6g}"


def _number(v: object) -> float | None:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def accuracy_cells(frame: pd.DataFrame) -> dict[Cell, float | None]:
    """``{(row, column): value}`` of every accuracy cell, row named by its ``split``/``row``/``metric``
    (``2x5/cka``, ``2x5/cka-intra/test/union_acc``); None for an empty cell."""
    keys = [k for k in ROW_KEYS if k in frame.columns]
    long = "metric" in frame.columns
    out: dict[Cell, float | None] = {}
    for i, (_, r) in enumerate(frame.iterrows()):
        row = "/".join(str(r[k]) for k in keys) if keys else str(i)
        if long:
            if "acc" not in str(r["metric"]):
                continue
            cols = [c for c in LONG_VALUES if c in frame.columns]
        else:
            cols = [c for c in frame.columns if "acc" in str(c) or c in OBJECTIVE]
        for c in cols:
            out[(row, str(c))] = _number(r[c])
    return out


def compare(committed: pd.DataFrame, now: pd.DataFrame) -> tuple[int, list[Difference]]:
    """(number of accuracy cells with a value on either side, the ones that differ in table order;
    a cell only one side has counts as differing)."""
    old, new = accuracy_cells(committed), accuracy_cells(now)
    cells = list(dict.fromkeys([*new, *old]))
    cells = [c for c in cells if old.get(c) is not None or new.get(c) is not None]
    diff = [Difference(row, col, old.get((row, col)), new.get((row, col))) for row, col in cells
            if old.get((row, col)) != new.get((row, col))]
    return len(cells), diff


def line(results: list[tuple[str, int, list[Difference]]]) -> str:
    """The one line over the tables compared (``(table, cells, differences)``)."""
    n = sum(r[1] for r in results)
    diff = [d for _, _, ds in results for d in ds]
    if not diff:
        return f"reproduced: every accuracy cell equals the committed report ({n} cells)"
    shown = "; ".join(d.text() for d in diff[:SHOWN])
    more = f"; and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    return f"differs from the committed report in {len(diff)} of {n} accuracy cells: {shown}{more}"


def committed_csv(path: Path) -> pd.DataFrame | None:
    """``path`` as committed in ``HEAD`` of the git checkout that holds it; None when there is no
    git, no checkout or no such committed file."""
    try:
        out = subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return _read(out.stdout) if out.returncode == 0 else None


def _read(blob: bytes) -> pd.DataFrame:
    """A CSV table (an empty file: no rows)."""
    try:
        return pd.read_csv(io.BytesIO(blob))
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def committed_line(out: str | Path) -> str | None:
    """The line for the report in ``out`` (None when no table of it is committed there)."""
    results = []
    for name in TABLES:
        path = Path(out).resolve() / name
        if not path.is_file():
            continue
        old = committed_csv(path)
        if old is None:
            continue
        n, diff = compare(old, _read(path.read_bytes()))
        results.append((name, n, diff))
    return line(results) if results else None
