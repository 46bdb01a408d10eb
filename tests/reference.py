"""Test oracles shared by several test modules (plain float64 formulas of docs/methods.md)."""

from __future__ import annotations

import math

import torch


def ref_pseudo_labels(logits, offsets, rule="confidence", T_pl=1.0):
    """The spec's "Pseudo-labels" in float64 with plain softmax: k* = argmax_k max_c p_k(c)
    (or argmin_k H(p_k) / log n_k), y = o_k* + argmax_c p_k*(c), confidence max_c p_k*(c)."""
    ps = [torch.softmax(z.double() / T_pl, 1) for z in logits]
    if rule == "confidence":
        score = torch.stack([p.max(1).values for p in ps], 1)
    else:
        score = torch.stack([(p * p.log()).sum(1) / math.log(p.shape[1]) for p in ps], 1)
    k = score.argmax(1)
    rows = torch.arange(len(k))
    y = torch.stack([p.argmax(1) + o for p, o in zip(ps, offsets)], 1)[rows, k]
    conf = torch.stack([p.max(1).values for p in ps], 1)[rows, k]
    return y, k, conf
