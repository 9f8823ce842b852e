"""Benchmark ``kind: local``: every client's own data and a public pool, read from disk.

A client's private data is a folder it points at (``benchmark.client_data[i]`` in
simulation, ``--node-config "data=<path>"`` on a deployed SuperNode); the pool is
``benchmark.pool_data`` (a folder, a ``save_to_disk`` directory, JSONL, CoOp split files, or a
hub id read with ``datasets.load_dataset``, e.g. ``ILSVRC/imagenet-1k``; a client's path may be
a hub id too, e.g. ``timm/oxford-iiit-pet`` for the paper's clients). The formats and every refusal of bad data are in
``metamoe/data/local_read.py``.

Label space. The pool's P classes are public and M0's head covers them (ids 0..P-1). A
client's own C classes are ids P..P+C-1 *on that node only*: their names, and the head rows
that score them (``clients/private_head.py``), never leave it. The server sees the client as
``client-<partition id>`` with its sample count.

Inputs. Images are decoded and converted to the seed's input by the seed's own transform
(:func:`image_transform`: the ViT's 28x28 grey in [-1, 1]; CLIP: ``models/clip.clip_transform``).
A client's data is decoded (and so checked, file by file) once, when the node first needs it;
for the ViT it is then held at the seed's input size (3 KB an image), for CLIP (600 KB an
image at 224x224) it stays on disk and :class:`LazyInputs` decodes each batch, with the
paper's random crop and flip for expert training (``Domain.x_train_aug``) and the centre crop
everywhere else. The pool is never decoded whole: :class:`LazyInputs` decodes the rows a stage
indexes (a client's proxies and sketch negatives; the server's batches). Texts are tokenised
by the seed's tokenizer as for the embedded text benchmark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from metamoe.data.local_read import DataError, Source, read_splits, validate
from metamoe.data.vision import MEAN, STD, Domain, VisionBenchmark

log = logging.getLogger("metamoe")

__all__ = ["DataError", "LazyInputs", "build_local_pool", "data_problem", "image_transform",
           "local_domain"]

# What a refusal's message says -> what the server may hear of it (no path, file or class name).
_PROBLEMS = (("empty class folder", "an empty class folder"), ("empty folder", "an empty folder"),
             ("unreadable image", "an unreadable or truncated image"),
             ("unreadable", "an unreadable file"), ("not an image", "a file that is not an image"),
             ("single class", "a single class"),
             ("label outside", "a label outside the class list"),
             ("invalid JSON", "a malformed JSONL line"), ("not a JSON object", "a malformed JSONL line"),
             ("'text'", "a malformed JSONL line"), ("'label'", "a malformed JSONL line"),
             ("no items", "no items"), ("has no items", "a class without items"),
             ("no such file", "no such file or folder"),
             ("not a saved Hugging Face dataset", "not a saved dataset"),
             ("holds images but", "the wrong modality"), ("holds texts but", "the wrong modality"))


def data_problem(err: Exception) -> str:
    """The kind of a :class:`DataError`, in words that name no file, folder or class: what the
    server is told when a node refuses its own data (the node's log has the full message)."""
    msg = str(err)
    return next((kind for key, kind in _PROBLEMS if key in msg), "unusable data")

IMAGE_SIZE, IMAGE_CHANNELS = 28, 1  # the ViT seed's input (models/vit.py ViTConfig)


def image_transform(size: int = IMAGE_SIZE, channels: int = IMAGE_CHANNELS
                    ) -> Callable[[object], np.ndarray]:
    """The ViT seed's transform: any PIL image (any size or mode) -> float32 [C, size, size]
    scaled as the embedded benchmark ((x / 255 - 0.5) / 0.5)."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"

    def tf(img) -> np.ndarray:
        if img.mode in ("RGBA", "LA", "P"):  # flatten transparency onto white
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        img = img.convert(mode).resize((size, size), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        return (x - MEAN) / STD

    return tf


class LazyInputs(Dataset):
    """Inputs decoded only for the rows asked for: ``x[i]`` one input, ``x[idx]`` (int array
    or slice) a stacked float32 array; ``len(x)`` its size. A map-style Dataset of inputs too
    (``__getitems__``: one tensor per batch), so the training loop reads it batch by batch;
    with labels it becomes :class:`~metamoe.data.dataset.LazyDataset` (``as_dataset``)."""

    inputs_only = True  # items are inputs; labels are given beside them

    def __init__(self, source: Source, transform: Callable[..., np.ndarray],
                 seed: int | None = None):
        """``seed``: a random transform (augmentation) draws item i's k-th decoding from
        ``default_rng([seed, i, k])``, so a seeded training order gives the same crops."""
        self.source, self.transform, self.seed = source, transform, seed
        self._draws: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.source)

    def restart(self) -> LazyInputs:
        """Draw the augmentations from the start again (a new training run)."""
        self._draws.clear()
        return self

    def _one(self, i: int) -> np.ndarray:
        try:
            if self.seed is not None:
                k = self._draws.get(int(i), 0)
                self._draws[int(i)] = k + 1
                rng = np.random.default_rng([int(self.seed), int(i), k])
                return self.transform(self.source.load(int(i)), rng)
            return self.transform(self.source.load(int(i)))
        except DataError:
            raise
        except Exception as e:  # a pool file that went bad after listing
            raise DataError(f"cannot read {self.source.describe(int(i))}: {e}") from e

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._one(int(idx))
        rows = range(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx).reshape(-1)
        if len(rows) == 0:
            return np.zeros((0, *self._one(0).shape), np.float32)
        return np.stack([self._one(i) for i in rows])

    def get_batch(self, start: int, stop: int) -> np.ndarray:  # proxy/pool_cache.py's batches
        return self[start:stop]

    def __getitems__(self, idx) -> torch.Tensor:
        return torch.from_numpy(self[np.asarray(idx, dtype=np.int64)])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._one(0).shape)


def _tokenize(texts: list[str], tokenizer, max_len: int) -> np.ndarray:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len)
    return np.asarray(enc["input_ids"], dtype=np.int64)


def _encode(source: Source, encoder: dict, lazy: bool):
    """(inputs, labels) of a source under the seed's input encoding."""
    if source.modality == "text":
        if encoder["modality"] != "text":
            raise DataError(f"{source.where}: holds texts but the seed model takes images")
        texts = [source.load(i) for i in range(len(source))]
        return _tokenize(texts, encoder["tokenizer"], encoder["max_len"]), source.labels
    if encoder["modality"] != "image":
        raise DataError(f"{source.where}: holds images but the seed model takes texts")
    lazy_x = LazyInputs(source, encoder["transform"])
    return (lazy_x if lazy else lazy_x[np.arange(len(source))]), source.labels


def is_hub_id(path: str, fmt: str = "auto") -> bool:
    """Whether a data path names a hub dataset (``owner/name`` that is not a local path)."""
    return fmt == "hub" or (fmt == "auto" and not Path(path).expanduser().exists()
                            and path.count("/") == 1 and not path.startswith((".", "~")))


def _hub_splits(name: str, split: str | None) -> dict[str, Source]:
    """A hub dataset (online users), downloaded once into the HF cache by ``datasets`` and read
    from its Arrow files like a saved dataset (rows decoded on access, never all at once).
    ``split`` None: every split it has."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{name}: a hub dataset, but `datasets` is not installed") from e
    from metamoe.data.local_read import _read_hf

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(f"{name}: not a local path, and loading it from the HF hub failed "
                        f"({type(e).__name__}: {e})") from e
    return _read_hf(Path(name), obj=ds)


def build_local_pool(b: dict, encoder: dict) -> tuple[object, np.ndarray, list[str]]:
    """(pool inputs, pool labels, pool class names) of ``benchmark`` section ``b``. Image pools
    are :class:`LazyInputs`; every pool item is listed and its labels read, not decoded."""
    pool, fmt = str(b["pool_data"]), str(b.get("pool_format", "auto"))
    if is_hub_id(pool, fmt):
        splits = _hub_splits(pool, str(b.get("pool_split", "train")))
    else:
        splits = read_splits(Path(pool).expanduser(), fmt)
    src = splits["train"]
    if len(src) == 0:
        raise DataError(f"the public pool {src.where} is empty")
    x, y = _encode(src, encoder, lazy=True)
    if int(b.get("max_pool", -1)) >= 0 and b["max_pool"] < len(src):
        keep = np.sort(np.random.default_rng(b["data_seed"]).permutation(len(src))[:b["max_pool"]])
        src = src.subset(keep)
        x, y = _encode(src, encoder, lazy=True)
    return x, np.asarray(y, np.int64), list(src.class_names)


def _seeded_split(src: Source, frac: float, seed: int, what: str) -> tuple[Source, Source]:
    """(rest, held out): a seeded, per-class share ``frac`` of ``src`` held out (at least one
    item of each class that has two or more)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(src.labels):
        idx = np.flatnonzero(src.labels == c)
        k = int(round(frac * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        held += rng.permutation(idx)[:k].tolist()
    held_idx = np.sort(np.asarray(held, np.int64))
    rest = np.setdiff1d(np.arange(len(src)), held_idx)
    if len(held_idx) == 0:
        raise DataError(f"{src.where}: too few items to hold out a {what} split")
    return src.subset(rest), src.subset(held_idx)


def local_domain(path: str, fmt: str, name: str, b: dict, encoder: dict, num_pool_classes: int
                 ) -> tuple[Domain, dict]:
    """One client's own data as a :class:`Domain` whose labels follow the pool's P classes
    (P..P+C-1), plus node-local facts (class names, sizes) that stay on the node. Every item
    is decoded and checked here, before any training; bad data raises :class:`DataError`
    naming the file or folder."""
    p = Path(path).expanduser()
    splits = _hub_splits(path, None) if is_hub_id(path, fmt) else read_splits(p, fmt)
    train = splits["train"]
    for s in splits.values():
        validate(s)
    seed = int(b.get("data_seed", 0))
    if "test" not in splits:
        train, test = _seeded_split(train, float(b["test_fraction"]), seed, "test")
    else:
        test = splits["test"]
    val = splits.get("val")
    if val is None and float(b.get("val_fraction", 0)) > 0:
        train, val = _seeded_split(train, float(b["val_fraction"]), seed + 1, "validation")
    if len(np.unique(train.labels)) < 2:
        raise DataError(f"{p}: the train split has a single class; a client needs two or more")
    off = int(num_pool_classes)
    cap = int(b.get("max_train", -1)), int(b.get("max_test", -1))
    if cap[0] >= 0 and cap[0] < len(train):
        train = train.subset(np.sort(np.random.default_rng(seed).permutation(len(train))[:cap[0]]))
    if cap[1] >= 0 and cap[1] < len(test):
        test = test.subset(np.sort(np.random.default_rng(seed).permutation(len(test))[:cap[1]]))
    lazy = bool(encoder.get("lazy", False))  # CLIP-sized inputs: decoded per batch
    xtr, ytr = _encode(train, encoder, lazy=lazy)
    xte, yte = _encode(test, encoder, lazy=lazy)
    classes = list(range(off, off + len(train.class_names)))
    dom = Domain(name, xtr, np.asarray(ytr, np.int64) + off, xte, np.asarray(yte, np.int64) + off,
                 classes, f"local data of {name}")
    if lazy and encoder.get("train_transform") is not None:  # augmented view for training
        dom.x_train_aug = LazyInputs(train, encoder["train_transform"], seed=seed)
    local = {"class_names": list(train.class_names), "n_train": len(train), "n_test": len(test)}
    if val is not None:
        xv, yv = _encode(val, encoder, lazy=lazy)
        local.update(x_val=xv, y_val=np.asarray(yv, np.int64) + off, n_val=len(val))
        dom.x_val, dom.y_val = local["x_val"], local["y_val"]
    log.info("%s: %d train / %d test items in %d classes from its own data", name, len(train),
             len(test), len(classes))
    return dom, local


def local_benchmark(b: dict, encoder: dict) -> VisionBenchmark:
    """The pool part of a local benchmark (what the server and every node share); the
    clients' own domains are added on their nodes (:func:`local_domain`)."""
    x, y, names = build_local_pool(b, encoder)
    return VisionBenchmark(b["name"], [], x, y, np.full(len(y), "pool"), class_names=names)
