"""Claim scores as tensor functions: one teacher's score of each image from its logits or its
features and fitted tensors (formulas in :mod:`harness.routing`). No statistics object, no rule:
:func:`harness.routing.stats.raw_score` picks a score by name for one teacher, and
:mod:`harness.routing.rules` standardises and combines them across teachers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: largest intermediate of one row chunk of a feature-space score, in elements ([rows, C, d] for
#: ``mahalanobis``, [rows, M] for ``knn``): 2^23 float32 = 32 MiB, whatever the number of images
CHUNK_ELEMENTS = 2**23


def _top_gaps(z: Tensor) -> tuple[Tensor, Tensor]:
    """(d, L) for logits z [N, n]: d_c = z_c - z_c* with the top class c* set to -inf, [N, n],
    and L = logsumexp_{c != c*} d_c = log((1 - p_max) / p_max), [N] (-inf when n = 1)."""
    top = z.argmax(1, keepdim=True)
    d = (z - z.gather(1, top)).scatter(1, top, -math.inf)
    return d, torch.logsumexp(d, 1)


def _log_softplus(x: Tensor) -> Tensor:
    """log(log(1 + e^x)), still resolving where softplus(x) ~ e^x underflows (x < -15)."""
    return torch.where(x < -15, x + torch.log1p(-0.5 * torch.exp(x.clamp_max(-15))), torch.log(F.softplus(x)))


def log_odds_confidence(logits: Tensor, T_pl: float = 1.0) -> Tensor:
    """logit(p_max) = -logsumexp_{c != c*} (z_c - z_c*) / T_pl, p_max = max softmax(z / T_pl); [N]."""
    z = logits.float() / T_pl
    if z.shape[1] == 1:
        return torch.full((len(z),), math.inf, device=z.device)
    return -_top_gaps(z)[1]


def log_entropy_score(logits: Tensor, T_pl: float = 1.0) -> Tensor:
    """log(log n) - log H(softmax(z / T_pl)) in log space (module docstring); +inf for n = 1; [N]."""
    z = logits.float() / T_pl
    n = z.shape[1]
    if n == 1:
        return torch.full((len(z),), math.inf, device=z.device)
    d, L = _top_gaps(z)
    sp = F.softplus(L)[:, None]
    ok = torch.isfinite(d) & (d < 0)  # classes tied with the top contribute p_c * 0
    terms = torch.where(ok, d - sp + torch.log(torch.where(ok, -d, 1.0)), -math.inf)
    log_h = torch.logsumexp(torch.cat([_log_softplus(L)[:, None], terms], 1), 1)
    return math.log(math.log(n)) - log_h


def _row_chunks(n: int, per_row: int) -> list[slice]:
    """Slices of consecutive rows of ``n``, each small enough that its [rows, per_row]
    intermediate holds at most :data:`CHUNK_ELEMENTS` elements (one row at least)."""
    rows = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(i, i + rows) for i in range(0, n, rows)]


def min_sq_mahalanobis(f: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """min_c (f - mu_c)^T P (f - mu_c), [N], computed in row chunks (never [N, C, d]).

    Each chunk is written into the preallocated result: a list of small per-chunk results kept
    between the large temporaries would fragment the allocator's heap and let the resident
    memory grow with N."""
    out = f.new_empty(len(f))
    for rows in _row_chunks(len(f), means.numel()):
        diff = f[rows, None, :] - means[None, :, :]  # [rows, C, d]
        out[rows] = torch.einsum("ncd,de,nce->nc", diff, precision, diff).clamp_min(0).min(1).values
    return out


def mahalanobis_score(f: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """-min_c sqrt((f - mu_c)^T P (f - mu_c)), [N], in row chunks (:func:`min_sq_mahalanobis`)."""
    return -min_sq_mahalanobis(f, means, precision).sqrt()


def rmd_score(f: Tensor, means: Tensor, precision: Tensor, bg_mean: Tensor, bg_precision: Tensor) -> Tensor:
    """D_0(f) - min_c D_c(f), [N]: squared Mahalanobis distance to the pool's background Gaussian
    minus the smallest squared class-conditional one (relative Mahalanobis, Ren et al. 2021, as a
    claim score: higher = closer to the teacher's classes than to the pool at large)."""
    return min_sq_mahalanobis(f, bg_mean[None, :], bg_precision) - min_sq_mahalanobis(f, means, precision)


def knn_score(f: Tensor, bank: Tensor, j: int) -> Tensor:
    """-|f^ - b^_(j)|, the distance of the normalised feature to its j-th nearest bank row, [N],
    computed in row chunks (never the whole [N, M] distance matrix) into the preallocated result."""
    fn = F.normalize(f, dim=1)
    out = f.new_empty(len(f))
    for rows in _row_chunks(len(f), len(bank)):
        out[rows] = -torch.cdist(fn[rows], bank).topk(j, dim=1, largest=False).values[:, j - 1]
    return out
