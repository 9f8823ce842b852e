"""Robust aggregation (``fl.aggregation``): mean | median | trimmed | krum.

``aggregate_states`` (fedavg_moe, ddome) is checked against hand-computed small cases and
against one poisoned client (its state scaled by 1e3): the robust rules stay within the honest
clients' range, the mean does not. ``counting_strategy`` (dense fedavg on Flower's own
FedMedian / FedTrimmedAvg / Krum) keeps the project's reply screening. One end-to-end run
through Flower's simulation engine (tiny benchmark, 3 clients, median) has one client's FedAvg
reply scaled by 100 after its real handler ran, by a Flower mod as in ``test_faults.py``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from omegaconf import OmegaConf

from metamoe.config import ConfigError, resolve_config
from metamoe.protocol import from_record, to_record
from metamoe.strategies import Federation
from metamoe.strategies.base import ClientInfo
from metamoe.strategies.ddome import ddome_aggregate
from metamoe.strategies.fedalign import FedAlignMoE, FedAvgMoE
from metamoe.strategies.fedavg import counting_strategy
from metamoe.strategies.fl_common import fedavg_states
from metamoe.strategies.robust import aggregate_states, aggregator
from tests.flower_sim import simulate, with_run_config


def agg(states, rule, n=None, beta=0.2, f=1):
    return aggregate_states(states, n or [1.0] * len(states), rule, beta, f)


def st(*vals, key="w"):
    return [{key: np.asarray(v, np.float32)} for v in vals]


# ------------------------------------------------------------------ aggregate_states
def test_mean_is_the_n_weighted_fedavg():
    s = st([1.0, 2.0], [3.0, 6.0])
    np.testing.assert_allclose(agg(s, "mean", n=[1, 3])["w"], [2.5, 5.0])
    np.testing.assert_array_equal(agg(s, "mean", n=[1, 3])["w"], fedavg_states(s, [1, 3])["w"])


def test_median_is_coordinatewise_and_unweighted():
    s = st([1.0, 5.0], [2.0, 3.0], [10.0, 4.0])
    out = agg(s, "median", n=[1000, 1, 1])  # the counts do not weight the median
    np.testing.assert_array_equal(out["w"], [2.0, 4.0])
    assert out["w"].dtype == np.float32
    # Even K: the mean of the two middle values.
    np.testing.assert_array_equal(agg(st([1.0], [2.0], [4.0], [8.0]), "median")["w"], [3.0])


def test_trimmed_mean_cuts_floor_beta_k_from_each_end():
    s = st([1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0])
    # K=5, beta=0.2: one value cut from each end, coordinate by coordinate.
    np.testing.assert_allclose(agg(s, "trimmed", beta=0.2)["w"], [3.0, 1.0])
    # beta=0.1: floor(0.5) = 0, nothing cut: the plain (unweighted) mean.
    np.testing.assert_allclose(agg(s, "trimmed", beta=0.1, n=[9, 1, 1, 1, 1])["w"], [22.0, -8.8])
    # beta=0.4: floor(2) = 2 cut from each end: the median.
    np.testing.assert_allclose(agg(s, "trimmed", beta=0.4)["w"], [3.0, 1.0])


def test_krum_scores_all_keys_flattened_together():
    # Points (a, b): P0=(0,0) P1=(1,5) P2=(2,1) P3=(9,0); f=0, K=4 -> 2 nearest each.
    # Squared distances: 01=26 02=5 03=81 12=17 13=89 23=50.
    # Scores: P0 5+26=31, P1 17+26=43, P2 5+17=22, P3 50+81=131 -> P2.
    pts = [(0, 0), (1, 5), (2, 1), (9, 0)]
    states = [{"a": np.array([a], np.float32), "b": np.array([b], np.float32)} for a, b in pts]
    out = agg(states, "krum", f=0)
    assert (out["a"].tolist(), out["b"].tolist()) == ([2.0], [1.0])
    # On key a alone (0, 1, 2, 9): P0 1+4=5, P1 1+1=2, P2 1+4=5, P3 49+64 -> P1.
    only_a = [{"a": s["a"]} for s in states]
    np.testing.assert_array_equal(agg(only_a, "krum", f=0)["a"], [1.0])
    # f=1: K-f-2 = 1 nearest: P0 5, P1 17, P2 5, P3 50 -> P0 (first of the tie).
    np.testing.assert_array_equal(agg(states, "krum", f=1)["a"], [0.0])


def test_krum_returns_a_copy_of_one_input():
    rng = np.random.default_rng(0)
    states = [{"x": rng.normal(size=(3, 4)).astype(np.float32),
               "y": rng.normal(size=5).astype(np.float32)} for _ in range(6)]
    out = agg(states, "krum", f=2)
    hits = [i for i, s in enumerate(states)
            if all(np.array_equal(out[k], s[k]) for k in s)]
    assert len(hits) == 1
    assert all(out[k] is not states[hits[0]][k] for k in out)
    out["x"][0, 0] = 99.0
    assert states[hits[0]]["x"][0, 0] != 99.0


@pytest.mark.parametrize("poisoned", [0, 2, 4])
def test_one_poisoned_client_of_five(poisoned):
    rng = np.random.default_rng(poisoned)
    states = [{"w": (1.0 + 0.1 * rng.normal(size=(4, 6))).astype(np.float32),
               "b": (1.0 + 0.1 * rng.normal(size=3)).astype(np.float32)} for _ in range(5)]
    honest = [s for i, s in enumerate(states) if i != poisoned]
    states[poisoned] = {k: v * 1e3 for k, v in states[poisoned].items()}
    n = [300.0] * 5
    lo = {k: np.min([s[k] for s in honest], 0) for k in states[0]}
    hi = {k: np.max([s[k] for s in honest], 0) for k in states[0]}
    for rule in ("median", "trimmed", "krum"):
        out = aggregate_states(states, n, rule, 0.2, 1)
        for k in out:
            assert (out[k] >= lo[k] - 1e-6).all() and (out[k] <= hi[k] + 1e-6).all(), (rule, k)
    krum = aggregate_states(states, n, "krum", 0.2, 1)
    assert any(all(np.array_equal(krum[k], s[k]) for k in s) for s in honest)
    mean = aggregate_states(states, n, "mean", 0.2, 1)
    assert all((mean[k] > hi[k]).all() for k in mean)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown aggregation rule 'avg'"):
        agg(st([1.0]), "avg")
    with pytest.raises(ValueError, match="keys"):
        agg([{"a": np.zeros(1)}, {"b": np.zeros(1)}], "median")
    with pytest.raises(ValueError, match="weights"):
        aggregate_states(st([1.0], [2.0]), [1.0], "median", 0.2, 1)


def test_ddome_aggregate_takes_the_rule():
    gates = st([0.0], [1.0], [100.0], key="g")
    trained = [{0: {"e": np.array([0.0], np.float32)}},
               {0: {"e": np.array([2.0], np.float32)}, 1: {"e": np.array([5.0], np.float32)}},
               {0: {"e": np.array([400.0], np.float32)}}]
    prev = [{"e": np.array([-1.0], np.float32)}] * 3
    fl = OmegaConf.create({"aggregation": "median", "trim_beta": 0.2, "krum_malicious": 1})
    gate, experts = ddome_aggregate(gates, [1, 1, 1], trained, prev, aggregator(fl))
    np.testing.assert_array_equal(gate["g"], [1.0])
    assert [float(e["e"][0]) for e in experts] == [2.0, 5.0, -1.0]  # e2 untrained: kept
    gate, _ = ddome_aggregate(gates, [1, 1, 1], trained, prev)  # default: FedAvg
    np.testing.assert_allclose(gate["g"], [101 / 3])


# ------------------------------------------------------------------ config / strategies
def _cfg(overrides: str):
    return resolve_config({"benchmark": "tiny", "method": "fedalign_moe", "overrides": overrides})


def test_fedalign_moe_refuses_robust_rules_fedavg_moe_takes_them():
    with pytest.raises(ConfigError, match="fl.aggregation"):
        FedAlignMoE(_cfg("fl.aggregation=median"), None, None, None)
    FedAlignMoE(_cfg("fl.aggregation=mean"), None, None, None)
    s = FedAvgMoE(_cfg("fl.aggregation=trimmed"), None, None, None)
    assert s.aggregate.keywords == {"rule": "trimmed", "trim_beta": 0.2, "krum_malicious": 1}


def _reply(arrays: dict, nid: int) -> Message:
    md = Metadata(run_id=1, message_id=f"m-{nid}-{time.time_ns()}", src_node_id=1,
                  dst_node_id=nid, reply_to_message_id="", group_id="", created_at=time.time(),
                  ttl=3600.0, message_type="train")
    return Message(RecordDict({"arrays": to_record(arrays),
                               "metrics": MetricRecord({"num-examples": 300})}),
                   reply_to=Message(RecordDict(), metadata=md))


@pytest.mark.parametrize("rule,cls", [("mean", FedAvg), ("median", FedMedian),
                                      ("trimmed", FedTrimmedAvg), ("krum", Krum)])
def test_counting_strategy_is_the_flower_class_and_still_screens(rule, cls):
    cfg = _cfg(f"fl.aggregation={rule} fl.trim_beta=0.25 fl.krum_malicious=1")
    fed = Federation(grid=None, cfg=cfg)
    shapes = {"w": (2, 3)}
    strat = counting_strategy(fed, shapes, cfg.fl, min_train_nodes=2, min_available_nodes=5)
    assert isinstance(strat, cls)
    if rule == "trimmed":
        assert strat.beta == 0.25
    if rule == "krum":
        assert strat.num_malicious_nodes == 1
    rng = np.random.default_rng(1)
    honest = [(1.0 + 0.1 * rng.normal(size=(2, 3))).astype(np.float32) for _ in range(4)]
    replies = []
    for i, w in enumerate(honest + [np.full((2, 3), np.nan, np.float32)]):
        fed.clients[20 + i] = ClientInfo(20 + i, f"c{i}", "mnist", i, 300)
        replies.append(_reply({"w": w * (1e3 if i == 3 else 1.0)}, 20 + i))
    arrays, _ = strat.aggregate_train(1, replies)
    got = from_record(arrays)["w"]
    assert [r["client"] for r in fed.rejected] == ["c4"]  # the NaN reply, not aggregated
    assert set(fed.upload_bytes) == {"c0", "c1", "c2", "c3"}
    assert [h["round"] for h in strat.history] == [1]
    lo, hi = np.min(honest[:3], 0), np.max(honest[:3], 0)
    inside = bool(((got >= lo - 1e-6) & (got <= hi + 1e-6)).all())
    assert inside == (rule != "mean"), (rule, got)


# ------------------------------------------------------------------ end to end
POISONED, SCALE = 2, 100.0


def _poison(run_config: dict, dump: Path):
    def poison(msg: Message, ctx: Context, call_next) -> Message:
        reply = call_next(msg, with_run_config(ctx, run_config))  # the real handler ran
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        pid = int(ctx.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        arrays = {k: v.numpy() * (SCALE if pid == POISONED else 1.0)
                  for k, v in reply.content["arrays"].items()}
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        np.savez(dump / f"r{rnd}-p{pid}-{os.getpid()}.npz", **arrays)
        return reply

    return poison


@pytest.mark.slow
@pytest.mark.attacks
def test_e2e_fedavg_median_survives_a_scaled_reply(tmp_path, cache_dir):
    import metamoe

    dump = tmp_path / "replies"
    dump.mkdir()
    rc = {"benchmark": "tiny", "method": "fedavg", "run-id": "median",
          "output-dir": str(tmp_path / "results"), "cache-dir": cache_dir,
          "overrides": "benchmark.num_clients=3 fl.aggregation=median fl.rounds=2 fl.epochs=1"}
    simulate(rc, 3, _poison(rc, dump))
    run_dir = tmp_path / "results" / "median"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["fl_aggregation"] == "median" and m["config"]["fl"]["aggregation"] == "median"
    assert [r["round"] for r in m["fl_rounds"]] == [1, 2] and not m["rejected"]
    assert len(m["clients"]) == 3 and not m["missing"]
    for block in (m["accuracy"], m["references"]["zero_shot"]):
        assert all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in block["per_domain"].values())
    # The emitted LoRA is the coordinate-wise median of the last round's three replies,
    # far from their mean (which the scaled reply dominates).
    last = {int(p.name.split("-")[1][1:]): dict(np.load(p)) for p in dump.glob("r2-*.npz")}
    assert sorted(last) == [0, 1, 2]
    moe = metamoe.load_moe(run_dir)
    for l, layer in enumerate(moe.moe_layers()):
        for attr, key in (("A1", "fc1.lora_A"), ("B1", "fc1.lora_B"),
                          ("A2", "fc2.lora_A"), ("B2", "fc2.lora_B")):
            k = f"layers.{l}.{key}"
            got = getattr(layer, attr)[0].detach().numpy()
            stack = np.stack([last[p][k] for p in range(3)])
            np.testing.assert_allclose(got, np.median(stack, 0), rtol=1e-5, atol=1e-7)
            assert np.abs(stack.mean(0) - got).max() > np.abs(got).max(), (l, attr)


def test_federation_orders_clients_and_replies_independently_of_arrival():
    """Replies arrive in whatever order the nodes finish: a phase's result follows the
    payloads' order and the registered clients follow (partition-id, name), so an
    order-sensitive step (grouping's k-means rows, cyclic transfer's member order) is the
    same on every run of a seed."""
    cfg = _cfg("")
    fed = Federation(grid=None, cfg=cfg)
    for nid, pid in ((31, 2), (30, 0), (32, 1)):  # registered in arrival order
        fed.clients[nid] = ClientInfo(nid, f"c{pid}", "mnist", pid, 300)
    fed.order_clients()
    assert [c.partition_id for c in fed.clients.values()] == [0, 1, 2]
    w = {"w": np.ones((2, 3), np.float32)}
    replies = [_reply(w, nid) for nid in (32, 31, 30)]  # arrival: last payload first
    got = fed.collect("train", [30, 31, 32], replies, lambda nid, c: nid, min_replies=3)
    assert list(got) == [30, 31, 32]


class _EvalGrid:
    """Answers each evaluate message with the node's accuracy (node id / 100), or an error for
    the nodes in ``fail``; records who was asked."""

    def __init__(self, fail=()):
        self.fail, self.asked = set(fail), []

    def send_and_receive(self, msgs, timeout=None):
        from flwr.app import Error

        out = []
        for m in msgs:
            nid = m.metadata.dst_node_id
            self.asked.append(nid)
            md = Metadata(run_id=1, message_id=f"m-{nid}-{time.time_ns()}", src_node_id=1,
                          dst_node_id=nid, reply_to_message_id="", group_id="evaluate",
                          created_at=time.time(), ttl=3600.0, message_type="evaluate")
            ask = Message(m.content, metadata=md)
            if nid in self.fail:
                rep = Message(error=Error(code=0, reason="crashed"), reply_to=ask)
            else:
                rep = Message(RecordDict({"metrics": MetricRecord({"acc": nid / 100})}),
                              reply_to=ask)
            out.append(rep)
        return out


def test_eval_per_domain_asks_one_client_per_domain_and_model_and_falls_back(monkeypatch):
    """run.eval_per_domain: of the clients of a domain sent the same model, the first
    evaluates for the others (their bytes counted, metrics.json's eval_shared names who stood
    for whom); a client sent another model, or of another domain, evaluates itself; when the
    one asked fails, the others are asked and the failure is recorded as missing. Off, every
    client is asked."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # the server's messages outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)
    w = {"w": np.ones((2, 3), np.float32)}

    def run(flag: bool, fail=()):
        fed = Federation(grid=_EvalGrid(fail), cfg=_cfg(f"run.eval_per_domain={flag}"))
        for nid, dom in ((10, "mnist"), (11, "mnist"), (12, "mnist"), (20, "uci"), (21, "uci")):
            fed.clients[nid] = ClientInfo(nid, f"c{nid}", dom, nid, 300)
        same = RecordDict({"moe": to_record(w)})
        other = RecordDict({"moe": to_record({"w": np.zeros((2, 3), np.float32)})})
        payloads = {10: same, 11: RecordDict({"moe": to_record(w)}), 12: other, 20: same,
                    21: same}
        got = fed.evaluate("evaluate", "evaluate", payloads,
                           lambda nid, c: dict(c["metrics"]))
        return fed, {fed.client_name(n): m["acc"] for n, m in got.items()}

    fed, acc = run(False)
    assert sorted(fed.grid.asked) == [10, 11, 12, 20, 21] and not fed.eval_shared
    fed, acc = run(True)
    assert sorted(fed.grid.asked) == [10, 12, 20]  # 11: same bytes as 10's payload
    assert acc == {"c10": 0.10, "c11": 0.10, "c12": 0.12, "c20": 0.20, "c21": 0.20}
    assert fed.eval_shared == {"evaluate": {"c11": "c10", "c21": "c20"}}
    assert fed.upload_bytes["c11"] == fed.upload_bytes["c10"] > 0
    assert fed.download_bytes["c21"] == fed.download_bytes["c20"] > 0
    fed, acc = run(True, fail={10})
    assert sorted(fed.grid.asked) == [10, 11, 12, 20]
    assert acc == {"c11": 0.11, "c12": 0.12, "c20": 0.20, "c21": 0.20}
    assert fed.missing == {"evaluate": ["c10"]} and "c11" not in fed.eval_shared["evaluate"]
    with pytest.raises(ConfigError, match="run.eval_per_domain"):
        resolve_config({"benchmark": "tiny_local", "method": "metamoe",
                        "overrides": "benchmark.num_clients=3 benchmark.pool_data=/p "
                                     "run.eval_per_domain=true"})
