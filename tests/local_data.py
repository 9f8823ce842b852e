"""Small, deterministic on-disk datasets in the formats ``metamoe.data.local_read`` reads.

Import from tests as ``from tests.local_data import ...``: ``tests`` has no ``__init__.py`` and
resolves as a namespace package because the repository root is on ``sys.path`` (the editable
install's ``.pth`` puts it there, and so does ``python -m pytest`` run from the root).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "gif": "GIF"}


def random_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` random grey images, uint8 ``[n, size, size]``."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _pil(img_u8: np.ndarray, mode: str, size=None):
    from PIL import Image

    if mode == "RGB":  # three different channels, so the file is really colour
        img = Image.fromarray(np.stack([img_u8, img_u8[::-1], 255 - img_u8], axis=-1), "RGB")
    elif mode == "L":
        img = Image.fromarray(img_u8, "L")
    else:
        raise ValueError(f"mode {mode!r}: use 'L' or 'RGB'")
    return img if size is None else img.resize(tuple(size), Image.NEAREST)


def _write_class_dirs(base: Path, images_u8, labels, class_names, *, nested: bool, ext: str,
                      mode: str, sizes) -> None:
    for c in class_names:
        (base / c).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images_u8, labels)):
        folder = base / class_names[int(lab)]
        if nested and i % 3:  # 1 or 2 levels of sub-folders for two thirds of the files
            folder = folder / f"sub{i % 2}" / ("deep" if i % 3 == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
        size = None if not sizes else sizes[i % len(sizes)]
        _pil(img, mode, size).save(folder / f"{i:04d}.{ext}", format=_PIL_FORMAT[ext.lower()])


def write_imagefolder(root, images_u8, labels, class_names, *, layout: str = "flat", test=None,
                      ext: str = "png", mode: str = "L", sizes=None) -> Path:
    """Class folders named by ``class_names`` (every one created, even without items).

    ``layout``: ``"flat"`` (``root/<class>/``), ``"nested"`` (files also 1-2 sub-folders deep)
    or ``"split"`` (``root/train/<class>/`` and, with ``test=(images, labels)``,
    ``root/test/<class>/``). ``sizes``: (w, h) sizes to cycle through, so sizes are mixed.
    """
    root = Path(root)
    if layout not in ("flat", "nested", "split"):
        raise ValueError(f"layout {layout!r}")
    if test is not None and layout != "split":
        raise ValueError("test= needs layout='split'")
    kw = dict(nested=layout == "nested", ext=ext, mode=mode, sizes=sizes)
    base = root / "train" if layout == "split" else root
    _write_class_dirs(base, images_u8, labels, class_names, **kw)
    if test is not None:
        _write_class_dirs(root / "test", test[0], test[1], class_names, **kw)
    return root


def write_hf(root, images_u8, labels, class_names, test=None, *, label_kind: str = "classlabel",
             mode: str = "L") -> Path:
    """``save_to_disk`` of a Dataset (or DatasetDict with ``test``) with an Image column
    ``"image"`` and a ``"label"`` column: a ClassLabel (``label_kind="classlabel"``; values
    are cast unchecked, so out-of-range ones can be written), the class name strings
    (``"str"``) or the raw ints (``"int"``)."""
    import datasets

    def build(images, labs):
        labs = [int(v) for v in labs]
        if label_kind == "str":
            labs = [class_names[v] for v in labs]
        ds = datasets.Dataset.from_dict(
            {"image": [_pil(im, mode) for im in images], "label": labs},
            features=datasets.Features({
                "image": datasets.Image(),
                "label": datasets.Value("string" if label_kind == "str" else "int64"),
            }),
        )
        if label_kind == "classlabel":
            ds = ds.cast_column("label", datasets.ClassLabel(names=list(class_names)))
        return ds

    train = build(images_u8, labels)
    obj = train if test is None else datasets.DatasetDict({"train": train,
                                                           "test": build(*test)})
    obj.save_to_disk(str(root))
    return Path(root)


def write_jsonl(root, texts, labels, test=None, classes=None) -> Path:
    """``root/train.jsonl`` (+ ``test.jsonl`` from ``test=(texts, labels)``, + ``classes.txt``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def dump(path, txts, labs):
        lines = [json.dumps({"text": t, "label": lab}) for t, lab in zip(txts, labs)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    dump(root / "train.jsonl", texts, labels)
    if test is not None:
        dump(root / "test.jsonl", *test)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    return root


def truncate_file(path) -> Path:
    """Cut a file to half its bytes (a truncated image)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_coop(root, images_u8, labels, class_names, splits=None, *,
               name: str = "Test") -> Path:
    """A CoOp split: ``root/images/<class>/<i>.jpg`` (RGB, every image) plus
    ``root/split_zhou_<name>.json`` listing ``[relpath, label, classname]`` per split.

    ``splits``: ``{"train": idx, "val": idx, "test": idx}`` (index arrays into ``images_u8``;
    any key may be left out); ``None`` puts every image in train. Returns the json's path.
    """
    root = Path(root)
    rels = []
    for i, (img, lab) in enumerate(zip(images_u8, labels)):
        rel = f"{class_names[int(lab)]}/{i:04d}.jpg"
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        _pil(img, "RGB").save(root / "images" / rel, format="JPEG")
        rels.append(rel)
    if splits is None:
        splits = {"train": np.arange(len(rels))}
    obj = {s: [[rels[int(i)], int(labels[int(i)]), class_names[int(labels[int(i)])]]
               for i in idx] for s, idx in splits.items()}
    path = root / f"split_zhou_{name}.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path
