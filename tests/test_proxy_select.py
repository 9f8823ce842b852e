"""Scoring, retrieval backends, alternatives and the select_proxies contract."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import metamoe.proxy.retrieval as retrieval
from metamoe.proxy.alternatives import kcenter_greedy, random_subset, relevance_top_m
from metamoe.proxy.dpp import greedy_dpp
from metamoe.proxy.embeddings import l2_normalize
from metamoe.proxy.retrieval import retrieve_candidates
from metamoe.proxy.scoring import relevance_scores
from metamoe.proxy.select import METHODS, select_from_scores, select_proxies
from metamoe.proxy.sketch import CentroidSketch, LogisticSketch


def _pool(n: int = 3000, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, d))
    return (centres[rng.integers(10, size=n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)


def _sketches(d: int = 32, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "a": LogisticSketch(weight=rng.normal(size=d).astype(np.float32), bias=0.3),
        "b": LogisticSketch(weight=rng.normal(size=d).astype(np.float32), bias=-1.0),
        "c": CentroidSketch(centroids=rng.normal(size=(3, d)).astype(np.float32), counts=np.array([5.0, 1.0, 0.0])),
    }


def test_relevance_scores_match_definitions() -> None:
    pool, sks = _pool(500), _sketches()
    r = relevance_scores(pool, list(sks.values()), chunk_rows=64)
    u = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    np.testing.assert_allclose(r[0], 1 / (1 + np.exp(-(u @ sks["a"].weight + 0.3))), rtol=1e-5)
    c = sks["c"].centroids / np.linalg.norm(sks["c"].centroids, axis=1, keepdims=True)
    expected = np.exp((u @ c.T - 1) / 0.2) @ np.array([5 / 6, 1 / 6, 0.0])
    np.testing.assert_allclose(r[2], expected, rtol=1e-4, atol=1e-7)
    assert r.shape == (3, 500) and (r >= 0).all() and (r <= 1).all()


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_faiss_and_numpy_retrieval_agree(index: str) -> None:
    pool, sks = _pool(20000), list(_sketches().values())
    ref = retrieve_candidates(pool, sks, 300, index="numpy", chunk_rows=4096)
    got = retrieve_candidates(pool, sks, 300, index=index, chunk_rows=4096, nprobe=1000)
    for a, b in zip(ref, got):
        assert np.array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.relevance, b.relevance)
    # the logistic top-n is the top-n by relevance
    r = relevance_scores(pool, sks[:1])[0]
    assert set(ref[0].indices) == set(np.argsort(-r.astype(np.float64), kind="stable")[:300])


def test_faiss_import_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, sks = _pool(5000), list(_sketches().values())
    expected = retrieve_candidates(pool, sks, 100, index="numpy")
    monkeypatch.setattr(retrieval, "faiss", None)
    with pytest.warns(RuntimeWarning, match="faiss unavailable"):
        got = retrieve_candidates(pool, sks, 100, index="flat")
    for a, b in zip(expected, got):
        assert np.array_equal(a.indices, b.indices)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_valid_unique_indices(method: str) -> None:
    pool, sks = _pool(4000), _sketches()
    out = select_proxies(pool, sks, n=400, m=20, method=method, seed=3)
    assert list(out) == list(sks)
    for res in out.values():
        assert res.method == method and res.n_candidates == 400
        assert res.indices.dtype == np.int64 and len(res.indices) == 20
        assert len(np.unique(res.indices)) == 20
        assert ((res.indices >= 0) & (res.indices < len(pool))).all()
        assert res.relevance.dtype == np.float32 and np.isfinite(res.relevance).all()
    again = select_proxies(pool, sks, n=400, m=20, method=method, seed=3)
    assert all(np.array_equal(out[k].indices, again[k].indices) for k in out)


def test_rw_dpp_equals_dpp_on_candidates_and_select_from_scores() -> None:
    pool, sks = _pool(4000), _sketches()
    out = select_proxies(pool, sks, n=500, m=30)
    cands = retrieve_candidates(pool, list(sks.values()), 500)
    for res, c in zip(out.values(), cands):
        assert np.array_equal(res.indices, c.indices[greedy_dpp(c.embeddings, c.relevance, 30).indices])
    scores = relevance_scores(pool, list(sks.values()))
    for res, via_scores in zip(out.values(), select_from_scores(pool, scores, 500, 30)):
        # same relevance up to float rounding of the key -> same picks on this data
        assert np.array_equal(res.indices, via_scores.indices)


def test_alternative_helpers() -> None:
    z = l2_normalize(_pool(300))
    assert relevance_top_m(np.array([0.1, 0.5, 0.5, 0.2]), 3).tolist() == [1, 2, 3]
    assert len(set(random_subset(10, 20).tolist())) == 10
    picks = kcenter_greedy(np.repeat(z[:2], 3, axis=0), 6)
    assert sorted(picks.tolist()) == list(range(6)) and picks[:2].tolist() == [0, 3]


def test_edge_cases_errors() -> None:
    pool, sks = _pool(100), _sketches()
    with pytest.raises(ValueError, match="pool_emb is empty"):
        select_proxies(np.zeros((0, 32), np.float32), sks, 10, 5)
    with pytest.raises(ValueError, match="n must"):
        select_proxies(pool, sks, 0, 0)
    with pytest.raises(ValueError, match="m must"):
        select_proxies(pool, sks, 10, 0)
    with pytest.raises(ValueError, match=r"m \(11\) must be <= n"):
        select_proxies(pool, sks, 10, 11)
    bad = pool.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        select_proxies(bad, sks, 10, 5)
    with pytest.raises(ValueError, match="dim"):
        select_proxies(pool[:, :16], sks, 10, 5)
    with pytest.raises(ValueError, match="method"):
        select_proxies(pool, sks, 10, 5, method="nope")


def test_tiny_and_duplicate_heavy_pools_give_documented_results() -> None:
    sks = _sketches(d=8)
    base = _pool(3, d=8)
    dup = np.concatenate([np.repeat(base, 50, axis=0), np.zeros((10, 8), np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = select_proxies(dup, sks, n=1000, m=100)
    for res in out.values():
        assert res.n_candidates == len(dup)  # n clamped to N
        assert 1 <= len(res.indices) <= 3  # only 3 distinct directions
        assert np.isfinite(res.relevance).all()
        assert len({tuple(dup[i]) for i in res.indices}) == len(res.indices)
    single = select_proxies(base[:1], sks, n=5, m=5)
    assert all(r.indices.tolist() == [0] for r in single.values())
    for method in ("relevance", "random", "kcenter"):
        out = select_proxies(dup, sks, n=1000, m=100, method=method)
        assert all(len(np.unique(r.indices)) == 100 for r in out.values())


def test_client_coverage_stage_mean_and_p90() -> None:
    """The client-side coverage metric: the nearest-proxy distance of each private test
    embedding, reduced to its mean and 90th percentile (the only values uploaded)."""
    import torch

    from metamoe.clients.stages import coverage
    from metamoe.data.vision import Domain, VisionBenchmark
    from metamoe.models.vit import ViT, ViTConfig
    from metamoe.training import features

    torch.manual_seed(0)
    seed = ViT(ViTConfig(stem_channels=8, dim=32, depth=2, heads=2, mlp_hidden=64)).eval()
    rng = np.random.default_rng(0)
    x_test = rng.normal(size=(40, 1, 28, 28)).astype(np.float32)
    other = rng.normal(size=(60, 1, 28, 28)).astype(np.float32)
    dom = Domain("d", x_test[:1], np.zeros(1, np.int64), x_test, np.zeros(40, np.int64), [0])
    pool_x = np.concatenate([x_test, other])  # the test images themselves are pool rows 0-39
    bench = VisionBenchmark("b", [dom], pool_x, np.zeros(100, np.int64),
                            np.array(["x"] * 100), class_names=["c"])
    sel = {"same": np.arange(40), "others": np.arange(40, 100), "empty": np.zeros(0, np.int64)}
    out = coverage(seed, dom, bench, sel)
    assert set(out) == {"coverage/same", "coverage_p90/same", "coverage/others",
                        "coverage_p90/others"}  # an empty selection has no coverage
    assert out["coverage/same"] < 1e-3 and out["coverage_p90/same"] < 1e-3
    zt, zo = (torch.nn.functional.normalize(torch.from_numpy(features(seed, x)), dim=1)
              for x in (x_test, other))
    d = torch.cdist(zt, zo).min(1).values.double().numpy()
    assert out["coverage/others"] == pytest.approx(d.mean(), rel=1e-5)
    assert out["coverage_p90/others"] == pytest.approx(np.quantile(d, 0.9), rel=1e-5)
    assert out["coverage_p90/others"] > out["coverage/others"] > 0.01
