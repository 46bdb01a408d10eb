"""Routing: which teacher claims an unlabelled image (spec, "Routing"), and the targets it implies.

Claim score s_k(x) of teacher k, from its logits z_k(x) (n_k classes) and features f_k(x); higher
means "more likely one of its own images". With d_c = (z_c - z_c*) / T_pl (c* the top class,
T_pl the rule's pseudo-label temperature) and L = logsumexp_{c != c*} d_c = log((1 - p_max) / p_max):

- ``confidence``  logit(p_max) = log(p_max / (1 - p_max)) = -L, p_max = max_c softmax(z_k / T_pl)_c
                  (the paper-era default). Monotone in p_max, so the claim ORDER is that of the
                  max softmax, but it keeps resolving where p_max rounds to 1.0 in float32 (top
                  margin above ~17): margins 20 and 30 give about 20 and 30. +inf when n_k = 1.
- ``max_logit``   max_c z_k,c
- ``energy``      logsumexp_c z_k,c
- ``entropy``     log(log n_k) - log H(softmax(z_k / T_pl)): monotone decreasing in the normalised
                  entropy H / log n_k (0 at the uniform distribution), computed in log space as
                  log H = logsumexp(log softplus(L), {d_c - softplus(L) + log(-d_c)}_{c != c*})
                  (H = softplus(L) + sum_{c != c*} p_c (-d_c), every term >= 0), so two confident
                  teachers with different margins get different scores. +inf when n_k = 1.
- ``mahalanobis`` -min_c sqrt((f - mu_c)^T P (f - mu_c)), mu_c teacher k's class means, P the
                  inverse of one shared Ledoit-Wolf covariance, both on its own training features
- ``knn``         -|f^ - b^_(j)|, distance of the L2-normalised feature to its j-th nearest
                  neighbour (j = ``knn_k``, 5) among teacher k's own normalised validation features
- ``rmd``         relative Mahalanobis (Ren et al. 2021, "A simple fix to Mahalanobis distance for
                  improving near-OOD detection"): D_0(f) - min_c D_c(f), with the *squared* distances
                  D_c(f) = (f - mu_c)^T P (f - mu_c) of ``mahalanobis`` and D_0(f) = (f - mu_0)^T P_0
                  (f - mu_0) to one background Gaussian (mu_0, P_0 the mean and inverse Ledoit-Wolf
                  covariance) fitted, with no label, on the *unlabelled pool* (the images the student
                  learns from) in teacher k's feature space (:func:`fit_background`). Subtracting D_0
                  removes the directions in which every pool image is far from the teacher's classes;
                  what is left says whether the image is closer to k's classes than to the pool at large.

Standardisation, fitted on each teacher's own data only (``rmd``: with the pool's background): ``none``; ``z`` = (s - mean) / std over
its own training images, applied to the scores above (so ``confidence/z`` standardises the
log-odds, which spreads like a logit margin, not the saturating probability; a score equal to
its mean, e.g. a one-class teacher's constant +inf, gives 0); ``percentile`` = fraction of its
own validation scores <= s. Several scores are summed after standardisation
(``max_logit+mahalanobis``).

Claiming teacher k* = argmax_k of the combined score. Exact ties (one-class teachers, percentile
steps of 1/M) are broken by continuous secondary scores, never by the teachers' order: with
``percentile``, first by the same scores z-standardised; then, for every rule, by the energy
logsumexp_c z_k,c of the raw logits. Only teachers indistinguishable on all of these fall back to
the lowest index. The pseudo-label is o_{k*} + argmax z_{k*}; its confidence (for CKA's
``conf_threshold``) is max_c softmax(z_{k*} / T_pl)_c.

``T_pl`` (spec "Pseudo-labels": p_k = softmax(z_k / T_pl), default 1) only acts on ``confidence``,
``entropy`` and the pseudo-label confidence. The fitted statistics are at T_pl = 1, so T_pl != 1
cannot be combined with a standardised ``confidence``/``entropy`` score (a validation error).

Targets over the union logits: ``concat`` = softmax(concat_k z_k / T) (as in KD), ``routed`` =
softmax(z_{k*} / T) placed in slice S_{k*}, zero elsewhere.

A rule is written ``score/standardize/targets``, e.g. ``max_logit+mahalanobis/z/routed``, or as a
mapping with the same keys plus ``T_pl`` (``{score: confidence, T_pl: 2}``). ``T_pl`` is left out
of the rule's serialised form when it is the default 1, so trial keys of existing studies stay.

Placement, precision, memory: the fitted statistics (:class:`TeacherStats`) are buffers of a
module, so they move with the method that holds them; scores, standardisation and claims run in
float32 outside autocast (:mod:`harness.precision`), so a batch is routed the same under the
training loop's bf16 autocast as in the float32 diagnostics; ``mahalanobis`` and ``knn`` are
computed in row chunks of at most :data:`CHUNK_ELEMENTS` intermediate elements, never as the
[N, C, d] or [N, M] tensor (at CIFAR scale 45k x 50 x 512 float32 would be 4.6 GB).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from harness.precision import float32
from harness.routing_schema import (  # noqa: F401  (a rule's schema lives in harness.routing_schema: re-exported)
    FEATURE_SCORES,
    SCORES,
    STANDARDIZE,
    TARGETS,
    TEMPERED,
    RoutingConfig,
)

#: Shift that removes a slice from a softmax (exp underflows to exactly 0 in float32).
_OFF = 1e4


class RoutingStats(BaseModel):
    """Settings of the fitted statistics (part of their cache key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    knn_k: int = Field(5, ge=1)
    shrinkage: Literal["ledoit_wolf"] = "ledoit_wolf"
    #: version of the claim-score formulas the statistics are fitted on (2: log-odds confidence,
    #: log-space entropy; 3: ``rmd`` and its pool background); part of the cache key, so
    #: statistics of older formulas are refitted
    score_version: Literal[3] = 3


#: largest intermediate of one row chunk of a feature-space score, in elements ([rows, C, d] for
#: ``mahalanobis``, [rows, M] for ``knn``): 2^23 float32 = 32 MiB, whatever the number of images
CHUNK_ELEMENTS = 2**23

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
