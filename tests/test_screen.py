"""Screening of expert uploads (``metamoe/strategies/screen.py``) on a tiny random ViT, and
the bound on selection steering: a client's sketch decides only its own proxies.

Three "clients" each hold a LoRA expert and proxies drawn from their own region of a synthetic
pool (three clusters of images); their honest router vectors are the FFN-input means of their
own proxies under their expert. Each check below fails if the corresponding rule of
``screen_experts`` is removed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bench.attacks import scale_delta, shift_labels
from metamoe.config import ScreenConf
from metamoe.models.lora import ffn_input_means, inject_ffn_lora, lora_state_dict
from metamoe.models.vit import ViT, ViTConfig
from metamoe.proxy.select import select_proxies
from metamoe.proxy.sketch import LogisticSketch
from metamoe.strategies.screen import delta_ratio, screen_experts

CFG = ViTConfig(stem_channels=4, dim=16, depth=2, heads=2, mlp_hidden=32, num_classes=6)
RANK, ALPHA = 2, 4.0


@pytest.fixture(scope="module")
def fed():
    torch.manual_seed(0)
    seed = ViT(CFG)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.5, size=(3, 1, 28, 28)).astype(np.float32)
    pool_x = np.concatenate([c + rng.normal(0, 0.5, size=(40, 1, 28, 28)).astype(np.float32)
                             for c in centres])
    pool_y = np.repeat(np.arange(3) * 2, 40).astype(np.int64)  # cluster k -> class 2k
    # M0 is pre-trained on the public pool, as the server's seed is
    opt = torch.optim.Adam(seed.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(seed(torch.from_numpy(pool_x)),
                                          torch.from_numpy(pool_y)).backward()
        opt.step()
    seed.eval()
    proxies, experts = {}, {}
    for k, name in enumerate("abc"):
        torch.manual_seed(10 + k)
        m = inject_ffn_lora(copy.deepcopy(seed), RANK, ALPHA)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:  # a small delta: A kept, B drawn (it starts at 0)
                    p.copy_(p * 0.05 if p.abs().sum() > 0 else torch.randn_like(p) * 2.0)
        proxies[name] = np.arange(40 * k, 40 * k + 30)
        vec = ffn_input_means(m, torch.from_numpy(pool_x[proxies[name]])).numpy()
        experts[name] = ({k2: v.numpy() for k2, v in lora_state_dict(m).items()}, vec, {})
    return seed, pool_x, pool_y, proxies, experts


def run(fed, experts, **conf):
    seed, pool_x, pool_y, proxies, _ = fed
    sc = OmegaConf.merge(OmegaConf.structured(ScreenConf), conf)
    return screen_experts(seed, pool_x, pool_y, experts, proxies, sc, RANK, ALPHA)


def test_honest_uploads_pass_and_keep_their_router_vectors(fed):
    stats, rejected, vectors = run(fed, fed[4])
    assert rejected == {}
    for n, (_, vec, _) in fed[4].items():
        assert np.array_equal(vectors[n], vec)
        assert stats[n]["router_gap"] < 0 and 0.99 < stats[n]["router_norm_ratio_max"] < 1.01


def test_scaled_router_vectors_are_rejected_and_long_rows_clipped(fed):
    experts = dict(fed[4])
    lora, vec, m = experts["b"]
    experts["b"] = (lora, vec * 10, m)
    _, rejected, _ = run(fed, experts)
    assert set(rejected) == {"b"} and "router vector norms" in rejected["b"]
    # below the rejection range but above the clip: the rows are shortened to the clip
    experts["b"] = (lora, vec * 2.5, m)
    stats, rejected, vectors = run(fed, experts)
    assert rejected == {}
    ratio = np.linalg.norm(vectors["b"], axis=1) / np.linalg.norm(vec, axis=1)
    assert np.allclose(ratio, 2.0, rtol=1e-3) and stats["b"]["router_clipped_layers"] == 2
    _, _, vectors = run(fed, experts, router_clip=0.0)  # off
    assert np.allclose(vectors["b"], vec * 2.5)


def test_scaled_delta_is_rejected(fed):
    experts = dict(fed[4])
    lora, vec, m = experts["c"]
    r0 = delta_ratio(fed[0], lora, ALPHA / RANK)
    experts["c"] = (scale_delta(lora, 100.0), vec, m)
    stats, rejected, _ = run(fed, experts, max_delta_ratio=50 * r0)
    assert set(rejected) == {"c"} and "LoRA delta" in rejected["c"]
    assert stats["c"]["delta_ratio"] == pytest.approx(100 * r0, rel=1e-4)
    # with no absolute bound, the median of the three clients still exposes it
    stats, rejected, _ = run(fed, experts, max_delta_ratio=1e9)
    assert set(rejected) == {"c"} and "the clients' median" in rejected["c"]
    assert stats["c"]["delta_vs_median"] > 50


def test_copied_router_vectors_are_rejected(fed):
    experts = dict(fed[4])
    experts["a"] = (experts["a"][0], experts["c"][1].copy(), {})
    stats, rejected, _ = run(fed, experts)
    assert set(rejected) == {"a"} and "fit another client's proxies" in rejected["a"]
    assert stats["a"]["router_gap"] > 0.5


def test_a_replayed_upload_is_kept_once(fed):
    experts = dict(fed[4])
    experts["c"] = copy.deepcopy(experts["b"])  # c sends b's whole upload, on c's proxies
    stats, rejected, _ = run(fed, experts)
    assert set(rejected) == {"c"} and "duplicates client b" in rejected["c"]
    assert stats["c"]["duplicate_of"] == "b"


def _trained(seed, x, y, steps=60):
    torch.manual_seed(3)
    m = inject_ffn_lora(copy.deepcopy(seed), RANK, ALPHA)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def test_an_expert_trained_on_permuted_labels_is_rejected(fed):
    seed, pool_x, pool_y, proxies, experts = fed
    idx = proxies["a"]
    x, y = torch.from_numpy(pool_x[idx]), torch.from_numpy(pool_y[idx])
    bad_y = torch.from_numpy(shift_labels(pool_y[idx], np.unique(pool_y)))
    trained = {}
    for kind, labels in (("honest", y), ("permuted", bad_y)):
        m = _trained(seed, x, labels)
        trained[kind] = ({k: v.numpy() for k, v in lora_state_dict(m).items()},
                         ffn_input_means(m, x).numpy(), {})
    stats, rejected, _ = run(fed, dict(experts, a=trained["honest"]))
    assert rejected == {} and stats["a"]["proxy_loss_ratio"] < 1
    stats, rejected, _ = run(fed, dict(experts, a=trained["permuted"]))
    assert set(rejected) == {"a"} and "own proxies" in rejected["a"]
    assert stats["a"]["proxy_loss_ratio"] > 2


def test_a_sketch_decides_only_its_own_proxies():
    """Selection steering is bounded: changing (or crafting) one client's sketch leaves every
    other client's picks unchanged, for every selection rule."""
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(400, 8)).astype(np.float32)
    sk = {n: LogisticSketch(rng.normal(size=8).astype(np.float32), 0.0) for n in "abc"}
    crafted = dict(sk, c=LogisticSketch((10 * pool[7]).astype(np.float32), 0.0))
    for method in ("rw_dpp", "relevance", "random", "dpp", "kcenter"):
        before = select_proxies(pool, sk, n=60, m=10, method=method, seed=0)
        after = select_proxies(pool, crafted, n=60, m=10, method=method, seed=0)
        for n in "ab":
            assert np.array_equal(before[n].indices, after[n].indices), method
        assert not np.array_equal(before["c"].indices, after["c"].indices), method
