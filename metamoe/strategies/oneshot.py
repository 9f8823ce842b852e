"""One-shot unification baselines (paper Table 1 rows): zero-shot, separate experts, BTM,
Model Soup, BTX, FlexOlmo, and the non-private UnrestrictedMoE upper bound.

Every method here starts from the same M0, uses the same client handlers (``query.identify``,
``query.sketch``, ``train.expert``, ``evaluate``), the same training loop
(:func:`metamoe.training.train`) and the same client-side evaluation; they differ only in what
the server does with the uploads. Specs: ``docs/baselines.md``.

Experts "on private data only" are the MetaMoE expert phase with ``expert.use_proxies=false,
expert.router_data=private`` and no sketch phase: M0 travels in the ``train.expert`` message.

Design choices (documented here, stated in every result row's ``notes``):

* ``separate_experts`` — row = the single expert with the best average over all domains;
  every expert's per-domain accuracy is in ``rows[...]["experts"]``.
* ``btm`` — no unified model: clients evaluate the experts as an ensemble (uniform mean of the
  experts' class probabilities, ``mode="ensemble"``; CV has no input likelihood).
* ``model_soup`` — uniform soup of the *merged* deltas, W0 + (1/K) Σ_i s·B_i A_i, written
  exactly as ONE LoRA expert of rank K·r (A's stacked, B's stacked and divided by K, α·K so the
  scale α/r is unchanged).
* ``btx`` — K experts in MoE layers, a randomly initialised linear router (no context term),
  BTX's default top-2 with softmax over the top-k logits (``renormalize``), router + experts
  fine-tuned on a uniform random public sample of size K·m (MetaMoE's proxy budget: clients ×
  ``select.m``), with the unify stage's epochs/lr, plus BTX's load-balancing loss α=0.01.
* ``flexolmo`` — router rows initialised from the clients' mean FFN input over their private
  data only (FlexOlmo's domain embedding, MetaMoE's per-layer analogue), proxies = top-m by the
  relevance sketch only (no DPP), then FlexOlmo "RT": only the router is fine-tuned on the
  union of those proxies, the experts are frozen. Top-1 (MetaMoE comparability), no context
  term, no negative router bias (absent from the released FlexOlmo, issue #32). The public
  expert anchor (M0's FFN as an extra expert, coordinated two-expert training) is OMITTED: the
  experts are the same private-only LoRA experts as every other baseline.
* ``unrestricted_moe_same_start`` / ``unrestricted_moe_scratch`` — NOT PRIVATE upper bounds
  (``strategies/unrestricted.py``): the server reads every client's private training set.

Suites sharing the client phases of several rows: ``strategies/suites.py``; the driver
that runs one or several members: ``strategies/oneshot_run.py``.
"""

from __future__ import annotations

import logging

import numpy as np

from metamoe.models.moe import MoEMixin
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.merges import BTX_LB_ALPHA, build_m0, build_soup, load_balancing_loss
from metamoe.strategies.oneshot_run import run_members
from metamoe.strategies.phases import PhaseStrategy
from metamoe.training import finetune

log = logging.getLogger("metamoe")


def acc_block(evaluations: dict[str, dict], fed: Federation, domains: list[str],
              key: str) -> dict:
    """{per_domain, average} of metric ``key`` (clients of a domain averaged)."""
    by: dict[str, list[float]] = {d: [] for d in domains}
    for name, m in evaluations.items():
        info = next((c for c in fed.clients.values() if c.name == name), None)
        dom = info.domain if info else name
        if key in m:
            by.setdefault(dom, []).append(float(m[key]))
    per = {d: float(np.mean(v)) if v else float("nan") for d, v in by.items()}
    vals = [v for v in per.values() if v == v]
    return {"per_domain": per, "average": float(np.mean(vals)) if vals else float("nan")}


class OneShot(PhaseStrategy):
    """A one-shot method: which client phases it needs and how the server merges."""

    needs_sketch = False  # sketch + proxy selection (FlexOlmo, MetaMoE)
    needs_experts = True  # the train.expert phase
    uses_router_vectors = False  # does the server use the uploaded router vectors?
    eval_mode = "routed"
    private = True
    reference_only = False  # row read from another member's evaluation (zero-shot/experts)
    provides_references = False  # its evaluation carries the *untouched* experts' accuracies
    notes = ""

    def build(self, experts: dict[str, tuple], selections: dict | None) -> MoEMixin | None:
        raise NotImplementedError

    def row(self, evals: dict[str, dict], fed: Federation) -> dict:
        doms = list(self.cfg.benchmark.domains)
        row = {"accuracy": acc_block(evals, fed, doms, "acc_unified")}
        experts = list(dict.fromkeys(k.split("/", 1)[1] for m in evals.values() for k in m
                                     if k.startswith("route_share/")))
        if self.eval_mode == "routed" and experts:  # {domain: {expert: share of its tokens}}
            share = {n: acc_block(evals, fed, doms, f"route_share/{n}")["per_domain"]
                     for n in experts}
            row["route_share"] = {d: {n: share[n][d] for n in experts} for d in doms}
        if groups := self.groups_extra(fed):  # unify.groups: the clients each expert merges
            row["groups"] = groups
        return row

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        return run_members(self, fed, node_ids, {self.name: self})

    def random_public(self, k: int) -> np.ndarray:
        """A seeded uniform sample of k·m public pool items (MetaMoE's proxy budget for k
        clients): BTX's and the from-scratch upper bound's public data."""
        return self.random_pool(k * int(self.cfg.select.m))


@register("zero_shot")
class ZeroShot(OneShot):
    name = "zero_shot"
    needs_experts = False
    reference_only = True
    notes = "M0 as is (lower bound); nothing trained or uploaded but evaluation scalars"

    def build(self, experts, selections):
        return build_m0(self.seed_model, self.cfg.expert.rank, self.cfg.expert.alpha)

    def row(self, evals, fed):
        return {"accuracy": acc_block(evals, fed, list(self.cfg.benchmark.domains),
                                      "acc_zero_shot")}


@register("separate_experts")
class SeparateExperts(OneShot):
    name = "separate_experts"
    reference_only = True
    notes = "each private-only expert on every domain; row = best single expert by average"

    def build(self, experts, selections):
        return self.expert_moe(experts, vectors=False)

    def row(self, evals, fed):
        doms = list(self.cfg.benchmark.domains)
        names = sorted({k.split("/", 1)[1] for m in evals.values() for k in m
                        if k.startswith("acc_expert/")})
        blocks = {n: acc_block(evals, fed, doms, f"acc_expert/{n}") for n in names}
        if not blocks:
            raise RuntimeError("separate_experts: no expert accuracies were reported")
        best = max(blocks, key=lambda n: blocks[n]["average"])
        return {"accuracy": blocks[best], "best_expert": best, "experts": blocks}


@register("btm")
class BTM(OneShot):
    name = "btm"
    eval_mode = "ensemble"
    provides_references = True
    notes = "ensemble (uniform mean of class probabilities) of the private-only experts"

    def build(self, experts, selections):
        return self.expert_moe(experts, vectors=False)


@register("model_soup")
class ModelSoup(OneShot):
    name = "model_soup"
    notes = "uniform soup of the merged LoRA deltas W0 + (1/K) sum_i B_i A_i"

    def build(self, experts, selections):
        loras = [experts[n][0] for n in experts]
        return build_soup(self.seed_model, loras, self.cfg.expert.rank, self.cfg.expert.alpha)


@register("btx")
class BTX(OneShot):
    name = "btx"
    notes = (f"random linear router, top-2 softmax over top-k, router+experts fine-tuned on "
             f"random public data (K*m samples), load balancing alpha={BTX_LB_ALPHA}")

    def build(self, experts, selections):
        uc = self.cfg.unify
        moe = self.expert_moe(experts, vectors=uc.router_init == "vectors")
        idx = self.random_public(len(experts)) if uc.data == "random_public" else \
            self.unify_data(selections)
        loss_fn, install = load_balancing_loss(BTX_LB_ALPHA)
        handles = install(moe)
        try:
            finetune(moe, self.bench.pool_x[idx], self.bench.pool_y[idx], uc, self.cfg.run.seed,
                     uc.train_router, uc.train_experts, loss_fn, desc="btx")
        finally:
            for h in handles:
                h.remove()
        return moe


@register("flexolmo")
class FlexOlmo(OneShot):
    name = "flexolmo"
    needs_sketch = True
    uses_router_vectors = True
    notes = ("router = private-only mean FFN inputs, proxies = top-m by relevance only, "
             "router-only fine-tuning (experts frozen), top-1, public-expert anchor omitted")

    def build(self, experts, selections):
        return self.unify(experts, self.unify_data(selections))


class MetaMoEMember(OneShot):
    """MetaMoE (+ an experiment) as a suite member: its own unify on the shared experts."""

    name = "metamoe"
    needs_sketch = True
    uses_router_vectors = True

    def build(self, experts, selections):
        return self.unify(experts, self.unify_data(selections))
