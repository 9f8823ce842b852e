"""The validation split (``benchmark.val_fraction``, ``benchmark.eval_split``): carved from each
domain's train split, seeded, never trained on, and what clients evaluate on with
``eval_split=val`` (``metamoe.compare --split val``)."""

import hashlib

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from metamoe.clients.node import node_data
from metamoe.config import ConfigError, resolve_config
from metamoe.data import client_partition, load_benchmark
from metamoe.data.vision import build_vision_benchmark, carve_val


def _hashes(x):
    return {hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in x}


def test_carve_val_takes_val_from_the_back_and_train_from_the_front():
    idx = np.arange(100)[::-1]
    tr, va = carve_val(idx, 0.1)
    assert va.tolist() == list(range(9, -1, -1)) and tr.tolist() == list(range(99, 9, -1))
    tr2, va2 = carve_val(idx, 0.1, max_train=30, max_val=4)
    assert tr2.tolist() == tr[:30].tolist() and va2.tolist() == idx[-4:].tolist()
    assert carve_val(idx, 0.0)[1].size == 0 and carve_val(idx, 0.0)[0].size == 100
    assert carve_val(np.arange(3), 0.001)[1].size == 1  # a positive fraction holds out one
    assert carve_val(np.arange(0), 0.1)[1].size == 0


def test_vision_val_is_disjoint_seeded_and_leaves_the_rest_unchanged():
    full = build_vision_benchmark(val_fraction=0.1)
    plain = build_vision_benchmark()
    for d, p in zip(full.domains, plain.domains, strict=True):
        assert len(d.x_val) == round(0.1 * len(p.x_train)) and len(d.y_val) == len(d.x_val)
        assert len(d.x_train) == len(p.x_train) - len(d.x_val)
        tr, va, te = _hashes(d.x_train), _hashes(d.x_val), _hashes(d.x_test)
        assert not va & tr and not va & te and not va & _hashes(full.pool_x), d.name
        assert va | tr <= _hashes(p.x_train) and np.array_equal(d.x_test, p.x_test)
        assert set(np.unique(d.y_val)) <= set(d.classes)
    assert np.array_equal(full.pool_x, plain.pool_x)


def test_tiny_train_sets_are_the_same_with_or_without_val():
    """max_train below the split's size: train is its front, val its back."""
    a = load_benchmark(resolve_config({"benchmark": "tiny"}))
    b = load_benchmark(resolve_config({"benchmark": "tiny",
                                       "overrides": "benchmark.val_fraction=0"}))
    for d, e in zip(a.domains, b.domains, strict=True):
        assert len(d.x_val) == 100 and len(e.x_val) == 0  # 10 %, at most max_test=100
        assert np.array_equal(d.x_train, e.x_train) and np.array_equal(d.x_test, e.x_test)
        assert not _hashes(d.x_val) & _hashes(d.x_train)


def test_text_val_is_disjoint_from_train_and_test():
    bench = load_benchmark(resolve_config({"benchmark": "tiny_text"}))
    for d in bench.domains:
        assert len(d.x_val) > 0
        assert not _hashes(d.x_val) & _hashes(d.x_train), d.name
        assert not _hashes(d.x_val) & _hashes(d.x_test), d.name


def test_eval_split_val_puts_val_where_clients_evaluate():
    run_config = {"benchmark": "tiny",
                  "overrides": "benchmark.clients_per_domain=2 benchmark.eval_split=val"}
    cfg = resolve_config(run_config)
    bench = load_benchmark(cfg)
    mnist = bench.domain("mnist")
    parts = [client_partition(cfg, bench, i)[1] for i in (0, 2)]
    for p in parts:  # the domain's clients share its val split, as they share its test split
        assert np.array_equal(p.x_test, mnist.x_val) and np.array_equal(p.y_test, mnist.y_val)
        assert not _hashes(p.x_train) & _hashes(mnist.x_val)
    assert sum(len(p.x_train) for p in parts) == len(mnist.x_train)
    # what a ClientApp's handlers read: the node's domain
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config=run_config)
    node = node_data(ctx)
    assert np.array_equal(node.domain.x_test, mnist.x_val)
    test_cfg = resolve_config({"benchmark": "tiny"})
    assert np.array_equal(client_partition(test_cfg, bench, 0)[1].x_test, mnist.x_test)


def test_bad_split_settings_fail_before_training():
    with pytest.raises(ConfigError, match="benchmark.eval_split"):
        resolve_config({"benchmark": "tiny", "overrides": "benchmark.eval_split=train"})
    with pytest.raises(ConfigError, match="val_fraction > 0"):
        resolve_config({"benchmark": "tiny", "overrides":
                        "benchmark.eval_split=val benchmark.val_fraction=0"})
