"""The two relevance sketch types a client uploads, and their transport format.

This module holds :class:`LogisticSketch` and :class:`CentroidSketch` (small frozen dataclasses),
the :data:`Sketch` union, their ``validate()`` checks (which raise ``ValueError`` naming the bad
field), ``to_arrays()`` / ``from_arrays()`` to and from plain ``dict[str, np.ndarray]`` for Flower
ArrayRecords, including the optional :class:`~metamoe.proxy.privacy.PrivacyReport`, and
:func:`sketch_from_arrays`, which rebuilds either kind on the server. How a client fits a sketch,
and the privacy argument behind its noise, are in :mod:`metamoe.proxy.sketch`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from metamoe.proxy.privacy import PrivacyReport

__all__ = ["CentroidSketch", "LogisticSketch", "Sketch", "sketch_from_arrays"]

_KIND_LOGISTIC = 1
_KIND_CENTROIDS = 2
_PRIVACY_FIELDS = ("dp_epsilon", "dp_delta", "dp_noise_std", "dp_sensitivity")


def _privacy_to_arrays(p: PrivacyReport | None) -> dict[str, np.ndarray]:
    if p is None:
        return {}
    values = (p.epsilon, p.delta, p.noise_std, p.sensitivity)
    return {k: np.array([v], dtype=np.float64) for k, v in zip(_PRIVACY_FIELDS, values)}


def _privacy_from_arrays(arrays: Mapping[str, np.ndarray]) -> PrivacyReport | None:
    present = [k in arrays for k in _PRIVACY_FIELDS]
    if not any(present):
        return None
    if not all(present):
        missing = [k for k, p in zip(_PRIVACY_FIELDS, present) if not p]
        raise ValueError(f"sketch arrays miss privacy field(s) {missing}")
    vals = [_scalar(arrays, k) for k in _PRIVACY_FIELDS]
    return PrivacyReport(epsilon=vals[0], delta=vals[1], noise_std=vals[2], sensitivity=vals[3])


def _scalar(arrays: Mapping[str, np.ndarray], key: str) -> float:
    if key not in arrays:
        raise ValueError(f"sketch arrays miss field '{key}'")
    a = np.asarray(arrays[key])
    if a.size != 1:
        raise ValueError(f"field '{key}' must hold one value, got shape {a.shape}")
    return float(a.reshape(()))


def _validate_privacy(p: PrivacyReport | None) -> None:
    if p is None:
        return
    for name in ("epsilon", "delta", "noise_std", "sensitivity"):
        v = getattr(p, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"privacy.{name} must be finite and >= 0, got {v}")


@dataclass(frozen=True)
class LogisticSketch:
    """Logistic domain classifier in cosine geometry: ``r(u) = sigmoid(weight.u + bias)``.

    Attributes:
        weight: float32 [d] weight on the L2-normalised embedding ``u``.
        bias: scalar bias.
        privacy: the (epsilon, delta) guarantee when noise was added, else None.
    """

    weight: np.ndarray
    bias: float
    privacy: PrivacyReport | None = None

    @property
    def dim(self) -> int:
        return int(np.asarray(self.weight).shape[-1])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field (shape, dtype or non-finite)."""
        w = np.asarray(self.weight)
        if w.ndim != 1 or w.size == 0:
            raise ValueError(f"weight must be a non-empty 1-D array, got shape {w.shape}")
        if not np.isfinite(w).all():
            raise ValueError("weight contains non-finite values")
        if not math.isfinite(float(self.bias)):
            raise ValueError(f"bias must be finite, got {self.bias}")
        _validate_privacy(self.privacy)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "sketch_kind": np.array([_KIND_LOGISTIC], dtype=np.int64),
            "weight": np.asarray(self.weight, dtype=np.float32),
            "bias": np.array([self.bias], dtype=np.float64),
        }
        out.update(_privacy_to_arrays(self.privacy))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> LogisticSketch:
        if "weight" not in arrays:
            raise ValueError("sketch arrays miss field 'weight'")
        sk = cls(
            weight=np.asarray(arrays["weight"], dtype=np.float32),
            bias=_scalar(arrays, "bias"),
            privacy=_privacy_from_arrays(arrays),
        )
        sk.validate()
        return sk


@dataclass(frozen=True)
class CentroidSketch:
    """Cluster centroids with counts; relevance is a count-weighted vMF mixture.

    ``r(u) = sum_j pi_j exp((cos(u, c_j) - 1) / temperature)`` with
    ``pi_j = counts_j / sum(counts)`` (see :mod:`metamoe.proxy.scoring`).

    A client releases no cell of fewer than ``privacy.min_count`` samples: smaller k-means
    cells are merged into their nearest cell before upload (``proxy.sketch.merge_small_cells``),
    so ``k`` may be below ``sketch.centroids``.

    Attributes:
        centroids: float32 [k, d] cell means (only their direction is used).
        counts: float32 [k] non-negative (possibly noisy) cell counts.
        temperature: vMF concentration ``1/kappa`` (> 0); smaller is sharper.
        privacy: the (epsilon, delta) guarantee when noise was added, else None.
    """

    centroids: np.ndarray
    counts: np.ndarray
    temperature: float = 0.2
    privacy: PrivacyReport | None = None

    @property
    def dim(self) -> int:
        return int(np.asarray(self.centroids).shape[-1])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field (shape, dtype or non-finite)."""
        c = np.asarray(self.centroids)
        n = np.asarray(self.counts)
        if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
            raise ValueError(f"centroids must be a non-empty [k, d] array, got shape {c.shape}")
        if not np.isfinite(c).all():
            raise ValueError("centroids contains non-finite values")
        if n.shape != (c.shape[0],):
            raise ValueError(f"counts must have shape ({c.shape[0]},), got {n.shape}")
        if not np.isfinite(n).all() or (n < 0).any():
            raise ValueError("counts must be finite and >= 0")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        _validate_privacy(self.privacy)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "sketch_kind": np.array([_KIND_CENTROIDS], dtype=np.int64),
            "centroids": np.asarray(self.centroids, dtype=np.float32),
            "counts": np.asarray(self.counts, dtype=np.float32),
            "temperature": np.array([self.temperature], dtype=np.float64),
        }
        out.update(_privacy_to_arrays(self.privacy))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CentroidSketch:
        for key in ("centroids", "counts"):
            if key not in arrays:
                raise ValueError(f"sketch arrays miss field '{key}'")
        sk = cls(
            centroids=np.asarray(arrays["centroids"], dtype=np.float32),
            counts=np.asarray(arrays["counts"], dtype=np.float32),
            temperature=_scalar(arrays, "temperature"),
            privacy=_privacy_from_arrays(arrays),
        )
        sk.validate()
        return sk


Sketch = LogisticSketch | CentroidSketch


def sketch_from_arrays(arrays: Mapping[str, np.ndarray]) -> Sketch:
    """Rebuild (and validate) a sketch from ``to_arrays()`` output of either kind."""
    kind = int(_scalar(arrays, "sketch_kind"))
    if kind == _KIND_LOGISTIC:
        return LogisticSketch.from_arrays(arrays)
    if kind == _KIND_CENTROIDS:
        return CentroidSketch.from_arrays(arrays)
    raise ValueError(f"sketch_kind {kind} is unknown")
