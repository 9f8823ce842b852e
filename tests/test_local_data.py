"""benchmark.kind=local on the node and the server, in-process: the config, the seed's image
transform, a lazily read pool, a client's own domain and head rows, and refusals that name the
file on the node but only the kind of problem to the server."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from metamoe.clients.node import LocalDataRefused, NodeData, _local_node, localize
from metamoe.clients.private_head import private_head_rows
from metamoe.config import ConfigError, parse_overrides, resolve_config
from metamoe.data import load_benchmark
from metamoe.data.local import LazyInputs, data_problem, image_transform
from metamoe.data.local_read import DataError, read_splits
from metamoe.models.vit import ViT, ViTConfig
from metamoe.training import accuracy
from tests.local_data import random_images, truncate_file, write_hf, write_imagefolder, write_jsonl


def _digits(n: int, classes: int, seed: int = 0, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent images (a bright bar whose row is the class) plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
    for i, c in enumerate(y):
        r = int(c * size / classes)
        x[i, r:r + max(1, size // classes)] = 250
    return x, y


@pytest.fixture()
def fed(tmp_path):
    px, py = _digits(120, 6, seed=1)
    pool = write_imagefolder(tmp_path / "pool", px, py, [f"p{i}" for i in range(6)])
    cx, cy = _digits(90, 3, seed=2, size=20)
    client = write_imagefolder(tmp_path / "c0", cx, cy, ["alpha", "beta", "gamma"],
                               layout="nested", ext="PNG", mode="RGB",
                               sizes=[(20, 20), (33, 17)])
    hx, hy = _digits(60, 4, seed=3)
    hf = write_hf(tmp_path / "c1", hx, hy, ["w", "x", "y", "z"], test=_digits(40, 4, seed=4))
    ov = (f"benchmark.client_data=[{client},{hf}] benchmark.pool_data={pool} "
          "benchmark.val_fraction=0.2 model.dim=16 model.heads=2 model.depth=1 "
          "model.mlp_hidden=32 model.stem_channels=4")
    cfg = resolve_config({"benchmark": "local", "overrides": ov,
                          "cache-dir": str(tmp_path / "cache")})
    return cfg, tmp_path


def test_config_names_clients_and_needs_a_pool(tmp_path):
    cfg = resolve_config({"benchmark": "local", "overrides":
                          "benchmark.client_data=[/a,/b,/c] benchmark.pool_data=/p"})
    assert list(cfg.benchmark.domains) == ["client-0", "client-1", "client-2"]
    with pytest.raises(ConfigError, match="pool_data"):
        resolve_config({"benchmark": "local", "overrides": "benchmark.client_data=[/a,/b]"})
    with pytest.raises(ConfigError, match="client_data"):
        resolve_config({"benchmark": "local", "overrides": "benchmark.pool_data=/p"})
    dep = resolve_config({"benchmark": "local", "overrides":
                          "benchmark.pool_data=/p benchmark.num_clients=4"})
    assert len(dep.benchmark.domains) == 4  # a deployment: the nodes bring their data
    with pytest.raises(ConfigError, match="test_fraction"):
        resolve_config({"benchmark": "local", "overrides": "benchmark.client_data=[/a,/b] "
                        "benchmark.pool_data=/p benchmark.test_fraction=1.5"})
    assert parse_overrides("a=1,b=[x,y] c=2") == ["a=1", "b=[x,y]", "c=2"]
    assert parse_overrides("'b=[/my data/a,/b]'") == ["b=[/my data/a,/b]"]  # quoted spaces


def test_seed_transform_takes_any_image():
    from PIL import Image

    tf = image_transform()
    for img in (Image.new("L", (13, 40), 255), Image.new("RGB", (64, 64), (0, 0, 0)),
                Image.new("RGBA", (28, 28), (10, 10, 10, 0)), Image.new("P", (5, 7))):
        x = tf(img)
        assert x.shape == (1, 28, 28) and x.dtype == np.float32
        assert -1.0 <= x.min() <= x.max() <= 1.0
    assert tf(Image.new("L", (9, 9), 255)).min() == 1.0  # white -> +1, as the embedded data


def test_pool_is_read_lazily(fed, monkeypatch):
    cfg, _ = fed
    bench = load_benchmark(cfg)
    assert isinstance(bench.pool_x, LazyInputs) and len(bench.pool_x) == 120
    assert bench.class_names == [f"p{i}" for i in range(6)] and bench.domains == []
    loads = []
    real = bench.pool_x.source.load
    monkeypatch.setattr(bench.pool_x.source, "load", lambda i: loads.append(i) or real(i))
    x = bench.pool_x[np.array([5, 17, 3])]
    assert x.shape == (3, 1, 28, 28) and sorted(loads) == [3, 5, 17]


def test_client_domain_head_rows_and_names_stay_local(fed):
    cfg, _ = fed
    bench = load_benchmark(cfg)
    node = _local_node(cfg, 0, bench, {})
    dom = node.domain
    assert node.name == "client-0" and node.private["class_names"] == ["alpha", "beta", "gamma"]
    assert dom.classes == [6, 7, 8] and set(np.unique(dom.y_train)) == {6, 7, 8}
    assert dom.x_train.shape[1:] == (1, 28, 28)
    n = node.private
    assert n["n_train"] + n["n_test"] + n["n_val"] == 90 and n["n_val"] >= 15
    # test and validation are seeded fractions, disjoint from train
    tr = {x.tobytes() for x in dom.x_train}
    assert not any(x.tobytes() in tr for x in n["x_val"])
    # the deployed node's own path wins over client_data
    other = _local_node(cfg, 0, bench, {"data": cfg.benchmark.client_data[1], "format": "hf"})
    assert other.domain.classes == [6, 7, 8, 9] and other.private["n_test"] == 40

    torch.manual_seed(0)
    seed = ViT(ViTConfig(dim=16, heads=2, depth=1, mlp_hidden=32, stem_channels=4,
                         num_classes=6))
    w, b = private_head_rows(seed, dom)
    w2, b2 = private_head_rows(seed, dom)
    assert torch.equal(w, w2) and torch.equal(b, b2) and w.shape == (3, 16)  # deterministic
    m0 = localize(node, copy.deepcopy(seed), seed)
    assert m0.head.out_features == 9 and m0.cfg.num_classes == 9
    assert torch.equal(m0.head.weight[:6], seed.head.weight)  # M0's own rows untouched
    assert not any(p.requires_grad for p in m0.head.parameters())
    # the probe fits the client's classes on M0's features (far above chance 1/3)
    assert accuracy(m0, dom.x_train, dom.y_train, dom.classes) > 0.6
    assert localize(NodeData(cfg, 0, bench, "x", dom, None), seed, seed) is seed


@pytest.mark.parametrize("kind", ["truncated", "single", "jsonl"])
def test_bad_client_data_is_refused_naming_only_the_kind(fed, kind, caplog):
    cfg, tmp = fed
    bench = load_benchmark(cfg)
    if kind == "truncated":
        x, y = _digits(30, 3)
        root = write_imagefolder(tmp / "bad", x, y, ["a", "b", "c"])
        bad = sorted((root / "b").iterdir())[2]
        truncate_file(bad)
        want = "unreadable or truncated image"
    elif kind == "single":
        root = write_imagefolder(tmp / "bad", random_images(25), np.zeros(25, int), ["only"])
        bad, want = root, "a single class"
    else:
        root = write_jsonl(tmp / "bad", ["fine text", "more"], ["a", "b"])
        with open(root / "train.jsonl", "a") as f:
            f.write('{"text": "no label here"}\n')
        bad, want = root / "train.jsonl", "malformed JSONL line"
    with pytest.raises(LocalDataRefused) as err:
        _local_node(cfg, 1, bench, {"data": str(root)})
    assert want in str(err.value) and str(tmp) not in str(err.value)
    assert str(bad.name) not in str(err.value)
    assert str(bad) in caplog.text or bad.name in caplog.text  # the node's own log names it


def test_data_problem_names_no_path():
    for msg, kind in (("/x/y/a.png: unreadable image (OSError: truncated)",
                       "an unreadable or truncated image"),
                      ("/x/cls: empty class folder: no image file", "an empty class folder"),
                      ("/d/train.jsonl:3: invalid JSON (Expecting value at column 1)",
                       "a malformed JSONL line"),
                      ("/d/test/zebra: label outside the class list: class 'zebra'",
                       "a label outside the class list")):
        assert data_problem(DataError(msg)) == kind


def test_text_pool_and_client_from_jsonl(tmp_path):
    pool = write_jsonl(tmp_path / "pool", [f"public sentence {i}" for i in range(60)],
                       ["news", "sport", "tech"] * 20)
    client = write_jsonl(tmp_path / "c", [f"private note {i}" for i in range(50)],
                         ["yes", "no"] * 25)
    cfg = resolve_config({"benchmark": "local_text", "cache-dir": str(tmp_path / "cache"),
                          "overrides": f"benchmark.client_data=[{client},{client}] "
                                       f"benchmark.pool_data={pool} model.layers=1 "
                                       "model.max_len=16"})
    bench = load_benchmark(cfg)
    assert bench.pool_x.shape == (60, 16) and bench.pool_x.dtype == np.int64
    assert bench.class_names == ["news", "sport", "tech"]
    node = _local_node(cfg, 0, bench, {})
    assert node.domain.classes == [3, 4] and node.domain.x_train.shape[1] == 16
    assert node.private["n_test"] == 10  # the seeded 20 % of 50
    splits = read_splits(client)
    assert len(splits["train"]) == 50


def test_hub_ids_as_client_data_and_pool(fed, monkeypatch):
    """``owner/name`` that is not a local path is read with datasets.load_dataset (offline
    here: the hub is replaced by the same data saved to disk) without a copy of it."""
    import datasets

    cfg, tmp = fed
    hx, hy = _digits(40, 4, seed=5)
    px, py = _digits(60, 3, seed=6)
    local = {"org/client-set": write_hf(tmp / "hub-c", hx, hy, ["a", "b", "c", "d"],
                                        test=_digits(20, 4, seed=7)),
             "org/pool-set": write_hf(tmp / "hub-p", px, py, ["u", "v", "w"])}
    calls = []

    def fake_load(name, split=None):
        calls.append((name, split))
        obj = datasets.load_from_disk(str(local[name]))
        return obj if split is None or not isinstance(obj, datasets.DatasetDict) else obj[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    hub = resolve_config({"benchmark": "local", "cache-dir": str(tmp / "cache"), "overrides":
                          "benchmark.client_data=[org/client-set,org/client-set] "
                          "benchmark.pool_data=org/pool-set model.dim=16 model.heads=2"})
    bench = load_benchmark(hub)
    assert bench.class_names == ["u", "v", "w"] and len(bench.pool_x) == 60
    node = _local_node(hub, 0, bench, {})
    assert node.private["class_names"] == ["a", "b", "c", "d"] and node.private["n_test"] == 20
    assert ("org/pool-set", "train") in calls and ("org/client-set", None) in calls
