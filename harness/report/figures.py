"""The report's figures' shared style: one palette, one way to make a figure and to save it.

Every figure is drawn beside the section that shows it, on these helpers (PNG, no pyplot state:
each figure is its own ``Figure``):

- :mod:`.tables` (the comparison and ablation sections): :func:`~.tables.accuracy_plot`,
  :func:`~.tables.curves_plot`, :func:`~.tables.loss_plot`, :func:`~.tables.ablation_plot`;
- :mod:`.decomposition`: :func:`~.decomposition.decomposition_plot`;
- :mod:`.scaling`: :func:`~.scaling.scaling_plot`;
- :mod:`.tuning`: :func:`~.tuning.tuning_history_plot`, :func:`~.tuning.tuning_curves_plot`,
  :func:`~.tuning.tuning_importance_plot`;
- :mod:`.leaderboard`: :func:`~.leaderboard.leaderboard_intervals_plot`,
  :func:`~.leaderboard.performance_profile_plot`.

One palette (:func:`palette`) maps every row label (``cka``, ``cka:wide``, ``cka-intra``) to one
colour, so a method has the same colour in every figure. This module imports no other harness
module (each section's module imports it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import seaborn as sns
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

DPI = 120
_BASE = {"teachers": 7, "kd": 0, "cfl": 1, "cka": 2, "scratch": 3}  # indices into tab10
_OTHER = [4, 5, 6, 8, 9]  # tab10 colours for other methods and named variants
# ablation variants: dark, saturated colours that differ from every tab10 colour
_ABLATION = ["#000000", "#c2189b", "#d4a000", "#0b1f65", "#800000", "#008b8b", "#6b8e23", "#ff4500"]
Palette = dict[str, tuple[float, float, float]]


def palette(labels: Sequence[str]) -> Palette:
    """A fixed colour per label: known methods keep their colour, the others follow in order.

    ``labels`` are row labels (``cka``, ``cka:wide``, ``cka-intra``); ablation variants draw from
    a separate list so that they never look like a method of the comparison table.
    """
    tab10, tab20 = sns.color_palette("tab10", 10), sns.color_palette("tab20", 20)
    spare = [tab10[i] for i in _OTHER] + [tab20[i] for i in range(1, 20, 2)]
    ablation = [to_rgb(c) for c in _ABLATION]
    out: Palette = {}
    n_other = n_abl = 0
    for label in labels:
        if label in out:
            continue
        if label in _BASE:
            out[label] = tab10[_BASE[label]]
        elif "-" in label and not label.startswith("-") and ":" not in label:
            out[label] = ablation[n_abl % len(ablation)]
            n_abl += 1
        else:
            out[label] = spare[n_other % len(spare)]
            n_other += 1
    return out


def figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, list[list]]:
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [list(r) for r in axes]


#: seed of the jitter of the seeds' dots (seaborn's stripplot draws it from numpy's global generator)
JITTER_SEED = 0


@contextlib.contextmanager
def seeded_jitter(seed: int = JITTER_SEED) -> Iterator[None]:
    """Draw seaborn's strip-plot jitter from a seeded numpy global generator, then put the caller's
    generator state back: a figure with jittered dots is the same PNG on every rebuild, and
    drawing it changes no random stream of the caller's."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path
