"""Poisoned but well-formed uploads, through the real ServerApp and ClientApps in Flower's
simulation: a Flower mod rewrites an attacker's reply after (or instead of) its real handler
ran, as ``tests/test_faults.py`` injects faults.

One federation of 8 clients on ``tiny_learn`` (experts that learn, so that a poisoned expert
differs from an honest one): partitions 0 (mnist) and 1 (uci) are honest, 2-7 each mount one
attack. Where an attack needs another client's upload the attacker recomputes it exactly, as
one that captured it would hold it: it runs the victim's real handler on the victim's data in
its own process, after working out the victim's proxies with the server's own (public)
selection code. The reference is the same federation in which the six attackers take no part
(they drop out at ``query.identify``): with screening, the honest clients' accuracies must be
within 1 point of it, and every attacker must be rejected for the right reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from bench.attacks import permuted_expert, scale_delta
from metamoe.clients import stages
from metamoe.clients.node import node_data, seed_model
from metamoe.config import resolve_config
from metamoe.data import client_names
from metamoe.protocol import EXPERT, IDENTIFY, SKETCH, from_record, to_record
from metamoe.proxy.sketch import sketch_from_arrays
from metamoe.server.seed import get_seed_model
from metamoe.strategies.metamoe import MetaMoE
from metamoe.training import derive_seed
from tests.flower_sim import simulate as simulate_apps
from tests.flower_sim import with_run_config

pytestmark = [pytest.mark.attacks, pytest.mark.slow]

OVERRIDES = "benchmark.num_clients=8"
# partition -> (attack, victim partition); the reason word the server must give for it
ATTACKS = {2: ("scaled_delta", None), 3: ("scaled_router", None), 4: ("permuted_labels", None),
           5: ("copied_router", 0), 6: ("replay", 1), 7: ("steered_sketch", 0)}
REASON = {"scaled_delta": "LoRA delta", "scaled_router": "router vector norms",
          "permuted_labels": "own proxies", "copied_router": "fit another client's proxies",
          "replay": "duplicates client", "steered_sketch": "fit another client's proxies"}


def _victim_proxies(cfg, view: Context, victim: int) -> ArrayRecord:
    """The proxies the server sends ``victim``: its sketch (its real handler's computation)
    run through the server's selection code on the public pool under M0."""
    node = node_data(view)
    seed = seed_model(view, node)
    sk = sketch_from_arrays(stages.sketch_stage(cfg, seed, node.domain, node.bench,
                                                derive_seed(cfg.run.seed, victim))[0])
    _, pool, _ = get_seed_model(cfg, node.bench)
    sel = MetaMoE(cfg, seed, node.bench, pool).select({node.name: sk})[node.name]
    method = cfg.select.method
    return to_record({"selected": sel[method], **{k: v for k, v in sel.items() if k != method}})


def attack_mod(run_config: dict, attacks: dict[int, tuple[str, int | None]]):
    def mod(msg: Message, ctx: Context, call_next) -> Message:
        def view(pid: int) -> Context:
            return with_run_config(ctx, run_config, **{"partition-id": pid})

        pid = int(ctx.node_config["partition-id"])
        mtype = msg.metadata.message_type
        kind, victim = attacks.get(pid, (None, None))
        if kind == "absent":
            if mtype == IDENTIFY:
                raise RuntimeError(f"partition {pid} takes no part")
            return call_next(msg, view(pid))
        if kind == "steered_sketch" and mtype == SKETCH:
            reply = call_next(msg, view(pid))
            reply.content["sketch"] = call_next(msg, view(victim)).content["sketch"]
            return reply
        if kind in ("copied_router", "replay") and mtype == EXPERT:
            own = msg.content["proxies"]
            msg.content["proxies"] = _victim_proxies(resolve_config(run_config), view(victim),
                                                     victim)
            stolen = call_next(msg, view(victim)).content
            msg.content["proxies"] = own
            reply = call_next(msg, view(pid))
            keys = ["router"] if kind == "copied_router" else ["expert", "router", "metrics"]
            for k in keys:
                reply.content[k] = stolen[k]
            return reply
        reply = call_next(msg, view(pid))
        if mtype != EXPERT or kind is None:
            return reply
        c = reply.content
        if kind == "scaled_delta":
            c["expert"] = to_record(scale_delta(from_record(c["expert"]), 10.0))
        elif kind == "scaled_router":
            c["router"] = ArrayRecord({"vectors": Array(c["router"]["vectors"].numpy() * 10.0)})
        elif kind == "permuted_labels":
            node = node_data(view(pid))
            idx = np.asarray(from_record(msg.content["proxies"])["selected"], np.int64)
            lora, vec, _ = permuted_expert(node.cfg, seed_model(view(pid), node), node.domain,
                                           node.bench, idx,
                                           derive_seed(node.cfg.run.seed, pid))
            c["expert"], c["router"] = to_record(lora), to_record({"vectors": vec})
        return reply

    return mod


def simulate(tmp, run_id: str, attacks: dict, cache: str) -> dict:
    rc = {"benchmark": "tiny_learn", "run-id": run_id, "output-dir": str(tmp / "results"),
          "cache-dir": cache, "overrides": OVERRIDES}
    simulate_apps(rc, 8, attack_mod(rc, attacks))
    run_dir = tmp / "results" / run_id
    return json.loads((run_dir / "metrics.json").read_text()) | \
        {"report": (run_dir / "report.md").read_text()}


def test_each_attacker_is_rejected_and_the_honest_clients_keep_their_accuracy(tmp_path,
                                                                            cache_dir):
    ref = simulate(tmp_path, "without-attackers", {p: ("absent", None) for p in ATTACKS},
                   cache_dir)
    hit = simulate(tmp_path, "attacked", ATTACKS, cache_dir)
    names = dict(enumerate(client_names(resolve_config({"benchmark": "tiny_learn",
                                                         "overrides": OVERRIDES}))))
    decision = hit["screening"]["decision"]
    for pid, (kind, _) in ATTACKS.items():
        why = decision[names[pid]]
        assert why != "accepted" and REASON[kind] in why, (kind, why)
    assert decision[names[0]] == decision[names[1]] == "accepted"
    assert sorted(hit["missing"]["screen"]) == sorted(names[p] for p in ATTACKS)
    assert {r["client"] for r in hit["rejected"] if r["phase"] == "screen"} == \
        {names[p] for p in ATTACKS}
    # Only the honest experts were merged, and only the honest clients evaluated it.
    assert sorted(hit["references"]["experts"]) == sorted([names[0], names[1]])
    assert set(hit["clients"]) == {names[0], names[1]}
    for dom in ("mnist", "uci"):
        assert abs(hit["accuracy"]["per_domain"][dom] - ref["accuracy"]["per_domain"][dom]) \
            <= 0.01, (dom, hit["accuracy"], ref["accuracy"])
    # The experts learned (so the attacks were tested against a working pipeline).
    assert ref["accuracy"]["average"] > ref["references"]["zero_shot"]["average"] + 0.05
    assert "## Screening of the expert uploads" in hit["report"]
    assert "REJECTED" in hit["report"] and "accepted" in hit["report"]
    st = hit["screening"]["stats"]
    assert st[names[0]]["router_clipped_layers"] == 0.0
