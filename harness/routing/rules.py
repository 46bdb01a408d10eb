"""Routing rules: standardise each teacher's claim scores, combine them, pick the claiming
teacher k* (ties broken by continuous secondary scores), the pseudo-labels it implies and the
targets over the union classes (formulas in :mod:`harness.routing`). Methods need only this
module; the statistics it reads are fitted in :mod:`harness.routing.stats`."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.precision import float32
from harness.routing.stats import TeacherStats, raw_score
from harness.routing_schema import SCORES, RoutingConfig

#: Shift that removes a slice from a softmax (exp underflows to exactly 0 in float32).
_OFF = 1e4


@float32
def standardize(scores: Tensor, name: str, how: str, stats: TeacherStats | None) -> Tensor:
    """Put one teacher's raw scores on a scale comparable across teachers (own data only)."""
    if how == "none":
        return scores
    if stats is None:
        raise ValueError(f"standardisation {how!r} needs the teacher's fitted statistics")
    i = SCORES.index(name)
    if how == "z":  # a score equal to its mean (also +inf = +inf) is 0
        return torch.where(scores == stats.z_mean[i], 0.0, (scores - stats.z_mean[i]) / stats.z_std[i])
    ref = stats.val_sorted[i]
    return torch.searchsorted(ref.contiguous(), scores.contiguous(), right=True).float() / max(len(ref), 1)


StatsList = Sequence[TeacherStats]


def _raw_scores(
    logits: list[Tensor], feats: list[Tensor], stats: StatsList | None, rule: RoutingConfig
) -> list[dict[str, Tensor]]:
    """Per teacher, the raw score of each of the rule's scores."""
    return [{s: raw_score(s, z, f, stats[k] if stats else None, T_pl=rule.T_pl) for s in rule.scores}
            for k, (z, f) in enumerate(zip(logits, feats))]


def _combine(raw: list[dict[str, Tensor]], stats: StatsList | None, how: str) -> Tensor:
    """Sum over scores of the standardised raw scores, [N, K]."""
    return torch.stack([sum(standardize(r, s, how, stats[k] if stats else None) for s, r in per.items())
                        for k, per in enumerate(raw)], dim=1)


@float32
def claim_scores(
    logits: list[Tensor], feats: list[Tensor], stats: StatsList | None, rule: RoutingConfig,
    how: str | None = None,
) -> Tensor:
    """Combined standardised claim scores, [N, K] (standardisation ``how``, default the rule's)."""
    return _combine(_raw_scores(logits, feats, stats, rule), stats, rule.standardize if how is None else how)


def lex_argmax(keys: list[Tensor]) -> Tensor:
    """Per row, the column that is largest on ``keys[0]``, ties broken by ``keys[1]``, and so on;
    each key [N, K]. Columns equal on every key go to the lowest index."""
    cand = torch.ones_like(keys[0], dtype=torch.bool)
    for key in keys:
        masked = torch.where(cand, key, -math.inf)
        cand = cand & (masked == masked.max(1, keepdim=True).values)
    return cand.float().argmax(1)


@float32
def claiming_teacher(
    logits: list[Tensor], feats: list[Tensor], stats: StatsList | None, rule: RoutingConfig
) -> Tensor:
    """k* [N]: argmax of the rule's score; exact ties by the z-standardised score (``percentile``
    rules), then by the energy logsumexp z_k; never by teacher order while these differ."""
    raw = _raw_scores(logits, feats, stats, rule)  # computed once, standardised once or twice
    keys = [_combine(raw, stats, rule.standardize)]
    if rule.standardize == "percentile":
        keys.append(_combine(raw, stats, "z"))
    keys.append(torch.stack([torch.logsumexp(z.float(), 1) for z in logits], 1))
    return lex_argmax(keys)


@torch.no_grad()
@float32
def route(
    logits: list[Tensor], feats: list[Tensor], stats: StatsList | None, rule: RoutingConfig,
    offsets: tuple[int, ...] | list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """(union pseudo-labels o_{k*} + argmax z_{k*}, claiming teacher k*, its max softmax(z / T_pl)),
    each [N]: the one implementation of the spec's pseudo-labels (no gradient). In float32
    outside autocast (:mod:`harness.precision`), so a batch routes the same under the training
    loop's autocast as in the float32 diagnostics; no host synchronisation, no tensor created
    off the inputs' device."""
    if len(offsets) != len(logits) or not logits:
        raise ValueError(f"got {len(offsets)} offsets for {len(logits)} teachers")
    k_star = claiming_teacher(logits, feats, stats, rule)
    labels, conf = torch.zeros_like(k_star), torch.zeros_like(k_star, dtype=torch.float32)
    for k, t in enumerate(logits):  # every row's own max softmax, kept where teacher k claims
        c, idx = F.softmax(t.float() / rule.T_pl, 1).max(1)
        m = k_star == k
        labels, conf = torch.where(m, idx + offsets[k], labels), torch.where(m, c, conf)
    return labels, k_star, conf


def oracle_labels(logits: list[Tensor], task: Tensor, offsets: tuple[int, ...] | list[int]) -> Tensor:
    """o_{t(x)} + argmax z_{t(x)}(x), [N]: each image sent to the teacher of the task it belongs to
    (``task`` [N], its true task id). A diagnostic only, since it reads the task of each image, a
    label: the teachers' ceiling under perfect routing (routing loss = its accuracy minus that
    of the claiming teacher's labels)."""
    labels = torch.zeros(len(task), dtype=torch.long, device=task.device)
    for k, z in enumerate(logits):
        labels = torch.where(task == k, z.argmax(1).to(task.device) + offsets[k], labels)
    return labels


def target_logits(logits: list[Tensor], k_star: Tensor, rule: RoutingConfig, T: float = 1.0) -> Tensor:
    """Logits whose softmax at temperature T is the rule's target over the union classes.

    ``concat``: the concatenated logits. ``routed``: non-claiming slices shifted down by
    ``1e4 * T`` so their probability is exactly 0 and slice S_{k*} holds softmax(z_{k*} / T).
    """
    cat = torch.cat([t.float() for t in logits], 1)
    if rule.targets == "concat":
        return cat
    shift = torch.cat(
        [torch.where(k_star == k, 0.0, -_OFF * max(T, 1.0)).unsqueeze(1).expand(-1, t.shape[1]) for k, t in enumerate(logits)],
        1,
    )
    return cat + shift
