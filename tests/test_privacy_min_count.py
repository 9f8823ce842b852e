"""``privacy.min_count``: no aggregate of fewer than that many private samples leaves a client.

* the centroid sketch never releases a cell below the floor (property-style over random data
  with outliers, n just below/at/above min_count·k; the issue's 300-embeddings-3-outliers case);
* an audit over deliberately small private sets n ∈ {1, 5, min_count - 1, min_count} for every
  sketch kind and the expert/router path: below the floor the client refuses with a
  :class:`PrivacyError` naming the artifact, the count and ``privacy.min_count``; at the floor it
  uploads, and no uploaded vector matches (cosine > 0.999) a single private sample's embedding
  or mean FFN input, nor lies within a fifth of the samples' typical spread of one (the mean
  FFN inputs share a large common component, so their cosines are high by nature; a
  singleton's upload would be at distance 0);
* evaluation, coverage, FedAlign's p/h and DDOME's uploads obey the same floor;
* through the real ServerApp/ClientApp in Flower's simulation: a client below the floor takes
  no part, and metrics.json names it and the reason.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from metamoe.clients.privacy import (
    PrivacyError,
    effective_count,
    per_sample_ffn_means,
    require_min_count,
    sample_token_counts,
)
from metamoe.config import ConfigError, resolve_config
from metamoe.proxy.scoring import relevance_scores
from metamoe.proxy.sketch import CentroidSketch, fit_centroid_sketch, merge_small_cells, sketch_from_arrays
from tests.flower_sim import simulate, with_run_config

MIN = 20  # the default privacy.min_count
COS = 0.999


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _max_cos(vectors: np.ndarray, samples: np.ndarray) -> float:
    return float(np.max(_unit(vectors) @ _unit(samples).T))


def _nearest_over_spread(vectors: np.ndarray, samples: np.ndarray) -> float:
    """Distance from the uploaded vectors to the nearest single sample, in units of the
    samples' mean distance to their own mean: 0 for a singleton's mean."""
    v = np.asarray(vectors, np.float64).reshape(len(vectors), -1)
    c = np.asarray(samples, np.float64).reshape(len(samples), -1)
    nearest = np.linalg.norm(v[:, None] - c[None], axis=-1).min()
    return float(nearest / np.linalg.norm(c - c.mean(0), axis=1).mean())


# ----------------------------------------------------------------------------- helpers
def test_default_and_validation():
    cfg = resolve_config({"benchmark": "tiny"})
    assert cfg.privacy.min_count == MIN
    assert resolve_config({"benchmark": "tiny", "overrides": "privacy.min_count=1"}
                          ).privacy.min_count == 1
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="privacy.min_count"):
            resolve_config({"benchmark": "tiny", "overrides": f"privacy.min_count={bad}"})


def test_require_min_count_names_artifact_count_and_floor():
    require_min_count("the thing", 20, 20)
    with pytest.raises(PrivacyError, match=r"refusing to upload the thing: it would aggregate "
                                           r"19 private samples, fewer than privacy.min_count=20"):
        require_min_count("the thing", 19, 20)
    with pytest.raises(PrivacyError, match=r"aggregate 3.5 private samples \(effective\)"):
        require_min_count("x", 3.5, 20, "private samples (effective)")


def test_effective_count_is_the_reciprocal_of_the_largest_share():
    assert effective_count(np.ones(37)) == pytest.approx(37)
    assert effective_count([0, 0, 1, 1, 1]) == pytest.approx(3)  # a subset's mean: its size
    assert effective_count([10.0] + [0.1] * 100) == pytest.approx(2.0)  # one sample dominates
    assert effective_count([]) == 0.0 and effective_count([0.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        effective_count([1.0, -1.0])


def test_sample_token_counts_images_and_text():
    class M:
        class cfg:  # noqa: N801 - mimics model.cfg
            pad_id = 0
    ids = np.array([[5, 6, 0, 0], [7, 0, 0, 0], [1, 2, 3, 4]])
    np.testing.assert_array_equal(sample_token_counts(M(), ids), [2, 1, 4])
    np.testing.assert_array_equal(sample_token_counts(M(), torch.from_numpy(ids)), [2, 1, 4])
    np.testing.assert_array_equal(sample_token_counts(M(), np.zeros((3, 1, 28, 28))), [1, 1, 1])
    np.testing.assert_array_equal(sample_token_counts(object(), ids), [1, 1, 1])


# ----------------------------------------------------------------------------- centroid sketch
def _data_with_outliers(rng: np.random.Generator, n: int, d: int, n_out: int) -> np.ndarray:
    centres = rng.normal(size=(rng.integers(2, 7), d)) * 2.0
    x = centres[rng.integers(len(centres), size=n - n_out)] + 0.7 * rng.normal(size=(n - n_out, d))
    out = rng.normal(size=(n_out, d)) * 4.0  # far from every cluster and from each other
    x = np.concatenate([x, out])
    return x[rng.permutation(n)].astype(np.float32)


def _check_valid_for_scoring(sk: CentroidSketch, d: int, rng: np.random.Generator) -> None:
    back = sketch_from_arrays(sk.to_arrays())
    assert isinstance(back, CentroidSketch)
    r = relevance_scores(rng.normal(size=(50, d)).astype(np.float32), [back])
    assert r.shape == (1, 50) and np.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()


def test_issue_case_outliers_get_no_cell_of_their_own():
    """300 embeddings, 3 outliers, 16 centroids: without the floor three cells hold one sample
    and their centroid is that sample (cosine 1.0); with it, none."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    x = centres[rng.integers(4, size=297)] + 0.3 * rng.normal(size=(297, 32))
    x = np.concatenate([x, rng.normal(size=(3, 32)) * 3]).astype(np.float32)
    before = fit_centroid_sketch(x, 16, seed=0, min_count=1)
    singles = before.centroids[before.counts == 1]
    assert len(singles) >= 3 and _max_cos(singles, x) > 0.9999  # the bug: reproduced
    sk = fit_centroid_sketch(x, 16, seed=0, min_count=MIN)
    assert (sk.counts >= MIN).all() and sk.counts.sum() == 300
    assert _max_cos(sk.centroids, x) < COS
    _check_valid_for_scoring(sk, 32, rng)


@pytest.mark.parametrize("trial", range(12))
def test_centroid_cells_never_below_min_count(trial):
    rng = np.random.default_rng(100 + trial)
    k = int(rng.integers(2, 20))
    m = int(rng.choice([2, 5, 20, 33]))
    d = int(rng.integers(3, 40))
    sizes = {m * k - 1, m * k, m * k + 1, m, m + 1, int(rng.integers(m, 6 * m * k))}
    for n in sorted(sizes):
        x = _data_with_outliers(rng, n, d, n_out=int(min(n // 4, rng.integers(0, 6))))
        sk = fit_centroid_sketch(x, k, seed=trial, min_count=m)
        counts = sk.counts
        assert (counts >= m).all(), (n, k, m, counts)
        assert counts.sum() == n  # merged, never dropped: all of Dp is still described
        assert 1 <= len(counts) <= min(k, n // m)
        if m >= 5:  # a mean of >= 5 generic samples is not any one of them
            assert _max_cos(sk.centroids, x) < COS, (n, k, m)
        _check_valid_for_scoring(sk, d, rng)
    with pytest.raises(ValueError, match="min_count"):
        fit_centroid_sketch(_data_with_outliers(rng, m - 1, d, 0), k, min_count=m)


@pytest.mark.parametrize("z", [0.05, 2.0])
def test_noisy_centroid_sketch_merges_on_the_noisy_counts(z):
    """With DP the merge is post-processing of the noisy (sums, counts): every released count
    is >= min_count while more than one cell is left; the guarantee is unchanged."""
    rng = np.random.default_rng(7)
    for n in (MIN, 3 * MIN, 16 * MIN - 1, 400):
        x = _data_with_outliers(rng, n, 16, 3)
        centers = rng.normal(size=(16, 16)).astype(np.float32)
        sk = fit_centroid_sketch(x, 16, centers=centers, noise_multiplier=z, min_count=MIN, seed=n)
        assert sk.privacy is not None and sk.privacy.sensitivity == pytest.approx(np.sqrt(2))
        if len(sk.counts) > 1:
            assert (sk.counts >= MIN).all(), sk.counts
        if z < 0.1:  # little noise: the counts are nearly the true ones
            assert abs(sk.counts.sum() - n) < 5
        _check_valid_for_scoring(sk, 16, rng)


def test_merge_small_cells_smallest_first_into_the_nearest():
    sums = np.array([[10.0, 0.0], [0.0, 10.0], [3.0, 0.5], [0.0, 0.0], [0.2, 1.0]])
    counts = np.array([10.0, 10.0, 3.0, 0.0, 1.0])
    s, c = merge_small_cells(sums, counts, 5)
    # the empty cell vanishes; cell 4 (1 sample, towards +y) joins cell 1; cell 2 joins cell 0
    np.testing.assert_allclose(c, [13.0, 11.0])
    np.testing.assert_allclose(s, [[13.0, 0.5], [0.2, 11.0]])
    s, c = merge_small_cells(sums, counts, 100)  # nothing reaches it: one cell, all samples
    np.testing.assert_allclose(c, [24.0])
    np.testing.assert_allclose(s, [sums.sum(0)])
    s, c = merge_small_cells(sums[:2], counts[:2], 5)
    np.testing.assert_array_equal(c, [10.0, 10.0])


# ----------------------------------------------------------------------------- stage audit
@pytest.fixture(scope="module")
def tiny():
    from metamoe.data import client_partition, load_benchmark
    from metamoe.models.vit import ViT, ViTConfig

    ov = "expert.epochs=1 expert.lr=0.01 expert.batch_size=32 select.m=40 run.device=cpu"
    cfg = resolve_config({"benchmark": "tiny", "overrides": ov})
    bench = load_benchmark(cfg)
    _, dom = client_partition(cfg, bench, 0)
    torch.manual_seed(0)
    seed = ViT(ViTConfig(stem_channels=8, dim=32, depth=2, heads=2, mlp_hidden=64)).eval()
    return cfg, bench, dom, seed


def _with(cfg, overrides: str):
    from omegaconf import OmegaConf

    out = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides.split()))
    OmegaConf.set_readonly(out, True)
    return out


def _first(dom, n: int, split: str = "train"):
    if split == "train":
        return replace(dom, x_train=dom.x_train[:n], y_train=dom.y_train[:n])
    return replace(dom, x_test=dom.x_test[:n], y_test=dom.y_test[:n])


SKETCHES = {"logistic": "sketch.kind=logistic",
            "centroids": "sketch.kind=centroids",
            "centroids-dp": "sketch.kind=centroids sketch.dp_sigma=0.5"}


@pytest.mark.parametrize("kind", list(SKETCHES))
@pytest.mark.parametrize("n", [1, 5, MIN - 1, MIN])
def test_sketch_refused_below_min_count_and_no_sample_at_it(tiny, kind, n):
    from metamoe.clients.stages import sketch_stage
    from metamoe.training import features

    cfg, bench, dom, seed = tiny
    cfg = _with(cfg, SKETCHES[kind])
    small = _first(dom, n)
    if n < MIN:
        with pytest.raises(PrivacyError, match=rf"{cfg.sketch.kind} sketch.*aggregate {n} "
                                               rf"private samples.*privacy.min_count={MIN}"):
            sketch_stage(cfg, seed, small, bench, 3)
        return
    arrays, info = sketch_stage(cfg, seed, small, bench, 3)
    assert info["n_private"] == n
    sk = sketch_from_arrays(arrays)
    emb = features(seed, small.x_train, cfg.select.embedding)
    if isinstance(sk, CentroidSketch):
        if sk.privacy is None or len(sk.counts) > 1:
            assert (sk.counts >= MIN).all()
        vecs = sk.centroids
    else:
        vecs = sk.weight[None]
    assert _max_cos(vecs, emb) < COS
    if isinstance(sk, CentroidSketch):  # cell means of unit vectors: compare directions
        assert _nearest_over_spread(_unit(vecs), _unit(emb)) > 0.2


@pytest.mark.parametrize("router_data", ["union", "private"])
def test_expert_and_router_vectors_refused_below_min_count(tiny, router_data):
    from metamoe.clients.stages import expert_stage

    cfg, bench, dom, seed = tiny
    cfg = _with(cfg, f"expert.router_data={router_data}")
    for n in (1, 5, MIN - 1):
        with pytest.raises(PrivacyError, match=rf"the expert.*aggregate {n} private samples, "
                                               rf"fewer than privacy.min_count={MIN}"):
            expert_stage(cfg, seed, _first(dom, n), bench, np.arange(40), 3)
    # the proxies do not count: MIN - 1 private samples + 400 public ones are still refused
    with pytest.raises(PrivacyError, match=f"aggregate {MIN - 1} private"):
        expert_stage(cfg, seed, _first(dom, MIN - 1), bench, np.arange(400), 3)


@pytest.mark.parametrize("router_data", ["union", "private"])
def test_router_vectors_at_min_count_match_no_single_sample(tiny, router_data):
    from metamoe.clients.stages import expert_stage
    from metamoe.models.lora import ffn_input_means, inject_ffn_lora, load_lora_state_dict

    cfg, bench, dom, seed = tiny
    cfg = _with(cfg, f"expert.router_data={router_data}")
    small = _first(dom, MIN)
    lora, vectors, metrics = expert_stage(cfg, seed, small, bench, np.arange(40), 3)
    assert metrics["n_private"] == MIN
    model = inject_ffn_lora(copy.deepcopy(seed), cfg.expert.rank, cfg.expert.alpha)
    load_lora_state_dict(model, {k: torch.from_numpy(v) for k, v in lora.items()})
    per = per_sample_ffn_means(model, torch.from_numpy(small.x_train)).numpy()  # [n, L, d]
    candidates = [(vectors.reshape(1, -1), per.reshape(MIN, -1))]
    candidates += [(vectors[l][None], per[:, l]) for l in range(per.shape[1])]
    for vec, cands in candidates:
        assert _max_cos(vec, cands) < COS
        assert _nearest_over_spread(vec, cands) > 0.2
    # what the floor prevents: a singleton's router vectors *are* its mean FFN input
    one = ffn_input_means(model, torch.from_numpy(small.x_train[:1])).numpy()
    assert _max_cos(one.reshape(1, -1), per[:1].reshape(1, -1)) > 0.9999
    assert _nearest_over_spread(one.reshape(1, -1), per.reshape(MIN, -1)) < 1e-5


def test_evaluation_and_coverage_refused_on_a_small_test_split(tiny):
    from metamoe.clients.stages import coverage, evaluate_stage
    from metamoe.models.lora import fresh_loras
    from metamoe.models.moe import MoEConfig, build_moe

    cfg, bench, dom, seed = tiny
    loras = fresh_loras(seed, 4, 8.0, [1, 2])
    moe = build_moe(seed, MoEConfig(num_experts=2, rank=4, alpha=8.0, expert_names=["a", "b"]),
                    loras, [torch.randn(2, 32), torch.randn(2, 32)])
    small = _first(dom, MIN - 1, "test")
    with pytest.raises(PrivacyError, match=rf"accuracies on the private test split.*"
                                           rf"{MIN - 1} private samples.*privacy.min_count={MIN}"):
        evaluate_stage(moe, small, ["a", "b"], min_count=MIN)
    with pytest.raises(PrivacyError, match="coverage metrics"):
        coverage(seed, small, bench, {"rw_dpp": np.arange(10)}, min_count=MIN)
    ok = _first(dom, MIN, "test")
    out = evaluate_stage(moe, ok, ["a", "b"], min_count=MIN, references=False)
    assert out["n_test"] == MIN
    assert set(coverage(seed, ok, bench, {"rw_dpp": np.arange(10)}, min_count=MIN)) == \
        {"coverage/rw_dpp", "coverage_p90/rw_dpp"}


def test_fedalign_descriptors_below_the_floor_are_withheld(tiny):
    from metamoe.clients.fl_local import moe_local_stats
    from metamoe.models.lora import fresh_loras
    from metamoe.models.moe import MoEConfig, build_moe

    _, _, dom, seed = tiny
    g = torch.Generator().manual_seed(0)
    E = 4
    moe = build_moe(seed, MoEConfig(num_experts=E, rank=4, alpha=8.0, top_k=2, context="none",
                                    logit_scale=8.0),  # peaked gates: concentrated support
                    fresh_loras(seed, 4, 8.0, list(range(E))),
                    [torch.randn(2, 32, generator=g) for _ in range(E)])
    x = torch.from_numpy(dom.x_train[:120])
    with pytest.raises(PrivacyError, match=r"FedAlign routing statistics p.*aggregate 19"):
        moe_local_stats(moe, x[:19], min_count=MIN)

    # the effective support Σ_i w_i / max_i w_i of every h[l, e], recomputed here
    w: list[list[torch.Tensor]] = [[] for _ in moe.moe_layers()]
    hooks = [layer.register_forward_pre_hook(
        lambda m, inp, l=l: w[l].append(m.gate_probs(inp[0].float()).sum(1).double()))
        for l, layer in enumerate(moe.moe_layers())]
    try:
        p1, h1, none = moe_local_stats(moe, x, min_count=1)
    finally:
        for h in hooks:
            h.remove()
    support = np.stack([(torch.cat(ws).sum(0) / torch.cat(ws).max(0).values).numpy()
                        for ws in w])  # [L, E]
    assert none == 0 and (support >= 1).all()
    floor = float(np.median(support))
    assert (support < floor).any() and (support >= floor).any(), support
    p, h, withheld = moe_local_stats(moe, x, min_count=floor)
    low = support < floor
    assert withheld == int(low.sum())
    np.testing.assert_array_equal(p, p1)  # p: a mean over every sample, always uploaded
    assert (h[low] == 0).all()
    np.testing.assert_allclose(h[~low], h1[~low], rtol=1e-6)


def test_ddome_and_fl_handlers_refuse_a_small_train_split(tiny):
    from types import SimpleNamespace

    from metamoe.clients import fl_handlers

    cfg, _, dom, _ = tiny
    node = SimpleNamespace(cfg=cfg, n_private=MIN - 1, name="c")
    with pytest.raises(PrivacyError, match=rf"DDOME selection.*{MIN - 1} private samples"):
        fl_handlers._require_train(node, "the DDOME selection (gate scores summed over the "
                                         "private train split)")
    fl_handlers._require_train(SimpleNamespace(cfg=cfg, n_private=MIN, name="c"), "x")


# ----------------------------------------------------------------------------- embedded sets
@pytest.mark.slow
def test_default_min_count_is_far_below_every_embedded_benchmark():
    """Every client's train and test split of the embedded benchmarks (and the tiny test
    configs) is at least twice the default floor, also token-weighted for text."""
    from types import SimpleNamespace

    from metamoe.data import client_names, client_partition, load_benchmark

    for name in ("tiny", "tiny_text", "vision", "vision_k20", "text"):
        if "text" in name:
            pytest.importorskip("transformers")
        cfg = resolve_config({"benchmark": name})
        bench = load_benchmark(cfg)
        text = cfg.model.arch == "bert"  # token ids, padded with MiniLM's pad_token_id 0
        model = SimpleNamespace(cfg=SimpleNamespace(pad_id=0)) if text else object()
        for p in range(len(client_names(cfg))):
            _, dom = client_partition(cfg, bench, p)
            for x in (dom.x_train, dom.x_test):
                assert len(x) >= 2 * cfg.privacy.min_count, (name, p, len(x))
                assert effective_count(sample_token_counts(model, x)) >= 2 * cfg.privacy.min_count


# ----------------------------------------------------------------------------- simulation
def _simulate(tmp: Path, cache: str, run_id: str, method: str, small: int,
              overrides: str) -> dict:
    """Flower simulation of ``method`` on tiny with 3 nodes; partition ``small`` runs with a
    floor above its whole private set (train 150, test 100), i.e. it is a client whose data
    is below ``privacy.min_count``."""
    rc = {"benchmark": "tiny", "method": method, "run-id": run_id,
          "output-dir": str(tmp / "results"), "cache-dir": cache, "overrides": overrides}
    small_rc = dict(rc, overrides=overrides + " privacy.min_count=100000")

    def inject(msg, ctx, call_next):
        small_node = int(ctx.node_config["partition-id"]) == small
        return call_next(msg, with_run_config(ctx, small_rc if small_node else rc))

    simulate(rc, 3, inject)
    return json.loads((tmp / "results" / run_id / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("method", "phases"), [("metamoe", ["sketch", "evaluate"]),
                                                ("fedalign_moe", ["seed-send"])])
def test_a_client_below_min_count_takes_no_part_and_the_server_says_why(tmp_path, cache_dir,
                                                                        method, phases):
    m = _simulate(tmp_path, cache_dir, f"min-count-{method}", method, 2,
                  "benchmark.num_clients=3 fl.rounds=1")
    names = {c["partition_id"]: n for n, c in m["clients"].items()} if "clients" in m else {}
    small = names.get(2, "mnist-1")
    for phase in phases:
        assert small in m["missing"][phase], (phase, m["missing"])
        reasons = [r["reason"] for r in m["rejected"]
                   if r["phase"] == phase and r["client"] == small]
        assert reasons and "client error" in reasons[0] and \
            "privacy.min_count=100000" in reasons[0] and "refusing to upload" in reasons[0], reasons
    assert not [r for r in m["rejected"] if r["client"] != small], m["rejected"]
    # the others finished the run
    assert set(m["accuracy"]["per_domain"]) == {"mnist", "uci"}
