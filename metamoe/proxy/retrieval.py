"""Top-n candidate retrieval per client.

Retrieval runs in two stages so that every backend returns the same picks:

1. *Pre-filter*: find a superset of ``p = n + slack`` rows per sketch with the
   largest keys (see :mod:`metamoe.proxy.scoring`).

   * ``index="flat"`` (default): exact inner-product search with faiss
     ``IndexFlatIP``.  For a logistic sketch the key ``w.u + b`` is an inner
     product plus a constant and ``sigmoid`` is monotone, so the top-n by
     relevance is the top-n by ``<u, w>``: the K weight vectors are the queries.
     The pool is indexed chunk by chunk (normalised rows, ``chunk_rows`` at a
     time) and each chunk's top-p list is merged into a running top-p, so
     memory stays bounded (one chunk + ``K p``) and the pool is never copied
     whole.  A GPU index is used when faiss-gpu sees a GPU and ``p <= 2048``
     (the faiss GPU k-selection limit).
   * ``index="ivf"``: ``IndexIVFFlat`` over the normalised pool with
     ``nlist = 4 sqrt(N)`` inverted lists, trained on a seeded sample, searched
     with ``nprobe`` lists (default 32; recall rises with nprobe, cost roughly
     ``nprobe/nlist`` of a flat scan).  Approximate; meant for pools >= 1M that
     are searched repeatedly.  The index holds its own normalised copy of the
     pool (``4 N d`` bytes).
   * ``index="numpy"``: chunked matmul scoring of all sketches, each chunk's
     ``[K, chunk]`` keys merged into a running top-p per sketch
     (``argpartition``); the ``[K, N]`` key matrix is never held.

   Centroid sketches have non-linear keys and always use the numpy scan.  If
   faiss cannot be imported, the faiss options fall back to numpy with a
   warning.

   The pool may be a float16 or float32 array or ``np.memmap`` (the on-disk
   cache of :mod:`metamoe.proxy.pool_cache`); every scan reads it chunk by
   chunk and converts each chunk to float32, so a float32 memmap gives the
   same picks as the array in memory.  Anonymous memory is O(N) only for the
   float32 row norms (4 bytes a row).

2. *Exact re-ranking*: the superset rows are gathered, normalised and re-scored
   by the same code for every backend, sorted by ``(-key, pool index)`` and cut
   to ``n``.  Backends can therefore differ only if floating-point noise in the
   pre-filter pushes a true top-n row below rank ``p``, i.e. a gap of ``slack``
   rows within ~1e-6 of the n-th key, which does not happen outside exact ties.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metamoe.proxy.embeddings import DEFAULT_CHUNK_ROWS, l2_normalize, row_norms
from metamoe.proxy.scoring import check_sketches, iter_pool_keys, relevance_from_keys, sketch_keys
from metamoe.proxy.sketch import LogisticSketch, Sketch

try:
    import faiss
except Exception as exc:  # noqa: BLE001 - any import failure (missing lib, bad build)
    faiss = None
    _FAISS_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _FAISS_ERROR = None

__all__ = ["INDEX_KINDS", "Candidates", "faiss_available", "retrieve_candidates"]

INDEX_KINDS = ("flat", "ivf", "numpy")
_GPU_MAX_K = 2048


@dataclass(frozen=True)
class Candidates:
    """The top-n pool rows of one sketch.

    Attributes:
        indices: int64 [n'] pool indices sorted by (-key, index).
        keys: [n'] ranking keys (logit or relevance).
        relevance: [n'] relevance ``r`` in [0, 1].
        normalized: [R, d] L2-normalised rows the candidates are taken from (zero rows stay
            zero); without a pre-filter it is the whole normalised pool, shared by all clients.
        rows: int64 [n'] positions of the candidates in ``normalized`` (``None``: all of
            ``normalized``, in order).
    """

    indices: np.ndarray
    keys: np.ndarray
    relevance: np.ndarray
    normalized: np.ndarray
    rows: np.ndarray | None = None

    @property
    def embeddings(self) -> np.ndarray:
        """[n', d] L2-normalised candidate rows in candidate order, gathered on each access:
        a selection reads them once per client, so K clients never hold K copies at once."""
        return self.normalized if self.rows is None else self.normalized[self.rows]


def faiss_available() -> bool:
    """Whether faiss imported successfully."""
    return faiss is not None


def _use_gpu(k: int) -> bool:
    return (
        hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and k <= _GPU_MAX_K
    )


def _unit_rows(pool: np.ndarray, inv: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the pool (float16/float32, array or memmap) as contiguous
    float32 unit vectors (zero rows stay zero): one float32 copy, normalised in place."""
    chunk = np.array(pool[start:stop], dtype=np.float32, order="C")
    chunk *= inv[start:stop, None]
    return chunk


def _merge_top(
    vals: np.ndarray | None, ids: np.ndarray | None, new_vals: np.ndarray, new_ids: np.ndarray, p: int
) -> tuple[np.ndarray, np.ndarray]:
    """The running top-p (largest ``vals``) per row after adding one chunk's candidates."""
    if vals is not None:
        new_vals = np.concatenate([vals, new_vals], axis=1)
        new_ids = np.concatenate([ids, new_ids], axis=1)
    if new_vals.shape[1] > p:
        keep = np.argpartition(-new_vals, p - 1, axis=1)[:, :p]
        new_vals = np.take_along_axis(new_vals, keep, axis=1)
        new_ids = np.take_along_axis(new_ids, keep, axis=1)
    return new_vals, new_ids


def _faiss_flat(
    pool: np.ndarray, inv: np.ndarray, queries: np.ndarray, p: int, chunk_rows: int
) -> np.ndarray:
    gpu = faiss.StandardGpuResources() if _use_gpu(p) else None
    best_d, best_i = None, None
    for start in range(0, pool.shape[0], chunk_rows):
        stop = min(start + chunk_rows, pool.shape[0])
        index = faiss.IndexFlatIP(pool.shape[1])
        if gpu is not None:
            index = faiss.index_cpu_to_gpu(gpu, 0, index)
        index.add(_unit_rows(pool, inv, start, stop))
        dist, ids = index.search(queries, min(p, stop - start))
        del index
        best_d, best_i = _merge_top(best_d, best_i, dist, ids + start, p)
    return best_i


def _faiss_ivf(
    pool: np.ndarray, inv: np.ndarray, queries: np.ndarray, p: int, chunk_rows: int, nprobe: int
) -> np.ndarray:
    n_rows, dim = pool.shape
    nlist = max(1, min(int(4 * math.sqrt(n_rows)), n_rows // 39))
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n_rows, size=min(n_rows, 64 * nlist), replace=False))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(np.asarray(pool[sample], dtype=np.float32) * inv[sample, None]))
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        index.add(_unit_rows(pool, inv, start, stop))
    index.nprobe = min(nprobe, nlist)
    _, ids = index.search(queries, p)
    return ids


def _numpy_prefilter(
    pool: np.ndarray, norms: np.ndarray, sketches: Sequence[Sketch], p: int, chunk_rows: int
) -> list[np.ndarray]:
    """The top-p rows per sketch by key, merged chunk by chunk: memory is O(K p + one
    chunk), never the [K, N] key matrix."""
    best_k, best_i = None, None
    for start, stop, keys in iter_pool_keys(pool, sketches, chunk_rows, norms=norms):
        ids = np.broadcast_to(np.arange(start, stop, dtype=np.int64), keys.shape)
        best_k, best_i = _merge_top(best_k, best_i, keys, ids, p)
    return list(best_i)


def retrieve_candidates(
    pool_emb: np.ndarray,
    sketches: Sequence[Sketch],
    n: int,
    *,
    index: str = "flat",
    nprobe: int = 32,
    slack: int = 64,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    dtype: type = np.float32,
    norms: np.ndarray | None = None,
) -> list[Candidates]:
    """Top-n candidates of ``pool_emb`` for each sketch (``n`` clamped to N).

    Args:
        pool_emb: [N, d] float16/float32 pool embeddings, array or memmap (validated by
            the caller, e.g. :func:`~metamoe.proxy.embeddings.check_pool`); read in chunks.
        sketches: K validated sketches of dimension d.
        n: candidates per sketch (>= 1).
        index: "flat" (faiss exact), "ivf" (faiss approximate) or "numpy".
        nprobe: inverted lists visited by the IVF search.
        slack: extra pre-filter rows that absorb floating-point noise.
        chunk_rows: rows per chunk in pool scans.
        dtype: float dtype of re-ranked keys, relevance and embeddings.
        norms: optional precomputed row norms of ``pool_emb``.

    Returns:
        One :class:`Candidates` per sketch, in order.
    """
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    check_sketches(sketches, pool_emb.shape[1])
    n_rows = pool_emb.shape[0]
    n = min(n, n_rows)
    p = min(n_rows, n + slack)
    if norms is None:
        norms = row_norms(pool_emb, chunk_rows)
    supersets: list[np.ndarray | None] = [None] * len(sketches)
    if p == n_rows:
        supersets = [np.arange(n_rows)] * len(sketches)
    else:
        if index != "numpy" and faiss is None:
            warnings.warn(
                f"faiss unavailable ({_FAISS_ERROR}); using numpy retrieval", RuntimeWarning, stacklevel=2
            )
            index = "numpy"
        linear = [i for i, s in enumerate(sketches) if isinstance(s, LogisticSketch)]
        if index != "numpy" and linear:
            inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
            queries = np.ascontiguousarray(np.stack([sketches[i].weight for i in linear]), dtype=np.float32)
            if index == "flat":
                ids = _faiss_flat(pool_emb, inv, queries, p, chunk_rows)
            else:
                ids = _faiss_ivf(pool_emb, inv, queries, p, chunk_rows, nprobe)
            for row, i in zip(ids, linear):
                supersets[i] = row[row >= 0]
        rest = [i for i, s in enumerate(supersets) if s is None]
        if rest:
            found = _numpy_prefilter(pool_emb, norms, [sketches[i] for i in rest], p, chunk_rows)
            for i, ids_i in zip(rest, found):
                supersets[i] = ids_i
    out = []
    # No pre-filter (n + slack >= N): every client's superset is the whole pool, so the pool is
    # normalised once and shared instead of gathered and normalised per client.
    shared = l2_normalize(pool_emb, dtype=dtype) if p == n_rows else None
    for sk, sup in zip(sketches, supersets):
        sup = np.sort(np.asarray(sup, dtype=np.int64))
        u = shared if shared is not None else l2_normalize(pool_emb[sup], dtype=dtype)
        keys = sketch_keys(u, sk)
        order = np.lexsort((sup, -keys))[:n]
        out.append(
            Candidates(
                indices=sup[order],
                keys=keys[order],
                relevance=relevance_from_keys(sk, keys[order]),
                normalized=u,
                rows=order,
            )
        )
    return out
