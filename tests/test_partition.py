"""Non-IID clients inside a domain: flwr-datasets' partitioners split a domain's train split
by Dirichlet label skew and by size skew (metamoe/data/partition.py)."""

import numpy as np
import pytest

from metamoe.config import ConfigError, resolve_config
from metamoe.data import client_partition, load_benchmark
from metamoe.data.partition import split_indices

LABELS = np.repeat(np.arange(10, 20), 110)  # 1,100 samples, 10 classes (ids need not start at 0)


def _skew(labels, parts):
    """Mean total-variation distance between a client's label distribution and its domain's."""
    classes = np.unique(labels)
    whole = np.array([(labels == c).mean() for c in classes])
    return float(np.mean([0.5 * np.abs(np.array([(labels[p] == c).mean() for c in classes])
                                       - whole).sum() for p in parts]))


def _check_cover(parts, n, min_size=1):
    rows = np.concatenate(parts)
    assert len(rows) == n and len(np.unique(rows)) == n  # disjoint, every row once
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    iid = split_indices(LABELS, 20, seed=1)
    skewed = {a: split_indices(LABELS, 20, partition="dirichlet", alpha=a, seed=1, min_size=5)
              for a in (0.2, 0.5, 10.0)}
    _check_cover(iid, len(LABELS))
    for parts in skewed.values():
        _check_cover(parts, len(LABELS), min_size=5)
    assert _skew(LABELS, iid) < 0.2
    assert _skew(LABELS, skewed[10.0]) < _skew(LABELS, skewed[0.5]) < _skew(LABELS, skewed[0.2])
    assert _skew(LABELS, skewed[0.5]) > 0.35


def test_the_split_is_flowers_dirichlet_partitioner():
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    ours = split_indices(LABELS, 6, partition="dirichlet", alpha=0.5, seed=3)
    ds = datasets.Dataset.from_dict({"label": LABELS - 10, "row": np.arange(len(LABELS))})
    part = DirichletPartitioner(6, "label", 0.5, min_partition_size=10, self_balancing=False,
                                shuffle=False, seed=3)
    part.dataset = ds.shuffle(seed=3)
    theirs = [sorted(part.load_partition(j)["row"]) for j in range(6)]
    assert [list(p) for p in ours] == theirs


def test_size_skew_alone_and_with_label_skew():
    for partition in ("iid", "dirichlet"):
        parts = split_indices(LABELS, 10, partition=partition, size_skew="linear", seed=2,
                              min_size=5)
        _check_cover(parts, len(LABELS), min_size=5)
        sizes = [len(p) for p in parts]
        assert sizes[-1] >= 9 * sizes[0]  # client j holds a share ∝ j + 1
        assert sizes == sorted(sizes)
    iid_sized = split_indices(LABELS, 10, size_skew="linear", seed=2, min_size=5)
    both = split_indices(LABELS, 10, partition="dirichlet", size_skew="linear", seed=2,
                         min_size=5)
    assert _skew(LABELS, both) > _skew(LABELS, iid_sized) + 0.2


def test_splits_are_seeded():
    a = split_indices(LABELS, 8, partition="dirichlet", seed=5)
    b = split_indices(LABELS, 8, partition="dirichlet", seed=5)
    c = split_indices(LABELS, 8, partition="dirichlet", seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_an_infeasible_split_names_the_domain():
    with pytest.raises(ValueError, match="domain 'uci'.*among 30 clients"):
        split_indices(LABELS, 30, size_skew="exponential", where="domain 'uci'")
    with pytest.raises(ValueError, match="uci.*cannot be split among 2000"):
        split_indices(LABELS, 2000, where="uci")
    with pytest.raises(ValueError, match="smallest client would hold 5 samples"):
        split_indices(LABELS, 20, partition="dirichlet", size_skew="linear", min_size=10)


def test_a_dirichlet_split_flowers_draws_miss_is_drawn_again_under_a_derived_seed():
    """Two labels, 20 clients of >= 20 (privacy.min_count): Flower's 10 Dirichlet draws miss
    for some seeds; the split then takes the next derived seed, the same one every time."""
    from metamoe.data.partition import _flower_split

    two = np.repeat([0, 1], 1200)
    missed = []
    for seed in range(8):
        try:
            _flower_split(two.tobytes(), str(two.dtype), 20, "dirichlet", 0.5, "none", 20, seed)
        except ValueError:
            missed.append(seed)
    assert missed  # Flower alone fails on some seeds ...
    for seed in missed:  # ... the split does not, deterministically
        parts = split_indices(two, 20, partition="dirichlet", alpha=0.5, min_size=20, seed=seed)
        _check_cover(parts, len(two), min_size=20)
        again = split_indices(two, 20, partition="dirichlet", alpha=0.5, min_size=20, seed=seed)
        assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_benchmark_options_reach_the_clients():
    over = ("benchmark.clients_per_domain=4 benchmark.partition=dirichlet "
            "benchmark.dirichlet_alpha=0.3 benchmark.size_skew=linear "
            "benchmark.min_partition_size=5")
    cfg = resolve_config({"benchmark": "tiny", "overrides": over})
    bench = load_benchmark(cfg)
    mnist = [client_partition(cfg, bench, i)[1] for i in (0, 2, 4, 6)]
    assert sum(len(p.x_train) for p in mnist) == len(bench.domain("mnist").x_train)
    assert [len(p.x_train) for p in mnist] == sorted(len(p.x_train) for p in mnist)
    rows = {x.tobytes() for p in mnist for x in p.x_train}
    assert len(rows) == len(bench.domain("mnist").x_train)
    # the clients of a domain keep sharing its test split
    assert all(np.array_equal(p.x_test, mnist[0].x_test) for p in mnist)


@pytest.mark.parametrize("over, key", [("benchmark.partition=shards", "benchmark.partition"),
                                       ("benchmark.size_skew=zipf", "benchmark.size_skew"),
                                       ("benchmark.dirichlet_alpha=0", "dirichlet_alpha")])
def test_bad_partition_config_fails_before_training(over, key):
    with pytest.raises(ConfigError, match=key):
        resolve_config({"benchmark": "tiny", "overrides": over})


def test_vision_k60_clients_are_label_skewed_and_cover_their_domains():
    from metamoe.config import num_clients

    cfg = resolve_config({"benchmark": "vision_k60"})
    bench = load_benchmark(cfg)
    assert num_clients(cfg) == 60
    parts = [client_partition(cfg, bench, i) for i in range(60)]
    for d in bench.domains:
        mine = [p for name, p in parts if name.startswith(f"{d.name}-")]
        assert len(mine) == 20 and min(len(p.x_train) for p in mine) >= 10
        assert sum(len(p.x_train) for p in mine) == len(d.x_train)
        skew = np.mean([0.5 * np.abs(np.bincount(p.y_train - min(d.classes), minlength=10)
                                     / len(p.y_train)
                                     - np.bincount(d.y_train - min(d.classes), minlength=10)
                                     / len(d.y_train)).sum() for p in mine])
        assert skew > 0.3, (d.name, skew)
