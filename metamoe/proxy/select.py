"""Proxy selection entry point: sketches -> relevance -> top-n -> m proxies.

Pipeline per client (all clients are handled together):

1. score the whole pool against every sketch in chunks
   (:mod:`metamoe.proxy.scoring`) and retrieve the top-``n`` candidates by
   relevance (:mod:`metamoe.proxy.retrieval`, faiss or numpy); the pool may be
   an in-memory array or an on-disk ``np.memmap`` (float16 or float32, see
   :mod:`metamoe.proxy.pool_cache`), never copied whole;
2. pick ``m`` proxies among the candidates with the chosen rule:

   ``"rw_dpp"`` (default) greedy MAP of the relevance-weighted DPP
   ``L = Diag(r) S Diag(r)``, ``S`` the cosine similarity of the candidates
   (:mod:`metamoe.proxy.dpp`); ``"dpp"`` the same with ``r = 1``;
   ``"relevance"`` the m most relevant candidates; ``"random"`` m candidates
   uniformly at random (seeded per client with ``(seed, crc32(name))``);
   ``"kcenter"`` farthest-first traversal (:mod:`metamoe.proxy.alternatives`).

Edge cases (documented contract):

* empty ``pool_emb``, ``n < 1`` or ``m < 1`` -> ``ValueError`` naming the
  argument; non-finite ``pool_emb`` -> ``ValueError``; a sketch whose
  dimension differs from the pool -> ``ValueError``.
* ``m > n`` -> ``ValueError`` (asking for more proxies than candidates is a
  configuration error).  ``n > N`` is clamped to ``N`` (a small pool simply
  offers all rows as candidates), so ``n_candidates = min(n, N)`` and a result
  has at most ``n_candidates`` picks.
* The DPP rules stop early when the best remaining conditional variance is
  below ``eps``: tiny pools, duplicate-heavy pools, zero vectors and ``m``
  larger than the embedding rank ``d`` give fewer than ``m`` picks, never NaN.
  (With d = 384, at most 384 rows can be picked by any DPP rule.)
* Zero embedding rows have no direction: relevance is the sketch's value at
  ``u = 0`` and the DPP never picks them.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from metamoe.proxy.alternatives import kcenter_greedy, random_subset, relevance_top_m
from metamoe.proxy.dpp import greedy_dpp_batch
from metamoe.proxy.embeddings import DEFAULT_CHUNK_ROWS, check_pool, l2_normalize
from metamoe.proxy.retrieval import Candidates, retrieve_candidates
from metamoe.proxy.sketch import Sketch

__all__ = ["METHODS", "SelectionResult", "select_from_scores", "select_proxies"]

METHODS = ("rw_dpp", "relevance", "random", "dpp", "kcenter")


@dataclass(frozen=True)
class SelectionResult:
    """Proxies picked for one client.

    Attributes:
        indices: int64 pool indices in pick order.
        relevance: float32 relevance ``r`` of the picks.
        n_candidates: size of the candidate set the picks came from.
        method: the selection rule.
    """

    indices: np.ndarray
    relevance: np.ndarray
    n_candidates: int
    method: str


def _check_args(n: int, m: int, method: str, eps: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if m > n:
        raise ValueError(f"m ({m}) must be <= n ({n}): cannot pick more proxies than candidates")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _pick(
    cands: list[Candidates],
    names: list[str],
    m: int,
    method: str,
    seed: int,
    eps: float,
    dtype: type,
    workers: int | None,
) -> dict[str, SelectionResult]:
    if method in ("rw_dpp", "dpp"):
        # Each client's candidate matrix is gathered when its DPP starts (see Candidates).
        problems = [(lambda c=c: c.embeddings, c.relevance if method == "rw_dpp" else None) for c in cands]
        positions = [res.indices for res in greedy_dpp_batch(problems, m, eps=eps, dtype=dtype, workers=workers)]
    elif method == "relevance":
        positions = [relevance_top_m(c.keys, m) for c in cands]
    elif method == "random":
        positions = [
            random_subset(len(c.indices), m, seed=[seed, zlib.crc32(name.encode())])
            for c, name in zip(cands, names)
        ]
    else:
        positions = [kcenter_greedy(c.embeddings, m) for c in cands]
    return {
        name: SelectionResult(
            indices=c.indices[pos].astype(np.int64),
            relevance=c.relevance[pos].astype(np.float32),
            n_candidates=len(c.indices),
            method=method,
        )
        for name, c, pos in zip(names, cands, positions)
    }


def select_proxies(
    pool_emb: np.ndarray,
    sketches: Mapping[str, Sketch],
    n: int,
    m: int,
    method: str = "rw_dpp",
    seed: int = 0,
    eps: float = 1e-6,
    index: str = "flat",
    *,
    dtype: type = np.float32,
    workers: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, SelectionResult]:
    """Select up to ``m`` proxies per client from the public pool.

    Args:
        pool_emb: [N, d] pool embeddings (any norm; normalised inside): a float16 or
            float32 array or ``np.memmap`` (e.g. :func:`metamoe.proxy.pool_cache.open_pool_embeddings`),
            read in chunks of rows and never copied whole; only the top-n candidates of
            each client are gathered. A float32 memmap gives the same picks as the array
            in memory; a float16 pool gives the picks of its float16-rounded values.
        sketches: client name -> validated sketch of dimension d.
        n: candidates per client retrieved by relevance (clamped to N).
        m: proxies per client (1 <= m <= n).
        method: one of :data:`METHODS`.
        seed: seed of the "random" method.
        eps: DPP early-stop threshold on the conditional variance.
        index: retrieval backend, "flat" (faiss exact), "ivf" or "numpy".
        dtype: float32 (default) or float64 for candidate scoring and the DPP.
        workers: threads for the per-client DPPs (default 1, see ``greedy_dpp_batch``).
        chunk_rows: pool rows read (and converted to float32) at a time.

    Returns:
        client name -> :class:`SelectionResult`, in the order of ``sketches``.
    """
    pool, norms = check_pool(pool_emb, "pool_emb", chunk_rows)
    _check_args(n, m, method, eps)
    names = list(sketches)
    if not names:
        return {}
    cands = retrieve_candidates(pool, [sketches[k] for k in names], n, index=index, dtype=dtype,
                                norms=norms, chunk_rows=chunk_rows)
    return _pick(cands, names, m, method, seed, eps, dtype, workers)


def select_from_scores(
    pool_emb: np.ndarray,
    scores: np.ndarray,
    n: int,
    m: int,
    method: str = "rw_dpp",
    seed: int = 0,
    eps: float = 1e-6,
    *,
    dtype: type = np.float32,
    workers: int | None = None,
) -> list[SelectionResult]:
    """Like :func:`select_proxies` for precomputed relevance ``scores`` [K, N] in [0, 1].

    Candidates are the top-n rows of each score row, ties broken by the
    smaller pool index.  Returns one result per score row (the "random"
    method seeds client ``i`` with ``(seed, crc32(str(i)))``).
    """
    pool, _ = check_pool(pool_emb, "pool_emb")
    _check_args(n, m, method, eps)
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != pool.shape[0]:
        raise ValueError(f"scores must have shape [K, {pool.shape[0]}], got {scores.shape}")
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise ValueError("scores must be finite and in [0, 1]")
    n = min(n, pool.shape[0])
    cands = []
    for row in scores.astype(dtype):
        kth = np.partition(row, len(row) - n)[len(row) - n]
        above = np.flatnonzero(row > kth)
        ties = np.flatnonzero(row == kth)[: n - len(above)]
        sup = np.concatenate([above, ties])
        sup = sup[np.lexsort((sup, -row[sup]))].astype(np.int64)
        cands.append(
            Candidates(indices=sup, keys=row[sup], relevance=row[sup], normalized=l2_normalize(pool[sup], dtype=dtype))
        )
    return list(_pick(cands, [str(i) for i in range(len(cands))], m, method, seed, eps, dtype, workers).values())
