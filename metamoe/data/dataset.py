"""The inputs of the one training and evaluation loop: map-style torch Datasets.

Any map-style ``torch.utils.data.Dataset`` works: items are ``(input, label)`` pairs for
training, inputs (or pairs, of which the input is used) for inference; decoding and
per-sample transforms happen in ``__getitem__``, so nothing needs to be held in memory whole,
and ``run.data_workers`` > 0 fetches batches in DataLoader worker processes. In-memory arrays
are one such dataset, :class:`ArrayDataset`, whose batches are fetched by one fancy index
(``__getitems__``), exactly as before Datasets existed. A dataset of padded token ids may
expose ``lengths()`` (real tokens per item) for length-grouped batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class ArrayDataset(Dataset):
    """In-memory inputs (and labels) as a map-style Dataset."""

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor | None = None):
        self.x = torch.as_tensor(x)
        self.y = None if y is None else torch.as_tensor(y)
        if self.y is not None and len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] if self.y is None else (self.x[i], self.y[i])

    def __getitems__(self, idx: Sequence[int]):  # one fancy index per batch
        idx = torch.as_tensor(idx)
        return self.x[idx] if self.y is None else (self.x[idx], self.y[idx])

    def lengths(self, pad_id: int = 0) -> torch.Tensor | None:
        """Real tokens per row of padded token ids (2-D integer input); None otherwise."""
        if self.x.ndim != 2 or self.x.dtype not in (torch.int64, torch.int32):
            return None
        return (self.x != pad_id).sum(1)


class IndexDataset(Dataset):
    """(index, label) items, for a loss that looks its inputs up by index (DDOME: each
    sample's tokens and its M0 feature); ``lengths`` are the indexed inputs' own, so
    length-grouped batching sees the texts, not the indices."""

    def __init__(self, y, lengths: torch.Tensor | None = None):
        self.y = torch.as_tensor(y)
        self._lengths = lengths
        if lengths is not None and len(lengths) != len(self.y):
            raise ValueError(f"{len(lengths)} lengths but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return torch.as_tensor(i), self.y[i]

    def __getitems__(self, idx: Sequence[int]):
        idx = torch.as_tensor(idx)
        return idx, self.y[idx]

    def lengths(self) -> torch.Tensor | None:
        return self._lengths


class LazyDataset(Dataset):
    """(input, label) items of inputs that decode on indexing (``x[idx]`` -> stacked array,
    e.g. :class:`metamoe.data.local.LazyInputs`) and in-memory labels: one fancy index per
    batch, so a batch decodes only its own rows."""

    def __init__(self, x, y: np.ndarray):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, torch.as_tensor(np.asarray(y))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.as_tensor(self.x[int(i)]), self.y[int(i)]

    def __getitems__(self, idx: Sequence[int]):
        idx = np.asarray(idx, dtype=np.int64)
        return torch.as_tensor(self.x[idx]), self.y[torch.as_tensor(idx)]

    def labels(self) -> torch.Tensor:
        return self.y


class ConcatInputs(Dataset):
    """Two input collections one after the other (a client's lazily decoded data, then the
    proxies it was sent): ``x[idx]`` / ``__getitems__`` as :class:`LazyDataset` reads them."""

    inputs_only = True

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            i = int(idx)
            return torch.as_tensor(self.a[i] if i < len(self.a) else self.b[i - len(self.a)])
        rows = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx).reshape(-1)
        out = [None] * len(rows)
        first = rows < len(self.a)
        for part, sel, off in ((self.a, first, 0), (self.b, ~first, len(self.a))):
            if sel.any():
                vals = torch.as_tensor(np.asarray(part[rows[sel] - off]))
                for k, v in zip(np.flatnonzero(sel), vals):
                    out[k] = v
        return torch.stack(out)

    def __getitems__(self, idx) -> torch.Tensor:
        return self[np.asarray(idx, dtype=np.int64)]


def concat_inputs(a, b):
    """``a`` then ``b``: one tensor when both are in memory (as ``torch.cat``), else a
    :class:`ConcatInputs` that decodes lazily."""
    if isinstance(a, (np.ndarray, torch.Tensor)) and isinstance(b, (np.ndarray, torch.Tensor)):
        return torch.cat([torch.as_tensor(a), torch.as_tensor(b)])
    return ConcatInputs(a, b)


def as_inputs(x):
    """In-memory inputs as a tensor (``torch.from_numpy``: no copy); lazy inputs as they are."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def as_dataset(x, y=None) -> Dataset:
    """``x`` if it already is a Dataset (then ``y`` must be None), else an ArrayDataset;
    lazily decoded inputs (``inputs_only``) with labels ``y`` become a :class:`LazyDataset`."""
    if getattr(x, "inputs_only", False) and y is not None:
        return LazyDataset(x, np.asarray(y))
    if isinstance(x, Dataset):
        if y is not None:
            raise ValueError("pass labels inside the Dataset's items, not as a second argument")
        return x
    return ArrayDataset(x, y)


def dataset_lengths(data: Dataset, pad_id: int = 0) -> torch.Tensor | None:
    fn = getattr(data, "lengths", None)
    if fn is None:
        return None
    out = fn(pad_id) if isinstance(data, ArrayDataset) else fn()
    return None if out is None else torch.as_tensor(out)


def dataset_labels(data: Dataset) -> torch.Tensor:
    """Every item's label, in order (a dataset may expose ``labels()`` to avoid decoding its
    inputs a second time)."""
    if isinstance(data, ArrayDataset):
        if data.y is None:
            raise ValueError("this dataset has no labels")
        return data.y
    fn = getattr(data, "labels", None)
    if fn is not None:
        return torch.as_tensor(fn())
    return torch.as_tensor([int(data[i][1]) for i in range(len(data))])


def _collate(data: Dataset):
    # An ArrayDataset's __getitems__ already returns the batch; other datasets' items are
    # stacked by torch's default_collate.
    return (lambda batch: batch) if hasattr(data, "__getitems__") else default_collate


def fetch(data: Dataset, idx: torch.Tensor):
    """One batch of ``data`` (the items at ``idx``), in this process."""
    if hasattr(data, "__getitems__"):
        return data.__getitems__(idx)
    return default_collate([data[int(i)] for i in idx])


def batches(data: Dataset, index_batches: Iterable[torch.Tensor], workers: int = 0,
            pin_memory: bool = False) -> Iterator:
    """The batches of ``data`` for the given index lists, in order; with ``workers`` > 0
    they are fetched by DataLoader worker processes (same batches, same order)."""
    if workers <= 0 or isinstance(data, ArrayDataset):
        for idx in index_batches:
            yield fetch(data, idx)
        return
    loader = DataLoader(data, batch_sampler=[i.tolist() for i in index_batches],
                        num_workers=int(workers), collate_fn=_collate(data),
                        pin_memory=pin_memory)
    yield from loader
