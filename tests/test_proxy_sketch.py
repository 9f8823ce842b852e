"""Relevance sketches, transport, validation and analytic-Gaussian accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metamoe.proxy.privacy import gaussian_delta, gaussian_epsilon
from metamoe.proxy.sketch import (
    CentroidSketch,
    LogisticSketch,
    fit_centroid_sketch,
    fit_logistic_sketch,
    sketch_from_arrays,
)


def _numeric_delta(sigma: float, sens: float, eps: float) -> float:
    """delta(eps) = E_P[(1 - exp(eps - Z))_+] by integrating the privacy-loss density.

    For the Gaussian mechanism the privacy loss Z under the first dataset is
    N(mu^2/2, mu^2) with mu = sens/sigma (independent of the closed form).
    """
    mu = sens / sigma
    z = np.linspace(eps, mu * mu / 2 + 40 * mu, 400001)
    dens = np.exp(-((z - mu * mu / 2) ** 2) / (2 * mu * mu)) / (mu * math.sqrt(2 * math.pi))
    return float(np.trapezoid((1 - np.exp(eps - z)) * dens, z))


@pytest.mark.parametrize(("sigma", "sens", "eps"), [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (0.7, 1.4, 3.0)])
def test_delta_matches_numeric_privacy_loss_integral(sigma: float, sens: float, eps: float) -> None:
    assert gaussian_delta(sigma, sens, eps) == pytest.approx(_numeric_delta(sigma, sens, eps), rel=1e-5)


def test_epsilon_inverts_delta_and_beats_classical_bound() -> None:
    for sigma in (0.8, 2.0, 5.0):
        eps = gaussian_epsilon(sigma, 1.0, 1e-5)
        assert gaussian_delta(sigma, 1.0, eps) == pytest.approx(1e-5, rel=1e-6)
        assert _numeric_delta(sigma, 1.0, eps) == pytest.approx(1e-5, rel=1e-3)
    # classical sigma = sqrt(2 ln(1.25/delta))/eps is valid for eps < 1, so analytic eps is smaller
    sigma = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert gaussian_epsilon(sigma, 1.0, 1e-5) < 0.5
    # scale invariance: only sigma/sensitivity matters
    assert gaussian_epsilon(3.0, 2.0, 1e-6) == pytest.approx(gaussian_epsilon(1.5, 1.0, 1e-6))
    assert gaussian_epsilon(1e6, 1.0, 0.5) == 0.0
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 1.0, 0.0)


def _domain_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 16))
    public = (centres[rng.integers(6, size=3000)] + 0.5 * rng.normal(size=(3000, 16))).astype(np.float32)
    private = (centres[rng.integers(2, size=300)] + 0.5 * rng.normal(size=(300, 16))).astype(np.float32)
    return private, public


def test_logistic_sketch_fits_and_round_trips() -> None:
    private, public = _domain_data()
    sk = fit_logistic_sketch(private, public, l2=1e-2)
    u = private / np.linalg.norm(private, axis=1, keepdims=True)
    assert (u @ sk.weight + sk.bias > 0).mean() > 0.95
    back = sketch_from_arrays(sk.to_arrays())
    assert isinstance(back, LogisticSketch) and back.privacy is None
    np.testing.assert_array_equal(back.weight, sk.weight)
    assert back.bias == sk.bias


def test_noisy_logistic_sketch_reports_chaudhuri_guarantee() -> None:
    private, public = _domain_data()
    sk = fit_logistic_sketch(private, public, l2=1e-2, clip_norm=1.0, noise_multiplier=2.0, delta=1e-5)
    p = sk.privacy
    assert p is not None
    assert p.sensitivity == pytest.approx(2 * 1.0 / (600 * 1e-2))
    assert p.noise_std == pytest.approx(2.0 * p.sensitivity)
    assert p.epsilon == pytest.approx(gaussian_epsilon(2.0, 1.0, 1e-5))
    assert sketch_from_arrays(sk.to_arrays()).privacy == p


def test_centroid_sketch_plain_and_noisy() -> None:
    private, public = _domain_data()
    sk = fit_centroid_sketch(private, 4, seed=0)
    assert sk.centroids.shape == (4, 16) and sk.counts.sum() == 300
    with pytest.raises(ValueError, match="centers"):
        fit_centroid_sketch(private, 4, noise_multiplier=1.0)
    centers = public[:8]
    noisy = fit_centroid_sketch(private, 8, centers=centers, clip_norm=2.0, noise_multiplier=1.0, delta=1e-6)
    assert noisy.privacy is not None
    assert noisy.privacy.sensitivity == pytest.approx(math.sqrt(2))
    assert noisy.privacy.epsilon == pytest.approx(gaussian_epsilon(1.0, 1.0, 1e-6))
    assert (noisy.counts >= 0).all()
    back = sketch_from_arrays(noisy.to_arrays())
    assert isinstance(back, CentroidSketch)
    np.testing.assert_array_equal(back.centroids, noisy.centroids)


def test_validate_names_bad_field() -> None:
    with pytest.raises(ValueError, match="weight"):
        LogisticSketch(weight=np.array([1.0, np.nan]), bias=0.0).validate()
    with pytest.raises(ValueError, match="bias"):
        LogisticSketch(weight=np.ones(3), bias=float("inf")).validate()
    with pytest.raises(ValueError, match="counts"):
        CentroidSketch(centroids=np.ones((2, 3)), counts=np.ones(3)).validate()
    with pytest.raises(ValueError, match="centroids"):
        CentroidSketch(centroids=np.ones(3), counts=np.ones(3)).validate()
    with pytest.raises(ValueError, match="weight"):
        sketch_from_arrays({"sketch_kind": np.array([1]), "bias": np.array([0.0])})
    with pytest.raises(ValueError, match="private_emb"):
        fit_centroid_sketch(np.full((4, 2), np.inf), 2)


def test_centroid_min_count_changes_only_cells_below_it() -> None:
    """A floor at or below the smallest cell leaves the sketch exactly as it was; a higher one
    merges the small cells (counts still sum to n, none below the floor, still scorable)."""
    private, _ = _domain_data()
    plain = fit_centroid_sketch(private, 8, seed=0)
    smallest = int(plain.counts.min())
    same = fit_centroid_sketch(private, 8, seed=0, min_count=smallest)
    np.testing.assert_array_equal(same.centroids, plain.centroids)
    np.testing.assert_array_equal(same.counts, plain.counts)
    merged = fit_centroid_sketch(private, 8, seed=0, min_count=smallest + 1)
    assert len(merged.counts) < 8 and (merged.counts > smallest).all()
    assert merged.counts.sum() == 300
    assert isinstance(sketch_from_arrays(merged.to_arrays()), CentroidSketch)
    with pytest.raises(ValueError, match="min_count"):
        fit_centroid_sketch(private[:5], 4, min_count=6)
