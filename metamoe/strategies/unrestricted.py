"""The NON-PRIVATE upper bounds: MoEs the server trains on the clients' private training sets
(it reads them directly). Their ``upload_bytes`` are the private sets' bytes (what would have
to be sent) + the replies; every row and metrics file carries ``"private": false``.

* ``unrestricted_moe_same_start`` — MetaMoE's own sketch, proxies, proxy-aligned experts and
  router vectors, then router + λ + experts fine-tuned on the pooled private data ∪ MetaMoE's
  proxies instead of the proxies alone, for ``expert.epochs`` passes: a strict superset of
  MetaMoE's information, so it should be above MetaMoE.
* ``unrestricted_moe_scratch`` — fresh experts and a random router under renormalised top-k
  (so the MoE starts exactly at M0), BTX's load-balancing loss, trained on the pooled private
  data ∪ a random public sample of MetaMoE's proxy budget (K·m).

Both sample domain-balanced batches (:func:`metamoe.training.balanced_weights`): every domain
is drawn equally often, as the metric (the mean over domains) weighs them.
"""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import OmegaConf

from metamoe.config import to_container
from metamoe.data import client_partition
from metamoe.models.lora import fresh_loras
from metamoe.models.moe import build_moe
from metamoe.protocol import EVALUATE
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.merges import BTX_LB_ALPHA, load_balancing_loss
from metamoe.strategies.metamoe import MetaMoE
from metamoe.strategies.oneshot import OneShot
from metamoe.training import balanced_weights, derive_seed, finetune

log = logging.getLogger("metamoe")

ACCOUNTING = {"note": "upload_bytes include each client's private training set (NOT PRIVATE) "
                      "+ the client's replies"}


def private_sets(cfg, bench, clients) -> tuple[list, list, list, dict[str, int]]:
    """NON-PRIVATE: the clients' private training sets, read here on the server. Returns
    (inputs, labels, domains, bytes per client), one entry per client."""
    xs, ys, doms, nbytes = [], [], [], {}
    for c in sorted(clients, key=lambda c: c.partition_id):
        _, dom = client_partition(cfg, bench, c.partition_id)
        xs.append(dom.x_train)
        ys.append(dom.y_train)
        doms.append(dom.name)
        nbytes[c.name] = int(dom.x_train.nbytes + dom.y_train.nbytes)
    return xs, ys, doms, nbytes


def pooled(xs, ys, doms, extra_x, extra_y, extra_dom) -> tuple[np.ndarray, np.ndarray, list]:
    """The private sets ∪ public samples (each public sample with the domain it counts for)."""
    x = np.concatenate([*xs, extra_x]) if len(extra_x) else np.concatenate(xs)
    y = np.concatenate([*ys, extra_y]) if len(extra_y) else np.concatenate(ys)
    groups = [d for d, xi in zip(doms, xs, strict=True) for _ in range(len(xi))] + list(extra_dom)
    return x, y, groups


def charge(fed: Federation, outcome_extra: dict, nbytes: dict[str, int]) -> None:
    for name, b in nbytes.items():  # counted as if the private data had been uploaded
        fed.upload_bytes[name] = fed.upload_bytes.get(name, 0) + b
    outcome_extra.update({"private": False, "private_data_bytes": nbytes,
                          "upload_accounting": ACCOUNTING})


@register("unrestricted_moe_same_start")
class UnrestrictedSameStart(MetaMoE):
    """NON-PRIVATE upper bound: MetaMoE up to its unify stage, which then also reads the
    clients' private training sets."""

    name = "unrestricted_moe_same_start"
    private = False
    notes = ("NOT PRIVATE: MetaMoE's experts, router vectors and proxies, then router + λ + "
             "experts fine-tuned on the pooled private data ∪ the proxies, domain-balanced, "
             "expert.epochs passes")

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self._fed, self._nbytes = fed, {}
        out = super().run(fed, node_ids)
        if not self._nbytes:  # unify resumed from its checkpoint
            self._nbytes = private_sets(self.cfg, self.bench, fed.clients.values())[3]
        charge(fed, out.extra, self._nbytes)
        out.model_extra["private"] = False
        return out

    def unify_data(self, selections) -> np.ndarray:
        self._selections = selections  # which client picked which proxy (for the balance)
        return super().unify_data(selections)

    def unify(self, experts: dict[str, tuple], union_idx: np.ndarray):
        moe = self.expert_moe(experts, vectors=True)
        clients = [c for c in self._fed.clients.values() if c.name in experts]
        self._nbytes = self.finetune_pooled(moe, clients, self._selections)
        return moe

    def finetune_pooled(self, moe, clients, selections) -> dict[str, int]:
        """Fine-tune router + λ + experts of ``moe`` on the pooled private sets of ``clients``
        ∪ their proxies, domain-balanced, with the unify section's optimiser, rates and batch
        for ``expert.epochs`` passes (the passes every method gets over private data). Returns
        the private bytes read per client (NON-PRIVATE).

        Not ``unify.epochs``: one pass (text's router stage before its val recipe) is a
        transient on the pooled data, in which λ falls and the tweets domain dips (val, seed 0:
        1 pass 77.44, level with MetaMoE; 2 passes 79.33; 3 passes 78.56;
        ``bench/unify_probe.py``, docs/results.md "Upper bound same start")."""
        uc = OmegaConf.merge(self.cfg.unify, {"epochs": int(self.cfg.expert.epochs)})
        xs, ys, doms, nbytes = private_sets(self.cfg, self.bench, clients)
        # every proxy counts for the domain of the first client (partition order) that picked it
        owner: dict[int, str] = {}
        method = self.cfg.select.method
        for c in sorted(clients, key=lambda c: c.partition_id):
            for i in np.asarray(selections[c.name][method]).tolist():
                owner.setdefault(int(i), c.domain)
        idx = np.asarray(sorted(owner), np.int64)
        x, y, groups = pooled(xs, ys, doms, self.bench.pool_x[idx], self.bench.pool_y[idx],
                              [owner[int(i)] for i in idx])
        hist = finetune(moe, x, y, uc, self.cfg.run.seed, True, True, desc="same-start",
                        sample_weights=balanced_weights(groups))
        log.info("NON-PRIVATE same-start MoE fine-tuned on %d private + %d public samples, "
                 "loss %.4f", sum(len(v) for v in xs), len(idx), hist["loss"])
        return nbytes


@register("unrestricted_moe_scratch")
class UnrestrictedScratch(OneShot):
    """NON-PRIVATE upper bound: a MoE trained from M0 by the server on the private sets."""

    name = "unrestricted_moe_scratch"
    needs_experts = False
    private = False
    notes = ("NOT PRIVATE: fresh experts, random router, renormalised top-k (starts at M0), "
             "load balancing, domain-balanced on the pooled private data ∪ K·m public samples")

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        fed.identify(node_ids)
        clients = sorted(fed.clients.values(), key=lambda c: c.partition_id)
        xs, ys, doms, nbytes = private_sets(self.cfg, self.bench, clients)
        names = [c.name for c in clients]
        uc, ec = self.cfg.unify, self.cfg.expert
        if not uc.renormalize or uc.top_k < 2:
            log.warning("unrestricted_moe_scratch with top_k=%d renormalize=%s does not start "
                        "at M0", uc.top_k, uc.renormalize)
        # Fresh LoRA experts (A seeded, B = 0): every expert is M0's FFN at the start.
        loras = fresh_loras(self.seed_model, ec.rank, ec.alpha,
                            [derive_seed(self.cfg.run.seed, p) for p in range(len(names))])
        moe = build_moe(self.seed_model, self.unify_moe_config(names), loras, None)
        pub = self.random_public(len(names))
        x, y, groups = pooled(xs, ys, doms, self.bench.pool_x[pub], self.bench.pool_y[pub],
                              ["public"] * len(pub))
        section = OmegaConf.create({**to_container(ec), "lambda_lr": uc.lambda_lr})
        loss_fn, install = load_balancing_loss(BTX_LB_ALPHA)
        handles = install(moe)
        try:
            with fed.phase("train_unrestricted"):
                hist = finetune(moe, x, y, section, self.cfg.run.seed, True, True, loss_fn,
                                desc="unrestricted", sample_weights=balanced_weights(groups))
        finally:
            for h in handles:
                h.remove()
        log.info("NON-PRIVATE unrestricted MoE trained on %d private + %d public samples, "
                 "loss %.4f", sum(len(v) for v in xs), len(pub), hist["loss"])
        dom_classes = {d.name: list(map(int, d.classes)) for d in self.bench.domains}
        model_extra = {"class_names": list(self.bench.class_names), "domains": dom_classes,
                       "private": False}
        with fed.phase("evaluate"):
            evals = fed.evaluate("evaluate", EVALUATE,
                                 self.configure_evaluate(fed, moe, model_extra),
                                 lambda nid, c: self.aggregate_evaluate(fed, nid, c))
        evals = {fed.client_name(n): v for n, v in evals.items()}
        extra: dict = {}
        charge(fed, extra, nbytes)
        row = self.row(evals, fed)
        row.update({"upload_bytes": {c.name: int(fed.upload_bytes.get(c.name, 0))
                                     for c in clients},
                    "private": False, "rounds": 1, "notes": self.notes, "method": self.name})
        extra["rows"] = {self.name: row}
        return Outcome(evaluations=evals, model=moe, model_extra=model_extra, extra=extra)
