"""Greedy relevance-weighted DPP: exactness, monotonicity, batching, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

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
