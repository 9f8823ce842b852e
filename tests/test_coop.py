"""metamoe.data.coop: CoOp split_zhou_<Name>.json files as a local data format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from metamoe.data.coop import read_coop
from metamoe.data.local_read import DataError, detect_format, read_splits, validate
from tests.local_data import random_images, write_coop

CLASSES = ["abyssinian", "golden retriever", "pug"]


def _write(tmp_path, n=18, **kw):
    imgs, labels = random_images(n, 8, seed=1), np.arange(n) % 3
    idx = np.arange(n)
    splits = {"train": idx[:9], "val": idx[9:12], "test": idx[12:]}
    return write_coop(tmp_path, imgs, labels, CLASSES, {**splits, **kw}), labels


def _raises(match_path, fn, *args, contains=()):
    with pytest.raises(DataError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg.startswith(str(match_path)), msg
    for part in contains:
        assert part in msg, msg
    return msg


def _edit(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("via", ["json", "folder"])
def test_reads_json_or_folder(tmp_path, via):
    js, labels = _write(tmp_path)
    assert js == tmp_path / "split_zhou_Test.json"
    path = js if via == "json" else tmp_path
    assert detect_format(path) == "coop"
    out = read_splits(path)
    assert out.keys() == {"train", "val", "test"}
    assert {k: len(s) for k, s in out.items()} == {"train": 9, "val": 3, "test": 6}
    for key, s in out.items():
        assert s.split == key and s.modality == "image" and s.class_names == CLASSES
        assert s.where == str(js) and s._owns_classes == (key == "train")
        assert all(f.startswith(str(tmp_path / "images")) for f in s._files)
    tr = out["train"]
    assert tr.labels.dtype == np.int64 and tr.labels.tolist() == labels[:9].tolist()
    assert tr._files[1] == str(tmp_path / "images" / "golden retriever" / "0001.jpg")
    im = tr.load(0)
    assert isinstance(im, Image.Image) and im.size == (8, 8) and im.mode == "RGB"
    validate(tr)
    assert read_splits(path, fmt="coop")["test"].labels.tolist() == labels[12:].tolist()
    sub = out["test"].subset(np.array([0, 2]))
    assert sub.class_names == CLASSES and len(sub) == 2


def test_image_root_rules(tmp_path):
    js, _ = _write(tmp_path)
    # no images/: relpaths are read relative to the json's folder
    (tmp_path / "images").rename(tmp_path / "flat")
    _edit(js, lambda o: [e.__setitem__(0, "flat/" + e[0]) for s in o.values() for e in s])
    assert read_coop(js)["train"]._files[0] == str(tmp_path / "flat" / "abyssinian" / "0000.jpg")
    # EuroSAT's 2750/ root
    _edit(js, lambda o: [e.__setitem__(0, e[0][5:]) for s in o.values() for e in s])
    (tmp_path / "flat").rename(tmp_path / "2750")
    assert read_coop(tmp_path)["val"]._files[0].startswith(str(tmp_path / "2750") + "/")
    # an images/ folder that does not hold the listed files does not win over 2750/
    (tmp_path / "images").mkdir()
    assert read_coop(js)["train"]._files[0].startswith(str(tmp_path / "2750") + "/")


def test_missing_or_empty_val_and_test_are_left_out(tmp_path):
    js, _ = _write(tmp_path, val=[])
    _edit(js, lambda o: o.pop("test"))
    out = read_splits(js)
    assert out.keys() == {"train"} and len(out["train"]) == 9


def test_class_names_come_from_all_splits(tmp_path):
    # label 2 ("pug") appears only in test: it is still a class, train does not own it empty
    imgs, labels = random_images(6, 8), np.array([0, 1, 0, 1, 2, 2])
    js = write_coop(tmp_path, imgs, labels, CLASSES, {"train": [0, 1, 2, 3], "test": [4, 5]})
    out = read_coop(js)
    assert out["train"].class_names == CLASSES and out["test"].labels.tolist() == [2, 2]
    _raises(js, validate, out["train"], contains=["'pug' has no items"])


def test_missing_image(tmp_path):
    js, _ = _write(tmp_path)
    gone = tmp_path / "images" / "pug" / "0014.jpg"
    gone.unlink()
    _raises(gone, read_splits, tmp_path, contains=[str(js), "missing image", "split test"])


@pytest.mark.parametrize("bad", [["a.jpg", 0], ["a.jpg", "0", "x"], ["a.jpg", 1.0, "x"],
                                 [3, 0, "x"], ["a.jpg", 0, None], ["a.jpg", True, "x"],
                                 "a.jpg", ["", 0, "x"]])
def test_bad_triple(tmp_path, bad):
    js, _ = _write(tmp_path)
    _edit(js, lambda o: o["val"].__setitem__(1, bad))
    _raises(js, read_splits, js, contains=["(split val, entry 1)", "triple"])


def test_split_not_a_list(tmp_path):
    js, _ = _write(tmp_path)
    _edit(js, lambda o: o.__setitem__("test", {"a": 1}))
    _raises(js, read_coop, js, contains=["'test' is not a list"])


def test_inconsistent_classname(tmp_path):
    js, _ = _write(tmp_path)
    _edit(js, lambda o: o["test"][4].__setitem__(2, "beagle"))
    _raises(js, read_coop, js, contains=["(split test, entry 4)", "'beagle'", "label 1"])


def test_labels_must_be_0_to_c_minus_1(tmp_path):
    js, _ = _write(tmp_path)
    _edit(js, lambda o: [e.__setitem__(1, 5) for e in o["train"] if e[1] == 2])
    _edit(js, lambda o: [e.__setitem__(1, 5) for s in ("val", "test") for e in o[s] if e[1] == 2])
    _raises(js, read_coop, js, contains=["0..5", "[2, 3, 4]"])
    _edit(js, lambda o: o["train"][0].__setitem__(1, -1))
    _raises(js, read_coop, js, contains=["(split train, entry 0)", "negative label"])


def test_same_classname_for_two_labels(tmp_path):
    js, _ = _write(tmp_path)
    _edit(js, lambda o: [e.__setitem__(2, "pug") for s in o.values() for e in s if e[1] == 0])
    _raises(js, read_coop, js, contains=["'pug'", "labels 0 and 2"])


@pytest.mark.parametrize("text,what", [('{"train": [["a.jpg", 0, "x"]', "invalid JSON"),
                                       ("[1, 2]", "not a JSON object"),
                                       ('{"val": []}', "no 'train' entries"),
                                       ('{"train": []}', "no 'train' entries")])
def test_malformed_json(tmp_path, text, what):
    js = tmp_path / "split_zhou_Bad.json"
    js.write_text(text)
    _raises(js, read_splits, tmp_path, contains=[what])


def test_folder_needs_exactly_one_split_json(tmp_path):
    _write(tmp_path)
    (tmp_path / "split_zhou_Other.json").write_text("{}")
    _raises(tmp_path, read_coop, tmp_path, contains=["found 2", "split_zhou_Other.json"])
    (tmp_path / "sub").mkdir()
    _raises(tmp_path / "sub", read_splits, tmp_path / "sub", "coop", contains=["found 0"])
    _raises(tmp_path / "nope", read_coop, tmp_path / "nope", contains=["no such file"])


def test_detect_format_keeps_other_formats(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    _raises(tmp_path / "x.csv", detect_format, tmp_path / "x.csv", contains=["not .jsonl"])
    (tmp_path / "x.json").write_text("{}")
    assert detect_format(tmp_path / "x.json") == "coop"
    assert detect_format(tmp_path) == "imagefolder"  # a json not named split_zhou_*
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "b"}\n')
    assert detect_format(tmp_path) == "jsonl"
