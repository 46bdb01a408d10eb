"""Loss functions of CKA and its baselines, as pure tensor functions.

These are the formulas of the method specification (``docs/methods.md``: §7 for CKA's four
loss components, §8-9 for KD and CFL's MMD). The CKA paper (Gao, Fu, Liu, Han, "Contrastive
Knowledge Amalgamation for Unsupervised Image Classification", arXiv 2307.14781) is public only as
its abstract; the exact formulas are the spec's reconstruction from it and from the methods it
builds on: SupCon (Khosla et al., NeurIPS 2020), KD (Hinton et al., 2015) and CFL (Luo et al.,
IJCAI 2019). Pseudo-labels (which teacher claims an image, spec "Pseudo-labels") are routing, not
a loss: :func:`harness.routing.route` is their one implementation.

Every function is stateless and side-effect free. All are numerically stable for temperatures
down to 0.05 and logits up to +-50 in float32 and float64: probabilities are only ever handled
as log-probabilities (``log_softmax`` / ``logsumexp``), and excluded entries (a sample against
itself) are removed from the matrices rather than filled with a large negative number, so no
``inf`` or ``NaN`` can enter either the value or the gradient.

Precision (:mod:`harness.precision`): every loss here is precision-sensitive (kernel distances
with tiny bandwidths, log-sum-exp over a batch or over classes, KL between softened
distributions, 1 - cosine of nearly equal vectors), so each runs in float32 outside autocast,
whatever the trial's precision: bf16/fp16 arguments are cast to float32 on entry, and the
gradient flows back to the bf16 activations that produced them. float32 and float64 arguments are
used as they are, so on the CPU, with ``amp: false`` and in the float64 tests nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harness.precision import float32

__all__ = [
    "align_cosine",
    "align_kl",
    "align_relation",
    "cross_entropy",
    "cross_supcon",
    "mmd2",
    "soft_target_kl",
    "supcon",
]

# --------------------------------------------------------------------------- helpers



def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_vectors(name: str, h: Tensor) -> None:
    if h.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [N, d], got shape {tuple(h.shape)}")


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _check_vectors(name_a, a)
    _check_vectors(name_b, b)
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_labels(h: Tensor, y: Tensor) -> None:
    if y.dim() != 1 or y.shape[0] != h.shape[0]:
        raise ValueError(
            f"labels must be a 1-D tensor with one entry per row ({h.shape[0]}), "
            f"got shape {tuple(y.shape)}"
        )


def _drop_diagonal(m: Tensor) -> Tensor:
    """[N, N] -> [N, N-1]: each row without its diagonal entry (order of the rest kept)."""
    # Flattened, the diagonal entries sit every n + 1 places starting at 0; dropping the first
    # one and viewing the rest as [n-1, n+1] puts all the others in the last column. Unlike
    # boolean indexing this needs no host-device sync.
    n = m.shape[0]
    return m.flatten()[1:].reshape(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def _log_softmax(x: Tensor, dim: int) -> Tensor:
    """Stable log-softmax, x - logsumexp(x).

    Same arithmetic as ``F.log_softmax`` (max-shifted); written with ``logsumexp`` because on
    a busy multi-threaded CPU the fused softmax kernel costs milliseconds per call even on
    tiny tensors (thread-pool wake-up), while the reduction does not.
    """
    return x - torch.logsumexp(x, dim=dim, keepdim=True)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise KL(p || q) = sum_c p(c) (log p(c) - log q(c)) from log-probabilities, -> [N].

    ``log_p`` and ``log_q`` come from ``log_softmax`` of finite inputs, so they are finite and
    ``p = exp(log_p)`` underflowing to 0 just gives a 0 term (no 0 * inf).
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _connected_zero(*tensors: Tensor) -> Tensor:
    """A scalar 0 that depends on the inputs, so ``backward()`` still works."""
    return sum(t.sum() for t in tensors) * 0.0  # type: ignore[return-value]


# --------------------------------------------------------------------------- contrastive


@float32
def supcon(h: Tensor, y: Tensor, tau: float = 0.1) -> Tensor:
    """Supervised-contrastive loss inside one model's common space (spec: L_intra).

    Formula (Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020, the L_out form)::

        SupCon(h, y) = mean_{i : |P(i)| > 0}  -(1/|P(i)|) sum_{p in P(i)}
                       log( exp(h_i.h_p / tau) / sum_{a != i} exp(h_i.h_a / tau) ),
        P(i) = { p != i : y_p = y_i }.

    Anchors without a positive are left out of the mean (not counted as 0). The self-pair
    a = i is removed from the denominator (the [N, N] similarity matrix loses its diagonal)
    rather than masked with a large negative value.

    Runs in float32 outside autocast (:mod:`harness.precision`): log-sum-exp over the batch at
    temperature tau.

    Args:
        h: [N, d] common-space vectors, expected unit-norm (not normalised here).
        y: [N] integer (pseudo-)labels.
        tau: Temperature, > 0.

    Returns:
        Scalar loss. When no anchor has a positive (all labels distinct, or N < 2) it is a
        zero that is still connected to ``h``'s graph, so ``backward()`` works.

    Raises:
        ValueError: On bad shapes or ``tau <= 0``.
    """
    _check_vectors("h", h)
    _check_labels(h, y)
    _check_positive("tau", tau)
    n = h.shape[0]
    if n < 2:
        return _connected_zero(h)
    same = y.reshape(-1, 1) == y.reshape(1, -1)
    pos = _drop_diagonal(same)  # [N, N-1]: p != i with y_p = y_i
    n_pos = pos.sum(dim=1)
    anchors = n_pos > 0
    if not bool(anchors.any()):
        return _connected_zero(h)
    sim = _drop_diagonal(h @ h.T / tau)  # [N, N-1]: all a != i
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[anchors] / n_pos[anchors].to(log_prob.dtype)
    return per_anchor.mean()


def _cross_supcon_one_way(anchor: Tensor, cand: Tensor, same: Tensor, tau: float) -> Tensor:
    sim = anchor @ cand.T / tau  # [N, N], j runs over all candidates including j = i
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    n_pos = same.sum(dim=1).to(log_prob.dtype)  # >= 1: j = i always qualifies
    pos_log_prob = torch.where(same, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return (-pos_log_prob / n_pos).mean()


@float32
def cross_supcon(
    h_s: Tensor, h_t: Tensor, y: Tensor, tau: float = 0.1, symmetric: bool = False
) -> Tensor:
    """Inter-model contrastive loss: student anchors against teacher candidates (spec: L_inter).

    Formula (CKA, Gao et al. arXiv 2307.14781, as reconstructed in the spec; a cross-view
    SupCon, Khosla et al. 2020)::

        CrossSupCon(h_s, h_t, y) = mean_i  -(1/|Q(i)|) sum_{q in Q(i)}
            log( exp(h_s,i.h_t,q / tau) / sum_j exp(h_s,i.h_t,j / tau) ),
        Q(i) = { j : y_j = y_i }   (always contains j = i, so every anchor counts).

    With ``symmetric=True`` the result is the average of this direction and the
    teacher-anchored one (h_t anchors, h_s candidates, same labels).

    Runs in float32 outside autocast (:mod:`harness.precision`): log-sum-exp over the batch at
    temperature tau.

    Args:
        h_s: [N, d] student common-space vectors (unit-norm expected).
        h_t: [N, d] teacher common-space vectors of the same N images, same order.
        y: [N] integer (pseudo-)labels.
        tau: Temperature, > 0.
        symmetric: Average with the teacher-anchored direction.

    Returns:
        Scalar loss.

    Raises:
        ValueError: On bad shapes or ``tau <= 0``.
    """
    _check_pair("h_s", h_s, "h_t", h_t)
    _check_labels(h_s, y)
    _check_positive("tau", tau)
    same = y.reshape(-1, 1) == y.reshape(1, -1)  # symmetric relation: reused by both directions
    loss = _cross_supcon_one_way(h_s, h_t, same, tau)
    if symmetric:
        loss = 0.5 * (loss + _cross_supcon_one_way(h_t, h_s, same, tau))
    return loss


# --------------------------------------------------------------------------- alignment


@float32
def align_kl(h_s: Tensor, h_t: Tensor, tau: float = 0.1) -> Tensor:
    """Sample-level alignment by KL over the d coordinates (spec: L_align default).

    Formula (CKA, Gao et al. arXiv 2307.14781, as reconstructed in the spec)::

        L = mean_i KL( softmax(h_t,i / tau) || softmax(h_s,i / tau) ),

    the softmax taken over the d coordinates of each common-space vector.

    Runs in float32 outside autocast (:mod:`harness.precision`): KL between distributions
    softened by tau.

    Args:
        h_s: [N, d] student vectors.
        h_t: [N, d] teacher vectors (the target distribution).
        tau: Temperature, > 0.

    Returns:
        Scalar loss, >= 0, 0 when ``h_s == h_t``.

    Raises:
        ValueError: On bad shapes or ``tau <= 0``.
    """
    _check_pair("h_s", h_s, "h_t", h_t)
    _check_positive("tau", tau)
    log_p_t = _log_softmax(h_t / tau, dim=1)
    log_p_s = _log_softmax(h_s / tau, dim=1)
    return _kl_rows(log_p_t, log_p_s).mean()


@float32
def align_cosine(h_s: Tensor, h_t: Tensor) -> Tensor:
    """Sample-level alignment by cosine distance (spec: L_align variant ``cosine``).

    Formula (CKA, Gao et al. arXiv 2307.14781, as reconstructed in the spec)::

        L = mean_i ( 1 - h_s,i . h_t,i / (|h_s,i| |h_t,i|) ).

    Rows are L2-normalised here (``F.normalize``, eps 1e-12), so non-unit inputs work; for unit
    inputs this is the spec's mean of 1 - h_s,i.h_t,i.

    Runs in float32 outside autocast (:mod:`harness.precision`): 1 - cosine of nearly equal
    vectors is a small difference of large numbers.

    Args:
        h_s: [N, d] student vectors.
        h_t: [N, d] teacher vectors.

    Returns:
        Scalar loss in [0, 2], 0 when the rows point the same way.

    Raises:
        ValueError: On bad shapes.
    """
    _check_pair("h_s", h_s, "h_t", h_t)
    cos = (F.normalize(h_s, dim=1) * F.normalize(h_t, dim=1)).sum(dim=1)
    return (1.0 - cos).mean()


@float32
def align_relation(h_s: Tensor, h_t: Tensor, tau: float = 0.1) -> Tensor:
    """Relation (similarity-structure) alignment (spec: L_align variant ``relation``).

    Formula (CKA, Gao et al. arXiv 2307.14781, as reconstructed in the spec)::

        R_t = softmax_row(H_t H_t^T / tau),  R_s = softmax_row(H_s H_s^T / tau),
        L = mean_i KL( R_t[i, :] || R_s[i, :] ),

    with the diagonal masked: entry (i, i) is excluded from each row's softmax (the row is a
    distribution over the other N-1 samples), not set to zero. The diagonal is removed from
    the similarity matrices before ``log_softmax``.

    Runs in float32 outside autocast (:mod:`harness.precision`): log-sum-exp of similarities
    over the batch, then a KL.

    Args:
        h_s: [N, d] student vectors (unit-norm expected, not normalised here).
        h_t: [N, d] teacher vectors of the same images, same order.
        tau: Temperature, > 0.

    Returns:
        Scalar loss, >= 0. For N < 2 (no off-diagonal entry) a connected zero.

    Raises:
        ValueError: On bad shapes or ``tau <= 0``.
    """
    _check_pair("h_s", h_s, "h_t", h_t)
    _check_positive("tau", tau)
    if h_s.shape[0] < 2:
        return _connected_zero(h_s, h_t)
    log_r_t = _log_softmax(_drop_diagonal(h_t @ h_t.T / tau), dim=1)
    log_r_s = _log_softmax(_drop_diagonal(h_s @ h_s.T / tau), dim=1)
    return _kl_rows(log_r_t, log_r_s).mean()


# --------------------------------------------------------------------------- soft targets


@float32
def soft_target_kl(z_t: Tensor, z_s: Tensor, T: float = 1.0) -> Tensor:
    """Knowledge-distillation soft-target loss (spec: L_task and the ``kd`` baseline).

    Formula (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015)::

        L = T^2 * mean_i KL( softmax(z_t,i / T) || softmax(z_s,i / T) ).

    The T^2 factor keeps the gradient scale roughly independent of T. For the spec's
    ``concat`` target pass the concatenated teacher logits; for ``per_task`` call it once per
    teacher with the student's slice S_k.

    Runs in float32 outside autocast (:mod:`harness.precision`): log-sum-exp over the classes,
    then a KL.

    Args:
        z_t: [N, n] teacher logits (the target).
        z_s: [N, n] student logits.
        T: Temperature, > 0.

    Returns:
        Scalar loss, >= 0, 0 when ``z_s == z_t`` (or differs by a per-row constant).

    Raises:
        ValueError: On bad shapes or ``T <= 0``.
    """
    _check_pair("z_t", z_t, "z_s", z_s)
    _check_positive("T", T)
    log_p_t = _log_softmax(z_t / T, dim=1)
    log_p_s = _log_softmax(z_s / T, dim=1)
    return (T * T) * _kl_rows(log_p_t, log_p_s).mean()


@float32
def cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy with hard labels (the ``scratch`` row, CKA's ``task_hard``)::

        L = mean_i -log softmax(z_i)[y_i] = mean_i ( logsumexp_c z_i,c - z_i,y_i ).

    ``F.cross_entropy``; this wrapper only fixes its precision instead of leaving it to
    autocast's per-device op lists. Runs in float32 outside autocast (:mod:`harness.precision`):
    log-sum-exp over the classes.

    Args:
        z: [N, n] logits.
        y: [N] integer labels in [0, n).

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(z, y)


# --------------------------------------------------------------------------- CFL


@float32
def mmd2(
    x: Tensor,
    y: Tensor,
    sigmas: Sequence[float] = (0.001, 0.01, 0.05, 0.1, 0.2, 1.0, 2.0),
) -> Tensor:
    """Squared maximum mean discrepancy with a multi-RBF kernel (CFL baseline).

    Formula (Luo et al., "Knowledge Amalgamation from Heterogeneous Networks by Common Feature
    Learning", IJCAI 2019; biased estimate as in the spec)::

        x_i <- x_i / |x_i|,  y_j <- y_j / |y_j|,
        K(a, b) = sum_{sigma in sigmas} exp( -|a - b|^2 / (2 sigma^2) ),
        MMD^2(X, Y) = max(0, mean K(X, X) + mean K(Y, Y) - 2 mean K(X, Y)),

    the means over all pairs, diagonal included (biased estimate). Squared distances come from
    one Gram matrix G of the stacked rows [X; Y], as in the reference code:
    |a - b|^2 = G_aa + G_bb - 2 G_ab, the norms read from G's diagonal, so a point's distance to
    itself is exactly 0 in any precision (norms computed apart from G leave a round-off of ~1e-7
    in float32, which the narrowest kernel, 2 sigma^2 = 2e-6, turns into a bias of about 1%);
    negative round-off between distinct points is clamped at 0.

    Runs in float32 outside autocast (:mod:`harness.precision`): under bf16 the a.b of the
    squared distances keeps ~3 digits, which the 1/(2 sigma^2) of the small bandwidths (up to
    5e5) turns into a gradient of random direction.

    Args:
        x: [N, c] samples of the first distribution (e.g. student features H_s).
        y: [M, c] samples of the second (e.g. a teacher's H_k); M may differ from N.
        sigmas: Kernel bandwidths, each > 0.

    Returns:
        Scalar >= 0; 0 when ``x`` and ``y`` are the same rows.

    Raises:
        ValueError: On bad shapes or a bandwidth <= 0.
    """
    _check_vectors("x", x)
    _check_vectors("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same width, got {x.shape[1]} and {y.shape[1]}")
    if len(sigmas) == 0:
        raise ValueError("sigmas must not be empty")
    for s in sigmas:
        _check_positive("sigma", s)
    xn = F.normalize(x, dim=1)
    yn = F.normalize(y, dim=1)
    gammas = torch.tensor(
        [1.0 / (2.0 * s * s) for s in sigmas], dtype=xn.dtype, device=xn.device
    ).reshape(-1, 1, 1)

    z = torch.cat([xn, yn])
    gram = z @ z.T
    sq = gram.diagonal()
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * gram).clamp_min(0.0)
    k = torch.exp(-gammas * d2.unsqueeze(0)).sum(dim=0)  # [N + M, N + M]
    n = xn.shape[0]
    value = k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()
    return value.clamp_min(0.0)
