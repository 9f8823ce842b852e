"""Analytic Gaussian mechanism accounting (Balle & Wang, ICML 2018).

A mechanism ``M(D) = f(D) + N(0, sigma^2 I)`` whose query ``f`` has L2
sensitivity ``Delta`` (the largest ``||f(D) - f(D')||_2`` over neighbouring
datasets) is (epsilon, delta)-DP exactly when (Balle & Wang 2018, Thm. 8)::

    delta(eps) = Phi(Delta/(2 sigma) - eps sigma/Delta)
                 - exp(eps) * Phi(-Delta/(2 sigma) - eps sigma/Delta)

with ``Phi`` the standard normal CDF.  ``delta(eps)`` is strictly decreasing in
``eps``, so the smallest ``eps`` for a target ``delta`` is found by bisection.
This curve is tight (it *is* the privacy profile of the Gaussian mechanism), so
it is never worse than the classical ``sigma >= Delta sqrt(2 ln(1.25/delta))/eps``
bound and, unlike it, is valid for ``eps >= 1``.

The second term is evaluated in log space (``exp(eps + log Phi(.))``) so large
``eps`` neither overflows nor loses precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.special import log_ndtr, ndtr

__all__ = ["PrivacyReport", "gaussian_delta", "gaussian_epsilon"]


@dataclass(frozen=True)
class PrivacyReport:
    """Privacy guarantee of one Gaussian-noised sketch.

    Attributes:
        epsilon: the epsilon of the (epsilon, delta)-DP guarantee.
        delta: the delta of the guarantee.
        noise_std: standard deviation of the added Gaussian noise (in the
            units in which ``sensitivity`` is expressed).
        sensitivity: L2 sensitivity of the released vector.
    """

    epsilon: float
    delta: float
    noise_std: float
    sensitivity: float


def _check(sigma: float, sensitivity: float) -> None:
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be finite and > 0, got {sensitivity}")


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """Exact delta of the Gaussian mechanism at a given epsilon.

    Args:
        sigma: noise standard deviation (> 0).
        sensitivity: L2 sensitivity ``Delta`` of the query (> 0).
        epsilon: privacy parameter (>= 0).

    Returns:
        ``delta(epsilon)`` of Balle & Wang (2018), Theorem 8, in [0, 1].
    """
    _check(sigma, sensitivity)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    first = float(ndtr(a - b))
    second = math.exp(epsilon + float(log_ndtr(-a - b)))
    return min(1.0, max(0.0, first - second))


def gaussian_epsilon(sigma: float, sensitivity: float, delta: float, tol: float = 1e-10) -> float:
    """Smallest epsilon such that the Gaussian mechanism is (epsilon, delta)-DP.

    Solves ``gaussian_delta(sigma, sensitivity, eps) = delta`` for ``eps`` by
    bisection (the left side is strictly decreasing in ``eps``).

    Args:
        sigma: noise standard deviation (> 0).
        sensitivity: L2 sensitivity ``Delta`` of the query (> 0).
        delta: target delta in (0, 1).
        tol: absolute tolerance on epsilon.

    Returns:
        epsilon >= 0 (0.0 when even epsilon = 0 already meets ``delta``).
    """
    _check(sigma, sensitivity)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if gaussian_delta(sigma, sensitivity, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(sigma, sensitivity, hi) > delta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            raise ValueError("epsilon diverges: sigma too small for this delta")
    while hi - lo > tol * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(sigma, sensitivity, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi
