"""The ``coop`` format of ``metamoe.data.local_read``: CoOp's ``split_zhou_<Name>.json``.

The CoOp benchmark (Zhou et al.) ships one JSON object per dataset (Oxford Pets, Flowers102,
EuroSAT, ...): ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}``,
``relpath`` relative to an image root. ``read_coop(path)`` takes the json file itself or a folder
holding exactly one ``split_zhou_*.json``. The image root is, next to the json, the first
existing folder of ``images/`` (Pets), ``jpg/`` (Flowers102), ``2750/`` (EuroSAT) that holds the
first listed train image, else the first of them that exists, else the json's folder.

Classes: the ``(label, classname)`` pairs of all splits; labels must be the ints ``0..C-1``, each
with one class name. Splits ``train`` (required, non-empty), ``val`` and ``test`` (left out when
missing or empty). Every listed image must exist (checked here; decoding is lazy, as for the
other formats). Errors are ``DataError`` whose message starts with the offending file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from metamoe.data.local_read import DataError, Source

__all__ = ["ROOT_NAMES", "SPLITS", "find_split_json", "read_coop"]

ROOT_NAMES = ("images", "jpg", "2750")  # image roots CoOp uses, tried in this order
SPLITS = ("train", "val", "test")  # json key == Source split name


def find_split_json(path: Path) -> Path:
    """``path`` if it is a file, else the one ``split_zhou_*.json`` in the folder ``path``."""
    path = Path(path).expanduser().absolute()
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    found = sorted(path.glob("split_zhou_*.json"))
    if len(found) != 1:
        which = ", ".join(f.name for f in found) if found else "none"
        raise DataError(f"{path}: expected exactly one split_zhou_*.json in this folder, "
                        f"found {len(found)} ({which})")
    return found[0]


def _image_root(base: Path, first: str | None) -> Path:
    roots = [base / n for n in ROOT_NAMES if (base / n).is_dir()]
    if first is not None:
        for r in roots:
            if (r / first).is_file():
                return r
    return roots[0] if roots else base


def _entries(obj: dict, json_file: Path) -> dict[str, list[tuple[str, int, str]]]:
    out = {}
    for split in SPLITS:
        items = obj.get(split)
        if items is None or (isinstance(items, list) and not items and split != "train"):
            continue
        if not isinstance(items, list):
            raise DataError(f"{json_file}: split {split!r} is not a list "
                            f"(got {type(items).__name__})")
        for i, e in enumerate(items):
            ok = (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[0]
                  and isinstance(e[1], int) and not isinstance(e[1], bool)
                  and isinstance(e[2], str) and e[2])
            if not ok:
                raise DataError(f"{json_file} (split {split}, entry {i}): not a "
                                f"[relpath, label, classname] triple of [str, int, str]: {e!r}")
        out[split] = [tuple(e) for e in items]
    if not out.get("train"):
        raise DataError(f"{json_file}: no 'train' entries (keys: {sorted(obj)})")
    return out


def _class_names(entries: dict, json_file: Path) -> list[str]:
    names: dict[int, str] = {}
    for split, items in entries.items():
        for i, (_, label, cname) in enumerate(items):
            if label < 0:
                raise DataError(f"{json_file} (split {split}, entry {i}): negative label {label}")
            if names.setdefault(label, cname) != cname:
                raise DataError(f"{json_file} (split {split}, entry {i}): label {label} is "
                                f"{cname!r} here but {names[label]!r} in an earlier entry")
    n = max(names) + 1
    if missing := [k for k in range(n) if k not in names]:
        raise DataError(f"{json_file}: labels must be 0..{n - 1} without gaps; no entry has "
                        f"label(s) {missing[:10]}")
    seen: dict[str, int] = {}
    for k in range(n):
        if seen.setdefault(names[k], k) != k:
            raise DataError(f"{json_file}: class name {names[k]!r} is used by labels "
                            f"{seen[names[k]]} and {k}")
    return [names[k] for k in range(n)]


def read_coop(path: Path) -> dict[str, Source]:
    """``{"train": Source}`` plus ``"val"``/``"test"`` from a CoOp split json (or its folder)."""
    json_file = find_split_json(path)
    try:
        obj = json.loads(json_file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{json_file}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{json_file}: invalid JSON ({e.msg} at line {e.lineno} column "
                        f"{e.colno})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{json_file}: not a JSON object with 'train'/'val'/'test' lists "
                        f"(got {type(obj).__name__})")
    entries = _entries(obj, json_file)
    names = _class_names(entries, json_file)
    root = _image_root(json_file.parent, entries["train"][0][0])
    out = {}
    for split, items in entries.items():
        files = [os.path.join(root, rel) for rel, _, _ in items]
        for i, f in enumerate(files):
            if not os.path.isfile(f):
                raise DataError(f"{f}: missing image listed in {json_file} (split {split}, "
                                f"entry {i}; image root {root})")
        labels = np.asarray([lab for _, lab, _ in items], dtype=np.int64)
        out[split] = Source("image", labels, list(names), str(json_file), split, _files=files,
                            _owns_classes=split == "train")
    return out
