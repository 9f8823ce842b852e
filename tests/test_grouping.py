"""Many clients, few experts (unify.groups, strategies/grouping.py): the merge is the weighted
delta cut to rank r, k-means on router vectors recovers domains, and the grouped unify reads
nothing but what the clients uploaded."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from metamoe.config import ConfigError, resolve_config
from metamoe.models.lora import fresh_loras, lora_shapes
from metamoe.strategies.grouping import assign, features, group_experts, merge_loras, purity


def _lora(rng, depth=2, dim=8, hidden=16, rank=2) -> dict:
    return {k: rng.normal(size=s).astype(np.float32)
            for k, s in lora_shapes(depth, dim, hidden, rank).items()}


def _delta(lo: dict, key_a: str) -> np.ndarray:
    return lo[key_a.replace("lora_A", "lora_B")].astype(np.float64) @ lo[key_a].astype(np.float64)


def test_merge_is_the_weighted_delta_cut_to_rank_r():
    rng = np.random.default_rng(0)
    loras = [_lora(rng) for _ in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    keys = [k for k in loras[0] if "lora_A" in k]
    exact, kept = merge_loras(loras, w, rank=6)  # 3 x rank 2: no truncation
    assert kept == pytest.approx(1.0)
    assert exact[keys[0]].shape == (6, 8)
    for k in keys:
        want = sum(wi * _delta(lo, k) for wi, lo in zip(w, loras))
        np.testing.assert_allclose(_delta(exact, k), want, atol=1e-5)
    cut, kept = merge_loras(loras, w, rank=2)  # the clients' rank: the best rank-2 ΔW
    energies = []
    for k in keys:
        want = sum(wi * _delta(lo, k) for wi, lo in zip(w, loras))
        u, s, vh = np.linalg.svd(want)
        np.testing.assert_allclose(_delta(cut, k), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-4)
        energies.append((s[:2] ** 2).sum() / (s ** 2).sum())
        assert cut[k].shape == (2, want.shape[1])
    assert kept == pytest.approx(min(energies), rel=1e-5) and kept < 1


def _uploads(k_per_domain: int, noise: float, seed: int = 0) -> dict:
    """Router vectors [L, d] of clients of 3 domains: a large shared profile (M0's), a
    domain direction, per-client noise; LoRA experts; uneven sample counts."""
    rng = np.random.default_rng(seed)
    L, d = 2, 8
    common = 5 * rng.normal(size=(L, d))
    dom = rng.normal(size=(3, L, d))
    up = {}
    for i in range(3 * k_per_domain):
        vec = common + dom[i % 3] + noise * rng.normal(size=(L, d))
        up[f"d{i % 3}-{i // 3}"] = (_lora(rng, L, d), vec.astype(np.float32),
                                    {"n_train": float(10 + i)})
    return up


def test_kmeans_on_router_vectors_recovers_the_domains():
    up = _uploads(5, noise=0.3)
    feats = features([e[1] for e in up.values()])
    domain_of = {c: c.split("-")[0] for c in up}
    labels, _ = assign(feats, 3, seed=0)
    members = {g: [c for c, lab in zip(up, labels) if lab == g] for g in set(labels)}
    assert purity(members, domain_of) == 1.0 and len(members) == 3
    labels, info = assign(feats, "auto", seed=0)
    assert len(set(labels)) == 3 and max(info["silhouette"], key=info["silhouette"].get) == "3"
    assert list(assign(feats, "none", 0)[0]) == list(range(15))
    labels, info = assign(feats, 16, 0)  # more groups than experts left: one each
    assert sorted(labels) == list(range(15)) and info["clamped_to"] == 15
    # no structure (pure noise around one profile): auto keeps an expert per client
    for k in (12, 18, 30):
        noise = [np.random.default_rng(100 + i).normal(size=(2, 8)) for i in range(k)]
        labels, info = assign(features(noise), "auto", seed=0)
        assert max(info["silhouette"].values()) < 0.5 and len(set(labels)) == k


def test_group_experts_weights_router_vectors_by_sample_count():
    up = _uploads(4, noise=0.3)
    out, rep = group_experts(up, 3, seed=0, rank=2)
    assert list(out) == ["group-0", "group-1", "group-2"] and rep["E"] == 3
    for g, members in rep["groups"].items():
        n = np.array([up[c][2]["n_train"] for c in members])
        want = sum(ni * up[c][1].astype(np.float64) for ni, c in zip(n, members)) / n.sum()
        np.testing.assert_allclose(out[g][1], want, rtol=1e-5)
        assert out[g][2] == {"n_train": n.sum(), "members": len(members)}
    assert group_experts(up, "none", 0, 2) == (up, {})
    one, rep = group_experts(up, len(up), seed=0, rank=2)  # groups of one: the experts as sent
    assert sorted(len(m) for m in rep["groups"].values()) == [1] * len(up)
    for g, (lora, _, _) in one.items():
        (c,) = rep["groups"][g]
        assert lora is up[c][0]
    for bad in ("0", "x", "3"):  # tiny has 2 clients
        with pytest.raises(ConfigError, match="unify.groups"):
            resolve_config({"benchmark": "tiny", "overrides": f"unify.groups={bad}"})
    with pytest.raises(ConfigError, match="router_init=random"):  # BTX has no router vectors
        resolve_config({"benchmark": "tiny", "method": "btx", "overrides": "unify.groups=2"})


class _Private:
    """Stands for a client's private split on the server: any read fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the server read private data ({name})")

    def __len__(self):
        raise AssertionError("the server read private data (len)")

    def __getitem__(self, i):
        raise AssertionError("the server read private data (item)")

    def __array__(self, *a, **k):
        raise AssertionError("the server read private data (array)")


def test_grouped_unify_reads_only_what_the_clients_uploaded():
    """The real MetaMoE unify with unify.groups=1 on a benchmark whose every private split is
    unreadable: it groups, merges and fine-tunes from the uploads and the public pool alone;
    with one group per client it builds exactly the ungrouped MoE."""
    from metamoe.data import load_benchmark
    from metamoe.models.vit import ViT
    from metamoe.server.seed import vit_config
    from metamoe.strategies.metamoe import MetaMoE

    cfg = resolve_config({"benchmark": "tiny", "overrides": "unify.groups=1 unify.epochs=1"})
    hidden = _Private()
    shared = load_benchmark(cfg)  # cached per process: change a copy, not the shared object
    bench = replace(shared, domains=[replace(d, x_train=hidden, y_train=hidden, x_test=hidden,
                                             y_test=hidden, x_val=hidden, y_val=hidden)
                                     for d in shared.domains])
    torch.manual_seed(0)
    seed = ViT(vit_config(cfg, bench.num_classes)).eval()
    loras = fresh_loras(seed, cfg.expert.rank, cfg.expert.alpha, [1, 2])
    L, d = seed.cfg.depth, seed.cfg.dim
    experts = {n: ({k: v.numpy() + 0.01 for k, v in lo.items()},
                   np.random.default_rng(i).normal(size=(L, d)).astype(np.float32),
                   {"n_train": 100.0 * (i + 1)})
               for i, (n, lo) in enumerate(zip(("mnist", "uci"), loras, strict=True))}
    strat = MetaMoE(cfg, seed, bench, None)
    union = strat.unify_data({"mnist": {"rw_dpp": np.arange(0, 40)},
                              "uci": {"rw_dpp": np.arange(30, 70)}})
    moe = strat.unify(experts, union)
    assert list(moe.moe_cfg.expert_names) == ["group-0"]
    assert strat.group_report["groups"] == {"group-0": ["mnist", "uci"]}

    two = resolve_config({"benchmark": "tiny", "overrides": "unify.groups=2 unify.epochs=0"})
    plain = resolve_config({"benchmark": "tiny", "overrides": "unify.epochs=0"})
    a = MetaMoE(two, seed, bench, None).unify(experts, union)
    b = MetaMoE(plain, seed, bench, None).unify(experts, union)
    assert list(a.moe_cfg.expert_names) == ["group-0", "group-1"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    assert all(isinstance(d.x_train, np.ndarray) for d in load_benchmark(cfg).domains)


def test_proxy_groups_recover_the_domains_from_the_servers_own_data():
    """unify.group_expert=fedavg groups before any expert exists: from the proxy sets the
    server selected (indices into its own pool), overlapping within a domain."""
    from metamoe.strategies.group_fl import proxy_groups

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    pool = np.concatenate([c + 0.5 * rng.normal(size=(200, 16)) for c in centres])
    sel = {f"d{i % 3}-{i // 3}": np.sort(rng.choice(np.arange(200) + 200 * (i % 3), 60, False))
           for i in range(12)}
    members, info = proxy_groups(pool, sel, 3, seed=0)
    assert info["features"] == "proxies" and len(members) == 3
    assert purity(members, {c: c.split("-")[0] for c in sel}) == 1.0
    members, info = proxy_groups(pool, sel, "auto", seed=0)
    assert len(members) == 3 and max(info["silhouette"], key=info["silhouette"].get) == "3"


def test_group_fedavg_config_is_checked_before_training():
    base = "unify.group_expert=fedavg screen.enabled=false"
    with pytest.raises(ConfigError, match="unify.groups"):
        resolve_config({"benchmark": "tiny", "overrides": base})
    with pytest.raises(ConfigError, match="screen.enabled"):
        resolve_config({"benchmark": "tiny", "overrides": "unify.groups=2 "
                                                           "unify.group_expert=fedavg"})
    with pytest.raises(ConfigError, match="DP over rounds"):
        resolve_config({"benchmark": "tiny", "overrides": f"{base} unify.groups=2 "
                                                           "privacy.expert_dp_sigma=1"})
    with pytest.raises(ConfigError, match="group_expert"):
        resolve_config({"benchmark": "tiny", "overrides": "unify.groups=2 "
                                                           "unify.group_expert=mean"})
    with pytest.raises(ConfigError, match="method=metamoe"):
        resolve_config({"benchmark": "tiny", "method": "flexolmo",
                        "overrides": f"{base} unify.groups=2"})
    from metamoe.strategies.suites import joins

    assert joins("metamoe_suite", "metamoe[groups3]", "vision_k20")
    assert not joins("metamoe_suite", "metamoe[groups3_fedavg]", "vision_k20")
    assert not joins("metamoe_suite", "metamoe[groups3_cyclic]", "vision_k20")
    with pytest.raises(ConfigError, match="group_expert=cyclic.*screen.enabled"):
        resolve_config({"benchmark": "tiny", "overrides": "unify.groups=2 "
                                                           "unify.group_expert=cyclic"})


@pytest.mark.slow
@pytest.mark.parametrize("proxies", ["union", "own"])
def test_group_fedavg_rounds_average_the_members_uploads(tmp_path, cache_dir, proxies):
    """The real apps in Flower's simulation, 4 clients in 2 groups, 2 rounds: each member
    starts from its group's LoRA (M0 in round 1: B = 0), round 2's LoRA is the n_train-weighted
    mean of the members' round-1 uploads, and the MoE has one expert per group. A member
    trains on the group's proxies (union of its members' selections) or its own selection."""
    import json

    from metamoe.protocol import EXPERT, IDENTIFY
    from tests.upload_audit import record_run

    rc = {"benchmark": "tiny", "experiment": "groups3_fedavg", "run-id": "gf",
          "output-dir": str(tmp_path), "cache-dir": cache_dir,
          "overrides": "benchmark.clients_per_domain=2 unify.groups=2 unify.group_rounds=2 "
                       f"unify.group_proxies={proxies}"}
    uploads, sent = record_run(rc, nodes=4)
    m = json.loads((tmp_path / "gf" / "metrics.json").read_text())
    g = m["groups"]
    assert (g["expert"], g["E"], g["rounds"], g["purity"]) == ("fedavg", 2, 2, 1.0)
    assert sorted(m["references"]["experts"]) == ["group-0", "group-1"]
    node = {u["info"][1]["name"]: nid for t, nid, u in uploads if t == IDENTIFY}
    ups = {}  # node -> [round-1 reply, round-2 reply]
    for t, nid, u in uploads:
        if t == EXPERT:
            ups.setdefault(nid, []).append(u)
    for ms in g["groups"].values():
        nids = [node[c] for c in ms]
        inits = [[s["init"][1] for s in sent[(EXPERT, n)]] for n in nids]
        assert all(len(i) == 2 and len(ups[n]) == 2 for i, n in zip(inits, nids))
        for k, v in inits[0][0].items():  # round 1: the same fresh LoRA (= M0) for all
            assert all(np.array_equal(v, i[0][k]) for i in inits)
            if "lora_B" in k:
                assert not v.any()
        for n in nids:  # router vectors and train accuracy in the last round only
            assert [("router" in u, "train_acc_private" in u["metrics"][1])
                    for u in ups[n]] == [(False, False), (True, True)]
        w = np.array([ups[n][0]["metrics"][1]["n_train"] for n in nids], np.float64)
        for k, v in inits[0][1].items():  # round 2: the weighted mean of round 1's uploads
            want = sum(wi * ups[n][0]["expert"][1][k] for wi, n in zip(w / w.sum(), nids))
            np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-7)
            assert all(np.array_equal(v, i[1][k]) for i in inits)
        got = [[set(s["proxies"][1]["selected"].tolist()) for s in sent[(EXPERT, n)]]
               for n in nids]
        assert all(p[0] == p[1] for p in got)  # the same proxies in every round
        for n, p in zip(nids, got):
            assert ups[n][0]["metrics"][1]["n_proxies"] == len(p[0])
        union = set().union(*(p[0] for p in got))
        if proxies == "union":
            assert all(p[0] == union for p in got)
        else:  # each its own selection: the group's union is the members' sets together
            assert all(p[0] < union for p in got)


@pytest.mark.slow
@pytest.mark.parametrize("order,final", [("fixed", "last"), ("shuffled", "average")])
def test_cyclic_group_expert_passes_the_lora_from_member_to_member(tmp_path, cache_dir,
                                                                   order, final):
    """unify.group_expert=cyclic in the real apps, 5 clients in groups of 3 and 2, 2 rounds:
    within a round each member starts from exactly what the previous member uploaded, round
    2's first member from what round 1's last member uploaded, in the grouping's order or in
    each round's seeded permutation (unify.group_order); the round's last step holds one
    client (below federation.min_clients=2), which is checked over the whole round. The MoE's
    expert (no unify training: unify.epochs=0) is the last member's upload or the n_train-
    weighted mean of the last round's uploads (unify.group_final)."""
    import json

    from metamoe.models.io import load_moe
    from metamoe.protocol import EXPERT, IDENTIFY
    from metamoe.strategies.group_fl import shuffled
    from tests.upload_audit import record_run

    rc = {"benchmark": "tiny", "experiment": "groups3_cyclic", "run-id": "gc",
          "output-dir": str(tmp_path), "cache-dir": cache_dir,
          "overrides": "benchmark.num_clients=5 unify.groups=2 unify.group_rounds=2 "
                       "federation.min_clients=2 run.eval_references_max=1 unify.epochs=0 "
                       f"unify.group_order={order} unify.group_final={final}"}
    uploads, sent = record_run(rc, nodes=5)
    m = json.loads((tmp_path / "gc" / "metrics.json").read_text())
    g = m["groups"]
    assert (g["expert"], g["E"], g["rounds"], g["purity"]) == ("cyclic", 2, 2, 1.0)
    assert (g["order"], g["final"]) == (order, final)
    moe = load_moe(tmp_path / "gc")
    slot = {name: i for i, name in enumerate(moe.moe_cfg.expert_names)}
    assert m["rounds"] == 2  # what compare's table and bench.many_clients report
    assert sorted(len(ms) for ms in g["groups"].values()) == [2, 3]
    # 2 experts > run.eval_references_max=1: the clients score the MoE only
    assert 0 < m["accuracy"]["average"] <= 1
    assert np.isnan(m["references"]["zero_shot"]["average"])
    assert all(np.isnan(e["average"]) for e in m["references"]["experts"].values())
    node = {u["info"][1]["name"]: nid for t, nid, u in uploads if t == IDENTIFY}
    ups: dict = {}
    n_train: dict = {}
    routed: dict = {}  # node -> per round: were router vectors uploaded?
    for t, nid, u in uploads:
        if t == EXPERT:
            ups.setdefault(nid, []).append(u["expert"][1])
            n_train[nid] = float(u["metrics"][1]["n_train"])
            routed.setdefault(nid, []).append("router" in u)
    seed = int(m["config"]["run"]["seed"])
    for gname, ms in g["groups"].items():
        orders = [shuffled(ms, seed, r) if order == "shuffled" else ms for r in (1, 2)]
        nids = [node[c] for c in ms]
        init = {n: [s["init"][1] for s in sent[(EXPERT, n)]] for n in nids}
        assert all(len(init[n]) == 2 == len(ups[n]) for n in nids)
        assert all(routed[n] == [False, True] for n in nids)  # the last round's only
        first = node[orders[0][0]]
        assert all(not v.any() for k, v in init[first][0].items() if "lora_B" in k)  # M0
        # the order the expert travels
        chain = [(r, node[c]) for r in range(2) for c in orders[r]]
        for (r0, prev), (r1, nxt) in zip(chain, chain[1:]):
            for k, v in init[nxt][r1].items():
                np.testing.assert_array_equal(v, ups[prev][r0][k])
        got = {k: v.numpy() for k, v in moe.export_expert(slot[gname]).items()}
        if final == "last":
            want = ups[chain[-1][1]][1]
        else:
            w = np.array([n_train[n] for n in nids])
            want = {k: sum(wi * ups[n][1][k] for wi, n in zip(w / w.sum(), nids))
                    for k in got}
        assert sorted(got) == sorted(want)
        for k, v in got.items():
            np.testing.assert_allclose(v, want[k], rtol=1e-5, atol=1e-7)
    if order == "shuffled":  # a permutation that moves someone in some round
        assert any(shuffled(ms, seed, r) != ms for ms in g["groups"].values() for r in (1, 2))


def test_group_round_replies_carry_router_vectors_in_the_last_round_only():
    """The server's check of one expert reply (PhaseStrategy.aggregate_expert): a non-final
    group round's reply is the LoRA and scalars (vectors None) and is refused when it holds
    router vectors; the last round's, like a one-shot expert's, must hold them."""
    from types import SimpleNamespace

    from flwr.app import MetricRecord, RecordDict

    from metamoe.protocol import to_record
    from metamoe.strategies.base import Federation
    from metamoe.strategies.phases import PhaseStrategy

    cfg = resolve_config({"benchmark": "tiny", "method": "metamoe"})
    mc = SimpleNamespace(depth=2, dim=8, mlp_hidden=16)
    strat = SimpleNamespace(seed_model=SimpleNamespace(cfg=mc), cfg=cfg)
    lora = {k: np.zeros(s, np.float32)
            for k, s in lora_shapes(2, 8, 16, int(cfg.expert.rank)).items()}
    fed = Federation(grid=None, cfg=cfg)

    def reply(with_vectors: bool) -> RecordDict:
        rd = RecordDict({"expert": to_record(lora), "metrics": MetricRecord({"n_train": 5})})
        if with_vectors:
            rd["router"] = to_record({"vectors": np.ones((2, 8), np.float32)})
        return rd

    check = PhaseStrategy.aggregate_expert
    _, vec, met = check(strat, fed, 3, reply(False), vectors=False)
    assert vec is None and met["n_train"] == 5
    assert check(strat, fed, 3, reply(True))[1].shape == (2, 8)
    with pytest.raises(ValueError, match="non-final group round"):
        check(strat, fed, 3, reply(True), vectors=False)
    with pytest.raises(Exception, match="router"):
        check(strat, fed, 3, reply(False))
