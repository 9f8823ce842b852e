"""The embedded vision benchmark: real, disjoint, per-domain label spaces."""

import hashlib

import numpy as np
import pytest

from metamoe.config import resolve_config
from metamoe.data import client_names, client_partition, load_benchmark
from metamoe.data.vision import DIGIT_CLASSES, FASHION_CLASSES, build_vision_benchmark


@pytest.fixture(scope="module")
def bench():
    return build_vision_benchmark()


def _hashes(x):
    return {hashlib.sha1(a.tobytes()).hexdigest() for a in x}


def test_sizes_and_label_spaces(bench):
    sizes = {d.name: (len(d.x_train), len(d.x_val), len(d.x_test)) for d in bench.domains}
    assert sizes == {"mnist": (3500, 0, 500), "uci": (1100, 0, 350), "fashion": (10000, 0, 2000)}
    assert len(bench.pool_x) == 50000 + 1000 + 347
    assert bench.domain("fashion").classes == FASHION_CLASSES
    assert bench.domain("mnist").classes == DIGIT_CLASSES == bench.domain("uci").classes
    for d in bench.domains:
        assert set(np.unique(d.y_train)) <= set(d.classes)
        assert set(np.unique(d.y_test)) == set(d.classes)  # every class is tested
        assert d.x_train.dtype == np.float32 and d.x_train.shape[1:] == (1, 28, 28)
    assert set(np.unique(bench.pool_source)) == {"mnist", "uci", "fashion"}
    assert (bench.pool_source != "fashion").mean() < 0.05  # imbalanced on purpose


def test_no_private_or_test_sample_in_the_pool(bench):
    pool = _hashes(bench.pool_x)
    for d in bench.domains:
        assert not pool & _hashes(d.x_train), d.name
        assert not pool & _hashes(d.x_test), d.name
        assert not _hashes(d.x_train) & _hashes(d.x_test), d.name


def test_domains_really_differ(bench):
    """UCI digits (8x8 upsampled) are blurry and bold: over twice MNIST's ink at the same
    labels, so an MNIST expert is not a UCI expert."""
    def ink(x):
        return float((x > 0).mean())
    assert ink(bench.domain("uci").x_train) > 2 * ink(bench.domain("mnist").x_train)


def test_splits_are_a_function_of_the_seed():
    a, b = build_vision_benchmark(seed=3, max_train=50), build_vision_benchmark(seed=3, max_train=50)
    assert np.array_equal(a.domains[0].x_train, b.domains[0].x_train)


def test_several_clients_per_domain_partition_the_train_split():
    cfg = resolve_config({"benchmark": "tiny", "overrides": "benchmark.clients_per_domain=3"})
    bench = load_benchmark(cfg)
    assert client_names(cfg) == ["mnist-0", "uci-0", "mnist-1", "uci-1", "mnist-2", "uci-2"]
    parts = [client_partition(cfg, bench, i)[1] for i in (0, 2, 4)]
    assert sum(len(p.x_train) for p in parts) == len(bench.domain("mnist").x_train)
    assert not _hashes(parts[0].x_train) & _hashes(parts[1].x_train)
    with pytest.raises(ValueError, match="partition-id 6"):
        client_partition(cfg, bench, 6)


def test_num_clients_need_not_be_a_multiple_of_the_domains():
    cfg = resolve_config({"benchmark": "tiny", "overrides": "benchmark.num_clients=5"})
    bench = load_benchmark(cfg)
    assert client_names(cfg) == ["mnist-0", "uci-0", "mnist-1", "uci-1", "mnist-2"]
    mnist = [client_partition(cfg, bench, i)[1] for i in (0, 2, 4)]
    uci = [client_partition(cfg, bench, i)[1] for i in (1, 3)]
    assert sum(len(p.x_train) for p in mnist) == len(bench.domain("mnist").x_train)
    assert sum(len(p.x_train) for p in uci) == len(bench.domain("uci").x_train)
    with pytest.raises(Exception, match="not both"):
        resolve_config({"benchmark": "tiny",
                        "overrides": "benchmark.num_clients=5 benchmark.clients_per_domain=2"})


def test_benchmark_disk_cache_roundtrips(tmp_path):
    from metamoe.data import _load

    cfg = resolve_config({"benchmark": "tiny", "cache-dir": str(tmp_path)})
    built = load_benchmark(cfg)
    assert len(list(tmp_path.glob("bench-*/done"))) == 1
    _load.cache_clear()
    cached = load_benchmark(cfg)
    assert cached is not built
    assert isinstance(cached.pool_x, np.memmap)  # read by row, never loaded whole
    for a, b in zip(built.domains, cached.domains):
        assert a.name == b.name and a.classes == b.classes
        assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert np.array_equal(built.pool_x, cached.pool_x)
    assert np.array_equal(built.pool_source, cached.pool_source)
