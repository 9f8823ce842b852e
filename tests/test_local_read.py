"""metamoe.data.local_read: reading and validating a client's own on-disk data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from metamoe.data.local_read import (
    IMAGE_EXTENSIONS,
    DataError,
    detect_format,
    read_splits,
    validate,
)
from tests.local_data import (
    random_images,
    truncate_file,
    write_hf,
    write_imagefolder,
    write_jsonl,
)

CLASSES = ["cat", "dog", "owl"]


def _data(n=24, seed=0, size=8):
    return random_images(n, size, seed), np.arange(n) % 3


def _raises(match_path, fn, *args, contains=()):
    with pytest.raises(DataError) as e:
        fn(*args)
    msg = str(e.value)
    assert str(match_path) in msg, msg
    for part in contains:
        assert part in msg, msg
    return msg


def test_truncated_images_are_not_tolerated_by_default():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert ".png" in IMAGE_EXTENSIONS and issubclass(DataError, ValueError)


# ------------------------------------------------------------------------ imagefolder
@pytest.mark.parametrize("ext,mode", [("png", "L"), ("jpg", "RGB"), ("PNG", "RGB"),
                                      ("JPG", "L")])
@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_imagefolder_reads(tmp_path, ext, mode, layout):
    imgs, labels = _data()
    sizes = [(8, 8), (12, 10), (5, 9)]
    write_imagefolder(tmp_path, imgs, labels, CLASSES, layout=layout, ext=ext, mode=mode,
                      sizes=sizes)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()
    assert detect_format(tmp_path) == "imagefolder"
    splits = read_splits(tmp_path)
    assert list(splits) == ["train"]
    src = splits["train"]
    assert src.modality == "image" and src.class_names == CLASSES and len(src) == 24
    assert src.labels.dtype == np.int64 and np.bincount(src.labels).tolist() == [8, 8, 8]
    files = [src.describe(i) for i in range(len(src))]
    assert files == sorted(files) and all(f.startswith(str(tmp_path)) for f in files)
    assert all(f.lower().endswith("." + ext.lower()) for f in files)
    if layout == "nested":
        depths = {len(f[len(str(tmp_path)):].split("/")) for f in files}
        assert depths == {3, 4, 5}  # class/file, class/sub/file, class/sub/deep/file
    validate(src)
    got_sizes = {src.load(i).size for i in range(len(src))}
    assert got_sizes == set(sizes)
    im = src.load(0)
    assert isinstance(im, Image.Image) and im.mode == mode
    if ext.lower() == "png" and mode == "L":
        k = int(files[0].rsplit("/", 1)[1].split(".")[0])  # files are named by their index
        ref = Image.fromarray(imgs[k]).resize(sizes[k % 3], Image.NEAREST)
        assert np.array_equal(np.asarray(im), np.asarray(ref))
    cls_of = [f[len(str(tmp_path)) + 1:].split("/")[0] for f in files]
    assert [CLASSES[k] for k in src.labels] == cls_of


def test_imagefolder_split_layout(tmp_path):
    imgs, labels = _data()
    timgs, tlabels = _data(9, seed=1)
    write_imagefolder(tmp_path, imgs, labels, CLASSES, layout="split", test=(timgs, tlabels))
    for c, name in (("dog", "v.bmp"), ("owl", "v.gif")):
        (tmp_path / "validation" / c).mkdir(parents=True)
        Image.fromarray(timgs[0]).save(tmp_path / "validation" / c / name)
    splits = read_splits(tmp_path, fmt="imagefolder")
    assert sorted(splits) == ["test", "train", "val"]
    assert len(splits["train"]) == 24 and len(splits["test"]) == 9 and len(splits["val"]) == 2
    assert splits["test"].class_names == CLASSES == splits["val"].class_names
    assert splits["val"].labels.tolist() == [1, 2]
    assert splits["val"].load(1).mode == "P"
    for s in splits.values():
        validate(s)


def test_imagefolder_test_with_fewer_classes_uses_train_names(tmp_path):
    imgs, labels = _data()
    write_imagefolder(tmp_path, imgs, labels, CLASSES, layout="split")
    (tmp_path / "test" / "owl").mkdir(parents=True)
    (tmp_path / "test" / "dog").mkdir(parents=True)
    for c in ("owl", "dog"):
        Image.fromarray(imgs[0]).save(tmp_path / "test" / c / "t.png")
    test = read_splits(tmp_path)["test"]
    assert test.class_names == CLASSES and test.labels.tolist() == [1, 2]
    validate(test)


def test_imagefolder_empty_root(tmp_path):
    _raises(tmp_path, read_splits, tmp_path, contains=["empty folder"])
    Image.fromarray(random_images(1)[0]).save(tmp_path / "loose.png")
    _raises(tmp_path, read_splits, tmp_path, contains=["1 image files directly"])


def test_imagefolder_empty_class_folder(tmp_path):
    imgs, labels = _data()
    write_imagefolder(tmp_path, imgs, labels, CLASSES + ["emu"], layout="nested")
    (tmp_path / "emu" / "deeper").mkdir()
    (tmp_path / "emu" / "deeper" / "readme.txt").write_text("no images here")
    _raises(tmp_path / "emu", read_splits, tmp_path, contains=["empty class folder"])


def test_imagefolder_test_class_outside_train(tmp_path):
    imgs, labels = _data()
    write_imagefolder(tmp_path, imgs, labels, CLASSES, layout="split", test=(imgs, labels))
    (tmp_path / "test" / "yak").mkdir()
    Image.fromarray(imgs[0]).save(tmp_path / "test" / "yak" / "y.png")
    _raises(tmp_path / "test" / "yak", read_splits, tmp_path,
            contains=["label outside the class list", "'yak'"])


def test_imagefolder_unreadable_image(tmp_path):
    imgs, labels = _data()
    write_imagefolder(tmp_path, imgs, labels, CLASSES)
    bad = tmp_path / "dog" / "fake.png"
    bad.write_text("this is a text file, not a PNG")
    src = read_splits(tmp_path)["train"]  # listing does not decode
    _raises(bad, validate, src, contains=["unreadable image"])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_imagefolder_truncated_image(tmp_path, ext):
    imgs, labels = _data(size=12)
    write_imagefolder(tmp_path, imgs, labels, CLASSES, ext=ext, mode="RGB")
    bad = truncate_file(tmp_path / "owl" / f"0005.{ext}")
    src = read_splits(tmp_path)["train"]
    _raises(bad, validate, src, contains=["unreadable image"])
    with pytest.raises(DataError):
        src.load([src.describe(i) for i in range(len(src))].index(str(bad)))


def test_single_class(tmp_path):
    imgs, _ = _data(6)
    write_imagefolder(tmp_path, imgs, np.zeros(6, int), ["cat"])
    src = read_splits(tmp_path)["train"]
    _raises(tmp_path, validate, src, contains=["single class"])
    write_jsonl(tmp_path / "t", ["a", "b"], ["x", "x"])
    _raises(tmp_path / "t" / "train.jsonl", validate, read_splits(tmp_path / "t")["train"],
            contains=["single class"])


def test_subset(tmp_path):
    imgs, labels = _data()
    write_imagefolder(tmp_path, imgs, labels, CLASSES)
    src = read_splits(tmp_path)["train"]
    idx = np.random.default_rng(0).permutation(len(src))[:10]
    sub = src.subset(idx)
    assert len(sub) == 10 and sub.class_names == CLASSES
    assert sub.labels.tolist() == src.labels[idx].tolist()
    assert [sub.describe(i) for i in range(10)] == [src.describe(int(k)) for k in idx]
    assert np.array_equal(np.asarray(sub.load(3)), np.asarray(src.load(int(idx[3]))))
    validate(sub)
    only_cats = src.subset(src.labels == 0)  # a boolean mask works too
    _raises(tmp_path, validate, only_cats, contains=["single class"])


def test_validate_refuses_a_class_without_items(tmp_path):
    write_jsonl(tmp_path, ["a", "b", "c"], ["x", "y", "x"], classes=["x", "y", "z"])
    src = read_splits(tmp_path)["train"]
    _raises(tmp_path / "train.jsonl", validate, src, contains=["'z' has no items"])


# --------------------------------------------------------------------------------- hf
def test_hf_dataset_dict(tmp_path):
    imgs, labels = _data()
    timgs, tlabels = _data(6, seed=2)
    root = write_hf(tmp_path / "hf", imgs, labels, CLASSES, test=(timgs, tlabels))
    assert detect_format(root) == "hf"
    splits = read_splits(root)
    assert sorted(splits) == ["test", "train"]
    tr, te = splits["train"], splits["test"]
    assert tr.modality == "image" and tr.class_names == CLASSES and te.class_names == CLASSES
    assert tr.labels.tolist() == labels.tolist() and te.labels.tolist() == tlabels.tolist()
    im = tr.load(5)
    assert isinstance(im, Image.Image) and np.array_equal(np.asarray(im), imgs[5])
    assert tr.describe(5) == f"{root} (split train) row 5"
    sub = tr.subset(np.array([7, 2]))
    assert sub.describe(0).endswith("row 7") and np.array_equal(np.asarray(sub.load(1)), imgs[2])
    validate(tr)
    validate(te)


@pytest.mark.parametrize("kind", ["str", "int"])
def test_hf_plain_dataset_string_and_int_labels(tmp_path, kind):
    imgs, _ = _data(8)
    if kind == "str":  # indices into the names below; only "7" and "10" present
        labels = np.array([2, 0] * 4)
    else:  # the raw int values themselves
        labels = np.array([7, 10] * 4)
    root = write_hf(tmp_path, imgs, labels, ["10", "2", "7"], label_kind=kind, mode="RGB")
    src = read_splits(root, fmt="hf")["train"]
    # str: sorted as strings ("10" < "7"); int: sorted as numbers (7 < 10)
    assert src.class_names == (["10", "7"] if kind == "str" else ["7", "10"])
    want = [src.class_names.index(v) for v in ("7", "10") * 4]
    assert src.labels.tolist() == want
    assert src.load(0).mode == "RGB"
    validate(src)


def test_hf_text_dataset(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"],
                                             "labels": ["pos", "neg", "pos"]}),
        "validation": datasets.Dataset.from_dict({"sentence": ["meh"], "labels": ["neg"]}),
    })
    dd.save_to_disk(str(tmp_path))
    splits = read_splits(tmp_path)
    assert sorted(splits) == ["train", "val"]
    assert splits["train"].modality == "text" and splits["train"].class_names == ["neg", "pos"]
    assert splits["train"].load(1) == "bad" and splits["val"].labels.tolist() == [0]
    validate(splits["train"])


@pytest.mark.parametrize("bad_value", [-1, 3, 99])
def test_hf_classlabel_out_of_range(tmp_path, bad_value):
    imgs, labels = _data(9)
    labels = labels.copy()
    labels[4] = bad_value
    root = write_hf(tmp_path, imgs, labels, CLASSES)
    _raises(root, read_splits, root, contains=["split train", "row 4", "outside"])


def test_hf_test_label_outside_train(tmp_path):
    imgs, labels = _data(9)
    tlabels = np.array([0, 1, 3])  # class 3 ("emu") is not among train's labels
    root = write_hf(tmp_path, imgs, labels, CLASSES + ["emu"], test=(imgs[:3], tlabels),
                    label_kind="str")
    _raises(root, read_splits, root, contains=["split test", "row 2", "'emu'",
                                                "label outside the class list"])


def test_hf_not_a_dataset(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    assert detect_format(tmp_path) == "hf"
    _raises(tmp_path, read_splits, tmp_path, contains=["not a saved Hugging Face dataset"])


# ------------------------------------------------------------------------------ jsonl
def test_jsonl_dir(tmp_path):
    texts = [f"text number {i}" for i in range(12)]
    labels = ["b", "a", 3] * 4
    write_jsonl(tmp_path, texts, labels, test=(["x", "y"], ["a", 3]))
    (tmp_path / "validation.jsonl").write_text('\n{"text": "v", "label": "b"}\n\n')
    assert detect_format(tmp_path) == "jsonl"
    splits = read_splits(tmp_path)
    assert sorted(splits) == ["test", "train", "val"]
    tr = splits["train"]
    assert tr.modality == "text" and tr.class_names == ["3", "a", "b"] and len(tr) == 12
    assert tr.labels.tolist()[:3] == [2, 1, 0] and tr.load(4) == "text number 4"
    assert tr.describe(4) == f"{tmp_path / 'train.jsonl'}:5"
    assert splits["test"].labels.tolist() == [1, 0]
    assert splits["val"].describe(0) == f"{tmp_path / 'validation.jsonl'}:2"
    validate(tr)
    sub = tr.subset(np.array([4, 0]))
    assert sub.load(0) == "text number 4" and sub.describe(1).endswith("train.jsonl:1")


def test_jsonl_file_and_classes_txt(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                         for t, lab in [("a", "x"), ("b", "y")]))
    assert detect_format(f) == "jsonl"
    assert list(read_splits(f)) == ["train"]
    root = write_jsonl(tmp_path / "d", ["a", "b", "c"], ["y", "x", "y"],
                       classes=["y", "", "x", "z"])
    src = read_splits(root)["train"]
    assert src.class_names == ["y", "x", "z"] and src.labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize("line,what", [
    ('{"text": "a", "label": "x"', "invalid JSON"),
    ('["a", "x"]', "not a JSON object"),
    ('{"label": "x"}', "missing or empty 'text'"),
    ('{"text": "  ", "label": "x"}', "missing or empty 'text'"),
    ('{"text": "a"}', "missing 'label'"),
    ('{"text": "a", "label": 1.5}', "'label' must be"),
])
def test_jsonl_malformed_line(tmp_path, line, what):
    root = write_jsonl(tmp_path, ["a", "b"], ["x", "y"])
    with open(root / "train.jsonl", "a") as fh:
        fh.write("\n" + line + "\n")  # line 3 is blank, the bad line is line 4
    _raises(f"{root / 'train.jsonl'}:4:", read_splits, root, contains=[what])


def test_jsonl_label_outside_classes_txt(tmp_path):
    root = write_jsonl(tmp_path, ["a", "b", "c"], ["x", "y", "w"], classes=["x", "y"])
    _raises(f"{root / 'train.jsonl'}:3:", read_splits, root,
            contains=["label outside the class list", "'w'", "classes.txt"])


def test_jsonl_test_label_outside_train(tmp_path):
    root = write_jsonl(tmp_path, ["a", "b"], ["x", "y"], test=(["c", "d"], ["y", "q"]))
    _raises(f"{root / 'test.jsonl'}:2:", read_splits, root,
            contains=["label outside the class list", "'q'"])


# -------------------------------------------------------------------------- general
def test_detect_format_and_errors(tmp_path):
    missing = tmp_path / "nope"
    _raises(missing, detect_format, missing, contains=["no such file or folder"])
    _raises(missing, read_splits, missing)
    (tmp_path / "x.csv").write_text("a,b")
    _raises(tmp_path / "x.csv", detect_format, tmp_path / "x.csv", contains=["not .jsonl"])
    (tmp_path / "d").mkdir()
    assert detect_format(tmp_path / "d") == "imagefolder"
    (tmp_path / "d" / "dataset_dict.json").write_text("{}")
    assert detect_format(tmp_path / "d") == "hf"
    with pytest.raises(DataError, match="auto, imagefolder, hf, jsonl"):
        read_splits(tmp_path, fmt="csv")
