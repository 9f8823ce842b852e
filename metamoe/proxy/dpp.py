"""Greedy MAP inference for the relevance-weighted DPP, without an n x n kernel.

For candidate rows ``z_i`` (L2-normalised by the caller, so ``Z Z^T`` is the cosine similarity)
and relevance ``r_i`` the kernel is ``L = Diag(r) Z Z^T Diag(r) = B B^T`` with ``b_i = r_i z_i``.
The greedy MAP of Chen, Zhang & Zhou (NeurIPS 2018) repeatedly adds the row with the largest
conditional variance ``d2_i = L_ii - L_iY L_YY^{-1} L_Yi`` (ties: the smaller index), kept in
feature space through the orthonormal Gram-Schmidt basis of the picked ``b``'s, so ``L`` is never
formed. ``block=1`` runs that loop as written, one GEMV per pick (the reference). The default
blocked lazy greedy returns the same picks: stale ``d2`` are upper bounds, so most rows stay
dormant, active rows are updated by one GEMM per block, a short certified list carries exact
values, and the working space is deflated as the rank is used up. Selection stops early when the
best remaining ``d2`` is below ``eps``. The loops are in :mod:`metamoe.proxy.dpp_loops`; the
derivation, numerics and memory are in docs/dpp.md, and measured timings in bench/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import numpy as np
from threadpoolctl import ThreadpoolController

from metamoe.proxy.dpp_loops import DPPResult, _greedy_blocked, _greedy_plain

__all__ = ["DPPResult", "greedy_dpp", "greedy_dpp_batch", "logdet"]

DEFAULT_BLOCK = 64
_ROW_CHUNK = 8192  # rows per chunk of the input check
_blas: ThreadpoolController | None = None  # created on first use (scanning the loaded libraries costs ms)


def _one_blas_thread() -> AbstractContextManager[object]:
    global _blas
    if _blas is None:
        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def _check_problem(z: np.ndarray, r: np.ndarray | None, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(z, dtype=dtype)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"Z must be a 2-D array [n, d], got shape {z.shape}")
    if not all(np.isfinite(z[i : i + _ROW_CHUNK]).all() for i in range(0, z.shape[0], _ROW_CHUNK)):
        raise ValueError("Z contains non-finite values")
    if r is None:
        r = np.ones(z.shape[0], dtype=dtype)
    r = np.asarray(r, dtype=dtype)
    if r.shape != (z.shape[0],):
        raise ValueError(f"r must have shape ({z.shape[0]},), got {r.shape}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError("r must be finite and >= 0")
    return z, r


def greedy_dpp(
    Z: np.ndarray,
    r: np.ndarray | None,
    m: int,
    *,
    eps: float = 1e-6,
    dtype: type = np.float32,
    block: int = DEFAULT_BLOCK,
) -> DPPResult:
    """Greedy MAP of the DPP with kernel ``Diag(r) Z Z^T Diag(r)``.

    Args:
        Z: [n, d] candidate embeddings (normalise rows for cosine similarity).
        r: [n] non-negative relevance, or ``None`` for the plain DPP (r = 1).
        m: maximum number of picks (>= 1; clamped to n).
        eps: stop when the best remaining conditional variance is < eps (> 0).
        dtype: float32 (default) or float64 arithmetic.
        block: at most this many picks between full updates of the active rows
            (>= 1).  ``1`` runs the plain one-GEMV-per-pick loop over all rows
            (the reference); larger values run the blocked lazy greedy with
            dormant rows and deflation (module docstring).  Same picks.

    Returns:
        :class:`DPPResult` with at most ``m`` picks (fewer on early stop).
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    z, r = _check_problem(Z, r, dtype)
    with _one_blas_thread():
        if block == 1:
            return _greedy_plain(z, r, m, eps)
        return _greedy_blocked(z, r, m, eps, block)


def greedy_dpp_batch(
    problems: Sequence[tuple[np.ndarray | Callable[[], np.ndarray], np.ndarray | None]],
    m: int,
    *,
    eps: float = 1e-6,
    dtype: type = np.float32,
    workers: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> list[DPPResult]:
    """Run :func:`greedy_dpp` on K independent ``(Z, r)`` problems.

    The result of each problem is identical to a standalone :func:`greedy_dpp`.
    ``Z`` may be a zero-argument callable returning the matrix: it is called when that
    problem starts, so with one worker only one problem's matrix exists at a time.
    ``workers`` > 1 runs problems on a thread pool.  The default is 1: two
    Python threads were slower on the benchmark's problems (timings in
    bench/README.md): the per-pick work is small and holds the GIL.
    Problems are not fused into one batched kernel: each has its own active
    rows, list and working basis, and the blocked loop's large operations are
    already GEMMs.
    """
    if not problems:
        return []
    workers = max(1, min(len(problems), workers or 1))

    def run(problem: tuple[np.ndarray | Callable[[], np.ndarray], np.ndarray | None]) -> DPPResult:
        z = problem[0]() if callable(problem[0]) else problem[0]
        return greedy_dpp(z, problem[1], m, eps=eps, dtype=dtype, block=block)

    if workers == 1:
        return [run(p) for p in problems]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, problems))


def logdet(Z: np.ndarray, r: np.ndarray | None, idx: Sequence[int] | np.ndarray) -> float:
    """``log det L_{idx,idx}`` in float64 (``-inf`` if singular; 0.0 for an empty set)."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return 0.0
    z = np.asarray(Z, dtype=np.float64)[idx]
    if r is not None:
        z = z * np.asarray(r, dtype=np.float64)[idx, None]
    sign, value = np.linalg.slogdet(z @ np.ascontiguousarray(z.T))
    return float(value) if sign > 0 else float("-inf")
