"""Relevance scoring of the public pool against client sketches.

Every pool row ``x`` is mapped to ``u = x/||x||`` (zero rows stay zero) and
scored for each sketch:

* :class:`~metamoe.proxy.sketch.LogisticSketch`: ranking key ``s = w.u + b``
  (the logit) and relevance ``r = sigmoid(s)``.
* :class:`~metamoe.proxy.sketch.CentroidSketch`: relevance
  ``r = sum_j pi_j exp((cos(u, c_j) - 1) / tau)`` with ``pi_j`` the normalised
  counts (uniform if all counts are 0).  This is a count-weighted mixture of
  von Mises-Fisher kernels rescaled so every component peaks at 1; hence
  ``r`` lies in ``[0, 1]``, equals the mixture weight mass near centroids and
  decays with cosine distance.  The ranking key is ``r`` itself.

The key is what candidate retrieval ranks by: it is a strictly increasing
function of ``r`` but, unlike ``r``, a float32 logit does not saturate to 1.0,
so the top-n set is not decided by rounding ties.

The pool is processed in row chunks (bounded memory): a float16 or float32
array or ``np.memmap`` is read ``chunk_rows`` rows at a time and each chunk is
converted to float32, never the whole pool (:func:`iter_pool_keys`).  All
sketches are scored together: their vectors (logistic weights, normalised
centroids) are stacked into one ``[d, c]`` matrix so each chunk costs one matmul.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from metamoe.proxy.embeddings import DEFAULT_CHUNK_ROWS, check_pool, float32_chunks, l2_normalize, row_norms
from metamoe.proxy.sketch import CentroidSketch, LogisticSketch, Sketch

__all__ = [
    "check_sketches",
    "iter_pool_keys",
    "pool_keys",
    "relevance_from_keys",
    "relevance_scores",
    "sketch_keys",
]


def _columns(sketch: Sketch) -> np.ndarray:
    """Vectors whose inner products with ``u`` determine the sketch's key, [d, c]."""
    if isinstance(sketch, LogisticSketch):
        return np.asarray(sketch.weight, dtype=np.float32)[:, None]
    if isinstance(sketch, CentroidSketch):
        return l2_normalize(sketch.centroids).T
    raise TypeError(f"unsupported sketch type {type(sketch).__name__}")


def _keys_from_products(sketch: Sketch, prod: np.ndarray) -> np.ndarray:
    """Ranking keys from ``prod = u @ _columns(sketch)`` ([rows, c] -> [rows])."""
    if isinstance(sketch, LogisticSketch):
        return prod[:, 0] + prod.dtype.type(sketch.bias)
    counts = np.asarray(sketch.counts, dtype=np.float64)
    total = counts.sum()
    pi = counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))
    inv_t = 1.0 / sketch.temperature
    return np.exp((prod - 1.0) * prod.dtype.type(inv_t)) @ pi.astype(prod.dtype)


def relevance_from_keys(sketch: Sketch, keys: np.ndarray) -> np.ndarray:
    """Map ranking keys to relevance ``r`` in [0, 1] (same dtype as ``keys``)."""
    if isinstance(sketch, LogisticSketch):
        # Numerically stable sigmoid for both signs.
        e = np.exp(-np.abs(keys))
        return np.where(keys >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(keys.dtype)
    return np.clip(keys, 0.0, 1.0)


def check_sketches(sketches: Sequence[Sketch], dim: int) -> None:
    """Validate every sketch; ``ValueError`` if its dimension is not ``dim``."""
    for i, sk in enumerate(sketches):
        sk.validate()
        if sk.dim != dim:
            raise ValueError(f"sketch {i} has dim {sk.dim}, pool_emb has dim {dim}")


def sketch_keys(u: np.ndarray, sketch: Sketch) -> np.ndarray:
    """Exact ranking keys for already-normalised rows ``u`` ([rows, d]), in u's dtype."""
    cols = _columns(sketch).astype(u.dtype)
    return _keys_from_products(sketch, u @ cols)


def _as_pool(pool_emb: np.ndarray) -> np.ndarray:
    """A float16/float32 array or memmap as it is; anything else as a float32 array."""
    if isinstance(pool_emb, np.ndarray) and pool_emb.dtype in (np.float16, np.float32):
        return pool_emb
    return np.asarray(pool_emb, dtype=np.float32)


def iter_pool_keys(
    pool_emb: np.ndarray,
    sketches: Sequence[Sketch],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    norms: np.ndarray | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, keys [K, stop - start])`` for consecutive row chunks of the pool.

    Memory is one float32 chunk and its ``[chunk_rows, c]`` product block; the pool
    (array or memmap, float16 or float32) is never copied whole.

    Args:
        pool_emb: [N, d] pool embeddings (raw; normalised on the fly).
        sketches: the K sketches.
        chunk_rows: rows per chunk.
        norms: optional precomputed row norms (see :func:`row_norms`).
    """
    pool_emb = _as_pool(pool_emb)
    check_sketches(sketches, pool_emb.shape[1])
    if norms is None:
        norms = row_norms(pool_emb, chunk_rows)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    cols = [_columns(sk) for sk in sketches]
    bounds = np.cumsum([0] + [c.shape[1] for c in cols])
    stacked = np.concatenate(cols, axis=1)
    for start, stop, chunk in float32_chunks(pool_emb, chunk_rows):
        prod = chunk @ stacked
        prod *= inv[start:stop, None]
        keys = np.empty((len(sketches), stop - start), dtype=np.float32)
        for i, sk in enumerate(sketches):
            keys[i] = _keys_from_products(sk, prod[:, bounds[i] : bounds[i + 1]])
        yield start, stop, keys


def pool_keys(
    pool_emb: np.ndarray,
    sketches: Sequence[Sketch],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    norms: np.ndarray | None = None,
) -> np.ndarray:
    """Ranking keys of every pool row for every sketch, float32 [K, N].

    Memory beyond the output is one chunk (see :func:`iter_pool_keys`); retrieval does
    not call this (it keeps a running top-p per sketch instead of the [K, N] matrix).

    Args:
        pool_emb: [N, d] pool embeddings (raw; normalised on the fly).
        sketches: the K sketches.
        chunk_rows: rows per chunk.
        norms: optional precomputed row norms (see :func:`row_norms`).
    """
    pool_emb = _as_pool(pool_emb)
    out = np.empty((len(sketches), pool_emb.shape[0]), dtype=np.float32)
    for start, stop, keys in iter_pool_keys(pool_emb, sketches, chunk_rows, norms):
        out[:, start:stop] = keys
    return out


def relevance_scores(
    pool_emb: np.ndarray, sketches: Sequence[Sketch], chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> np.ndarray:
    """Relevance ``r`` in [0, 1] of every pool row for every sketch, float32 [K, N]."""
    pool_emb, norms = check_pool(pool_emb, "pool_emb", chunk_rows)
    keys = pool_keys(pool_emb, sketches, chunk_rows, norms=norms)
    for i, sk in enumerate(sketches):
        keys[i] = relevance_from_keys(sk, keys[i])
    return keys
