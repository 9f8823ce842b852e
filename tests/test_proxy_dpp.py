"""Greedy relevance-weighted DPP: exactness, monotonicity, batching, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from metamoe.proxy import dpp
from metamoe.proxy.dpp import greedy_dpp, greedy_dpp_batch, logdet
from metamoe.proxy.embeddings import l2_normalize


def _problem(seed: int, n: int, d: int, clusters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    z = l2_normalize(centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, d)))
    return z, rng.uniform(0.05, 1.0, size=n).astype(np.float32)


def _brute_force_greedy(z: np.ndarray, r: np.ndarray, m: int, eps: float = 1e-6) -> list[int]:
    """argmax_i log det L_{Y+i} over remaining i at every step (numpy slogdet)."""
    picks: list[int] = []
    for _ in range(m):
        best, best_val = -1, -np.inf
        for i in range(len(r)):
            if i in picks:
                continue
            val = logdet(z, r, picks + [i])
            if val > best_val:
                best, best_val = i, val
        # stop like the greedy: the gain det(L_{Y+i})/det(L_Y) fell below eps
        if best < 0 or best_val - logdet(z, r, picks) < np.log(eps):
            break
        picks.append(best)
    return picks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_brute_force_logdet_greedy(seed: int, dtype: type) -> None:
    z, r = _problem(seed, n=40, d=12)
    res = greedy_dpp(z, r, 10, dtype=dtype)
    assert res.indices.tolist() == _brute_force_greedy(z, r, 10)


def test_rank_limit_stops_early_without_nan() -> None:
    """With n > d the kernel has rank d: exactly d picks, finite positive gains."""
    z, r = _problem(7, n=60, d=8)
    res = greedy_dpp(z, r, 30)
    assert len(res.indices) == 8
    assert np.isfinite(res.gains).all() and (res.gains > 0).all()
    assert res.indices.tolist() == _brute_force_greedy(z, r, 30)


def test_unit_relevance_equals_plain_dpp() -> None:
    z, _ = _problem(3, n=200, d=32)
    ones = np.ones(len(z), dtype=np.float32)
    assert np.array_equal(greedy_dpp(z, ones, 25).indices, greedy_dpp(z, None, 25).indices)


def test_gains_non_increasing_and_logdet_path() -> None:
    """What is monotone along the greedy path.

    The gain d2_k (conditional variance of the k-th pick given the earlier
    picks) is non-increasing: the (k+1)-th pick's conditional variance at step
    k was at most d2_k (it was not the argmax) and conditioning on one more
    item can only shrink it.  Since det(L_Y) is the product of the gains,
    log det L_{Y_k} - log det L_{Y_{k-1}} = log d2_k exactly: that increment is
    non-increasing, but it is *negative* whenever d2_k < 1 (always the case
    with r < 1, since d2_k <= r_k^2), so log det itself is not monotone.  With
    r = 1 and unit-norm rows d2_1 = 1 and every later d2_k <= 1, so log det is
    non-increasing from 0.
    """
    z, r = _problem(11, n=300, d=24)
    for rel in (r, None):
        res = greedy_dpp(z, rel, 20, dtype=np.float64)
        assert np.all(np.diff(res.gains) <= 1e-12)
        path = [logdet(z, rel, res.indices[:k]) for k in range(len(res.indices) + 1)]
        np.testing.assert_allclose(np.diff(path), np.log(res.gains), rtol=1e-6, atol=1e-8)
    assert np.all(np.diff(path) <= 1e-6)  # r = 1: log det non-increasing (float32 unit rows)


def test_batch_equals_per_client() -> None:
    problems = [_problem(s, n=150 + 10 * s, d=16) for s in range(4)]
    problems.append((problems[0][0], None))
    for workers in (1, 2):
        batched = greedy_dpp_batch(problems, 12, workers=workers)
        for (z, r), got in zip(problems, batched):
            single = greedy_dpp(z, r, 12)
            assert np.array_equal(got.indices, single.indices)
            assert np.array_equal(got.gains, single.gains)


def test_duplicates_zero_rows_and_tiny_inputs() -> None:
    base = l2_normalize(np.random.default_rng(0).normal(size=(3, 8)))
    z = np.concatenate([np.repeat(base, 10, axis=0), np.zeros((5, 8), dtype=np.float32)])
    res = greedy_dpp(z, None, 20)
    assert sorted(z[res.indices].round(5).tolist()) == sorted(base.round(5).tolist())
    assert len(res.indices) == 3 and np.isfinite(res.gains).all()
    # first copy of each distinct row wins (ties go to the smaller index)
    assert set(res.indices.tolist()) == {0, 10, 20}
    assert greedy_dpp(np.zeros((4, 3)), None, 2).indices.size == 0
    assert greedy_dpp(base[:1], None, 5).indices.tolist() == [0]


def test_invalid_inputs() -> None:
    z, r = _problem(0, n=10, d=4)
    with pytest.raises(ValueError, match="m"):
        greedy_dpp(z, r, 0)
    with pytest.raises(ValueError, match="eps"):
        greedy_dpp(z, r, 2, eps=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        greedy_dpp(np.full((3, 2), np.nan), None, 1)
    with pytest.raises(ValueError, match="r must"):
        greedy_dpp(z, r[:3], 2)


# --- blocked lazy greedy (the default loop) against the plain loop (block=1) and brute force ---

# (block, list_rows): tiny lists and blocks force every path (list growth, full lists,
# activation of dormant rows, early block ends, deflation); (64, 256) is the default
BLOCKINGS = [(2, 1), (3, 2), (5, 4), (64, 256)]


def _blocked(z, r, m: int, block: int, list_rows: int, eps: float = 1e-6, dtype: type = np.float64):
    z = np.asarray(z, dtype=dtype)
    r = np.ones(len(z), dtype=dtype) if r is None else np.asarray(r, dtype=dtype)
    with dpp._one_blas_thread():
        return dpp._greedy_blocked(z, r, m, eps, block, list_rows)


def _spread_problem(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered rows with relevance spread over decades (most rows start dormant) and a few r = 0."""
    z, _ = _problem(seed, n, d)
    rng = np.random.default_rng(seed + 100)
    r = np.exp(-6.0 * rng.random(n))
    r[rng.random(n) < 0.05] = 0.0
    return z, r


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_matches_brute_force(seed: int, blocking: tuple[int, int]) -> None:
    z, r = _problem(seed, n=40, d=12)
    for m in (10, 20):  # 20 > d: deflation down to rank exhaustion
        assert _blocked(z, r, m, *blocking).indices.tolist() == _brute_force_greedy(z, r, m)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_equals_plain(dtype: type, blocking: tuple[int, int]) -> None:
    """Same picks as the one-GEMV-per-pick loop, below and past the rank, with spread relevance."""
    cases = [
        (_problem(1, n=500, d=24), 15),  # m < d: no deflation
        (_problem(2, n=500, d=24), 60),  # m > d: stops at the rank
        (_spread_problem(3, n=600, d=20), 40),  # dormant rows activated late, r = 0 rows
        ((_spread_problem(4, n=300, d=16)[0], None), 16),  # plain DPP: all rows active at once
    ]
    for (z, r), m in cases:
        plain = greedy_dpp(z, r, m, dtype=dtype, block=1)
        got = _blocked(z, r, m, *blocking, dtype=dtype)
        assert got.indices.tolist() == plain.indices.tolist()
        tol = 1e-9 if dtype == np.float64 else 2e-5
        np.testing.assert_allclose(got.gains, plain.gains, rtol=tol, atol=tol)


def test_default_is_blocked_and_matches_plain_float32_large() -> None:
    """A benchmark-like float32 problem (n >> list, m > d) through the public API."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(16, 48))
    z = l2_normalize(centres[rng.integers(16, size=4000)] + 0.7 * rng.normal(size=(4000, 48)))
    r = (1.0 / (1.0 + np.exp(-(z @ rng.normal(size=48)) * 4.0))).astype(np.float32)
    got = greedy_dpp(z, r, 100)
    plain = greedy_dpp(z, r, 100, block=1)
    assert len(got.indices) == 48  # rank exhausted
    assert np.array_equal(got.indices, plain.indices)


@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_exact_ties_go_to_smaller_index(blocking: tuple[int, int]) -> None:
    """Orthogonal unit rows (shuffled, each repeated) all tie at d2 = 1 at every step."""
    rng = np.random.default_rng(0)
    d = 12
    labels = rng.permutation(np.repeat(np.arange(d), 7))
    z = np.eye(d)[labels]
    first = sorted(int(np.flatnonzero(labels == k)[0]) for k in range(d))
    for dtype in (np.float64, np.float32):
        assert _blocked(z, None, 30, *blocking, dtype=dtype).indices.tolist() == first
        assert greedy_dpp(z, None, 30, dtype=dtype, block=1).indices.tolist() == first


@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_duplicates_pick_first_copy(blocking: tuple[int, int]) -> None:
    """Many exact copies (more than the list holds): the greedy over the distinct rows, first copies."""
    rng = np.random.default_rng(1)
    base = l2_normalize(rng.normal(size=(9, 16)))
    base_r = rng.uniform(0.2, 1.0, size=9)
    labels = rng.integers(9, size=400)
    z, r = base[labels], base_r[labels]
    first = np.array([np.flatnonzero(labels == k)[0] for k in range(9)])
    expected = first[greedy_dpp(base, base_r, 20, dtype=np.float64, block=1).indices].tolist()
    for dtype in (np.float64, np.float32):
        assert _blocked(z, r, 20, *blocking, dtype=dtype).indices.tolist() == expected
        assert greedy_dpp(z, r, 20, dtype=dtype, block=1).indices.tolist() == expected


@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_early_stop(blocking: tuple[int, int]) -> None:
    """A large eps stops the greedy once the best conditional variance drops below it."""
    z, r = _problem(9, n=60, d=10)
    for eps in (0.05, 0.2):
        got = _blocked(z, r, 30, *blocking, eps=eps)
        assert got.indices.tolist() == _brute_force_greedy(z, r, 30, eps=eps)
        assert 0 < len(got.indices) < 10 and (got.gains >= eps).all()
        assert got.indices.tolist() == greedy_dpp(z, r, 30, eps=eps, dtype=np.float64, block=1).indices.tolist()


@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_edge_cases(blocking: tuple[int, int]) -> None:
    zeros = np.zeros((5, 4))
    assert _blocked(zeros, None, 3, *blocking).indices.size == 0
    assert _blocked(np.ones((1, 3)), None, 4, *blocking).indices.tolist() == [0]
    z, r = _problem(2, n=12, d=20)  # n < d: every row picked, m clamped to n
    got = _blocked(z, r, 50, *blocking)
    assert sorted(got.indices.tolist()) == list(range(12))
    assert got.indices.tolist() == greedy_dpp(z, r, 50, dtype=np.float64, block=1).indices.tolist()
    assert _blocked(z, np.zeros(12), 3, *blocking).indices.size == 0


def test_batch_blocked_and_plain() -> None:
    """Batched over clients, either loop gives each client's standalone result."""
    problems = [_spread_problem(s, n=300 + 50 * s, d=16) for s in range(4)]
    problems.append((problems[0][0], None))
    for block in (1, 4, 64):
        for workers in (1, 2):
            batched = greedy_dpp_batch(problems, 20, workers=workers, block=block)
            for (z, r), got in zip(problems, batched):
                single = greedy_dpp(z, r, 20, block=block)
                assert np.array_equal(got.indices, single.indices)
                assert np.array_equal(got.gains, single.gains)
    plain = greedy_dpp_batch(problems, 20, block=1, dtype=np.float64)
    blocked = greedy_dpp_batch(problems, 20, dtype=np.float64)
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(plain, blocked))


def test_invalid_block() -> None:
    z, r = _problem(0, n=10, d=4)
    with pytest.raises(ValueError, match="block"):
        greedy_dpp(z, r, 2, block=0)
