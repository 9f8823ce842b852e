"""One-shot unification baselines (paper Table 1 rows): zero-shot, separate experts, BTM,
Model Soup, BTX, FlexOlmo, and the non-private UnrestrictedMoE upper bound.

Every method here starts from the same M0, uses the same client handlers (``query.identify``,
``query.sketch``, ``train.expert``, ``evaluate``), the same training loop
(:func:`metamoe.training.train`) and the same client-side evaluation; they differ only in what
the server does with the uploads. Specs: ``shared/design/baselines.md`` and
``baselines_detail.md`` §5–8.

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
* ``unrestricted_moe`` — NOT PRIVATE: the server reads every client's private training set
  directly and trains a K-expert MoE (fresh LoRA experts, random router, MetaMoE's router
  architecture) on their union with the expert optimiser settings. Its ``upload_bytes`` are
  the private sets' bytes (what would have to be sent) + the evaluation replies, and every row
  and metrics file carries ``"private": false``.

Sharing (``oneshot_suite`` / ``metamoe_suite``): one ``flwr run`` can emit several rows that
share their client phases. Each member is built with exactly the config it has when run alone
(``method=<name>`` [+ experiment] + the suite run's overrides), and the suite refuses to run
unless every member's expert/sketch/model/seed config equals the suite's, so the shared experts
are exactly what each method would train alone (client seeds are config-derived; see
``stages.expert_stage``). Upload bytes per row count only what that method sends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from omegaconf import DictConfig, OmegaConf

from metamoe.clients.stages import optim
from metamoe.config import ConfigError, resolve_config, to_container, validate
from metamoe.models.moe import MoEConfig, MoEViT, build_moe
from metamoe.protocol import get_record, record_nbytes, to_record
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.metamoe import MetaMoE
from metamoe.training import train

log = logging.getLogger("metamoe")

BTX_LB_ALPHA = 0.01  # BTX's load-balancing weight (Sukhbaatar et al. 2024, §3)


# ============================================================================ server-side merges
def soup_lora(loras: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Uniform soup of K LoRA experts as ONE LoRA of rank K·r (use alpha·K to keep α/r):
    Σ_i B_i A_i / K == (concat_i B_i / K) @ (stack_i A_i)."""
    if not loras:
        raise ValueError("model soup of zero experts")
    k = len(loras)
    out = {}
    for key in loras[0]:
        if key.endswith("lora_A"):
            out[key] = np.concatenate([lo[key] for lo in loras], axis=0)
        elif key.endswith("lora_B"):
            out[key] = np.concatenate([lo[key] for lo in loras], axis=1) / k
        else:
            raise KeyError(f"unexpected LoRA key {key!r}")
    return {k_: v.astype(np.float32) for k_, v in out.items()}


def build_soup(seed, loras: list[dict[str, np.ndarray]], rank: int, alpha: float) -> MoEViT:
    k = len(loras)
    cfg = MoEConfig(num_experts=1, rank=rank * k, alpha=alpha * k, top_k=1, context="none",
                    expert_names=["soup"])
    merged = {key: torch.from_numpy(v) for key, v in soup_lora(loras).items()}
    return build_moe(seed, cfg, [merged], None)


def build_m0(seed, rank: int, alpha: float) -> MoEViT:
    """M0 as a one-expert MoE whose expert has zero LoRA (so it computes exactly M0)."""
    mc = seed.cfg
    from metamoe.models.lora import lora_shapes

    zero = {k: torch.zeros(s) for k, s in lora_shapes(mc.depth, mc.dim, mc.mlp_hidden,
                                                      rank).items()}
    cfg = MoEConfig(num_experts=1, rank=rank, alpha=alpha, top_k=1, context="none",
                    expert_names=["M0"])
    return build_moe(seed, cfg, [zero], None)


def load_balancing_loss(alpha: float) -> tuple[Callable, Callable[[MoEViT], list]]:
    """BTX/Switch load balancing: per layer α·N·Σ_i u_i p_i with u_i the batch mean of the
    (top-k) gate value of expert i and p_i the batch mean of its softmax probability.

    Returns (loss_fn for :func:`train`, installer(model) -> hook handles)."""
    captured: list[torch.Tensor] = []

    def install(model: MoEViT) -> list:
        def hook(layer, inputs):
            if layer.forced is None and layer.training:
                captured.append(inputs[0])
        return [layer.register_forward_pre_hook(hook) for layer in model.moe_layers()]

    def loss_fn(model: MoEViT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        captured.clear()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        layers = model.moe_layers()
        lb = loss.new_zeros(())
        for layer, z in zip(layers, captured, strict=False):
            probs = layer.gate_probs(z)  # [B, T, N]
            topv, topi = probs.topk(layer.cfg.top_k, dim=-1)
            if layer.cfg.renormalize:
                topv = topv / topv.sum(-1, keepdim=True)
            gates = torch.zeros_like(probs).scatter(-1, topi, topv)
            n = probs.shape[-1]
            lb = lb + alpha * n * (gates.reshape(-1, n).mean(0) * probs.reshape(-1, n).mean(0)
                                   ).sum()
        captured.clear()
        return loss + lb
    return loss_fn, install


def finetune(moe: MoEViT, x: np.ndarray, y: np.ndarray, section: DictConfig, seed: int,
             train_router: bool, train_experts: bool, loss_fn: Callable | None = None,
             desc: str = "finetune") -> dict:
    """Fine-tune router (+ λ) and/or experts of ``moe`` with the shared training loop."""
    moe.freeze_base()
    groups = []
    for flag, params, lr in ((train_router, moe.router_parameters(), section.lr),
                             (train_router, moe.lambda_parameters(), section.lambda_lr),
                             (train_experts, moe.expert_parameters(), section.lr)):
        if flag and params:
            groups.append({"params": params, "lr": lr})
        else:
            for p in params:
                p.requires_grad_(False)
    if not groups or section.epochs == 0 or len(x) == 0:
        return {"loss": float("nan"), "examples": 0}
    kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
    return train(moe, torch.from_numpy(x), torch.from_numpy(y), optim(section), params=groups,
                 seed=seed, desc=desc, log_every=1, **kw)


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


# ============================================================================ members
class OneShot(MetaMoE):
    """A one-shot method: which client phases it needs and how the server merges."""

    needs_sketch = False  # sketch + proxy selection (FlexOlmo, MetaMoE)
    needs_experts = True  # the train.expert phase
    uses_router_vectors = False  # does the server use the uploaded router vectors?
    eval_mode = "routed"
    private = True
    reference_only = False  # row read from another member's evaluation (zero-shot/experts)
    provides_references = False  # its evaluation carries the *untouched* experts' accuracies
    notes = ""

    def build(self, experts: dict[str, tuple], selections: dict | None) -> MoEViT | None:
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
        return row

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        return run_members(self, fed, node_ids, {self.name: self})


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

    def random_public(self, k: int) -> np.ndarray:
        rng = np.random.default_rng(self.cfg.run.seed)
        size = min(k * int(self.cfg.select.m), len(self.bench.pool_x))
        return np.sort(rng.choice(len(self.bench.pool_x), size=size, replace=False))

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


# ============================================================================ the shared driver
def _delta(fed: Federation, before: dict[str, int]) -> dict[str, int]:
    return {c.name: int(fed.upload_bytes.get(c.name, 0) - before.get(c.name, 0))
            for c in fed.clients.values()}


def run_members(lead: OneShot, fed: Federation, node_ids: list[int],
                members: dict[str, OneShot]) -> Outcome:
    """Run the client phases the members need ONCE, then every member's merge + evaluation.

    ``lead`` carries the run's config (the suite's, or the single method's). Returns an
    Outcome whose ``extra["rows"]`` has one row per member:
    {accuracy, upload_bytes {client: int}, private, rounds, notes, ...}."""
    domains = list(lead.cfg.benchmark.domains)
    fed.identify(node_ids)
    node_ids = list(fed.clients)
    base = {c.name: int(fed.upload_bytes.get(c.name, 0)) for c in fed.clients.values()}
    identify_bytes = dict(base)
    extra: dict = {}

    # --- sketch + selection (FlexOlmo, MetaMoE); each member selects with its own config
    sketch_bytes: dict[str, int] = {}
    selections: dict[str, dict] = {}
    sketch_ran = False
    if any(m.needs_sketch for m in members.values()):
        before = dict(fed.upload_bytes)
        with fed.phase("sketch"):
            got = fed.exchange("sketch", "query.sketch", lead.configure_sketch(node_ids),
                               lambda nid, c: lead.aggregate_sketch(fed, nid, c))
        sketch_ran = True
        sketch_bytes = _delta(fed, before)
        fed.drop_missing(got)
        sketches = {fed.client_name(n): sk for n, (sk, _) in got.items()}
        dp = {fed.client_name(n): d for n, (_, d) in got.items() if d}
        if dp:
            extra["sketch_dp"] = dp
        with fed.phase("select"):
            cache: dict[str, dict] = {}
            for rname, m in members.items():
                if m.needs_sketch:
                    key = str(sorted(to_container(m.cfg.select).items()))
                    if key not in cache:
                        cache[key] = m.select(sketches)
                    selections[rname] = cache[key]

    # --- experts (one training per client, shared by every member)
    experts: dict[str, tuple] = {}
    expert_bytes: dict[str, dict[str, int]] = {}
    if any(m.needs_experts for m in members.values()):
        if lead.cfg.expert.use_proxies:
            sel = next(iter(selections.values()), None)
            if sel is None:
                raise ConfigError("expert.use_proxies=true needs a member with a sketch phase")
        else:  # private-only experts: no proxies are sent
            sel = {c.name: {lead.cfg.select.method: np.zeros(0, np.int64)}
                   for c in fed.clients.values()}

        def validate(nid: int, content: RecordDict):
            out = lead.aggregate_expert(fed, nid, content)
            expert_bytes[fed.client_name(nid)] = {
                k: record_nbytes(RecordDict({k: content[k]})) for k in content}
            return out

        payloads = lead.configure_expert(fed, sel, with_seed=not sketch_ran)
        if not lead.cfg.expert.use_proxies:  # send no coverage ablation picks either
            for content in payloads.values():
                content["proxies"] = to_record({"selected": np.zeros(0, np.int64)})
        with fed.phase("expert"):
            got = fed.exchange("expert", "train.expert", payloads, validate)
        fed.drop_missing(got)
        order = sorted(got, key=lambda n: fed.clients[n].partition_id)
        experts = {fed.client_name(n): got[n] for n in order}
        extra.update(lead.expert_extras(experts))

    # --- merges and evaluations
    dom_classes = {d.name: list(map(int, d.classes)) for d in lead.bench.domains}
    model_extra = {"class_names": list(lead.bench.class_names), "domains": dom_classes}
    evaluated: dict[str, tuple[dict, dict]] = {}
    models: dict[str, MoEViT | None] = {}
    order_names = sorted(members, key=lambda r: members[r].reference_only)  # refs last
    for rname in order_names:
        m = members[rname]
        if m.reference_only and len(members) > 1:
            src = next((r for r in evaluated if members[r].provides_references), None)
            if src is not None:
                evaluated[rname] = evaluated[src]
                models[rname] = None
                continue
        used = {c: selections.get(rname, {}).get(c) for c in experts} \
            if rname in selections else None
        with fed.phase(f"merge[{rname}]"):
            moe = m.build(experts, used)
        models[rname] = moe
        before = dict(fed.upload_bytes)
        with fed.phase(f"evaluate[{rname}]" if len(members) > 1 else "evaluate"):
            evals = fed.exchange(
                f"evaluate[{rname}]", "evaluate",
                m.configure_evaluate(fed, moe, {**model_extra, "mode": m.eval_mode}),
                lambda nid, c, m=m: m.aggregate_evaluate(fed, nid, c))
        evaluated[rname] = ({fed.client_name(n): v for n, v in evals.items()},
                            _delta(fed, before))

    rows: dict[str, dict] = {}
    for rname, m in members.items():
        evals, eval_bytes = evaluated[rname]
        row = m.row(evals, fed)
        up = {}
        for c in fed.clients.values():
            b = identify_bytes.get(c.name, 0) + eval_bytes.get(c.name, 0)
            if m.needs_sketch:
                b += sketch_bytes.get(c.name, 0)
            if m.needs_experts and c.name in expert_bytes:
                eb = expert_bytes[c.name]
                b += sum(v for k, v in eb.items() if k != "router" or m.uses_router_vectors)
            up[c.name] = int(b)
        row.update({"upload_bytes": up, "private": m.private, "rounds": 1,
                    "notes": m.notes, "method": m.cfg.method})
        rows[rname] = row
        log.info("row %s: average %.4f, upload bytes %s", rname, row["accuracy"]["average"], up)
    extra["rows"] = rows

    main = next(iter(members))
    evals_main = evaluated[main][0]
    model = models.get(main)
    keep_model = len(members) == 1 and model is not None and \
        not members[main].reference_only and members[main].eval_mode == "routed"
    if len(members) == 1:
        measured = {k: int(v) for k, v in fed.upload_bytes.items()}
        # What this method really sends (the shared expert handler also uploads router vectors,
        # which only FlexOlmo/MetaMoE use): metrics.json's upload_bytes is the row's count.
        for c, b in rows[main]["upload_bytes"].items():
            fed.upload_bytes[c] = b
        extra["upload_accounting"] = {
            "transport_bytes": measured,
            "note": "upload_bytes counts the records this method uses; transport_bytes is "
                    "what the shared handlers sent"}
        extra["accuracy"] = rows[main]["accuracy"]
    else:
        extra["accuracy"] = {"per_domain": {d: float("nan") for d in domains},
                             "average": float("nan")}
        extra["suite_note"] = "a suite run: see rows[<method>] for each method's results"
    extra["private"] = all(m.private for m in members.values())
    return Outcome(evaluations=evals_main, model=model if keep_model else None,
                   model_extra=model_extra, extra=extra)


# ============================================================================ non-private bound
@register("unrestricted_moe")
class UnrestrictedMoE(OneShot):
    """NON-PRIVATE upper bound: the server reads the clients' private training data."""

    name = "unrestricted_moe"
    needs_experts = False
    private = False
    notes = "NOT PRIVATE: MoE trained by the server on the union of all private training sets"

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        fed.identify(node_ids)
        clients = sorted(fed.clients.values(), key=lambda c: c.partition_id)
        data_bytes: dict[str, int] = {}
        xs, ys = [], []
        from metamoe.data import client_partition

        # NON-PRIVATE: the private training sets are loaded here, on the server.
        for c in clients:
            _, dom = client_partition(self.cfg, self.bench, c.partition_id)
            xs.append(dom.x_train)
            ys.append(dom.y_train)
            data_bytes[c.name] = int(dom.x_train.nbytes + dom.y_train.nbytes)
        names = [c.name for c in clients]
        uc, ec = self.cfg.unify, self.cfg.expert
        import copy

        from metamoe.models.lora import inject_ffn_lora, lora_state_dict

        loras = []
        for p in range(len(names)):  # fresh LoRA experts (A seeded, B = 0) as on the clients
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.run.seed * 1000 + p)
                fresh = inject_ffn_lora(copy.deepcopy(self.seed_model), ec.rank, ec.alpha)
            loras.append(lora_state_dict(fresh))
        moe = build_moe(self.seed_model, self.unify_moe_config(names), loras, None)
        section = OmegaConf.create({**to_container(ec), "lambda_lr": uc.lambda_lr})
        with fed.phase("train_unrestricted"):
            hist = finetune(moe, np.concatenate(xs), np.concatenate(ys), section,
                            self.cfg.run.seed, True, True, desc="unrestricted")
        log.info("NON-PRIVATE unrestricted MoE trained on %d private samples, loss %.4f",
                 sum(len(x) for x in xs), hist["loss"])
        dom_classes = {d.name: list(map(int, d.classes)) for d in self.bench.domains}
        model_extra = {"class_names": list(self.bench.class_names), "domains": dom_classes,
                       "private": False}
        before = dict(fed.upload_bytes)
        with fed.phase("evaluate"):
            evals = fed.exchange("evaluate", "evaluate",
                                 self.configure_evaluate(fed, moe, model_extra),
                                 lambda nid, c: self.aggregate_evaluate(fed, nid, c))
        evals = {fed.client_name(n): v for n, v in evals.items()}
        for c in clients:  # counted as if the private data had been uploaded
            fed.upload_bytes[c.name] = fed.upload_bytes.get(c.name, 0) + data_bytes[c.name]
        row = self.row(evals, fed)
        row.update({"upload_bytes": {c.name: int(fed.upload_bytes.get(c.name, 0))
                                     for c in clients},
                    "private": False, "rounds": 1, "notes": self.notes,
                    "method": self.name})
        _ = before
        return Outcome(evaluations=evals, model=moe, model_extra=model_extra,
                       extra={"rows": {self.name: row}, "private": False,
                              "private_data_bytes": data_bytes,
                              "upload_accounting": {"note": "upload_bytes include each "
                                                    "client's private training set (NOT "
                                                    "PRIVATE) + identify/evaluation replies"}})


# ============================================================================ suites
ONESHOT_SUITE = (("zero_shot", "zero_shot", ""), ("separate_experts", "separate_experts", ""),
                 ("btm", "btm", ""), ("model_soup", "model_soup", ""), ("btx", "btx", ""),
                 ("flexolmo", "flexolmo", ""), ("metamoe[no_pa]", "metamoe", "no_pa"))
METAMOE_SUITE = (("metamoe", "metamoe", ""), ("metamoe[no_ca_router]", "metamoe", "no_ca_router"),
                 ("metamoe[authors_code]", "metamoe", "authors_code"))
# Sections a member must share with the suite for the shared phases to be exactly its own.
SHARED_SECTIONS = ("benchmark", "model", "pretrain", "expert", "federation")


def _diff(a, b) -> dict:
    """Leaves of ``a`` that differ from ``b`` (nested dicts)."""
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            d = _diff(v, b[k])
            if d:
                out[k] = d
        elif b.get(k, object()) != v:
            out[k] = v
    return out


def member_config(suite_cfg: DictConfig, method: str, experiment: str = "") -> DictConfig:
    """The config ``method`` [+ ``experiment``] has when run alone with the suite's overrides:
    its own resolved config + whatever the suite run changed relative to the suite's files."""
    bench = suite_cfg.benchmark.name
    plain = resolve_config({"benchmark": bench, "method": suite_cfg.method,
                            "seed": int(suite_cfg.run.seed)})
    changed = _diff(to_container(suite_cfg), to_container(plain))
    changed.pop("run", None)
    cfg = resolve_config({"benchmark": bench, "method": method, "experiment": experiment,
                          "seed": int(suite_cfg.run.seed)})
    cfg = OmegaConf.merge(cfg, changed, {"run": to_container(suite_cfg.run)})
    OmegaConf.set_readonly(cfg, False)
    cfg.method = method
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


class Suite(OneShot):
    members: tuple = ()

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        members = make_members(self.cfg, self.members, self.seed_model, self.bench,
                               self.pool_features)
        return run_members(self, fed, node_ids, members)


def make_members(cfg: DictConfig, spec, seed_model, bench, pool_features) -> dict[str, OneShot]:
    from metamoe.strategies.base import STRATEGIES

    members: dict[str, OneShot] = {}
    for rname, method, exp in spec:
        mcfg = member_config(cfg, method, exp)
        for sect in SHARED_SECTIONS:
            if to_container(mcfg[sect]) != to_container(cfg[sect]):
                raise ConfigError(
                    f"suite {cfg.method}: member {rname} has another {sect} config than the "
                    f"suite ({_diff(to_container(mcfg[sect]), to_container(cfg[sect]))}); its "
                    "shared phases would not be its own — run it alone")
        cls = MetaMoEMember if method == "metamoe" else STRATEGIES[method]
        m = cls(mcfg, seed_model, bench, pool_features)
        shared = ["sketch"] if m.needs_sketch else []
        if m.needs_experts and cfg.expert.use_proxies:
            shared.append("select")  # the experts are trained on the suite's selection
        for sect in shared:
            if to_container(mcfg[sect]) != to_container(cfg[sect]):
                raise ConfigError(f"suite {cfg.method}: member {rname} has another {sect} "
                                  "config than the suite; run it alone")
        members[rname] = m
    return members


@register("oneshot_suite")
class OneShotSuite(Suite):
    """Private-only experts trained once; rows zero_shot, separate_experts, btm, model_soup,
    btx, flexolmo and metamoe[no_pa] (each exactly as when run alone)."""

    name = "oneshot_suite"
    members = ONESHOT_SUITE


@register("metamoe_suite")
class MetaMoESuite(Suite):
    """MetaMoE's experts trained once; rows metamoe and its unify-only ablations
    (metamoe[no_ca_router], metamoe[authors_code])."""

    name = "metamoe_suite"
    members = METAMOE_SUITE


SUITES = {"oneshot_suite": ONESHOT_SUITE, "metamoe_suite": METAMOE_SUITE}
_ = (ArrayRecord, MetricRecord, get_record, math)  # re-exported names used by tests
