"""One shared expert per group, trained among the group's members by FedAvg
(``unify.group_expert=fedavg``) or by passing it from member to member (``cyclic``); the
alternative, ``merge``, merges uploaded experts (``strategies/grouping.py``).

MetaMoE's expert phase, run as ``unify.group_rounds`` R rounds per group:

1. **Groups** before any expert exists, from what the server already holds: the proxy sets it
   selected from the clients' sketches (:func:`grouping.proxy_features`, k-means with
   ``unify.groups`` E clusters or ``auto``).
2. **Rounds**: a group's expert starts at M0 (a fresh LoRA with B = 0). In round r every member
   gets the group's current LoRA and proxies (``unify.group_proxies``: ``union``, the group's,
   i.e. the union of its members' proxy sets, or ``own``, the member's own selection, so that
   a group passes over each proxy about as often as one client over its own), trains
   ``expert.epochs / R`` passes over its Dp ∪ those proxies
   (``clients/stages.py expert_stage``) and uploads the expert reply it always uploads; the
   server averages the members' LoRA factors weighted by ``n_train`` (FedAvg on LoRA, as the
   ``fedavg`` baseline does). ``cyclic`` (cyclic weight transfer): within a round the members
   train one after another, each starting from the LoRA the previous one uploaded (the
   groups in parallel: step j trains every group's j-th member), so the group's expert takes
   as many sequential optimiser steps as one client holding the group's data; a round takes
   as many exchanges as the largest group has members. The order is the grouping's in every
   round (``unify.group_order=fixed``) or a fresh seeded permutation per round
   (``shuffled``). Either way R rounds × expert.epochs / R keeps the budget rule's passes
   over Dp.
3. The group's expert is its last state: with ``fedavg`` the last round's average, with
   ``cyclic`` the last member's LoRA (``unify.group_final=last``) or the ``n_train``-weighted
   average of the LoRAs its members uploaded in the last round (``average``: a mean along
   one round's trajectory, which weighs every member's data alike instead of the last
   member's most). Its router vectors are its members' last-round vectors,
   ``n_train``-weighted.

A member that fails or is rejected in a round is left out of that round's average (logged
and recorded by :class:`~metamoe.strategies.base.Federation`); a group no member answered
keeps its LoRA; a group with no reply in the last round has no expert. Uploads: R expert
replies per client, counted in upload bytes; only the last round's carry router vectors and
the train accuracy (``"final"`` in the round's config): the earlier ones would go unused, and
each would be one more release of a mean over the client's private data.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from metamoe.models.lora import fresh_loras
from metamoe.protocol import EXPERT, to_record
from metamoe.strategies.base import Federation, PhaseError
from metamoe.strategies.fl_common import fedavg_states, weighted_mean
from metamoe.strategies.grouping import assign, members_of, parse_groups, proxy_features
from metamoe.training import derive_seed

log = logging.getLogger("metamoe")


def proxy_groups(pool_features: np.ndarray, selections: dict[str, np.ndarray], groups,
                 seed: int) -> tuple[dict[str, list[str]], dict]:
    """{"group-<g>": [clients]} and the assignment info, from the proxy sets ``selections``
    ({client: indices into the public pool})."""
    names = list(selections)
    labels, info = assign(proxy_features(pool_features, [selections[c] for c in names]),
                          parse_groups(groups), seed)
    return members_of(names, labels), {**info, "features": "proxies"}


def shuffled(members: list[str], seed: int, rnd: int) -> list[str]:
    """``members`` in round ``rnd``'s seeded order (``unify.group_order=shuffled``)."""
    perm = np.random.default_rng(derive_seed(seed, 7927, rnd)).permutation(len(members))
    return [members[i] for i in perm]


def group_fedavg(strat, fed: Federation, selections: dict[str, dict[str, np.ndarray]],
                 with_seed: bool) -> tuple[dict[str, tuple], dict]:
    """The expert phase of ``unify.group_expert=fedavg`` (module doc): returns one expert per
    group {group: (LoRA, router vectors, {"n_train", "members"})} and the group report."""
    cfg, uc, ec = strat.cfg, strat.cfg.unify, strat.cfg.expert
    method = cfg.select.method
    own = {ci.name: sel[method] for ci in fed.clients.values()
           if (sel := selections.get(ci.name)) is not None}
    members, info = proxy_groups(strat.pool_features, own, uc.groups, int(cfg.run.seed))
    log.info("unify.group_expert=%s: %d clients -> %d groups %s", uc.group_expert, len(own),
             len(members), {g: len(m) for g, m in members.items()})
    node_of = {ci.name: nid for nid, ci in fed.clients.items()}
    rounds, rank, alpha = int(uc.group_rounds), int(ec.rank), float(ec.alpha)
    inits = fresh_loras(strat.seed_model, rank, alpha,
                        [derive_seed(int(cfg.run.seed), 7919, i) for i in range(len(members))])
    state = {g: {k: v.numpy() for k, v in lo.items()}
             for g, lo in zip(members, inits, strict=True)}
    union = {g: np.unique(np.concatenate([own[c] for c in ms])) for g, ms in members.items()}
    proxies = {c: own[c] if uc.group_proxies == "own" else union[g]
               for g, ms in members.items() for c in ms}
    seed = strat.configure_sketch([0])[0] if with_seed else None
    cyclic = uc.group_expert == "cyclic"
    # fedavg: one step per round, every member at once; cyclic: the j-th member of every group
    # in step (r, j), the groups in parallel
    width = max(len(ms) for ms in members.values()) if cyclic else 1
    last: dict[str, dict[str, tuple]] = {}
    for r in range(1, rounds + 1):
        order = {g: (shuffled(ms, int(cfg.run.seed), r)
                     if cyclic and uc.group_order == "shuffled" else ms)
                 for g, ms in members.items()}
        for j in range(width):
            active = {g: (ms[j:j + 1] if cyclic else ms) for g, ms in order.items()}
            payloads = {}
            for g, ms in active.items():
                for c in ms:
                    if node_of.get(c) not in fed.clients:
                        continue
                    content = RecordDict({
                        "proxies": to_record({"selected": proxies[c]}),
                        "init": to_record(state[g]),
                        "group-round": ConfigRecord({"round": r,
                                                     "epochs": float(ec.epochs) / rounds,
                                                     "final": r == rounds})})
                    if seed is not None and r == 1:  # a member's first message
                        content["seed"], content["seed-config"] = seed["seed"], \
                            seed["seed-config"]
                    payloads[node_of[c]] = content
            phase = f"expert-r{r}" + (f"-{j}" if cyclic else "")
            # a cyclic step holds one member per group: federation.min_clients is checked
            # over the whole round instead
            got = fed.exchange(phase, EXPERT, payloads,
                               lambda nid, c, final=r == rounds:
                               strat.aggregate_expert(fed, nid, c, vectors=final),
                               min_replies=0 if cyclic else None)
            by_name = {fed.client_name(n): v for n, v in got.items()}
            if j == 0:
                last = {}
            for g, ms in active.items():
                ups = {c: by_name[c] for c in ms if c in by_name}
                if not ups:
                    if ms:
                        log.warning("group %s: no valid expert reply in %s; its LoRA is kept",
                                    g, phase)
                    continue
                n = [float(u[2]["n_train"]) for u in ups.values()]
                state[g] = fedavg_states([u[0] for u in ups.values()], n)
                last.setdefault(g, {}).update(ups)
        answered = sum(len(v) for v in last.values())
        if cyclic and answered < int(cfg.federation.min_clients):
            raise PhaseError(f"phase expert-r{r}: only {answered} members answered in the "
                             f"round, federation.min_clients={cfg.federation.min_clients}")
    experts = {}
    for g, ups in last.items():
        n = [float(u[2]["n_train"]) for u in ups.values()]
        if cyclic and uc.group_final == "average":
            state[g] = fedavg_states([u[0] for u in ups.values()], n)
        experts[g] = (state[g], weighted_mean([u[1] for u in ups.values()], n),
                      {"n_train": float(sum(n)), "members": float(len(ups))})
    report = {**info, "E": len(experts), "groups": members, "expert": uc.group_expert,
              "rounds": rounds}
    if cyclic:
        report.update(order=uc.group_order, final=uc.group_final)
    return experts, report
