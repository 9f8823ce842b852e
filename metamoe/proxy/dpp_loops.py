"""The two greedy loops behind :func:`metamoe.proxy.dpp.greedy_dpp`, and the result type they return.

This module holds :class:`DPPResult`, the plain reference loop ``_greedy_plain`` (``block=1``: one
GEMV over all rows per pick), the blocked lazy greedy ``_greedy_blocked`` (the default: dormant
rows, one GEMM per block, a certified lazy list and deflation) and the helpers they share (exact
duplicate removal, the re-orthogonalised residual of a pick). Inputs are the checked, typed
arrays that :func:`~metamoe.proxy.dpp.greedy_dpp` passes in, with BLAS already capped at one
thread. The derivation, numerics and memory bounds are in docs/dpp.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_LIST_ROWS = 256  # initial lazy-list length; it may grow to 8x within a block
_ACT_CHUNK = 4096  # rows per activation GEMM (bounds the temporaries)


@dataclass(frozen=True)
class DPPResult:
    """Greedy DPP picks.

    Attributes:
        indices: int64 [k <= m] row positions in pick order.
        gains: float64 [k] conditional variance ``d2`` of each pick when picked
            (``det L_Y`` is their product; non-increasing along the path).
    """

    indices: np.ndarray
    gains: np.ndarray


def _result(picks: list[int], gains: list[float]) -> DPPResult:
    return DPPResult(indices=np.asarray(picks, dtype=np.int64), gains=np.asarray(gains, dtype=np.float64))


def _later_copies(z: np.ndarray, r: np.ndarray, key: np.ndarray, eps: float) -> np.ndarray:
    """Rows (live: ``key >= eps``) that repeat an earlier row exactly: same ``z`` row and same ``r``.

    In exact arithmetic a later copy ties with its first copy until that one is
    picked (the smaller index wins) and has ``d2 = 0`` afterwards, so it is
    never picked; in floating point the copies' values can differ in the last
    bit (a BLAS kernel treats rows at different positions differently), so
    they are removed up front to keep "ties go to the smaller index" exact.
    ``key`` is any row-wise function of ``(z_i, r_i)`` computed the same way
    for every row (``einsum``, not BLAS): only rows with equal keys are compared.
    """
    live = np.flatnonzero(key >= eps)
    if live.size < 2:
        return live[:0]
    srt = live[np.argsort(key[live], kind="stable")]
    same = key[srt[1:]] == key[srt[:-1]]
    if not same.any():
        return live[:0]
    cand = np.unique(np.concatenate([srt[1:][same], srt[:-1][same]]))
    uint = np.uint64 if z.itemsize == 8 else np.uint32
    bits = np.empty((cand.size, z.shape[1] + 1), dtype=uint)
    bits[:, :-1] = z[cand].view(uint)
    bits[:, -1] = r[cand].view(uint)
    _, group = np.unique(bits.view(np.dtype((np.void, bits.shape[1] * bits.itemsize))).ravel(), return_inverse=True)
    by_group = np.lexsort((cand, group.ravel()))  # within a group, ascending index
    later = np.zeros(cand.size, dtype=bool)
    later[by_group[1:]] = group.ravel()[by_group[1:]] == group.ravel()[by_group[:-1]]
    return cand[later]


def _residual(b_j: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, float]:
    """The pick's residual ``p = b_j - Q^T Q b_j`` against the orthonormal rows ``q``,
    re-orthogonalised once (CGS2), and its gain ``g = |p|^2``."""
    p = b_j.copy()
    if len(q):
        p -= (q @ p) @ q
        p -= (q @ p) @ q
    return p, float(p @ p)


def _greedy_plain(z: np.ndarray, r: np.ndarray, m: int, eps: float) -> DPPResult:
    """Reference loop: one GEMV ``B q_k`` over all rows per pick."""
    dtype = z.dtype
    n, d = z.shape
    m = min(m, n)
    b = z * r[:, None]
    d2 = np.einsum("ij,ij->i", b, b)
    d2[_later_copies(z, r, d2, eps)] = -np.inf
    q = np.zeros((m, d), dtype=dtype)
    picks: list[int] = []
    gains: list[float] = []
    while len(picks) < m:
        k = len(picks)
        j = int(np.argmax(d2))
        if not d2[j] >= eps:
            break
        p, g = _residual(b[j], q[:k])
        if not g >= eps:
            break
        q[k] = p / math.sqrt(g)
        picks.append(j)
        gains.append(g)
        e = b @ q[k]
        d2 -= e * e
        d2[j] = -np.inf  # mask the pick (stays -inf under later updates)
    return _result(picks, gains)


def _complement(q: np.ndarray) -> np.ndarray:
    """float64 orthonormal basis [D, D - k] of the orthogonal complement of the rows of ``q`` [k, D].

    The last ``D - k`` columns of the Householder QR of ``q^T``: when the ``q``'s
    are coordinate vectors (exactly orthogonal inputs) the basis is exact too,
    so exact ties survive the change of basis.
    """
    k = q.shape[0]
    return np.linalg.qr(q.astype(np.float64).T, mode="complete")[0][:, k:]


def _sq_rows(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _greedy_blocked(
    z: np.ndarray,
    r: np.ndarray,
    m: int,
    eps: float,
    block: int,
    list_rows: int = _LIST_ROWS,
) -> DPPResult:
    """Blocked lazy greedy over an active set, with deflation (derivation: docs/dpp.md)."""
    dtype = z.dtype
    n, d = z.shape
    m = min(m, n)
    # dormant rows keep their initial bound r^2 |z|^2 (-inf: activated, or below eps: never pickable)
    ud = _sq_rows(z)
    ud *= r
    ud *= r
    ud[~(ud >= eps)] = -np.inf
    ud[_later_copies(z, r, ud, eps)] = -np.inf
    n_dormant = int(np.count_nonzero(ud > -np.inf))
    if n_dormant == 0:
        return _result([], [])
    dmax = float(ud.max())
    act: float | None = 0.5 * dmax  # activate rows with a dormant bound >= act at the next block start
    basis: np.ndarray | None = None  # float64 [d, dim]: input space -> working space (None: identity)
    basis_t: np.ndarray | None = None
    dim = d
    # active rows: working coordinates ya (scaled by r), bounds ua (exact at block starts), input index ia
    ya = np.empty((n_dormant, dim), dtype=dtype)
    ua = np.empty(n_dormant, dtype=dtype)
    ia = np.empty(n_dormant, dtype=np.int64)
    na = 0
    q = np.zeros((min(m, dim), dim), dtype=dtype)  # directions of the picks since the last deflation
    kk = 0  # rows of q in use
    k0 = 0  # q[k0:kk] not yet applied to ua
    picks: list[int] = []
    gains: list[float] = []
    wide = False  # the last block ran out of list: the next one lists every active row
    neg_inf = -np.inf

    def deflate_due() -> bool:
        # halve the dimension while most live rows are dormant (it halves their activation cost),
        # and always once the rank is nearly used up (the end game)
        return 2 * kk >= dim and (dim - kk <= block or n_dormant >= na)

    while len(picks) < m:
        if kk and deflate_due():
            if kk == dim:
                break  # rank exhausted: every remaining d2 is 0
            wc = _complement(q[:kk])
            basis = wc if basis is None else basis @ wc
            basis_t = basis.astype(dtype)
            y = ya[:na] @ wc.astype(dtype)
            alive = np.flatnonzero(ua[:na] >= eps)  # stale bounds: rows below eps never come back
            dim -= kk
            ya = np.empty((ya.shape[0], dim), dtype=dtype)
            na = alive.size
            ya[:na] = y[alive]
            ia[:na] = ia[alive]
            ua[:na] = _sq_rows(ya[:na])
            q = np.zeros((min(m - len(picks), dim), dim), dtype=dtype)
            kk = k0 = 0
        elif k0 < kk:  # refresh the active bounds with the block's picks: one GEMM
            if na:
                e = ya[:na] @ q[k0:kk].T
                ua[:na] -= _sq_rows(e)
            k0 = kk
        if act is not None:  # activate dormant rows: exact d2 = |W^T b|^2 - |Q W^T b|^2
            new = np.flatnonzero(ud >= act)  # ascending input index
            want = min(n_dormant, list_rows)
            if new.size < want:
                new = np.sort(np.argpartition(ud, n - want)[n - want :])
            for lo in range(0, new.size, _ACT_CHUNK):
                rows = new[lo : lo + _ACT_CHUNK]
                y = z[rows]
                if basis_t is not None:
                    y = y @ basis_t
                y *= r[rows, None]
                uy = _sq_rows(y)
                if kk:
                    uy -= _sq_rows(y @ q[:kk].T)
                np.minimum(uy, ud[rows], out=uy)  # float guard: an activated row never exceeds its bound
                hi = na + rows.size
                ya[na:hi] = y
                ua[na:hi] = uy
                ia[na:hi] = rows
                na = hi
            ud[new] = neg_inf
            n_dormant -= new.size
            dmax = float(ud.max()) if n_dormant else neg_inf
            act = None
        # lazy list: active rows by decreasing bound; `outside` bounds the active rows past order[:big]
        big = na if wide else min(na, 8 * list_rows)
        wide = False
        if big < na:
            part = np.argpartition(ua[:na], na - big - 1)
            top = part[na - big :]
            outside = ua[part[na - big - 1]]
        else:
            top = np.arange(na)
            outside = neg_inf
        order = top[np.argsort(-ua[top], kind="stable")]
        c = min(big, list_rows)
        rows = order[:c]
        bl = ya[rows]
        vals = ua[rows]  # exact d2 of the listed rows
        stop = False
        while True:
            best = vals.max() if c else neg_inf
            bound = ua[order[c]] if c < big else outside
            if not best > max(bound, dmax):  # not certified: an unlisted row might reach best
                if max(best, bound, dmax) < eps:
                    stop = True
                    break
                if bound >= dmax:  # an active row: list more of them
                    if c == big:
                        wide = True
                        break
                    c2 = min(big, 2 * c)
                    if kk > k0 and c2 > max(2 * list_rows, na // 8):
                        break  # cheaper to refresh every active row than to grow the list
                    more = order[c:c2]
                    bn = ya[more]
                    vn = ua[more]
                    if kk > k0:
                        vn -= _sq_rows(bn @ q[k0:kk].T)
                    bl = np.concatenate([bl, bn])
                    vals = np.concatenate([vals, vn])
                    rows = order[:c2]
                    c = c2
                    continue
                # a dormant row: activate those with a bound >= half the best listed value
                ref = max(best, bound)
                act = 0.5 * (ref if ref >= eps else dmax)
                break
            if not best >= eps:
                stop = True
                break
            ties = np.flatnonzero(vals == best)
            pos = int(ties[0]) if ties.size == 1 else int(ties[np.argmin(ia[rows[ties]])])
            j = int(rows[pos])
            p, g = _residual(ya[j], q[:kk])
            if not g >= eps:
                stop = True
                break
            q[kk] = p / math.sqrt(g)
            picks.append(int(ia[j]))
            gains.append(g)
            kk += 1
            ua[j] = neg_inf  # mask the pick
            vals[pos] = neg_inf
            if len(picks) == m or kk - k0 >= block or deflate_due():
                break
            vals -= np.square(bl @ q[kk - 1])
        if stop:
            break
    return _result(picks, gains)
