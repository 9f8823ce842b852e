"""The ``jsonl`` format of ``metamoe.data.local_read`` (see its module docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from metamoe.data.local_read import _SPLIT_NAMES, DataError, Source, _extra_splits

__all__ = ["read_jsonl"]


def _read_jsonl_file(path: Path) -> tuple[list[str], list[str], list[str]]:
    texts, labels, refs = [], [], []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        ref = f"{path}:{n}"
        try:
            line = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{ref}: not UTF-8 text ({e})") from e
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{ref}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{ref}: not a JSON object (got {type(obj).__name__})")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{ref}: missing or empty 'text' (a non-empty string)")
        lab = obj.get("label")
        if lab is None:
            raise DataError(f"{ref}: missing 'label'")
        if isinstance(lab, bool) or not isinstance(lab, int | str) or lab == "":
            raise DataError(f"{ref}: 'label' must be a non-empty string or an int, got {lab!r}")
        texts.append(text)
        labels.append(str(lab))
        refs.append(ref)
    if not texts:
        raise DataError(f"{path}: no items (no non-blank lines)")
    return texts, labels, refs


def _read_classes(path: Path) -> list[str]:
    names: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if (name := line.strip()) in names:
            raise DataError(f"{path}:{n}: duplicate class name {name!r}")
        names += [name] if name else []
    if not names:
        raise DataError(f"{path}: no class names")
    return names


def read_jsonl(root: Path) -> dict[str, Source]:
    classes_file = None
    if root.is_file():
        files = {"train": root}
    else:
        if not (root / "train.jsonl").is_file():
            raise DataError(f"{root}: no train.jsonl in this folder")
        found = {n: root / f"{n}.jsonl" for n, _ in _SPLIT_NAMES}
        found = {n: f for n, f in found.items() if f.is_file()}
        files = {"train": root / "train.jsonl", **_extra_splits(root, found)}
        if (root / "classes.txt").is_file():
            classes_file = root / "classes.txt"
    parsed = {key: _read_jsonl_file(f) for key, f in files.items()}
    if classes_file is not None:
        names, origin = _read_classes(classes_file), f"the class list of {classes_file}"
    else:
        names, origin = sorted(set(parsed["train"][1])), "train's labels"
    index = {c: k for k, c in enumerate(names)}
    out = {}
    for key, (texts, labels, refs) in parsed.items():
        for lab, ref in zip(labels, refs):
            if lab not in index:
                raise DataError(f"{ref}: label outside the class list: {lab!r} is not in "
                                f"{origin} {names}")
        ids = np.asarray([index[lab] for lab in labels], dtype=np.int64)
        out[key] = Source("text", ids, list(names), str(files[key]), key, _texts=texts,
                          _refs=refs, _owns_classes=key == "train")
    return out
