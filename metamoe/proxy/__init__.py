"""MetaMoE proxy selection: client relevance sketches and server-side selection.

Modules (no Flower dependency):

* :mod:`~metamoe.proxy.sketch`: client relevance sketches (logistic, centroids), DP noise.
* :mod:`~metamoe.proxy.sketch_types`: the sketch dataclasses and their array transport.
* :mod:`~metamoe.proxy.privacy`: analytic Gaussian mechanism accounting.
* :mod:`~metamoe.proxy.scoring`: chunked relevance scoring of the pool.
* :mod:`~metamoe.proxy.retrieval`: top-n candidate retrieval (faiss / numpy).
* :mod:`~metamoe.proxy.dpp`: greedy relevance-weighted DPP MAP.
* :mod:`~metamoe.proxy.dpp_loops`: its plain (reference) and blocked greedy loops.
* :mod:`~metamoe.proxy.alternatives`: baseline selection rules.
* :mod:`~metamoe.proxy.select`: the :func:`select_proxies` entry point.
* :mod:`~metamoe.proxy.pool_cache`: the pool's M0 embeddings in an on-disk memmap cache
  (:func:`embed_pool`, :func:`open_pool_embeddings`), for pools that do not fit in memory.
"""

from metamoe.proxy.dpp import DPPResult, greedy_dpp, greedy_dpp_batch, logdet
from metamoe.proxy.pool_cache import PoolCacheMismatch, embed_pool, open_pool_embeddings
from metamoe.proxy.privacy import PrivacyReport, gaussian_delta, gaussian_epsilon
from metamoe.proxy.scoring import relevance_scores
from metamoe.proxy.select import METHODS, SelectionResult, select_from_scores, select_proxies
from metamoe.proxy.sketch import (
    CentroidSketch,
    LogisticSketch,
    Sketch,
    fit_centroid_sketch,
    fit_logistic_sketch,
    sketch_from_arrays,
)

__all__ = [
    "METHODS",
    "CentroidSketch",
    "DPPResult",
    "LogisticSketch",
    "PoolCacheMismatch",
    "PrivacyReport",
    "SelectionResult",
    "Sketch",
    "embed_pool",
    "fit_centroid_sketch",
    "fit_logistic_sketch",
    "gaussian_delta",
    "gaussian_epsilon",
    "greedy_dpp",
    "greedy_dpp_batch",
    "logdet",
    "open_pool_embeddings",
    "relevance_scores",
    "select_from_scores",
    "select_proxies",
    "sketch_from_arrays",
]
