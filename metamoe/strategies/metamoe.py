"""The MetaMoE strategy: sketch → select → expert → unify → evaluate (paper Alg. 1).

The phases themselves (payloads, validation of replies, proxy selection, the unify stage)
are in ``strategies/phases.py``, shared with the one-shot baselines; this module is the
driver, with a checkpoint after every phase so an interrupted run resumes.
"""

from __future__ import annotations

import logging

import torch

from metamoe.models.io import moe_from_state, shipped_state
from metamoe.protocol import EVALUATE, EXPERT, SKETCH
from metamoe.proxy import sketch as psk
from metamoe.strategies.base import Federation, Outcome, pack, register, unpack
from metamoe.strategies.group_fl import group_fedavg
from metamoe.strategies.phases import PhaseStrategy

log = logging.getLogger("metamoe")


@register("metamoe")
class MetaMoE(PhaseStrategy):
    name = "metamoe"

    # ---------------------------------------------------------------- driver
    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        ck = fed.checkpoint
        extra: dict = {}
        fed.identify(node_ids)
        node_ids = list(fed.clients)
        seed_sent = False

        saved = ck.load("sketch") if ck else None
        if saved:
            arrays, meta = saved
            sketches = {c: psk.sketch_from_arrays(a) for c, a in unpack(arrays).items()}
            dp = meta["dp"]
            fed.resumed.append("sketch")
        else:
            with fed.phase("sketch"):
                got = fed.exchange("sketch", SKETCH, self.configure_sketch(node_ids),
                                   lambda nid, c: self.aggregate_sketch(fed, nid, c))
            seed_sent = True
            sketches = {fed.client_name(nid): sk for nid, (sk, _) in got.items()}
            dp = {fed.client_name(nid): d for nid, (_, d) in got.items() if d}
            if ck:
                ck.save("sketch", pack({c: sk.to_arrays() for c, sk in sketches.items()}),
                        {"dp": dp})
        if dp:
            extra["sketch_dp"] = dp

        saved = ck.load("select") if ck else None
        if saved:
            selections = unpack(saved[0])
            fed.resumed.append("select")
        else:
            with fed.phase("select"):
                selections = self.select(sketches)
            if ck:
                ck.save("select", pack(selections), {})

        saved = ck.load("expert") if ck else None
        if saved:
            flat, meta = saved
            experts = {}
            for c in meta["order"]:
                arrs = unpack(flat)[c]
                vec = arrs.pop("__router__")
                experts[c] = (arrs, vec, meta["metrics"][c])
            self.group_report = meta.get("groups", {})
            fed.resumed.append("expert")
        elif self.cfg.unify.group_expert != "merge":  # one expert per group, trained in rounds
            with fed.phase("expert"):
                experts, self.group_report = group_fedavg(self, fed, selections,
                                                          with_seed=not seed_sent)
        else:
            with fed.phase("expert"):
                got = fed.exchange("expert", EXPERT,
                                   self.configure_expert(fed, selections, with_seed=not seed_sent),
                                   lambda nid, c: self.aggregate_expert(fed, nid, c))
            order = sorted(got, key=lambda n: fed.clients[n].partition_id)
            experts = {fed.client_name(n): got[n] for n in order}
        if ck and "expert" not in fed.resumed:
            ck.save("expert", pack({c: {**e[0], "__router__": e[1]} for c, e in experts.items()}),
                    {"order": list(experts), "metrics": {c: e[2] for c, e in experts.items()},
                     "groups": self.group_report})
        if self.cfg.unify.group_expert != "merge":  # the group experts' communication rounds
            extra["rounds"] = int(self.cfg.unify.group_rounds)
        extra.update(self.expert_extras(experts))
        experts = self.screen(fed, experts, selections, extra)

        # the proxies of the clients whose experts (or groups) reach unify
        trained = set(experts) if self.cfg.unify.group_expert == "merge" else \
            {c for g in experts for c in self.group_report["groups"][g]}
        used = {c: sel for c, sel in selections.items() if c in trained}
        saved = ck.load("unify") if ck else None
        if saved:
            moe = moe_from_state({k: torch.from_numpy(v) for k, v in saved[0].items()},
                                 saved[1])
            self.group_report = saved[1].get("groups", {})
            fed.resumed.append("unify")
        else:
            with fed.phase("unify"):
                moe = self.unify(experts, self.unify_data(used))
            if ck:
                ck.save("unify", {k: v.detach().cpu().numpy() for k, v in shipped_state(moe).items()},
                        {"model": moe.cfg.to_dict(), "moe": moe.moe_cfg.to_dict(),
                         "groups": self.group_report})
        extra["lambdas"] = moe.lambdas()
        if groups := self.groups_extra(fed):  # unify.groups: the clients each expert merges
            extra["groups"] = groups
        domains = {d.name: list(map(int, d.classes)) for d in self.bench.domains}
        model_extra = {"class_names": list(self.bench.class_names), "domains": domains}
        with fed.phase("evaluate"):
            evals = fed.evaluate("evaluate", EVALUATE,
                                 self.configure_evaluate(fed, moe, model_extra),
                                 lambda nid, c: self.aggregate_evaluate(fed, nid, c))
        evaluations = {fed.client_name(n): m for n, m in evals.items()}
        return Outcome(evaluations=evaluations, model=moe, model_extra=model_extra, extra=extra)
