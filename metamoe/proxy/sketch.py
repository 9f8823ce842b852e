"""Relevance sketches a client computes on its private embeddings and uploads.

A sketch summarises *where* a client's data lives in the frozen seed model's
embedding space without revealing samples.  All sketches live in cosine
geometry: private embeddings are L2-normalised (``u = x/||x||``) and the server
scores pool rows the same way (see :mod:`metamoe.proxy.scoring`).

Two sketches are provided.

**Logistic domain classifier** (:func:`fit_logistic_sketch`, paper default).
Positives are the client's embeddings, negatives an equal-size random sample
of the public pool.  With clip norm ``C`` the feature of an example is
``a = (C/sqrt 2) [u, 1]`` (the constant coordinate carries the bias), so every
feature has norm exactly ``C``.  The client minimises the L2-regularised
logistic loss::

    J(theta) = (1/n) sum_i log(1 + exp(-y_i theta.a_i)) + (Lambda/2) ||theta||^2

to convergence with L-BFGS (float64).  The uploaded ``weight``/``bias`` are
``theta`` mapped back to u-space: ``logit(u) = weight.u + bias``.

*Privacy (output perturbation, Chaudhuri, Monteleoni & Sarwate, JMLR 2011,
Thm. 6/Cor. 8).*  ``J`` is ``Lambda``-strongly convex and each loss gradient
has norm ``<= |l'| ||a|| <= C``, so for two datasets differing in one example
(replace-one neighbours, ``n`` = positives + negatives fixed) the exact
minimisers satisfy ``||theta - theta'|| <= 2C/(n Lambda)``.  Adding
``N(0, (z Delta)^2 I)`` with ``Delta = 2C/(n Lambda)`` to ``theta`` is the
Gaussian mechanism; its (epsilon, delta) comes from the analytic Gaussian
mechanism (:mod:`metamoe.proxy.privacy`).  The argument needs the *exact*
minimiser: the solver runs to a tight gradient tolerance and warns if it does
not reach it.  The negatives are public and only their count depends on the
(fixed) private size.

**k-means centroids with counts** (:func:`fit_centroid_sketch`).  Embeddings
are clipped, ``x <- x min(1, C/||x||)``, assigned to cells, and the client
releases per-cell sums (as means) and counts; no public sample is needed.

*Privacy (add/remove-one neighbours).*  The k-means *assignment* is itself a
function of the private data: adding one point can move every centroid, so
there is no useful sensitivity bound for Lloyd's algorithm run on private
data.  The noisy variant therefore requires data-independent ``centers``
(e.g. k-means centres of the public pool broadcast by the server, or any
public/seeded vectors) and performs a single nearest-centre assignment.  The
partition is then fixed, and adding/removing one point changes exactly one
cell sum by at most ``C`` (L2) and that cell's count by 1, so the vector
``(sums / C, counts)`` has L2 sensitivity ``Delta = sqrt 2``.  Noise
``N(0, (z Delta)^2)`` is added to every count and ``N(0, (z Delta C)^2)`` to
every sum coordinate; centroids ``sum / max(count, 1)`` and clamped counts
are post-processing.  Without noise the client may run full k-means.

*Minimum cell size* (``min_count``, the client's ``privacy.min_count``).  A k-means cell
of one sample has that sample's (clipped) embedding as its centroid, so no cell of fewer
than ``min_count`` samples is released: :func:`merge_small_cells` repeatedly takes the
smallest cell below the floor and merges it (sum and count) into the cell whose mean is
nearest by cosine, until every cell has at least ``min_count``.  Merging keeps every
sample (counts still sum to ``n``; cells are never dropped), so the sketch still covers
all of Dp; the number of cells shrinks to at most ``n // min_count``.  Fewer than
``min_count`` samples in all is refused (``ValueError``).  With noise the merge runs on
the *noisy* sums and counts: it is post-processing of the DP release (merging on the true
counts would make the partition data-dependent and void the sensitivity argument), so
there the floor holds for the released counts, and a single remaining cell (all of Dp)
may show a noisy count below it.

Both sketches are small frozen dataclasses with ``to_arrays()`` /
``from_arrays()`` (plain ``dict[str, np.ndarray]`` for Flower ArrayRecords)
and ``validate()``, which raises ``ValueError`` naming the bad field; they,
and :func:`sketch_from_arrays`, are defined in :mod:`metamoe.proxy.sketch_types`
and re-exported here.  This module holds the two fitting functions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import minimize

from metamoe.proxy.embeddings import check_embeddings, l2_normalize
from metamoe.proxy.privacy import PrivacyReport, gaussian_epsilon
from metamoe.proxy.sketch_types import CentroidSketch, LogisticSketch, Sketch, sketch_from_arrays

__all__ = [
    "CentroidSketch",
    "LogisticSketch",
    "Sketch",
    "fit_centroid_sketch",
    "fit_logistic_sketch",
    "merge_small_cells",
    "sketch_from_arrays",
]


def _check_dp_args(clip_norm: float, noise_multiplier: float | None, delta: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm}")
    if noise_multiplier is not None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta}")


def fit_logistic_sketch(
    private_emb: np.ndarray,
    public_emb: np.ndarray,
    *,
    l2: float = 1e-3,
    clip_norm: float = 1.0,
    noise_multiplier: float | None = None,
    delta: float = 1e-5,
    seed: int = 0,
    max_iter: int = 2000,
    grad_tol: float = 1e-7,
) -> LogisticSketch:
    """Fit the logistic domain classifier (optionally with output perturbation).

    Args:
        private_emb: [n, d] client embeddings (positives).
        public_emb: [M, d] public embeddings; ``n`` of them (without replacement
            when ``M >= n``) are sampled as negatives.
        l2: regulariser ``Lambda`` (> 0) of the objective in the module docstring.
        clip_norm: feature norm ``C``; features are ``(C/sqrt 2)[u, 1]``.
        noise_multiplier: ``z``; noise std is ``z * 2C/(n_total Lambda)``.
            ``None`` releases the exact minimiser (no DP guarantee).
        delta: the delta at which epsilon is reported.
        seed: seeds the negative sample and the noise.
        max_iter: L-BFGS iteration cap.
        grad_tol: gradient-norm tolerance; a ``RuntimeWarning`` is emitted if the
            solver stops above it (the DP argument assumes the exact minimiser).

    Returns:
        A validated :class:`LogisticSketch`.
    """
    pos = check_embeddings(private_emb, "private_emb")
    pub = check_embeddings(public_emb, "public_emb")
    if pub.shape[1] != pos.shape[1]:
        raise ValueError(f"public_emb has dim {pub.shape[1]}, private_emb has dim {pos.shape[1]}")
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be finite and > 0, got {l2}")
    _check_dp_args(clip_norm, noise_multiplier, delta)
    rng = np.random.default_rng(seed)
    n_pos = pos.shape[0]
    neg_idx = rng.choice(pub.shape[0], size=n_pos, replace=pub.shape[0] < n_pos)
    u = l2_normalize(np.concatenate([pos, pub[np.sort(neg_idx)]]), dtype=np.float64)
    scale = clip_norm / math.sqrt(2.0)
    a = scale * np.concatenate([u, np.ones((u.shape[0], 1))], axis=1)
    y = np.concatenate([np.ones(n_pos), -np.ones(n_pos)])
    n_total = a.shape[0]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = y * (a @ theta)
        loss = np.logaddexp(0.0, -margin).mean() + 0.5 * l2 * theta @ theta
        coef = -y * np.exp(-np.logaddexp(0.0, margin)) / n_total  # -y * sigmoid(-margin) / n
        return float(loss), a.T @ coef + l2 * theta

    res = minimize(
        objective,
        np.zeros(a.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": grad_tol * 1e-2, "ftol": 1e-15},
    )
    theta = res.x
    grad_norm = float(np.linalg.norm(objective(theta)[1]))
    if grad_norm > grad_tol:
        warnings.warn(
            f"logistic sketch: L-BFGS stopped at gradient norm {grad_norm:.2e} > {grad_tol:.1e}; "
            "the output-perturbation guarantee assumes the exact minimiser",
            RuntimeWarning,
            stacklevel=2,
        )
    privacy = None
    if noise_multiplier is not None:
        sensitivity = 2.0 * clip_norm / (n_total * l2)
        std = noise_multiplier * sensitivity
        theta = theta + rng.normal(0.0, std, size=theta.shape)
        eps = gaussian_epsilon(std, sensitivity, delta)
        privacy = PrivacyReport(epsilon=eps, delta=delta, noise_std=std, sensitivity=sensitivity)
    sk = LogisticSketch(
        weight=(scale * theta[:-1]).astype(np.float32), bias=float(scale * theta[-1]), privacy=privacy
    )
    sk.validate()
    return sk


def merge_small_cells(sums: np.ndarray, counts: np.ndarray, min_count: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Merge cells until every count is ``>= min_count`` (or one cell is left).

    Repeatedly the smallest cell below ``min_count`` (lowest index on ties) is merged into
    the other cell whose mean direction (``sums`` row) is nearest by cosine: its sum and
    count are added there and it is removed.  Empty cells (count 0, zero sum) just vanish.
    Returns the new ``(sums [k', d], counts [k'])``, float64, in the original cell order.
    """
    sums = np.array(sums, dtype=np.float64)
    counts = np.array(counts, dtype=np.float64)
    if sums.ndim != 2 or counts.shape != (sums.shape[0],):
        raise ValueError(f"sums [k, d] and counts [k] expected, got {sums.shape}, {counts.shape}")
    alive = list(range(len(counts)))
    while len(alive) > 1:
        small = [i for i in alive if counts[i] < min_count]
        if not small:
            break
        i = min(small, key=lambda j: (counts[j], j))
        others = [j for j in alive if j != i]
        unit = l2_normalize(sums[[i] + others], dtype=np.float64)
        j = others[int(np.argmax(unit[1:] @ unit[0]))]
        sums[j] += sums[i]
        counts[j] += counts[i]
        alive.remove(i)
    return sums[alive], counts[alive]


def fit_centroid_sketch(
    private_emb: np.ndarray,
    k: int,
    *,
    centers: np.ndarray | None = None,
    clip_norm: float = 1.0,
    noise_multiplier: float | None = None,
    delta: float = 1e-5,
    temperature: float = 0.2,
    seed: int = 0,
    min_count: int = 1,
) -> CentroidSketch:
    """Compute the centroid/count sketch (optionally with the Gaussian mechanism).

    Args:
        private_emb: [n, d] client embeddings.
        k: number of cells (clamped to ``n`` when running private k-means).
        centers: optional data-independent [k, d] centres; rows are assigned to
            the nearest centre by cosine.  Required when ``noise_multiplier`` is
            set (see the module docstring).  When ``None``, spherical-ish k-means
            (sklearn, on normalised rows) defines the cells.
        clip_norm: ``C``; every embedding is clipped to norm ``C`` before summing.
        noise_multiplier: ``z``; noise std is ``z * sqrt 2`` on counts and
            ``z * sqrt 2 * C`` on sum coordinates.  ``None`` adds no noise.
        delta: the delta at which epsilon is reported.
        temperature: stored relevance temperature (see :class:`CentroidSketch`).
        seed: seeds k-means and the noise.
        min_count: smallest released cell count (``privacy.min_count``); smaller cells are
            merged into their nearest cell (:func:`merge_small_cells`, on the noisy values
            when ``noise_multiplier`` is set).  ``ValueError`` if ``n < min_count``.

    Returns:
        A validated :class:`CentroidSketch` with ``<= k`` cells.
    """
    x = check_embeddings(private_emb, "private_emb")
    _check_dp_args(clip_norm, noise_multiplier, delta)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if x.shape[0] < min_count:
        raise ValueError(f"private_emb has {x.shape[0]} rows, fewer than min_count={min_count}: "
                         "no cell of the sketch could reach the minimum")
    rng = np.random.default_rng(seed)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    clipped = x * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-30))[:, None]
    u = l2_normalize(x)
    if centers is None:
        if noise_multiplier is not None:
            raise ValueError(
                "centers: a noisy centroid sketch needs data-independent (public) centres; "
                "k-means on private data has unbounded sensitivity"
            )
        from sklearn.cluster import KMeans

        k = min(k, x.shape[0])
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(u)
    else:
        c = check_embeddings(centers, "centers")
        if c.shape[1] != x.shape[1]:
            raise ValueError(f"centers has dim {c.shape[1]}, private_emb has dim {x.shape[1]}")
        k = c.shape[0]
        labels = np.argmax(u @ l2_normalize(c).T, axis=1)
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, clipped.astype(np.float64))
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    privacy = None
    if noise_multiplier is not None:
        sensitivity = math.sqrt(2.0)
        std = noise_multiplier * sensitivity
        sums += rng.normal(0.0, std * clip_norm, size=sums.shape)
        counts += rng.normal(0.0, std, size=counts.shape)
        eps = gaussian_epsilon(std, sensitivity, delta)
        privacy = PrivacyReport(epsilon=eps, delta=delta, noise_std=std, sensitivity=sensitivity)
    if min_count > 1:  # 1: no floor (every k-means cell has a sample already)
        sums, counts = merge_small_cells(sums, counts, min_count)
    centroids = sums / np.maximum(counts, 1.0)[:, None]
    sk = CentroidSketch(
        centroids=centroids.astype(np.float32),
        counts=np.maximum(counts, 0.0).astype(np.float32),
        temperature=temperature,
        privacy=privacy,
    )
    sk.validate()
    return sk
