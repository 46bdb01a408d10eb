"""Routing statistics: what is fitted on each teacher's own data (class means, a shared
Ledoit-Wolf precision, a bank of validation features, each score's standardisation statistics)
and on the unlabelled pool (the background Gaussian of ``rmd``), and one teacher's raw claim
score read from them. The teacher stage needs only this module; the rules that route a batch
are in :mod:`harness.routing.rules`."""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from harness.precision import float32
from harness.routing.scores import knn_score, log_entropy_score, log_odds_confidence, mahalanobis_score, rmd_score
from harness.routing_schema import SCORES


class RoutingStats(BaseModel):
    """Settings of the fitted statistics (part of their cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    knn_k: int = Field(5, ge=1)
    shrinkage: Literal["ledoit_wolf"] = "ledoit_wolf"
    #: version of the claim-score formulas the statistics are fitted on (2: log-odds confidence,
    #: log-space entropy; 3: ``rmd`` and its pool background); part of the cache key, so
    #: statistics of older formulas are refitted
    score_version: Literal[3] = 3


#: the tensors of :class:`TeacherStats` (the order of ``to_dict``; the constructor takes ``knn_k``
#: after ``val_sorted``, the optional background last)
STAT_TENSORS = ("means", "precision", "bank", "z_mean", "z_std", "val_sorted", "bg_mean", "bg_precision")


class TeacherStats(nn.Module):
    """Statistics of one teacher on its own data, and the background Gaussian of the pool.

    The tensors are (non-persistent) buffers, so they move with the module that holds them:
    :class:`harness.methods.base.TeacherSet` holds one per teacher, and ``method.to(device)``
    puts them where the trial runs. On disk they are :meth:`to_dict`, plain CPU tensors and an
    int (loadable with ``torch.load(weights_only=True)``); non-persistent, they are not part of a
    method's ``state_dict``.
    """

    means: Tensor  # [n_k, d] class means of training features
    precision: Tensor  # [d, d] inverse shared Ledoit-Wolf covariance
    bank: Tensor  # [M, d] L2-normalised validation features
    z_mean: Tensor  # [len(SCORES)] per score, on own training images
    z_std: Tensor  # [len(SCORES)]
    val_sorted: Tensor  # [len(SCORES), M] sorted own validation scores
    bg_mean: Tensor  # [d] mean of the pool's features ([0] when no pool was given)
    bg_precision: Tensor  # [d, d] inverse Ledoit-Wolf covariance of the pool's features ([0, 0])

    def __init__(self, means: Tensor, precision: Tensor, bank: Tensor, z_mean: Tensor, z_std: Tensor,
                 val_sorted: Tensor, knn_k: int = 5, bg_mean: Tensor | None = None,
                 bg_precision: Tensor | None = None) -> None:
        super().__init__()
        bg_mean = means.new_zeros(0) if bg_mean is None else bg_mean
        bg_precision = means.new_zeros(0, 0) if bg_precision is None else bg_precision
        for name, t in zip(STAT_TENSORS, (means, precision, bank, z_mean, z_std, val_sorted, bg_mean, bg_precision)):
            self.register_buffer(name, t, persistent=False)
        self.knn_k = int(knn_k)

    @property
    def has_background(self) -> bool:
        """Whether a pool background was fitted (``rmd`` needs it)."""
        return self.bg_mean.numel() > 0

    def to_dict(self) -> dict[str, object]:
        """The cache format: ``{name: CPU tensor, ..., "knn_k": int}``."""
        out: dict[str, object] = {k: getattr(self, k).detach().cpu() for k in STAT_TENSORS}
        out["knn_k"] = self.knn_k
        return out

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "TeacherStats":
        return cls(**d)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"classes={len(self.means)}, d={self.means.shape[-1]}, bank={len(self.bank)}, knn_k={self.knn_k}, "
                f"background={self.has_background}")


@float32
def raw_score(
    name: str, logits: Tensor, feats: Tensor, stats: TeacherStats | None, exclude_self: bool = False, T_pl: float = 1.0
) -> Tensor:
    """One teacher's claim score (higher = more likely its own image), shape [N]; in float32
    outside autocast (:mod:`harness.precision`), on the device of its inputs and statistics."""
    z = logits.float()
    if name == "confidence":
        return log_odds_confidence(z, T_pl)
    if name == "max_logit":
        return z.max(1).values
    if name == "energy":
        return torch.logsumexp(z, 1)
    if name == "entropy":
        return log_entropy_score(z, T_pl)
    if stats is None:
        raise ValueError(f"claim score {name!r} needs the teacher's fitted statistics")
    f = feats.float()
    if name == "mahalanobis":
        return mahalanobis_score(f, stats.means, stats.precision)
    if name == "knn":
        return knn_score(f, stats.bank, min(stats.knn_k + int(exclude_self), len(stats.bank)))
    if name == "rmd":
        if not stats.has_background:
            raise ValueError("claim score 'rmd' needs a background fitted on the unlabelled pool "
                             "(fit_stats(..., background=fit_background(pool features)))")
        return rmd_score(f, stats.means, stats.precision, stats.bg_mean, stats.bg_precision)
    raise ValueError(f"unknown claim score {name!r}")


def fit_background(pool_feats: Tensor) -> tuple[Tensor, Tensor]:
    """(mu_0 [d], P_0 [d, d]): mean and inverse Ledoit-Wolf covariance of one teacher's features on
    the unlabelled pool, the background Gaussian of ``rmd``. Takes features only: no label can
    reach it. Fitted on the CPU in float64, returned as float32 on the features' device."""
    from sklearn.covariance import LedoitWolf

    f = pool_feats.detach().float()
    lw = LedoitWolf().fit(f.cpu().double().numpy())
    return (torch.from_numpy(lw.location_).float().to(f.device),
            torch.from_numpy(lw.precision_).float().to(f.device))


@torch.no_grad()
def fit_stats(
    net: torch.nn.Module, x_train: Tensor, y_train: Tensor, x_val: Tensor, settings: RoutingStats = RoutingStats(),
    background: tuple[Tensor, Tensor] | None = None,
) -> TeacherStats:
    """Fit teacher k's routing statistics on its own training and validation images only.

    ``background`` is the pool's background Gaussian in this teacher's feature space
    (:func:`fit_background`); without it, ``rmd`` is unavailable (its standardisation
    statistics are NaN and scoring it raises). With it, ``rmd`` is standardised like every score,
    on the teacher's own training (``z``) and validation (``percentile``) images.

    ``x_train``/``x_val`` may be tensors or lazy (streamed) collections; the net runs on them in
    chunks on its own device, the statistics are fitted on the CPU and returned there (the
    module that holds them moves them). Every score is computed in row chunks
    (:data:`CHUNK_ELEMENTS`), so memory beyond the features themselves stays bounded."""
    from sklearn.covariance import LedoitWolf

    net.eval()
    z_tr, f_tr = _outputs(net, x_train)
    z_va, f_va = _outputs(net, x_val if len(x_val) else x_train)
    dev, y_train = f_tr.device, y_train.to(f_tr.device)
    n_k = int(z_tr.shape[1])
    means = torch.stack([f_tr[y_train == c].mean(0) if (y_train == c).any() else f_tr.mean(0) for c in range(n_k)])
    centred = (f_tr - means[y_train]).double().numpy()
    precision = torch.from_numpy(LedoitWolf().fit(centred).precision_).float().to(dev)
    del centred
    bank = F.normalize(f_va, dim=1)
    n = len(SCORES)
    bg_mean, bg_precision = (None, None) if background is None else (background[0].float().to(dev),
                                                                     background[1].float().to(dev))
    partial = TeacherStats(means, precision, bank, torch.zeros(n, device=dev), torch.ones(n, device=dev),
                           torch.zeros(n, 0, device=dev), settings.knn_k, bg_mean, bg_precision)

    def all_scores(z: Tensor, f: Tensor, exclude_self: bool = False) -> Tensor:
        return torch.stack([raw_score(s, z, f, partial, exclude_self=exclude_self)
                            if s != "rmd" or partial.has_background else torch.full((len(z),), math.nan)
                            for s in SCORES])

    tr, va = all_scores(z_tr, f_tr), all_scores(z_va, f_va, exclude_self=True)
    partial.z_mean = tr.mean(1)
    partial.z_std = tr.std(1).nan_to_num(1.0).clamp_min(1e-6)  # nan: a one-class teacher's +inf scores
    if not partial.has_background:
        partial.z_std[SCORES.index("rmd")] = math.nan
    partial.val_sorted = va.sort(1).values
    return partial


def _outputs(net: torch.nn.Module, x: Tensor, bs: int = 1024) -> tuple[Tensor, Tensor]:
    """(logits, features) of ``net`` on ``x`` in chunks of ``bs``, as float32 on the CPU: each
    chunk of a tensor ``x`` is moved to the net's device, a lazy (streamed) ``x`` is decoded chunk
    by chunk, in order, through a DataLoader onto that device."""
    from harness.data.stream import in_chunks

    p = next(itertools.chain(net.parameters(), net.buffers()), None)
    dev = p.device if p is not None else torch.device("cpu")
    logits, feats = [], []
    for xb in in_chunks(x, bs, dev):
        z, f = net.forward_both(xb.to(dev))  # type: ignore[operator]
        logits.append(z.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(logits), torch.cat(feats)
