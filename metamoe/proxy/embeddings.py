"""Row-wise embedding utilities shared by the proxy-selection modules.

All relevance sketches and the DPP work in *cosine geometry*: an embedding
``x`` is mapped to ``u = x / ||x||`` (a zero row stays zero, it has no
direction).  These helpers do that in bounded memory.

A pool may be an in-memory array or a ``np.memmap`` (e.g. the on-disk cache of
:mod:`metamoe.proxy.pool_cache`), float32 or float16.  The pool-side helpers
(:func:`check_pool`, :func:`row_norms`, :func:`float32_chunks`) read it
``chunk_rows`` rows at a time and convert each chunk to float32, so a pool is
never copied whole and a float32 memmap gives bit-identical results to the same
array in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "check_embeddings",
    "check_pool",
    "float32_chunks",
    "l2_normalize",
    "row_norms",
]

DEFAULT_CHUNK_ROWS = 65536

# Pool dtypes read as they are (chunk by chunk); any other dtype is converted once.
_POOL_DTYPES = (np.float16, np.float32)


def _check_shape(x: np.ndarray, name: str, allow_empty: bool) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {x.shape}")
    if x.shape[1] == 0 or (x.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{name} is empty (shape {x.shape})")


def float32_chunks(
    x: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, x[start:stop] as float32)`` for consecutive row chunks of ``x``.

    A float32 chunk of an in-memory array is a view; any other chunk (float16,
    a memmap's pages) is converted, so at most one chunk is held in anonymous memory.
    """
    for start in range(0, x.shape[0], chunk_rows):
        stop = min(start + chunk_rows, x.shape[0])
        yield start, stop, np.asarray(x[start:stop], dtype=np.float32)


def check_embeddings(x: np.ndarray, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """Validate a 2-D finite embedding matrix and return it as float32 (a copy unless it
    already is float32; see :func:`check_pool` for a pool that must not be copied).

    Raises:
        ValueError: naming ``name`` if ``x`` is not 2-D, is empty (unless
            ``allow_empty``) or contains NaN/inf.
    """
    x = np.asarray(x)
    _check_shape(x, name, allow_empty)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    for start in range(0, x.shape[0], DEFAULT_CHUNK_ROWS):
        if not np.isfinite(x[start : start + DEFAULT_CHUNK_ROWS]).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def check_pool(
    x: np.ndarray, name: str, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pool embedding matrix without copying it; ``(pool, row norms)``.

    ``x`` may be a float16 or float32 array or memmap: it is returned as it is (a
    ``np.memmap`` stays one) and read chunk by chunk, in one pass that checks
    finiteness and computes the float32 row norms (:func:`row_norms`).  Other
    dtypes (float64, integers, lists) are converted to float32 first.

    Raises:
        ValueError: as :func:`check_embeddings`.
    """
    if not (isinstance(x, np.ndarray) and x.dtype in _POOL_DTYPES):
        x = np.asarray(x)
        if x.dtype not in _POOL_DTYPES:
            x = x.astype(np.float32)
    _check_shape(x, name, allow_empty=False)
    norms = np.empty(x.shape[0], dtype=np.float32)
    for start, stop, c in float32_chunks(x, chunk_rows):
        if not np.isfinite(c).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        norms[start:stop] = np.sqrt(np.einsum("ij,ij->i", c, c))
    return x, norms


def row_norms(x: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """L2 norm of every row, computed chunk by chunk in float32 (shape [rows])."""
    out = np.empty(x.shape[0], dtype=np.float32)
    for start, stop, c in float32_chunks(x, chunk_rows):
        out[start:stop] = np.sqrt(np.einsum("ij,ij->i", c, c))
    return out


def l2_normalize(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Return a copy of ``x`` with unit-norm rows (zero rows stay zero), in ``dtype``.

    The whole of ``x`` is converted: meant for candidate sets and chunks, not a whole pool.
    """
    x = np.asarray(x, dtype=dtype)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return x * inv[:, None]
