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

Where each part lives (this face re-exports them all):

- :mod:`harness.routing_schema`  a rule's schema (pydantic only; the study schema stands on it)
- :mod:`harness.routing.scores`  the claim scores as tensor functions
- :mod:`harness.routing.stats`   the fitted statistics (:class:`TeacherStats`, :func:`fit_stats`,
                                 :func:`fit_background`) and one teacher's score read from them
                                 (:func:`raw_score`): all the teacher stage needs
- :mod:`harness.routing.rules`   standardisation, the claiming teacher, pseudo-labels and targets:
                                 all a method needs
"""

from harness.routing.rules import (
    StatsList,
    claim_scores,
    claiming_teacher,
    lex_argmax,
    oracle_labels,
    route,
    standardize,
    target_logits,
)
from harness.routing.scores import (
    CHUNK_ELEMENTS,
    knn_score,
    log_entropy_score,
    log_odds_confidence,
    mahalanobis_score,
    min_sq_mahalanobis,
    rmd_score,
)
from harness.routing.stats import STAT_TENSORS, RoutingStats, TeacherStats, fit_background, fit_stats, raw_score
from harness.routing_schema import FEATURE_SCORES, SCORES, STANDARDIZE, TARGETS, TEMPERED, RoutingConfig

__all__ = [
    "CHUNK_ELEMENTS", "FEATURE_SCORES", "SCORES", "STANDARDIZE", "STAT_TENSORS", "TARGETS", "TEMPERED",
    "RoutingConfig", "RoutingStats", "StatsList", "TeacherStats", "claim_scores", "claiming_teacher",
    "fit_background", "fit_stats", "knn_score", "lex_argmax", "log_entropy_score", "log_odds_confidence",
    "mahalanobis_score", "min_sq_mahalanobis", "oracle_labels", "raw_score", "rmd_score", "route", "standardize",
    "target_logits",
]
