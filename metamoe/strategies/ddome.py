"""DDOME: a frozen common expert (M0) and an MLP gate picking a per-client expert subset.

* ``ddome`` — DDOME, baselines_detail.md §4. Common expert = M0 (frozen): its pooled feature
  feeds a 2-layer-MLP gate over M = ``fl.ddome_experts`` (default: number of clients) FFN-LoRA
  experts. Per round a normal client receives the gate, uploads its top-K expert indices
  (``fl.ddome_top_k``; TOPK of the gate scores summed over Dp), receives those K experts and
  trains gate + experts jointly on CE of the gate-renormalised mixture of the K experts'
  probabilities [I]. With ``fl.ddome_anchors`` (default) the first M clients (partition order)
  are anchors one-to-one with the experts: an anchor trains only its expert (CE) and the gate
  (CE to its expert's one-hot). Simplification, stated plainly: with one client per domain and
  M = N every client is an anchor (the domains are the "roughly distinct" anchor
  distributions); all clients take part in every round (no client sampling). Server: gate =
  n-weighted FedAvg over all participants, expert e = n-weighted FedAvg over the clients that
  trained it (untrained experts keep their weights). Test time on the client's unlabelled test
  inputs: top-K experts by summed gate scores, then per sample the single expert with the
  highest gate score among them. No unified MoE artifact is emitted for DDOME.

``fl.aggregation`` (mean | median | trimmed | krum, ``strategies/robust.py``) replaces the
n-weighted average of the gate and of each expert (over the clients that trained it); the rule
is recorded in the Outcome's ``extra`` as ``fl_aggregation``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from metamoe.config import num_clients
from metamoe.models.gate import GateMLP
from metamoe.models.lora import fresh_loras, lora_shapes
from metamoe.models.moe_state import module_arrays
from metamoe.protocol import (
    CONFIG,
    DDOME_EVALUATE,
    DDOME_SELECT,
    DDOME_SPEC,
    DDOME_TRAIN,
    UploadError,
    check_arrays,
    check_metrics,
    encode_settings,
    from_record,
    get_record,
    to_record,
)
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.fl_common import FLStrategy, fedavg_states, n_examples
from metamoe.strategies.robust import aggregator
from metamoe.training import derive_seed, seeded

log = logging.getLogger("metamoe")


def ddome_aggregate(gates: Sequence[dict[str, np.ndarray]], n: Sequence[float],
                    trained: Sequence[dict[int, dict[str, np.ndarray]]],
                    prev_experts: list[dict[str, np.ndarray]],
                    combine: Callable[..., dict[str, np.ndarray]] = fedavg_states
                    ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """DDOME server step: the gate combined over every participant, expert e over the
    clients that trained it; experts nobody trained keep their weights. ``combine(states, n)``
    is the n-weighted FedAvg by default, or a robust rule (``robust.aggregator``)."""
    gate = combine(gates, n)
    experts = []
    for e, prev in enumerate(prev_experts):
        who = [(t[e], w) for t, w in zip(trained, n, strict=False) if e in t]
        experts.append(combine([s for s, _ in who], [w for _, w in who]) if who
                       else prev)
    return gate, experts


@register("ddome")
class DDOME(FLStrategy):
    name = "ddome"

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self.start(fed, node_ids)
        f, ec, mc = self.cfg.fl, self.cfg.expert, self.seed_model.cfg
        M = int(f.ddome_experts) if f.ddome_experts > 0 else num_clients(self.cfg)
        K = min(int(f.ddome_top_k), M)
        with seeded(self.cfg.run.seed):
            gate = module_arrays(GateMLP(mc.dim, int(f.ddome_gate_hidden), M))
        experts = [{k: v.numpy() for k, v in e.items()} for e in
                   fresh_loras(self.seed_model, int(ec.rank), float(ec.alpha),
                               [derive_seed(self.cfg.run.seed, p) for p in range(M)])]
        lshapes = lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, int(ec.rank))
        gshapes = {k: v.shape for k, v in gate.items()}
        order = sorted(fed.clients, key=lambda nid: fed.clients[nid].partition_id)
        anchors = {nid: q for q, nid in enumerate(order[:M])} if f.ddome_anchors else {}
        base = {"rank": int(ec.rank), "alpha": float(ec.alpha), "top_k": K, "M": M}
        history = []
        for r in range(1, int(f.rounds) + 1):
            conf = {**base, "round": r}
            normal = [nid for nid in fed.clients if nid not in anchors]
            subsets = {nid: [q] for nid, q in anchors.items() if nid in fed.clients}
            if normal:
                def val_sel(nid, content):
                    name = fed.client_name(nid)
                    sel = from_record(get_record(content, "select", ArrayRecord, name))
                    idx = np.asarray(sel.get("experts", []))
                    if idx.dtype.kind != "i" or len(idx) != K or len(set(idx.tolist())) != K \
                            or idx.min() < 0 or idx.max() >= M:
                        raise UploadError(f"client {name}: expert selection {idx.tolist()} is "
                                          f"not {K} distinct indices in [0, {M})")
                    return sorted(int(i) for i in idx)

                with fed.phase("select"):
                    got = fed.exchange(f"select-r{r}", DDOME_SELECT,
                                       {nid: RecordDict({"gate": to_record(gate), CONFIG:
                                                         encode_settings(DDOME_SPEC, conf)})
                                        for nid in normal}, val_sel)
                subsets.update(got)
            payloads = {}
            for nid, ids in subsets.items():
                c = {**conf, "anchor": anchors.get(nid)}
                payloads[nid] = RecordDict({
                    "gate": to_record(gate),
                    "experts": to_record({f"e{e}/{k}": v for e in ids
                                          for k, v in experts[e].items()}),
                    CONFIG: encode_settings(DDOME_SPEC, c)})

            def val_train(nid, content, subsets=subsets):
                name = fed.client_name(nid)
                g = check_arrays(from_record(get_record(content, "gate", ArrayRecord, name)),
                                 gshapes, name, "gate")
                spec = {f"e{e}/{k}": s for e in subsets[nid] for k, s in lshapes.items()}
                ex = check_arrays(from_record(get_record(content, "experts", ArrayRecord, name)),
                                  spec, name, "experts")
                m, n = n_examples(content, name, f.weighting)
                trained = {e: {k: ex[f"e{e}/{k}"] for k in lshapes} for e in subsets[nid]}
                return g, n, trained, float(m.get("train_loss", float("nan")))

            with fed.phase("train"):
                got = fed.exchange(f"train-r{r}", DDOME_TRAIN, payloads, val_train)
            ids = sorted(got, key=lambda nid: fed.clients[nid].partition_id)
            gate, experts = ddome_aggregate([got[i][0] for i in ids], [got[i][1] for i in ids],
                                            [got[i][2] for i in ids], experts,
                                            aggregator(f))
            rec = {"round": r, "experts": {fed.client_name(i): subsets[i] for i in ids},
                   "anchors": {fed.client_name(i): anchors[i] for i in ids if i in anchors},
                   "train_loss": {fed.client_name(i): got[i][3] for i in ids}}
            history.append(rec)
            log.info("ddome round %d/%d: experts %s losses %s", r, f.rounds, rec["experts"],
                     rec["train_loss"])

        def val_eval(nid, content):
            name = fed.client_name(nid)
            return check_metrics(get_record(content, "metrics", MetricRecord, name),
                                 ["acc_unified", "acc_zero_shot"], name)

        all_experts = to_record({f"e{e}/{k}": v for e in range(M) for k, v in experts[e].items()})
        gate_rec, eval_conf = to_record(gate), encode_settings(DDOME_SPEC, base)
        with fed.phase("evaluate"):
            got = fed.evaluate("evaluate", DDOME_EVALUATE,
                               {nid: RecordDict({"gate": gate_rec, "experts": all_experts,
                                                 CONFIG: eval_conf})
                                for nid in fed.clients}, val_eval)
        evals = {fed.client_name(n): m for n, m in got.items()}
        chosen = {c: [int(k.split("/e")[1]) for k, v in m.items()
                      if k.startswith("ddome_chosen/") and v > 0] for c, m in evals.items()}
        share = {c: {f"e{e}": float(m.get(f"ddome_share/e{e}", float("nan"))) for e in range(M)}
                 for c, m in evals.items()}
        anchor_domain = {q: fed.clients[nid].domain for nid, q in anchors.items()
                         if nid in fed.clients}
        return Outcome(evaluations=evals, model=None,
                       extra={"fl_rounds": history, "ddome_test_experts": chosen,
                              "ddome_M": M, "ddome_K": K, "ddome_share": share,
                              "ddome_anchor_domain": {f"e{q}": d for q, d in
                                                      sorted(anchor_domain.items())},
                              "ddome_own_share": own_domain_share(
                                  share, {fed.client_name(n): c.domain
                                          for n, c in fed.clients.items()}, anchor_domain),
                              "fl_aggregation": str(f.aggregation)})


def own_domain_share(share: dict[str, dict[str, float]], domain_of: dict[str, str],
                     anchor_domain: dict[int, str]) -> dict[str, float]:
    """Per domain: the mean over its clients of the share of their test samples the gate sent
    to an expert anchored by a client of the same domain (``metrics.json`` →
    ``ddome_own_share``; NaN for a domain without an anchored expert, e.g. without anchors)."""
    by_dom: dict[str, list[float]] = {}
    for c, sh in share.items():
        d = domain_of.get(c)
        own = [q for q, ad in anchor_domain.items() if ad == d]
        by_dom.setdefault(str(d), []).append(
            float(sum(sh.get(f"e{q}", 0.0) for q in own)) if own else float("nan"))
    return {d: float(np.mean(v)) for d, v in sorted(by_dom.items())}
