"""Row-wise embedding utilities shared by the proxy-selection modules.

All relevance sketches and the DPP work in *cosine geometry*: an embedding
``x`` is mapped to ``u = x / ||x||`` (a zero row stays zero, it has no
direction).  These helpers do that in bounded memory.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_CHUNK_ROWS", "check_embeddings", "l2_normalize", "row_norms"]

DEFAULT_CHUNK_ROWS = 65536


def check_embeddings(x: np.ndarray, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """Validate a 2-D finite embedding matrix and return it as float32.

    Raises:
        ValueError: naming ``name`` if ``x`` is not 2-D, is empty (unless
            ``allow_empty``) or contains NaN/inf.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {x.shape}")
    if x.shape[1] == 0 or (x.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    for start in range(0, x.shape[0], DEFAULT_CHUNK_ROWS):
        if not np.isfinite(x[start : start + DEFAULT_CHUNK_ROWS]).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def row_norms(x: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    """L2 norm of every row, computed chunk by chunk (float32, shape [rows])."""
    out = np.empty(x.shape[0], dtype=np.float32)
    for start in range(0, x.shape[0], chunk_rows):
        c = x[start : start + chunk_rows]
        out[start : start + len(c)] = np.sqrt(np.einsum("ij,ij->i", c, c))
    return out


def l2_normalize(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Return a copy of ``x`` with unit-norm rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=dtype)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return x * inv[:, None]
