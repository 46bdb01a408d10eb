"""Routing: which teacher claims an unlabelled image (spec, "Routing"), and the targets it implies.

Claim score s_k(x) of teacher k, from its logits z_k(x) (n_k classes) and features f_k(x):

- ``confidence``  max_c softmax(z_k)_c                      (the paper-era default)
- ``max_logit``   max_c z_k,c
- ``energy``      logsumexp_c z_k,c
- ``entropy``     -H(softmax(z_k)) / log n_k                 (0 for n_k = 1)
- ``mahalanobis`` -min_c sqrt((f - mu_c)^T P (f - mu_c)), mu_c teacher k's class means, P the
                  inverse of one shared Ledoit-Wolf covariance, both on its own training features
- ``knn``         -|f^ - b^_(j)|, distance of the L2-normalised feature to its j-th nearest
                  neighbour (j = ``knn_k``, 5) among teacher k's own normalised validation features

Standardisation, fitted on each teacher's own data only: ``none``; ``z`` = (s - mean) / std over
its own training images; ``percentile`` = fraction of its own validation scores <= s. Several
scores are summed after standardisation (``max_logit+mahalanobis``). The claiming teacher is
k* = argmax_k of the combined score (ties: lowest k); the pseudo-label is o_{k*} + argmax z_{k*}.

Targets over the union logits: ``concat`` = softmax(concat_k z_k / T) (as in KD), ``routed`` =
softmax(z_{k*} / T) placed in slice S_{k*}, zero elsewhere.

A rule is written ``score/standardize/targets``, e.g. ``max_logit+mahalanobis/z/routed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

SCORES = ("confidence", "max_logit", "energy", "entropy", "mahalanobis", "knn")
STANDARDIZE = ("none", "z", "percentile")
TARGETS = ("concat", "routed")
#: Shift that removes a slice from a softmax (exp underflows to exactly 0 in float32).
_OFF = 1e4


class RoutingConfig(BaseModel):
    """A routing rule: claim score(s), standardisation, targets. ``parse("a+b/z/routed")``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: str = "confidence"
    standardize: Literal["none", "z", "percentile"] = "none"
    targets: Literal["concat", "routed"] = "concat"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: object) -> object:
        if isinstance(v, str):
            parts = v.split("/")
            if not 1 <= len(parts) <= 3:
                raise ValueError(f"routing rule {v!r}: write score/standardize/targets")
            return dict(zip(("score", "standardize", "targets"), parts))
        return v

    @field_validator("score")
    @classmethod
    def _known_scores(cls, v: str) -> str:
        parts = v.split("+")
        bad = [p for p in parts if p not in SCORES]
        if bad or len(set(parts)) != len(parts):
            raise ValueError(f"unknown or repeated claim score {bad[0] if bad else v!r} (choose from: {', '.join(SCORES)})")
        return v

    @property
    def scores(self) -> tuple[str, ...]:
        return tuple(self.score.split("+"))

    @property
    def name(self) -> str:
        return f"{self.score}/{self.standardize}/{self.targets}"

    @property
    def needs_stats(self) -> bool:
        """Whether the rule needs statistics fitted on the teachers' own data."""
        return self.standardize != "none" or any(s in ("mahalanobis", "knn") for s in self.scores)

    @classmethod
    def parse(cls, text: str) -> "RoutingConfig":
        """``"score[+score]/standardize/targets"`` (the last two optional)."""
        return cls.model_validate(text)


class RoutingStats(BaseModel):
    """Settings of the fitted statistics (part of their cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    knn_k: int = Field(5, ge=1)
    shrinkage: Literal["ledoit_wolf"] = "ledoit_wolf"


@dataclass
class TeacherStats:
    """Statistics of one teacher on its own data (all plain tensors: saved with weights_only)."""

    means: Tensor  # [n_k, d] class means of training features
    precision: Tensor  # [d, d] inverse shared Ledoit-Wolf covariance
    bank: Tensor  # [M, d] L2-normalised validation features
    z_mean: Tensor  # [len(SCORES)] per score, on own training images
    z_std: Tensor  # [len(SCORES)]
    val_sorted: Tensor  # [len(SCORES), M] sorted own validation scores
    knn_k: int = 5

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "TeacherStats":
        return cls(**d)  # type: ignore[arg-type]


def raw_score(name: str, logits: Tensor, feats: Tensor, stats: TeacherStats | None, exclude_self: bool = False) -> Tensor:
    """One teacher's claim score (higher = more likely its own image), shape [N]."""
    z = logits.float()
    if name == "confidence":
        return F.softmax(z, 1).max(1).values
    if name == "max_logit":
        return z.max(1).values
    if name == "energy":
        return torch.logsumexp(z, 1)
    if name == "entropy":
        n = z.shape[1]
        if n == 1:
            return torch.zeros(len(z))
        lp = F.log_softmax(z, 1)
        return (lp.exp() * lp).sum(1) / math.log(n)
    if stats is None:
        raise ValueError(f"claim score {name!r} needs the teacher's fitted statistics")
    f = feats.float()
    if name == "mahalanobis":
        diff = f[:, None, :] - stats.means[None, :, :]  # [N, C, d]
        d2 = torch.einsum("ncd,de,nce->nc", diff, stats.precision, diff).clamp_min(0)
        return -d2.min(1).values.sqrt()
    if name == "knn":
        dist = torch.cdist(F.normalize(f, dim=1), stats.bank)
        j = min(stats.knn_k + int(exclude_self), dist.shape[1])
        return -dist.topk(j, dim=1, largest=False).values[:, j - 1]
    raise ValueError(f"unknown claim score {name!r}")


def standardize(scores: Tensor, name: str, how: str, stats: TeacherStats | None) -> Tensor:
    """Put one teacher's raw scores on a scale comparable across teachers (own data only)."""
    if how == "none":
        return scores
    if stats is None:
        raise ValueError(f"standardisation {how!r} needs the teacher's fitted statistics")
    i = SCORES.index(name)
    if how == "z":
        return (scores - stats.z_mean[i]) / stats.z_std[i]
    ref = stats.val_sorted[i]
    return torch.searchsorted(ref.contiguous(), scores.contiguous(), right=True).float() / max(len(ref), 1)


def claim_scores(
    logits: list[Tensor], feats: list[Tensor], stats: list[TeacherStats] | None, rule: RoutingConfig
) -> Tensor:
    """Combined standardised claim scores, [N, K]."""
    cols = []
    for k, (z, f) in enumerate(zip(logits, feats)):
        st = stats[k] if stats else None
        cols.append(sum(standardize(raw_score(s, z, f, st), s, rule.standardize, st) for s in rule.scores))
    return torch.stack(cols, dim=1)


@torch.no_grad()
def route(
    logits: list[Tensor], feats: list[Tensor], stats: list[TeacherStats] | None, rule: RoutingConfig,
    offsets: tuple[int, ...] | list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """(union pseudo-labels, claiming teacher k*, claiming teacher's max softmax), each [N]."""
    k_star = claim_scores(logits, feats, stats, rule).argmax(1)
    labels = torch.empty_like(k_star)
    conf = torch.empty(len(k_star), device=k_star.device)
    for k, t in enumerate(logits):
        m = k_star == k
        if m.any():
            p = F.softmax(t[m].float(), 1)
            c, idx = p.max(1)
            labels[m], conf[m] = idx + offsets[k], c
    return labels, k_star, conf


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


@torch.no_grad()
def fit_stats(
    net: torch.nn.Module, x_train: Tensor, y_train: Tensor, x_val: Tensor, settings: RoutingStats = RoutingStats()
) -> TeacherStats:
    """Fit teacher k's routing statistics on its own training and validation images only.

    ``x_train``/``x_val`` may be tensors or lazy (streamed) collections."""
    from sklearn.covariance import LedoitWolf

    net.eval()
    z_tr, f_tr = _outputs(net, x_train)
    z_va, f_va = _outputs(net, x_val if len(x_val) else x_train)
    n_k = int(z_tr.shape[1])
    means = torch.stack([f_tr[y_train == c].mean(0) if (y_train == c).any() else f_tr.mean(0) for c in range(n_k)])
    centred = (f_tr - means[y_train]).double().numpy()
    precision = torch.from_numpy(LedoitWolf().fit(centred).precision_).float()
    bank = F.normalize(f_va, dim=1)
    partial = TeacherStats(means, precision, bank, torch.zeros(len(SCORES)), torch.ones(len(SCORES)),
                           torch.zeros(len(SCORES), 0), settings.knn_k)
    tr = torch.stack([raw_score(s, z_tr, f_tr, partial) for s in SCORES])
    va = torch.stack([raw_score(s, z_va, f_va, partial, exclude_self=True) for s in SCORES])
    partial.z_mean = tr.mean(1)
    partial.z_std = tr.std(1).clamp_min(1e-6)
    partial.val_sorted = va.sort(1).values
    return partial


def _outputs(net: torch.nn.Module, x: Tensor, bs: int = 1024) -> tuple[Tensor, Tensor]:
    """(logits, features) of ``net`` on ``x`` in chunks of ``bs``; a lazy (streamed) ``x`` is
    decoded chunk by chunk, in order, through a DataLoader onto the net's device."""
    from harness.data.stream import in_chunks

    p = next(net.parameters(), None)
    outs = [net.forward_both(xb) for xb in in_chunks(x, bs, p.device if p is not None else None)]  # type: ignore[operator]
    return torch.cat([o[0] for o in outs]).float().cpu(), torch.cat([o[1] for o in outs]).float().cpu()
