"""On-disk cache of the public pool's M0 embeddings, for pools that do not fit in memory.

:func:`embed_pool` runs M0 over a pool batch by batch (through the ``features`` function the
caller passes: :func:`metamoe.training.features`, the project's one batched forward, which
this layer-1 module may not import; see ``tests/test_architecture.py``) and writes each
batch's embeddings into a ``.npy`` file opened with ``np.lib.format.open_memmap``: at no
point is the pool, or its ``[N, d]`` embedding matrix, held in memory. The result is a
read-only ``np.memmap`` that :func:`metamoe.proxy.select_proxies` (and scoring,
retrieval) read chunk by chunk; only each client's top-n candidates are gathered.

Pool inputs (``items``):

* a numpy array or torch tensor ``[N, ...]`` (sliced batch by batch);
* any object with ``get_batch(start, stop)`` returning the inputs ``start:stop`` as one
  array/tensor (a lazy pool that builds a batch at once, e.g. ``bench/pool_scale.py``);
* any map-style sequence (``__len__`` + ``__getitem__(i)``: a torch ``Dataset``, a list,
  a lazy wrapper): items are stacked per batch; an item that is a tuple/list, such as a
  dataset's ``(x, y)``, contributes its first element;
* an iterable of items (a generator), with ``rows=N`` given.

The file holds the raw (not normalised) embeddings in ``float16`` (half the disk and page
cache; the default) or ``float32``. The selection normalises rows itself, so a float32
cache gives exactly the picks of the same embeddings in memory; a float16 cache gives the
picks of the float16-rounded embeddings (relative error ~5e-4 per value), which can differ
from the float32 picks where two candidates' keys or DPP gains are that close.

Cache identity: a sidecar JSON (``<file>.npy.json``) records the key, the shape and the dtype.
The key is :func:`pool_cache_key` of M0's fingerprint (:func:`model_fingerprint`: a hash
of its state dict's names, dtypes, shapes and bytes, or any string the caller gives), the
pool's fingerprint (given by the caller: e.g. a config hash and N) and the embedding kind.
:func:`open_pool_embeddings` refuses (``PoolCacheMismatch``, a ``ValueError``) a file
whose key, shape or dtype differs from what the caller expects, or that has no metadata.

Writes go to a temporary name in the same directory; the metadata, then the ``.npy``, are
renamed into place only when complete, so a concurrent run sees either no cache or a
whole one. Two runs writing the same key write the same embeddings (bit for bit with the
same batch size on one machine), so the last rename wins harmlessly. ``overwrite=True``
removes a mismatching file before the new metadata is renamed in, so new metadata is never
paired with an old file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported when a function needs it: ``import metamoe.proxy`` stays light
    import torch

log = logging.getLogger("metamoe")

__all__ = [
    "PoolCacheMismatch",
    "embed_pool",
    "model_fingerprint",
    "open_pool_embeddings",
    "pool_cache_key",
    "pool_cache_path",
]

FORMAT_VERSION = 1
KINDS = ("tokens", "cls")
DTYPES = ("float16", "float32")


class PoolCacheMismatch(ValueError):
    """A cache file whose key, shape or dtype is not the one asked for (or has no metadata)."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of the model's state dict: every entry's name, dtype, shape and bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pool_cache_key(model_fp: str, pool_fp: str, kind: str = "tokens") -> str:
    """The cache key (16 hex digits) of M0 ``model_fp``'s ``kind`` embeddings of pool ``pool_fp``."""
    blob = json.dumps({"model": str(model_fp), "pool": str(pool_fp), "kind": str(kind),
                       "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pool_cache_path(cache_dir: str | os.PathLike, key: str, kind: str = "tokens",
                    dtype: str = "float16") -> Path:
    """The conventional file of a cache key: ``<cache_dir>/pool-<kind>-<dtype>-<key>.npy``."""
    return Path(cache_dir) / f"pool-{kind}-{dtype}-{key}.npy"


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def open_pool_embeddings(path: str | os.PathLike, *, key: str | None = None, rows: int | None = None,
                         dim: int | None = None, dtype: str | None = None) -> np.memmap:
    """The cached embeddings at ``path`` as a read-only ``np.memmap`` [N, d].

    Each of ``key``, ``rows``, ``dim``, ``dtype`` that is given must match the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        PoolCacheMismatch: the metadata is missing or unreadable, disagrees with the
            ``.npy`` header, or a given ``key``/``rows``/``dim``/``dtype`` differs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pool embedding cache at {path}")
    try:
        meta = json.loads(_meta_path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PoolCacheMismatch(f"{path}: missing or unreadable metadata {_meta_path(path).name} "
                                f"({type(exc).__name__}); not a complete pool cache") from exc
    arr = np.load(path, mmap_mode="r")
    if not isinstance(arr, np.memmap) or arr.ndim != 2:
        raise PoolCacheMismatch(f"{path}: not a 2-D array file")
    found = {"key": meta.get("key"), "rows": arr.shape[0], "dim": arr.shape[1], "dtype": str(arr.dtype)}
    if list(meta.get("shape", ())) != list(arr.shape) or meta.get("dtype") != str(arr.dtype):
        raise PoolCacheMismatch(f"{path}: metadata shape/dtype {meta.get('shape')}/{meta.get('dtype')} "
                                f"!= file {list(arr.shape)}/{arr.dtype}")
    want = {"key": key, "rows": rows, "dim": dim, "dtype": None if dtype is None else str(np.dtype(dtype))}
    bad = {k: (v, found[k]) for k, v in want.items() if v is not None and v != found[k]}
    if bad:
        raise PoolCacheMismatch(f"{path}: cache does not match: "
                                + ", ".join(f"{k} expected {e!r}, found {f!r}" for k, (e, f) in bad.items()))
    return arr


def _as_input(item: Any) -> torch.Tensor:
    import torch

    if isinstance(item, (tuple, list)):
        item = item[0]
    return torch.as_tensor(item)


def _batches(items: Any, rows: int, batch_size: int) -> Iterable[Any]:
    """The pool's inputs, ``batch_size`` at a time (see the module docstring)."""
    import torch

    if isinstance(items, (np.ndarray, torch.Tensor)):
        for start in range(0, rows, batch_size):
            yield items[start:start + batch_size]
    elif hasattr(items, "get_batch"):
        for start in range(0, rows, batch_size):
            yield items.get_batch(start, min(start + batch_size, rows))
    elif hasattr(items, "__getitem__") and hasattr(items, "__len__"):
        for start in range(0, rows, batch_size):
            yield torch.stack([_as_input(items[i]) for i in range(start, min(start + batch_size, rows))])
    else:
        it = iter(items)
        for start in range(0, rows, batch_size):
            chunk = [_as_input(x) for x in itertools.islice(it, min(batch_size, rows - start))]
            if len(chunk) < min(batch_size, rows - start):
                raise ValueError(f"the item iterable ended after {start + len(chunk)} items, rows={rows}")
            yield torch.stack(chunk)


FeaturesFn = Callable[["torch.nn.Module", Any, str, int], np.ndarray]


def embed_pool(model: torch.nn.Module, items: Any, path: str | os.PathLike, *, pool_fp: str,
               features: FeaturesFn, kind: str = "tokens", batch_size: int = 1024, dtype: str = "float16",
               model_fp: str | None = None, rows: int | None = None,
               overwrite: bool = False) -> np.memmap:
    """M0's ``kind`` embeddings of the pool ``items``, cached at ``path``; read-only memmap [N, d].

    If ``path`` already holds this key's cache (same key, N and dtype) it is opened, not
    recomputed. Otherwise the pool is embedded batch by batch with
    ``features(model, batch, kind, len(batch))`` and written to a temporary file that is
    renamed to ``path`` when complete.

    Args:
        model: M0 (any module with ``forward_embedding`` / ``forward_features``).
        items: the pool's inputs (see the module docstring).
        path: the ``.npy`` file (e.g. :func:`pool_cache_path`).
        pool_fp: the pool's fingerprint (the caller's: e.g. a config hash and N).
        features: the batched forward, ``metamoe.training.features`` (signature
            ``features(model, x, kind, batch_size) -> float32 [len(x), d]``).
        kind: ``tokens`` (all last-layer tokens) or ``cls`` (the pooled feature).
        batch_size: inputs per forward.
        dtype: ``float16`` (default) or ``float32`` storage.
        model_fp: M0's fingerprint; default :func:`model_fingerprint` of ``model``.
        rows: N; required when ``items`` has no ``len()`` (an iterable).
        overwrite: replace a file at ``path`` whose key/shape/dtype differs (default: refuse).

    Raises:
        PoolCacheMismatch: a different cache is at ``path`` and ``overwrite`` is False.
        ValueError: bad arguments, an empty pool, or an embedding that is not finite in
            ``dtype`` (float16 overflows beyond 65504: use float32).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(items) if rows is None else int(rows)
    if n < 1:
        raise ValueError("the pool is empty")
    path = Path(path)
    key = pool_cache_key(model_fingerprint(model) if model_fp is None else model_fp, pool_fp, kind)
    replacing = False
    if path.exists():
        try:
            out = open_pool_embeddings(path, key=key, rows=n, dtype=dtype)
            log.info("pool embeddings loaded from cache %s %s", path, out.shape)
            return out
        except PoolCacheMismatch:
            if not overwrite:
                raise
            replacing = True
            log.info("replacing the pool embedding cache %s (key/shape/dtype differ)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp, tmp_meta = path.with_name(f".{path.name}.{tag}"), path.with_name(f".{path.name}.json.{tag}")
    t0, done, next_log, mm = time.perf_counter(), 0, max(1, n // 10), None
    try:
        for batch in _batches(items, n, batch_size):
            emb = np.asarray(features(model, batch, kind, len(batch)))
            if mm is None:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, emb.shape[1]))
            block = emb.astype(mm.dtype, copy=False)
            if not np.isfinite(block).all():
                raise ValueError(f"pool rows {done}-{done + len(block)}: embedding not finite in {dtype}"
                                 + (" (float16 overflows beyond 65504: use dtype='float32')"
                                    if dtype == "float16" and np.isfinite(emb).all() else ""))
            mm[done:done + len(block)] = block
            done += len(block)
            if done >= next_log or done == n:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log.info("embedded %d/%d pool items (%.0f/s)", done, n, rate)
                next_log = done + max(1, n // 10)
        if done != n:
            raise ValueError(f"the pool yielded {done} items, expected {n}")
        mm.flush()
        shape = list(mm.shape)
        del mm
        mm = None
        seconds = time.perf_counter() - t0
        meta = {"format": FORMAT_VERSION, "key": key, "pool_fp": str(pool_fp), "kind": kind,
                "dtype": str(np.dtype(dtype)), "shape": shape, "seconds": round(seconds, 3)}
        tmp_meta.write_text(json.dumps(meta, indent=1))
        if replacing:  # never pair the new metadata with the old file, even for a moment
            path.unlink(missing_ok=True)
        tmp_meta.replace(_meta_path(path))
        tmp.replace(path)
    except BaseException:
        del mm  # unmap before unlinking
        for f in (tmp, tmp_meta):
            f.unlink(missing_ok=True)
        raise
    log.info("pool embeddings %s cached at %s (%.1fs, %.0f items/s)", shape, path, seconds, n / seconds)
    return open_pool_embeddings(path, key=key, rows=n, dtype=dtype)
