"""Read and validate data that a client (or the public pool) brings on its own disk.

``read_splits(path)`` lists a dataset's items and labels without decoding them (``Source``),
``Source.load(i)`` decodes one item, ``validate(source)`` decodes every item once. Every bad
input raises ``DataError`` (a ``ValueError``) whose message starts with the offending file or
folder (absolute path) and says what is wrong. Formats (``detect_format`` picks one):

* ``imagefolder`` — ``<root>/<class>/<files>`` (files at any depth under a class folder), or,
  when ``<root>`` has a ``train`` sub-folder, ``<root>/train/<class>/...`` with optional
  ``test/`` and ``val/`` (or ``validation/``). Classes: the sorted class folder names of train;
  test/val may not add classes. Hidden entries (``.*``) and files without an image extension
  (``IMAGE_EXTENSIONS``, any case) are skipped; files are listed in sorted order.
* ``hf`` — a folder written by ``datasets``' ``save_to_disk``: a ``DatasetDict`` (``train``,
  optional ``test``, ``validation``/``val``) or a ``Dataset`` (train). Items: the first
  ``datasets.Image`` column (else ``image``/``img``) or a string column ``text``/``sentence``.
  Labels ``label``/``labels``: a ``ClassLabel`` (its names; values in ``[0, num_classes)``),
  strings (classes: sorted distinct train labels) or ints (classes: ``str(v)`` of the sorted
  distinct train values, labels remapped to their indices).
* ``jsonl`` — a ``*.jsonl`` file (train only), or a folder with ``train.jsonl``, optional
  ``test.jsonl``, ``val.jsonl``/``validation.jsonl`` and ``classes.txt`` (one name a line).
  Each non-blank line is a JSON object with a non-empty string ``"text"`` and a ``"label"``
  (a string, or an int read as ``str(v)``). Classes: ``classes.txt``, else the sorted distinct
  train labels. Texts are held in memory. Read by ``metamoe.data.jsonl_read``.
* ``coop`` — a CoOp ``split_zhou_<Name>.json`` (or a folder holding exactly one) listing
  ``[relpath, label, classname]`` per split; read by ``metamoe.data.coop``, see there.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = ["DataError", "IMAGE_EXTENSIONS", "Source", "detect_format", "read_splits", "validate"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMATS = ("auto", "imagefolder", "hf", "jsonl", "coop")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SPLIT_NAMES = (("test", "test"), ("val", "val"), ("validation", "val"))


class DataError(ValueError):
    """Bad client data; the message names the offending file or folder."""


@dataclass(eq=False)
class Source:
    """One split of one dataset: lazily loadable items with integer labels."""

    modality: str  # "image" | "text"
    labels: np.ndarray  # int64 [N], indices into class_names
    class_names: list[str]
    where: str  # the path it was read from (for messages)
    split: str = "train"
    _files: list[str] | None = field(default=None, repr=False)  # imagefolder: absolute paths
    _class_dirs: dict[str, str] | None = field(default=None, repr=False)  # imagefolder
    _texts: list[str] | None = field(default=None, repr=False)  # jsonl texts
    _refs: list[str] | None = field(default=None, repr=False)  # jsonl: "file:line" per item
    _hf: object = field(default=None, repr=False)  # datasets.Dataset (item column only)
    _col: str | None = field(default=None, repr=False)
    _rows: np.ndarray | None = field(default=None, repr=False)  # hf row numbers
    _owns_classes: bool = field(default=True, repr=False)  # class list defined by this split

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        if self._files is not None:
            return self._files[i]
        if self._refs is not None:
            return self._refs[i]
        return f"{self.where} (split {self.split}) row {int(self._rows[i])}"

    def load(self, i: int):
        """Item ``i``: a ``PIL.Image.Image`` as stored (mode L, RGB, RGBA, P...) or a ``str``."""
        if self._texts is not None:
            return self._texts[i]
        if self._files is not None:
            return _open_image(self._files[i], self.describe(i))
        try:
            value = self._hf[int(self._rows[i])][self._col]
        except Exception as e:
            raise DataError(f"{self.describe(i)}: unreadable {self.modality} "
                            f"({type(e).__name__}: {e})") from e
        return value if self.modality == "text" else _hf_image(value, self.describe(i))

    def subset(self, idx: np.ndarray) -> Source:
        """Same class names, the items at ``idx`` (integer indices or a boolean mask)."""
        idx = np.asarray(idx)
        idx = (np.flatnonzero(idx) if idx.dtype == bool else idx).astype(np.int64).reshape(-1)
        pick = lambda xs: None if xs is None else [xs[int(k)] for k in idx]  # noqa: E731
        return replace(
            self, labels=self.labels[idx].copy(), class_names=list(self.class_names),
            _files=pick(self._files), _texts=pick(self._texts), _refs=pick(self._refs),
            _rows=None if self._rows is None else self._rows[idx].copy(), _owns_classes=False,
        )


def _open_image(path: str, what: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        raise DataError(f"{what}: unreadable image ({type(e).__name__}: {e})") from e
    return im


def _hf_image(value, what: str):
    from PIL import Image

    if isinstance(value, dict):  # an undecoded Image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray | str):
        return _open_image(io.BytesIO(value) if not isinstance(value, str) else value, what)
    if isinstance(value, Image.Image):
        return value
    arr = None if value is None else np.asarray(value)
    if arr is None or arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise DataError(f"{what}: not an image ({type(value).__name__})")
    return Image.fromarray(arr)


def detect_format(path) -> str:
    """``"imagefolder"``, ``"hf"``, ``"jsonl"`` or ``"coop"`` for ``path``; see the module
    docstring."""
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".jsonl":
            return "jsonl"
        if p.suffix.lower() == ".json":
            return "coop"
        raise DataError(f"{p}: a file that is not .jsonl or .json; expected a .jsonl file, a "
                        "CoOp split .json or a folder (an image folder or a saved HF dataset)")
    if (p / "train.jsonl").is_file():
        return "jsonl"
    if any((p / m).is_file() for m in _HF_MARKERS):
        return "hf"
    if any(p.glob("split_zhou_*.json")):
        return "coop"
    return "imagefolder"


def read_splits(path, fmt: str = "auto") -> dict[str, Source]:
    """``{"train": Source}`` plus ``"test"`` and ``"val"`` where the data has them."""
    p = Path(path).expanduser().absolute()
    if fmt not in FORMATS:
        raise DataError(f"{p}: unknown data format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt in ("jsonl", "coop"):  # imported here: those modules import this one
        from metamoe.data.coop import read_coop
        from metamoe.data.jsonl_read import read_jsonl

        return {"jsonl": read_jsonl, "coop": read_coop}[fmt](p)
    return {"imagefolder": _read_imagefolder, "hf": _read_hf}[fmt](p)


def validate(source: Source) -> None:
    """Decode every item once; refuse fewer than two classes and classes without items."""
    from PIL import ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set elsewhere): truncated "
                      "images will not be detected", stacklevel=2)
    n = len(source)
    counts = np.bincount(source.labels, minlength=len(source.class_names))
    if len(present := np.flatnonzero(counts)) < 2:
        only = ", ".join(repr(source.class_names[k]) for k in present) or "no class"
        raise DataError(f"{source.where}: single class: only {only} has items (split "
                        f"{source.split}, {n} items); need at least 2 classes")
    if source._owns_classes:
        for k in np.flatnonzero(counts == 0):
            name = source.class_names[k]
            if source._class_dirs and name in source._class_dirs:
                raise DataError(f"{source._class_dirs[name]}: empty class folder: "
                                f"class {name!r} has no items")
            raise DataError(f"{source.where}: class {name!r} has no items "
                            f"(split {source.split})")
    for i in range(n):
        item = source.load(i)
        if source.modality == "text":
            if not isinstance(item, str) or not item.strip():
                raise DataError(f"{source.describe(i)}: missing or empty text ({item!r})")
        elif not hasattr(item, "mode"):
            raise DataError(f"{source.describe(i)}: not an image ({type(item).__name__})")


def _extra_splits(where: Path, found: dict) -> dict:
    """``{"test": x, "val": y}`` from what was found under the names test/val/validation."""
    out = {}
    for name, key in _SPLIT_NAMES:
        if name in found:
            if key in out:
                raise DataError(f"{where}: both a 'val' and a 'validation' split; keep one")
            out[key] = found[name]
    return out


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d[0] != ".")
        out += [os.path.join(dirpath, f) for f in filenames if _is_image(f)]
    return sorted(out)


def _read_image_split(folder: Path, split: str, classes: list[str] | None) -> Source:
    class_dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name[0] != ".")
    if not class_dirs:
        loose = sum(1 for f in folder.iterdir() if f.is_file() and _is_image(f.name))
        hint = f" ({loose} image files directly in it: put each class in its own sub-folder)"
        raise DataError(f"{folder}: empty folder: no class sub-folders{hint if loose else ''}")
    names = class_dirs if classes is None else classes
    index = {c: k for k, c in enumerate(names)}
    files, labels, dirs = [], [], {}
    for c in class_dirs:
        cdir = folder / c
        if c not in index:
            raise DataError(f"{cdir}: label outside the class list: class {c!r} is not in "
                            f"train's classes {names}")
        found = _image_files(cdir)
        if not found:
            raise DataError(f"{cdir}: empty class folder: no image file "
                            f"({'/'.join(IMAGE_EXTENSIONS)}) at any depth")
        dirs[c] = str(cdir)
        files += found
        labels += [index[c]] * len(found)
    return Source("image", np.asarray(labels, dtype=np.int64), list(names), str(folder), split,
                  _files=files, _class_dirs=dirs, _owns_classes=classes is None)


def _read_imagefolder(root: Path) -> dict[str, Source]:
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (an image folder is <root>/<class>/<images>)")
    if not (root / "train").is_dir():
        return {"train": _read_image_split(root, "train", None)}
    out = {"train": _read_image_split(root / "train", "train", None)}
    found = {n: root / n for n, _ in _SPLIT_NAMES if (root / n).is_dir()}
    for key, folder in _extra_splits(root, found).items():
        out[key] = _read_image_split(folder, key, out["train"].class_names)
    return out


def _hf_columns(ds, where: str) -> tuple[str, str, str]:
    import datasets

    cols, feats = ds.column_names, ds.features
    item = next((c for c in cols if isinstance(feats[c], datasets.Image)), None)
    item = item or next((c for c in ("image", "img") if c in cols), None)
    modality = "image"
    if item is None:
        item, modality = next((c for c in ("text", "sentence") if c in cols), None), "text"
        dtype = getattr(feats[item], "dtype", None) if item is not None else "string"
        if dtype not in ("string", "large_string"):
            raise DataError(f"{where}: text column {item!r} is {feats[item]}, not strings")
    if item is None:
        raise DataError(f"{where}: no image column (a datasets.Image feature, or 'image'/'img') "
                        f"and no text column ('text'/'sentence'); columns: {cols}")
    label = next((c for c in ("label", "labels") if c in cols), None)
    if label is None:
        raise DataError(f"{where}: no label column ('label' or 'labels'); columns: {cols}")
    return item, modality, label


def _hf_labels(ds, col: str, where: str, train_names: list[str] | None):
    """(int64 labels, class names): train when ``train_names`` is None, else mapped onto it."""
    import datasets

    feat = ds.features[col]
    values = ds.with_format("arrow")[col].to_pylist()
    for r, v in enumerate(values):
        if v is None or isinstance(v, bool) or not isinstance(v, int | str):
            raise DataError(f"{where} row {r}: label must be an int or a string, got {v!r}")
    if isinstance(feat, datasets.ClassLabel):
        arr = np.asarray(values, dtype=np.int64)
        bad = np.flatnonzero((arr < 0) | (arr >= feat.num_classes))
        if len(bad):
            raise DataError(f"{where} row {bad[0]}: label {arr[bad[0]]} outside the ClassLabel "
                            f"range [0, {feat.num_classes})")
        if train_names is None or list(feat.names) == train_names:
            return arr, list(feat.names)
        values = [feat.names[v] for v in arr]
    if len({type(v) for v in values}) > 1:
        raise DataError(f"{where}: labels mix ints and strings")
    names = [str(v) for v in sorted(set(values))] if train_names is None else train_names
    index = {n: k for k, n in enumerate(names)}
    out = np.empty(len(values), dtype=np.int64)
    for r, v in enumerate(values):
        k = index.get(str(v))
        if k is None:
            raise DataError(f"{where} row {r}: label outside the class list: {v!r} is not in "
                            f"train's classes {names}")
        out[r] = k
    return out, names


def _read_hf(root: Path, obj=None) -> dict[str, Source]:
    """A dataset saved with ``save_to_disk`` at ``root``, or ``obj`` (a loaded Dataset /
    DatasetDict, e.g. from the hub; ``root`` then names it in messages)."""
    import datasets

    try:
        obj = datasets.load_from_disk(str(root)) if obj is None else obj
    except Exception as e:
        raise DataError(f"{root}: not a saved Hugging Face dataset (datasets.load_from_disk "
                        f"failed: {type(e).__name__}: {e})") from e
    if isinstance(obj, datasets.DatasetDict):
        if "train" not in obj:
            raise DataError(f"{root}: no 'train' split (splits: {list(obj)})")
        splits = {"train": obj["train"], **_extra_splits(root, dict(obj))}
    else:
        splits = {"train": obj}
    out, names = {}, None
    for key, ds in splits.items():
        where = f"{root} (split {key})"
        item, modality, label = _hf_columns(ds, where)
        if out and modality != out["train"].modality:
            raise DataError(f"{where}: {modality} items but train holds {out['train'].modality}")
        labels, names = _hf_labels(ds, label, where, names)
        out[key] = Source(modality, labels, names, str(root), key, _hf=ds.select_columns([item]),
                          _col=item, _rows=np.arange(len(ds), dtype=np.int64),
                          _owns_classes=key == "train")
    return out
