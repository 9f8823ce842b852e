"""The on-disk pool embedding cache (metamoe/proxy/pool_cache.py) and proxy selection over a
memmap pool: round trip, key, refusals, lazy pools, and the same picks as in memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from metamoe.models.vit import ViT, ViTConfig
from metamoe.proxy.pool_cache import (
    PoolCacheMismatch,
    embed_pool,
    model_fingerprint,
    open_pool_embeddings,
    pool_cache_key,
    pool_cache_path,
)
from metamoe.proxy.select import METHODS, select_proxies
from metamoe.proxy.sketch import CentroidSketch, LogisticSketch
from metamoe.training import features


@pytest.fixture(scope="module")
def model() -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(stem_channels=8, dim=32, depth=2, heads=2, mlp_hidden=64)).eval()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 1, 28, 28)).astype(np.float32)


class LazyImages:
    """A map-style pool that makes image i when asked (never materialised)."""

    def __init__(self, n: int):
        self.n = n
        self.base = _images(7, seed=3)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return np.roll(self.base[i % 7], i % 5, axis=-1) * (1 - 0.001 * (i % 11))


class BatchedLazy(LazyImages):
    def get_batch(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self[i] for i in range(start, stop)])


def test_round_trip_key_and_cache_hit(tmp_path, model, monkeypatch) -> None:
    x = _images(160)
    ref = features(model, x, "tokens")
    fp = model_fingerprint(model)
    key = pool_cache_key(fp, "pool-a", "tokens")
    path = pool_cache_path(tmp_path, key, "tokens", "float32")
    assert path.name == f"pool-tokens-float32-{key}.npy"
    got = embed_pool(model, x, path, pool_fp="pool-a", features=features, batch_size=64, dtype="float32")
    assert isinstance(got, np.memmap) and got.shape == ref.shape and got.dtype == np.float32
    assert not got.flags.writeable
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["key"] == key and meta["shape"] == list(ref.shape) and meta["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]  # no temp left

    def boom(*a, **k):
        raise AssertionError("a cache hit must not embed again")

    again = embed_pool(model, x, path, pool_fp="pool-a", features=boom, dtype="float32")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
    assert open_pool_embeddings(path, key=key, rows=160, dim=ref.shape[1], dtype="float32").shape == ref.shape

    # float16 storage (the default): the same embeddings rounded to half precision
    half = embed_pool(model, x, tmp_path / "half.npy", pool_fp="pool-a", features=features, batch_size=128)
    assert half.dtype == np.float16
    np.testing.assert_allclose(np.asarray(half, np.float32), ref, rtol=2e-3, atol=2e-3)

    # the key: M0's weights, the pool's fingerprint and the kind all enter it
    assert key != pool_cache_key(fp, "pool-b", "tokens") != pool_cache_key(fp, "pool-a", "cls")
    other = ViT(model.cfg)
    other.load_state_dict(model.state_dict())
    assert model_fingerprint(other) == fp
    with torch.no_grad():
        other.head.bias[0] += 1e-3
    assert model_fingerprint(other) != fp
    monkeypatch.setattr(torch.nn.Module, "state_dict", boom)  # a given string is used as it is
    assert embed_pool(model, x, path, pool_fp="pool-a", features=boom, model_fp=fp,
                      dtype="float32").shape == ref.shape


def test_refuses_a_cache_that_does_not_match(tmp_path, model) -> None:
    x = _images(64)
    path = tmp_path / "pool.npy"
    embed_pool(model, x, path, pool_fp="A", features=features, dtype="float32")
    key = pool_cache_key(model_fingerprint(model), "A", "tokens")
    for kwargs, what in [({"key": "0" * 16}, "key"), ({"rows": 65}, "rows"), ({"dim": 3}, "dim"),
                         ({"dtype": "float16"}, "dtype")]:
        with pytest.raises(PoolCacheMismatch, match=what):
            open_pool_embeddings(path, **kwargs)
    with pytest.raises(PoolCacheMismatch, match="key"):  # another pool under the same file name
        embed_pool(model, x, path, pool_fp="B", features=features, dtype="float32")
    with pytest.raises(PoolCacheMismatch, match="dtype"):
        embed_pool(model, x, path, pool_fp="A", features=features, dtype="float16")
    with pytest.raises(PoolCacheMismatch, match="rows"):
        embed_pool(model, x[:32], path, pool_fp="A", features=features, dtype="float32")
    assert open_pool_embeddings(path, key=key).shape[0] == 64  # nothing was overwritten
    # overwrite=True replaces it
    got = embed_pool(model, x[:32], path, pool_fp="A32", features=features, dtype="float16", overwrite=True)
    assert got.shape[0] == 32 and got.dtype == np.float16
    # a header that disagrees with the metadata, or no metadata: not a complete cache
    meta = path.with_name(path.name + ".json")
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "shape": [33, m["shape"][1]]}))
    with pytest.raises(PoolCacheMismatch, match="metadata shape"):
        open_pool_embeddings(path)
    meta.unlink()
    with pytest.raises(PoolCacheMismatch, match="metadata"):
        open_pool_embeddings(path)
    with pytest.raises(FileNotFoundError):
        open_pool_embeddings(tmp_path / "absent.npy")


def test_failed_write_leaves_nothing(tmp_path, model) -> None:
    calls = []

    def flaky(m, b, kind, bs):
        calls.append(len(b))
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return features(m, b, kind, bs)

    with pytest.raises(RuntimeError, match="disk on fire"):
        embed_pool(model, _images(120), tmp_path / "p.npy", pool_fp="x", features=flaky, batch_size=30)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pool_kind", ["map", "get_batch", "iterable", "tuples"])
def test_lazy_pool_larger_than_a_batch(tmp_path, model, pool_kind) -> None:
    lazy = LazyImages(300)
    dense = np.stack([lazy[i] for i in range(300)])
    items, rows = {
        "map": (lazy, None),
        "get_batch": (BatchedLazy(300), None),
        "iterable": ((lazy[i] for i in range(300)), 300),
        "tuples": ([(lazy[i], i) for i in range(300)], None),  # a dataset's (x, y) items
    }[pool_kind]
    got = embed_pool(model, items, tmp_path / "lazy.npy", pool_fp="lazy300", features=features,
                     batch_size=64, dtype="float32", rows=rows)  # 4 full batches + 44
    np.testing.assert_allclose(np.asarray(got), features(model, dense), rtol=1e-5, atol=1e-6)


def test_short_iterable_is_refused(tmp_path, model) -> None:
    with pytest.raises(ValueError, match="ended after 10"):
        embed_pool(model, iter(_images(10)), tmp_path / "p.npy", pool_fp="x", features=features, rows=20)
    assert list(tmp_path.iterdir()) == []


def _pool(n: int, d: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    return (centres[rng.integers(12, size=n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)


def _sketches(d: int = 48) -> dict:
    rng = np.random.default_rng(1)
    return {
        "a": LogisticSketch(weight=rng.normal(size=d).astype(np.float32), bias=0.3),
        "b": LogisticSketch(weight=rng.normal(size=d).astype(np.float32), bias=-1.0),
        "c": CentroidSketch(centroids=rng.normal(size=(3, d)).astype(np.float32), counts=np.array([5.0, 1, 0])),
    }


def _memmap(tmp_path, arr: np.ndarray, name: str) -> np.memmap:
    mm = np.lib.format.open_memmap(tmp_path / name, mode="w+", dtype=arr.dtype, shape=arr.shape)
    mm[:] = arr
    mm.flush()
    del mm
    return np.load(tmp_path / name, mmap_mode="r")


@pytest.mark.parametrize("index", ["flat", "numpy"])
def test_memmap_pool_gives_identical_picks(tmp_path, index) -> None:
    pool, sks = _pool(6000), _sketches()
    mm32 = _memmap(tmp_path, pool, "p32.npy")
    mm16 = _memmap(tmp_path, pool.astype(np.float16), "p16.npy")
    rounded = pool.astype(np.float16).astype(np.float32)
    for method in METHODS:
        kw = dict(n=300, m=30, method=method, seed=2, index=index, chunk_rows=1300)  # 5 chunks
        ref = select_proxies(pool, sks, **kw)
        got = select_proxies(mm32, sks, **kw)
        for k in sks:
            assert np.array_equal(ref[k].indices, got[k].indices), (method, k)
            np.testing.assert_array_equal(ref[k].relevance, got[k].relevance)
        # float16: exactly the picks of the float16-rounded values, close to the float32 ones
        h = select_proxies(mm16, sks, **kw)
        r = select_proxies(rounded, sks, **kw)
        for k in sks:
            assert np.array_equal(h[k].indices, r[k].indices), (method, k)
            if method == "relevance":
                assert len(set(h[k].indices) & set(ref[k].indices)) >= 27
    # the chunk size does not change the picks either
    one = select_proxies(mm32, sks, n=300, m=30, index=index)
    assert all(np.array_equal(one[k].indices, select_proxies(pool, sks, n=300, m=30, index=index,
                                                             chunk_rows=1300)[k].indices) for k in sks)


def test_memmap_pool_is_never_copied_whole(tmp_path) -> None:
    pool, sks = _pool(60000, d=64), _sketches(64)  # 15.4 MB as float32
    mm = _memmap(tmp_path, pool.astype(np.float16), "p16.npy")
    del pool
    select_proxies(mm, sks, n=300, m=30, chunk_rows=4096)  # warm-up (imports, faiss)
    for index in ("flat", "numpy"):
        tracemalloc.start()
        select_proxies(mm, sks, n=300, m=30, index=index, chunk_rows=4096)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # one float32 chunk (1 MB) and its products, the norms, the candidates: far below the
        # 15.4 MB a float32 copy of the pool would take (or the 7.7 MB of the float16 pool)
        assert peak < 5e6, (index, peak)


def test_bad_memmap_values_are_still_refused(tmp_path) -> None:
    pool = _pool(5000)
    pool[4321, 3] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        select_proxies(_memmap(tmp_path, pool, "bad.npy"), _sketches(), n=100, m=10, chunk_rows=1000)
