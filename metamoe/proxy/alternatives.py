"""Baseline proxy-selection rules over one client's candidate set.

All functions return int64 row positions (into the candidate arrays) of
``min(m, n)`` distinct rows, except :func:`plain_dpp`, which may stop early
like every DPP (see :mod:`metamoe.proxy.dpp`).

* :func:`relevance_top_m`: the m most relevant rows (FlexOlmo-style
  selection): sort by ``(-key, index)``.
* :func:`random_subset`: m rows uniformly without replacement, seeded.
* :func:`plain_dpp`: greedy DPP MAP with ``r = 1`` (diversity only).
* :func:`kcenter_greedy`: farthest-first traversal (Gonzalez 1985), a
  2-approximation of the k-center objective ``max_i min_{j in Y} dist(i, j)``
  with cosine distance ``1 - <z_i, z_j>``; it starts from row 0 (the most
  relevant candidate) and breaks distance ties by the smaller index.  Once
  every remaining row is at distance 0 from the selection (duplicates) it
  keeps adding them in index order, so the count is always ``min(m, n)``.
"""

from __future__ import annotations

import numpy as np

from metamoe.proxy.dpp import greedy_dpp

__all__ = ["kcenter_greedy", "plain_dpp", "random_subset", "relevance_top_m"]


def _check_m(m: int) -> None:
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")


def relevance_top_m(keys: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` largest keys, ties broken by the smaller position."""
    _check_m(m)
    keys = np.asarray(keys)
    return np.lexsort((np.arange(len(keys)), -keys))[:m].astype(np.int64)


def random_subset(n: int, m: int, seed: int = 0) -> np.ndarray:
    """``min(m, n)`` distinct positions in ``range(n)``, uniformly at random (seeded)."""
    _check_m(m)
    rng = np.random.default_rng(seed)
    return rng.choice(n, size=min(m, n), replace=False).astype(np.int64)


def plain_dpp(Z: np.ndarray, m: int, *, eps: float = 1e-6, dtype: type = np.float32) -> np.ndarray:
    """Greedy MAP of the unweighted DPP ``L = Z Z^T`` (may return fewer than m)."""
    return greedy_dpp(Z, None, m, eps=eps, dtype=dtype).indices


def kcenter_greedy(Z: np.ndarray, m: int) -> np.ndarray:
    """Farthest-first traversal on rows of ``Z`` with cosine distance, from row 0."""
    _check_m(m)
    z = np.asarray(Z, dtype=np.float32)
    n = z.shape[0]
    m = min(m, n)
    picks = [0]
    min_dist = 1.0 - z @ z[0]
    min_dist[0] = -np.inf
    for _ in range(m - 1):
        j = int(np.argmax(min_dist))  # first index among equal distances
        picks.append(j)
        np.minimum(min_dist, 1.0 - z @ z[j], out=min_dist)
        min_dist[picks] = -np.inf
    return np.asarray(picks, dtype=np.int64)
