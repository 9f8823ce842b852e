"""How a domain's train split is divided among the clients of that domain.

``benchmark.partition`` and ``benchmark.size_skew`` choose the split when a domain has more
than one client (``clients_per_domain > 1`` or ``num_clients`` > the number of domains):

* ``iid`` + ``none`` — a seeded permutation cut into equal parts (the default);
* ``dirichlet`` — label skew: flwr-datasets' ``DirichletPartitioner`` (each label's samples
  divided among the clients by a Dirichlet(``dirichlet_alpha``) draw, redrawn until every
  client has ``min_partition_size`` samples; when Flower's 10 draws all fail, again under the
  next of ``RESEEDS`` derived seeds);
* ``size_skew`` ``linear`` | ``exponential`` — client j of a domain holds a share of the
  domain proportional to j+1 (or e^(j+1)): flwr-datasets' ``LinearPartitioner`` /
  ``ExponentialPartitioner`` sizes; with ``dirichlet`` too, those sizes are filled by
  ``InnerDirichletPartitioner`` (both skews at once).

Every skewed split gives each client at least ``min_partition_size`` samples, or fails naming
the domain before the client trains.

Flower's partitioners read a HF ``datasets.Dataset``; here it holds only the domain's labels
and row numbers, so the split is a list of row indices into the domain's arrays. Each client
computes its own domain's split on its node from the seed; nothing about it is uploaded.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from metamoe.config import CHOICES

PARTITIONS = CHOICES["benchmark.partition"]
RESEEDS = 8  # Dirichlet splits: seeds tried (each with Flower's own 10 draws) before failing
SIZE_SKEWS = CHOICES["benchmark.size_skew"]


def split_indices(labels: np.ndarray, k: int, *, partition: str = "iid",
                  alpha: float = 0.5, size_skew: str = "none", min_size: int = 10,
                  seed: int = 0, where: str = "domain") -> list[np.ndarray]:
    """Row indices of each of the ``k`` clients of one domain (disjoint, covering every
    row; sorted, except the IID split's permutation order). ``where`` names the domain in
    errors."""
    labels = np.asarray(labels)
    if partition not in PARTITIONS or size_skew not in SIZE_SKEWS:
        raise ValueError(f"benchmark.partition={partition!r} must be one of {PARTITIONS} and "
                         f"benchmark.size_skew={size_skew!r} one of {SIZE_SKEWS}")
    if k > len(labels):
        raise ValueError(f"{where}: {len(labels)} train samples cannot be split among "
                         f"{k} clients")
    if partition == "iid" and size_skew == "none":
        perm = np.random.default_rng(seed).permutation(len(labels))
        return np.array_split(perm, k)
    # Flower's Dirichlet partitioner redraws up to 10 times; when every draw leaves a client
    # below min_size, the split is drawn again under the next derived seed (deterministic: the
    # same config always gives the same split, and a split that succeeds at once is unchanged).
    err = None
    for attempt in range(RESEEDS):
        key = (labels.tobytes(), str(labels.dtype), k, partition, float(alpha), size_skew,
               int(min_size), int(seed) + 7919 * attempt)
        try:
            return [np.asarray(p) for p in _flower_split(*key)]
        except ValueError as e:
            err = e
            if partition != "dirichlet" or size_skew != "none":
                break  # the size partitioners are deterministic in their sizes
    raise ValueError(f"{where}: benchmark.partition={partition} (dirichlet_alpha="
                     f"{alpha}, min_partition_size={min_size}), size_skew={size_skew} "
                     f"cannot split {len(labels)} samples among {k} clients: {err}") from None


@lru_cache(maxsize=32)
def _flower_split(label_bytes: bytes, dtype: str, k: int, partition: str, alpha: float,
                  size_skew: str, min_size: int, seed: int) -> tuple[tuple[int, ...], ...]:
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        ExponentialPartitioner,
        InnerDirichletPartitioner,
        LinearPartitioner,
    )

    datasets.disable_progress_bars()
    labels = np.frombuffer(label_bytes, dtype=dtype)
    # Flower's Dirichlet partitioners index labels 0..C-1: a domain's labels are renumbered.
    dense = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    ds = datasets.Dataset.from_dict({"label": dense, "row": np.arange(len(labels))})
    # The size partitioners take consecutive rows: shuffled first, seeded.
    ds = ds.shuffle(seed=seed)
    sizes = None
    if size_skew != "none":
        sizer = (LinearPartitioner if size_skew == "linear" else ExponentialPartitioner)(k)
        sizer.dataset = ds
        sizer.load_partition(0)  # the sizes are determined on first use
        sizes = [int(sizer.partition_id_to_size[j]) for j in range(k)]
        if min(sizes) < max(1, min_size):
            raise ValueError(f"the smallest client would hold {min(sizes)} samples")
    if partition == "dirichlet":
        part = (InnerDirichletPartitioner(sizes, "label", alpha, shuffle=False, seed=seed)
                if sizes is not None else
                DirichletPartitioner(k, "label", alpha, min_partition_size=min_size,
                                     self_balancing=False, shuffle=False, seed=seed))
        part.dataset = ds
    else:  # iid with a size skew: the sizer's own consecutive rows of the shuffled ds
        part = sizer
    return tuple(tuple(sorted(part.load_partition(j)["row"])) for j in range(k))
