"""The NOT PRIVATE upper bounds' building blocks: domain-balanced sampling, and the from-scratch
MoE starting exactly at M0 (their end-to-end runs: tests/test_compare.py)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metamoe.config import resolve_config
from metamoe.models.lora import fresh_loras
from metamoe.models.moe import build_moe, unify_moe_config
from metamoe.models.vit import ViT
from metamoe.server.seed import vit_config
from metamoe.training import balanced_weights, train


def test_balanced_weights_give_every_group_the_same_mass():
    groups = ["a"] * 90 + ["b"] * 10 + ["c"] * 20
    w = balanced_weights(groups)
    mass = {g: float(w[[i for i, x in enumerate(groups) if x == g]].sum()) for g in "abc"}
    assert mass == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_weighted_batches_draw_the_groups_equally_often():
    groups = np.array([0] * 900 + [1] * 100)
    drawn = []
    w = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.w = w

    def loss_fn(m, xb, yb):
        drawn.append(xb.clone())
        return (m.w ** 2).sum()

    cfg = OmegaConf.create({"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False,
                            "weight_decay": 0.0, "epochs": 4, "batch_size": 50, "shuffle": True,
                            "group_by_length": False})
    x = torch.arange(1000)
    train(model, x, torch.zeros(1000, dtype=torch.long), cfg, params=[w], loss_fn=loss_fn,
          seed=0, sample_weights=balanced_weights(groups))
    idx = torch.cat(drawn).numpy()
    assert len(drawn) == 4 * 20  # the same number of steps as without weights
    assert 0.45 < (groups[idx] == 1).mean() < 0.55  # 10 % of the data, half of the draws
    train(model, x, torch.zeros(1000, dtype=torch.long), cfg, params=[w], loss_fn=loss_fn,
          seed=0)
    plain = torch.cat(drawn[80:]).numpy()
    assert (groups[plain] == 1).mean() == pytest.approx(0.1)  # every item once per epoch
    with pytest.raises(ValueError, match="sample_weights"):
        train(model, x, torch.zeros(1000, dtype=torch.long), cfg, params=[w], loss_fn=loss_fn,
              sample_weights=torch.zeros(1000))


def test_from_scratch_moe_starts_at_m0():
    """Fresh experts (B = 0) under renormalised top-2: the MoE is M0 exactly; MetaMoE's
    π-weighted top-1 on the same experts is a shrunken M0 (the old bound's start)."""
    cfg = resolve_config({"benchmark": "tiny", "method": "unrestricted_moe_scratch"})
    torch.manual_seed(0)
    seed = ViT(vit_config(cfg, 20)).eval()
    names = ["mnist", "uci", "fashion"]
    loras = fresh_loras(seed, cfg.expert.rank, cfg.expert.alpha, [1, 2, 3])
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = seed(x)
        scratch = build_moe(seed, unify_moe_config(cfg, names), loras, None).eval()
        torch.testing.assert_close(scratch(x), want, rtol=1e-5, atol=1e-5)
        top1 = resolve_config({"benchmark": "tiny", "method": "metamoe"})
        shrunk = build_moe(seed, unify_moe_config(top1, names), loras, None).eval()
        assert not torch.allclose(shrunk(x), want, atol=1e-3)


def test_same_start_unify_starts_from_the_clients_experts_and_adds_the_private_sets(monkeypatch):
    """unrestricted_moe_same_start's unify: MetaMoE's MoE of the uploaded experts and router
    vectors, fine-tuned on the pooled private sets ∪ MetaMoE's proxies, domain-balanced, with
    the private sets' bytes charged as uploads (its run end to end: tests/test_compare.py)."""
    from types import SimpleNamespace

    import metamoe.strategies.unrestricted as unr
    from metamoe.data import load_benchmark
    from metamoe.strategies.base import ClientInfo

    cfg = resolve_config({"benchmark": "tiny", "method": "unrestricted_moe_same_start",
                          "overrides": "expert.epochs=2"})  # unify.epochs stays 1
    bench = load_benchmark(cfg)
    torch.manual_seed(0)
    seed = ViT(vit_config(cfg, bench.num_classes)).eval()
    strat = unr.UnrestrictedSameStart(cfg, seed, bench, None)
    strat._fed = SimpleNamespace(clients={7: ClientInfo(7, "mnist", "mnist", 0, 300),
                                          8: ClientInfo(8, "uci", "uci", 1, 300)})
    loras = fresh_loras(seed, cfg.expert.rank, cfg.expert.alpha, [1, 2])
    L, d = seed.cfg.depth, seed.cfg.dim
    experts = {n: ({k: v.numpy() for k, v in lo.items()},
                   np.random.default_rng(i).normal(size=(L, d)).astype(np.float32), {})
               for i, (n, lo) in enumerate(zip(("mnist", "uci"), loras, strict=True))}
    sel = {"mnist": {"rw_dpp": np.arange(0, 40)}, "uci": {"rw_dpp": np.arange(30, 70)}}
    union = strat.unify_data(sel)
    seen = {}

    def spy(moe, x, y, section, seed_, train_router, train_experts, desc, sample_weights):
        seen.update(moe=moe, n=len(x), w=sample_weights, router=train_router,
                    experts=train_experts, epochs=section.epochs, lr=section.lr)
        return {"loss": 0.0}

    monkeypatch.setattr(unr, "finetune", lambda moe, x, y, section, seed_, r, e, desc="",
                        sample_weights=None: spy(moe, x, y, section, seed_, r, e, desc,
                                                 sample_weights))
    moe = strat.unify(experts, union)
    assert seen["moe"] is moe and seen["router"] and seen["experts"]
    # the unify section's rates for the passes every method gets over private data
    assert (seen["epochs"], seen["lr"]) == (cfg.expert.epochs, cfg.unify.lr)
    assert seen["n"] == 600 + len(union) == 670  # both private sets and the 70 proxies
    w = seen["w"].numpy()  # rows: mnist 300, uci 300, proxies 0-39 (mnist's), 40-69 (uci's)
    assert w[:300].sum() + w[600:640].sum() == pytest.approx(0.5)  # mnist: half the draws
    assert strat._nbytes == {"mnist": 943_200, "uci": 943_200}
    ref = strat.expert_moe(experts, vectors=True)  # MetaMoE's starting MoE
    for a, b in zip(moe.router_parameters(), ref.router_parameters(), strict=True):
        torch.testing.assert_close(a, b)
