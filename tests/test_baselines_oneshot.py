"""One-shot baselines: server-side merges on constructed inputs, plus ONE end-to-end
``flwr run`` of the one-shot suite (every one-shot row) on the tiny benchmark."""

import copy
import json

import numpy as np
import pytest
import torch

from metamoe.clients import stages
from metamoe.config import ConfigError, resolve_config
from metamoe.data import client_partition, load_benchmark
from metamoe.models.lora import ffn_input_means, inject_ffn_lora, load_lora_state_dict, lora_shapes
from metamoe.models.moe import MoEConfig, build_moe
from metamoe.models.vit import ViT, ViTConfig
from metamoe.strategies import STRATEGIES
from metamoe.strategies.merges import build_m0, build_soup, load_balancing_loss, soup_lora
from metamoe.strategies.oneshot import BTX, FlexOlmo
from metamoe.strategies.suites import ONESHOT_SUITE, make_members, member_config
from metamoe.strategies.unrestricted import UnrestrictedSameStart, UnrestrictedScratch

R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def seed():
    torch.manual_seed(0)
    return ViT(ViTConfig(stem_channels=8, dim=32, depth=2, heads=2, mlp_hidden=64)).eval()


def random_lora(seed, k):
    g = torch.Generator().manual_seed(k)
    mc = seed.cfg
    return {key: torch.randn(s, generator=g).numpy() * 0.1
            for key, s in lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, R).items()}


def test_every_method_is_registered_with_a_config():
    for m in ("zero_shot", "separate_experts", "btm", "model_soup", "btx", "flexolmo",
              "unrestricted_moe_scratch", "unrestricted_moe_same_start", "oneshot_suite", "metamoe_suite"):
        assert m in STRATEGIES
        assert resolve_config({"benchmark": "tiny", "method": m}).method == m


def test_model_soup_equals_the_averaged_merged_delta(seed):
    loras = [random_lora(seed, k) for k in range(3)]
    merged = soup_lora(loras)
    s = ALPHA / R
    for key in loras[0]:
        if key.endswith("lora_A"):
            bkey = key[:-1] + "B"
            want = np.mean([s * lo[bkey] @ lo[key] for lo in loras], axis=0)
            got = (ALPHA * 3) / (R * 3) * merged[bkey] @ merged[key]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            # averaging A and B separately is NOT the soup
            naive = s * np.mean([lo[bkey] for lo in loras], 0) \
                @ np.mean([lo[key] for lo in loras], 0)
            assert not np.allclose(naive, want, atol=1e-4)
    # ... and the soup model computes exactly the dense W0 + mean delta model
    soup = build_soup(seed, loras, R, ALPHA)
    dense = copy.deepcopy(seed)
    with torch.no_grad():
        for l, ffn in enumerate(dense.ffn_layers()):
            for name in ("fc1", "fc2"):
                a = f"layers.{l}.{name}.lora_A"
                delta = np.mean([s * lo[a[:-1] + "B"] @ lo[a] for lo in loras], axis=0)
                getattr(ffn, name).weight += torch.from_numpy(delta)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(soup(x), dense(x), rtol=1e-4, atol=1e-5)


def test_zero_shot_model_is_exactly_m0(seed):
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(build_m0(seed, R, ALPHA)(x), seed(x))


def test_btm_ensemble_averages_probabilities(seed):
    loras = [{k: torch.from_numpy(v) for k, v in random_lora(seed, k).items()} for k in (1, 2)]
    moe = build_moe(seed, MoEConfig(num_experts=2, rank=R, alpha=ALPHA, expert_names=["a", "b"]),
                    loras, None)
    x, classes = torch.randn(64, 1, 28, 28), list(range(10, 20))
    cls = torch.tensor(classes)
    with torch.no_grad():
        probs = []
        for p in (0, 1):
            moe.set_forced(p)
            probs.append(moe(x)[:, cls].softmax(-1))
        moe.set_forced(None)
    pred = cls[((probs[0] + probs[1]) / 2).argmax(1)]
    y = pred.clone()
    y[::2] = cls[0]  # half of the labels agree with the ensemble by construction
    want = float((pred == y).float().mean())
    assert stages.ensemble_accuracy(moe, x, y, classes) == pytest.approx(want)


def test_load_balancing_loss_is_alpha_for_uniform_routing(seed):
    loras = [{k: torch.from_numpy(v) for k, v in random_lora(seed, k).items()} for k in (1, 2)]
    cfg = MoEConfig(num_experts=2, rank=R, alpha=ALPHA, top_k=2, renormalize=True,
                    context="none", expert_names=["a", "b"])
    moe = build_moe(seed, cfg, loras, None)
    with torch.no_grad():
        for layer in moe.moe_layers():
            layer.router.zero_()  # uniform probabilities -> u_i = p_i = 1/2
    loss_fn, install = load_balancing_loss(0.01)
    handles = install(moe)
    moe.train()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 20, (8,))
    total = loss_fn(moe, x, y)
    ce = torch.nn.functional.cross_entropy(moe(x), y)
    for h in handles:
        h.remove()
    # per layer alpha * N * sum_i (1/2)(1/2) = alpha, two layers
    assert float((total - ce).detach()) == pytest.approx(0.02, abs=1e-6)


@pytest.fixture(scope="module")
def tiny():
    cfg = resolve_config({"benchmark": "tiny", "method": "btx",
                          "overrides": "unify.epochs=1"})
    return cfg, load_benchmark(cfg)


def test_btx_router_is_random_not_vectors_and_is_trained(seed, tiny):
    cfg, bench = tiny
    experts = {}
    for k, name in enumerate(["mnist", "uci"]):
        vec = np.random.default_rng(k).normal(size=(seed.cfg.depth, seed.cfg.dim))
        experts[name] = (random_lora(seed, k), vec.astype(np.float32), {})
    btx = BTX(cfg, seed, bench, None)
    assert btx.cfg.unify.router_init == "random" and btx.cfg.unify.top_k == 2
    idx = btx.random_public(2)
    assert len(idx) == 2 * cfg.select.m and len(np.unique(idx)) == len(idx)
    untrained = build_moe(seed, MoEConfig(num_experts=2, rank=R, alpha=ALPHA, top_k=2,
                                          context="none", renormalize=True), [
        {k: torch.from_numpy(v) for k, v in e[0].items()} for e in experts.values()], None)
    moe = btx.build(experts, None)
    for l, (layer, init) in enumerate(zip(moe.moe_layers(), untrained.moe_layers(), strict=True)):
        for p, e in enumerate(experts.values()):
            assert not np.allclose(init.router[p].detach().numpy(), e[1][l])
        assert not torch.equal(layer.router, init.router)  # the router was fine-tuned ...
        assert not torch.equal(layer.B1, init.B1)  # ... and the experts too


def test_flexolmo_router_vectors_are_private_only_and_proxies_relevance_only(seed, tiny):
    cfg = resolve_config({"benchmark": "tiny", "method": "flexolmo"})
    bench = tiny[1]
    assert cfg.select.method == "relevance"
    assert not cfg.expert.use_proxies and cfg.expert.router_data == "private"
    assert not cfg.unify.train_experts and cfg.unify.train_router  # router-only RT
    _, dom = client_partition(cfg, bench, 0)
    proxies = np.arange(50)
    lora, vectors, metrics = stages.expert_stage(cfg, seed, dom, bench, proxies, 7)
    assert metrics["n_proxies"] == 0 and metrics["n_train"] == len(dom.x_train)
    model = inject_ffn_lora(copy.deepcopy(seed), R, ALPHA)
    load_lora_state_dict(model, {k: torch.from_numpy(v) for k, v in lora.items()})
    want = ffn_input_means(model, torch.from_numpy(dom.x_train)).numpy()
    np.testing.assert_allclose(vectors, want, rtol=1e-5, atol=1e-6)
    # the MoE's router rows start from those vectors; RT leaves the experts untouched
    flex = FlexOlmo(cfg, seed, bench, None)
    experts = {"mnist": (lora, vectors, {}), "uci": (random_lora(seed, 3), vectors * 0.5, {})}
    sel = {"mnist": {"relevance": np.arange(0, 20)}, "uci": {"relevance": np.arange(10, 40)}}
    assert list(flex.unify_data(sel)) == list(range(40))  # union of the relevance picks
    moe = flex.build(experts, sel)
    init = build_moe(seed, moe.moe_cfg, [{k: torch.from_numpy(v) for k, v in e[0].items()}
                                         for e in experts.values()],
                     [torch.from_numpy(e[1]) for e in experts.values()])
    for layer, ref in zip(moe.moe_layers(), init.moe_layers(), strict=True):
        assert torch.equal(layer.A1, ref.A1) and torch.equal(layer.B2, ref.B2)
        assert not torch.equal(layer.router, ref.router)
    for l, ref in enumerate(init.moe_layers()):
        np.testing.assert_allclose(ref.router[0].detach().numpy(), vectors[l], rtol=1e-6)


def test_unrestricted_is_marked_non_private():
    assert UnrestrictedScratch.private is False and UnrestrictedSameStart.private is False
    assert all(STRATEGIES[m].private for m in ("zero_shot", "btm", "btx", "flexolmo"))


def test_suite_members_have_their_standalone_config_and_mismatch_is_refused():
    cfg = resolve_config({"benchmark": "tiny", "method": "oneshot_suite",
                          "overrides": "expert.epochs=2"})
    members = make_members(cfg, ONESHOT_SUITE, None, None, None)
    for name, m in members.items():
        alone = resolve_config({"benchmark": "tiny", "method": m.cfg.method,
                                "experiment": "no_pa" if name == "metamoe[no_pa]" else "",
                                "overrides": "expert.epochs=2"})
        for sect in ("expert", "unify", "select", "sketch", "model"):
            assert m.cfg[sect] == alone[sect], (name, sect)
    assert member_config(cfg, "btx").unify.top_k == 2
    with pytest.raises(ConfigError, match="expert"):  # MetaMoE's experts use proxies
        make_members(cfg, (("metamoe", "metamoe", ""),), None, None, None)


@pytest.mark.slow
def test_oneshot_suite_end_to_end_and_a_method_alone_matches_its_row(tmp_path, monkeypatch,
                                                                      cache_dir):
    """The one-shot suite computes every default row plus a variant that changes only the
    server stage (``flexolmo[top2]``) in ONE run; FlexOlmo also runs as its own ``flwr run``
    and sharing changes nothing: same accuracies, upload bytes and client training (one method
    alone, the routed one, to keep the test suite within CI's time)."""
    from metamoe.compare import compare
    from metamoe.models.io import load_moe

    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "flwr-home"))
    suite_rows = [r for r, _, _ in ONESHOT_SUITE] + ["flexolmo[top2]"]
    kw = dict(benchmark="tiny", seeds=1, cache_dir=cache_dir, timeout=900)
    shared = compare(output_dir=str(tmp_path / "shared"), share=True, methods=suite_rows, **kw)
    (run_dir,) = (shared / "runs").iterdir()
    m = json.loads((run_dir / "metrics.json").read_text())
    rows = m["rows"]
    assert list(rows) == suite_rows  # exactly the requested members, one run
    for name, row in rows.items():
        assert set(row["accuracy"]["per_domain"]) == {"mnist", "uci"}, name
        assert 0.0 <= row["accuracy"]["average"] <= 1.0, name
        assert row["private"] is True and row["rounds"] == 1
        assert set(row["upload_bytes"]) == {"mnist", "uci"}
    sep = rows["separate_experts"]
    assert sep["accuracy"]["average"] == max(b["average"] for b in sep["experts"].values())
    assert set(sep["experts"]) == {"mnist", "uci"}
    for c in ("mnist", "uci"):
        up = {r: rows[r]["upload_bytes"][c] for r in rows}
        # zero-shot sends only scalars; the others a LoRA expert; FlexOlmo and MetaMoE also
        # the sketch and router vectors
        assert up["zero_shot"] < 2000 < up["model_soup"]
        assert up["btm"] == up["separate_experts"]
        assert abs(up["model_soup"] - up["btx"]) < 200
        assert up["flexolmo"] > up["btx"] and up["metamoe[no_pa]"] > up["btx"]
        assert up["flexolmo[top2]"] == up["flexolmo"]
    assert m["expert_train"]["mnist"]["n_proxies"] == 0  # private-only experts
    assert {"sketch", "select", "expert"} <= set(m["wall_seconds"])
    # Routed rows report where each domain's tokens went; the BTM ensemble does not route.
    for name in ("btx", "flexolmo", "metamoe[no_pa]", "flexolmo[top2]"):
        shares = rows[name]["route_share"]
        assert set(shares) == {"mnist", "uci"}, name
        for share in shares.values():
            assert set(share) == {"mnist", "uci"} and abs(sum(share.values()) - 1) < 1e-6, name
    assert "route_share" not in rows["btm"]
    assert m["route_share"] == {}  # no single model: the report has each routed row's table
    report = (run_dir / "report.md").read_text()
    assert "## Routing share of flexolmo " in report and "Routing share of btm " not in report

    alone = compare(output_dir=str(tmp_path / "alone"), share=False, methods=["flexolmo"], **kw)
    ts, ta = (json.loads((d / "table.json").read_text()) for d in (shared, alone))
    assert ta["flexolmo"]["per_domain"] == ts["flexolmo"]["per_domain"]
    assert ta["flexolmo"]["upload_bytes"] == ts["flexolmo"]["upload_bytes"]
    (alone_dir,) = (alone / "runs").glob("flexolmo-s0-*")
    a = json.loads((alone_dir / "metrics.json").read_text())
    assert a["method"] == "flexolmo" and a["private"] is True
    for c in ("mnist", "uci"):  # the client phase is the same computation
        assert a["expert_train"][c]["train_loss"] == m["expert_train"][c]["train_loss"]
    moe = load_moe(alone_dir)  # a unified model is emitted and loads
    assert sum(p.numel() for p in moe.parameters()) > 0
