"""The one loop on map-style Datasets (metamoe/data/dataset.py) gives exactly what it gives on
in-memory arrays, on the tiny benchmark: the pool's embeddings under M0 and so the proxy
picks, an expert's trained LoRA, and accuracies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from metamoe import device
from metamoe.config import resolve_config
from metamoe.data import client_partition, load_benchmark
from metamoe.data.dataset import ArrayDataset
from metamoe.models.lora import inject_ffn_lora, lora_state_dict
from metamoe.proxy.select import select_proxies
from metamoe.proxy.sketch import fit_logistic_sketch
from metamoe.server.seed import get_seed_model
from metamoe.training import accuracy, features, seeded, train


class LazyItems(Dataset):
    """Items one at a time, as a decoding dataset gives them (no batched fetch)."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        xi = torch.from_numpy(np.array(self.x[i]))
        return xi if self.y is None else (xi, torch.tensor(int(self.y[i])))


@pytest.fixture(scope="module")
def tiny(cache_dir):
    cfg = resolve_config({"benchmark": "tiny", "cache-dir": cache_dir})
    bench = load_benchmark(cfg)
    seed, pool, _ = get_seed_model(cfg, bench)
    return cfg, bench, seed, pool


def test_pool_embeddings_and_picks_are_the_same(tiny):
    cfg, bench, seed, pool = tiny
    lazy = features(seed, LazyItems(bench.pool_x), cfg.select.embedding)
    assert np.array_equal(lazy, features(seed, bench.pool_x, cfg.select.embedding))
    sketches = {}
    for p in range(2):
        _, dom = client_partition(cfg, bench, p)
        pos = features(seed, LazyItems(dom.x_train), cfg.select.embedding)
        sketches[dom.name] = fit_logistic_sketch(pos, lazy[:len(pos)], l2=cfg.sketch.l2, seed=p)
    picks = {name: select_proxies(emb, sketches, n=cfg.select.n, m=cfg.select.m, seed=0)
             for name, emb in (("lazy", lazy), ("arrays", pool))}
    for c in sketches:
        assert list(picks["lazy"][c].indices) == list(picks["arrays"][c].indices)


def test_training_and_accuracy_are_the_same(tiny):
    cfg, bench, seed, _ = tiny
    _, dom = client_partition(cfg, bench, 0)
    ec = cfg.expert
    with seeded(7):
        base = inject_ffn_lora(copy.deepcopy(seed), ec.rank, ec.alpha)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    train(a, dom.x_train, dom.y_train, ec, seed=3)
    train(b, LazyItems(dom.x_train, dom.y_train), None, ec, seed=3)
    for k, v in lora_state_dict(a).items():
        assert torch.equal(v, lora_state_dict(b)[k]), k
    acc = accuracy(a, dom.x_test, dom.y_test, dom.classes)
    assert acc == accuracy(b, LazyItems(dom.x_test, dom.y_test), None, dom.classes)
    assert acc == accuracy(a, ArrayDataset(dom.x_test, dom.y_test), None, dom.classes)


def test_dataloader_workers_give_the_same_batches(tiny):
    cfg, bench, seed, _ = tiny
    x = bench.pool_x[:600]
    with device.use(device.Runtime(workers=2)):
        lazy = features(seed, LazyItems(x), "cls", batch_size=128)
    assert np.array_equal(lazy, features(seed, x, "cls", batch_size=128))
