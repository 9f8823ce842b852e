"""The server-side phase code MetaMoE and the one-shot baselines share.

:class:`PhaseStrategy` holds one ``configure`` (payloads per node) + ``aggregate`` (validate
one reply) pair per client phase — sketch, expert, evaluate — around
:meth:`Federation.exchange`, plus the server's own work between them: proxy selection, merging
experts into a MoE and fine-tuning it (:func:`metamoe.training.finetune`, the one fine-tuning
routine of every routed method). MetaMoE (``strategies/metamoe.py``) and the one-shot baselines
(``strategies/oneshot.py``) are sibling subclasses that differ in their drivers and merges.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from metamoe.models.io import seed_payload, shipped_state
from metamoe.models.lora import lora_shapes
from metamoe.models.moe import MoEConfig, MoEMixin, build_moe, unify_moe_config
from metamoe.protocol import (
    CONFIG,
    MOE_SPEC,
    UploadError,
    check_arrays,
    check_metrics,
    encode_settings,
    from_record,
    get_record,
    to_record,
    torch_state_to_record,
)
from metamoe.proxy import sketch as psk
from metamoe.proxy.select import select_proxies
from metamoe.strategies.base import Federation, PhaseError, Strategy
from metamoe.strategies.grouping import group_experts, purity
from metamoe.strategies.screen import screen_experts
from metamoe.training import finetune

log = logging.getLogger("metamoe")


class PhaseStrategy(Strategy):
    """The client phases and server stages of the one-shot pipeline (paper Alg. 1)."""

    group_report: dict = {}  # unify.groups: the last unify's groups (grouping.py)

    # ---------------------------------------------------------------- phase 1: sketch
    def configure_sketch(self, node_ids: list[int]) -> dict[int, RecordDict]:
        seed_rec, seed_cfg = seed_payload(self.seed_model)
        return {nid: RecordDict({"seed": seed_rec, "seed-config": seed_cfg}) for nid in node_ids}

    def aggregate_sketch(self, fed: Federation, nid: int, content: RecordDict):
        name = fed.client_name(nid)
        info = get_record(content, "info", ConfigRecord, name)
        if str(info.get("name", "")) != name:
            raise UploadError(f"client {name}: sketch reply claims to be {info.get('name')!r}")
        arrays = from_record(get_record(content, "sketch", ArrayRecord, name))
        try:
            sketch = psk.sketch_from_arrays(arrays)
        except (ValueError, KeyError, TypeError) as e:
            raise UploadError(f"client {name}: bad sketch: {e}") from None
        want = {"logistic": psk.LogisticSketch, "centroids": psk.CentroidSketch}
        if not isinstance(sketch, want[self.cfg.sketch.kind]):
            raise UploadError(f"client {name}: a {type(sketch).__name__} was uploaded, the run "
                              f"uses sketch.kind={self.cfg.sketch.kind!r}")
        if sketch.dim != self.pool_features.shape[1]:
            raise UploadError(f"client {name}: sketch dimension {sketch.dim} != embedding "
                              f"dimension {self.pool_features.shape[1]}")
        return sketch, {k: info[k] for k in info if k.startswith("dp_")}

    # ---------------------------------------------------------------- phase 2: select
    def select(self, sketches: dict[str, object]) -> dict[str, dict[str, np.ndarray]]:
        sc = self.cfg.select
        methods = [sc.method]
        if sc.coverage_ablation:
            methods += [m for m in ("rw_dpp", "relevance", "random") if m != sc.method]
        out: dict[str, dict[str, np.ndarray]] = {name: {} for name in sketches}
        for method in methods:
            res = select_proxies(self.pool_features, sketches, n=sc.n, m=sc.m, method=method,
                                 seed=self.cfg.run.seed, eps=sc.eps, index=sc.index)
            for name, r in res.items():
                out[name][method] = np.asarray(r.indices, dtype=np.int64)
        for name, sel in out.items():
            idx = sel[sc.method]
            src = self.bench.pool_source[idx]
            mix = {str(s): int((src == s).sum()) for s in np.unique(src)}
            log.info("client %s: %d proxies by %s, sources %s", name, len(idx), sc.method, mix)
        return out

    # ---------------------------------------------------------------- phase 3: expert
    def configure_expert(self, fed: Federation, selections,
                         with_seed: bool = False) -> dict[int, RecordDict]:
        """Proxy indices per client (+ the other methods' picks for the coverage ablation);
        M0 too when the clients have not received it in this run (resume, no sketch phase)."""
        seed = self.configure_sketch([0])[0] if with_seed else None
        payloads = {}
        for nid, info in fed.clients.items():
            if info.name not in selections:
                continue  # no sketch from this client: it has no proxies and no expert
            sel = selections[info.name]
            arrays = {"selected": sel[self.cfg.select.method]}
            arrays.update({m: v for m, v in sel.items() if m != self.cfg.select.method})
            content = RecordDict({"proxies": to_record(arrays)})
            if seed is not None:
                content["seed"], content["seed-config"] = seed["seed"], seed["seed-config"]
            payloads[nid] = content
        return payloads

    def aggregate_expert(self, fed: Federation, nid: int, content: RecordDict,
                         vectors: bool = True):
        """A client's expert upload, checked: (LoRA, router vectors, metrics). ``vectors=False``:
        a non-final group round (``strategies/group_fl.py``), whose reply holds no router
        vectors (None) and must not: only the last round's are used."""
        name = fed.client_name(nid)
        mc, ec = self.seed_model.cfg, self.cfg.expert
        lora = check_arrays(from_record(get_record(content, "expert", ArrayRecord, name)),
                            lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, ec.rank), name,
                            "expert")
        metrics = check_metrics(get_record(content, "metrics", MetricRecord, name),
                                ["n_train"], name)
        if not vectors:
            if "router" in content:
                raise ValueError(f"{name}: router vectors in a non-final group round")
            return lora, None, metrics
        router = check_arrays(from_record(get_record(content, "router", ArrayRecord, name)),
                              {"vectors": (mc.depth, mc.dim)}, name, "router vectors")
        return lora, router["vectors"], metrics

    # ---------------------------------------------------------------- screening
    def screen(self, fed: Federation, experts: dict[str, tuple], selections,
               extra: dict) -> dict[str, tuple]:
        """Screen the expert uploads (``strategies/screen.py``) before unify: rejected clients
        are logged and recorded like malformed uploads and take no further part (no expert, no
        proxies in the unify data, no evaluation); the others' router vectors come back clipped.
        Statistics and decisions go to ``metrics.json["screening"]``."""
        sc = self.cfg.screen
        if not sc.enabled or not experts:
            return experts
        method = self.cfg.select.method
        proxies = {c: np.asarray(selections[c][method], np.int64) for c in experts
                   if c in selections}
        with fed.phase("screen"):
            stats, rejected, vectors = screen_experts(
                self.seed_model, self.bench.pool_x, self.bench.pool_y, experts, proxies, sc,
                int(self.cfg.expert.rank), float(self.cfg.expert.alpha))
        extra["screening"] = {"stats": stats,
                              "decision": {c: rejected.get(c, "accepted") for c in experts}}
        for c, why in rejected.items():
            fed.reject("screen", c, why)
        if rejected:
            fed.missing["screen"] = sorted(rejected)
            fed.drop_missing([nid for nid, info in fed.clients.items()
                              if info.name not in rejected])
        kept = {c: (e[0], vectors[c], e[2]) for c, e in experts.items() if c not in rejected}
        need = int(self.cfg.federation.min_clients)
        if len(kept) < need:
            raise PhaseError(f"phase screen: only {len(kept)} experts passed screening, "
                             f"federation.min_clients={need}; rejected: {rejected}")
        return kept

    # ---------------------------------------------------------------- phase 4: unify
    def unify_moe_config(self, names: list[str]) -> MoEConfig:
        """The MoE of experts ``names``: LoRA shape from ``expert``, routing from ``unify``."""
        return unify_moe_config(self.cfg, names)

    def expert_moe(self, experts: dict[str, tuple], vectors: bool) -> MoEMixin:
        """The clients' experts (name -> (LoRA, router vectors, metrics)) merged into a MoE
        with the ``unify`` section's routing; router rows from the router vectors or random."""
        names = list(experts)
        loras = [{k: torch.from_numpy(v) for k, v in experts[n][0].items()} for n in names]
        vecs = [torch.from_numpy(experts[n][1]) for n in names] if vectors else None
        return build_moe(self.seed_model, self.unify_moe_config(names), loras, vecs)

    def unify(self, experts: dict[str, tuple], union_idx: np.ndarray) -> MoEMixin:
        """MetaMoE's unify stage: the experts merged with router rows from their router
        vectors, then router, λ and experts fine-tuned on the union of the proxies."""
        uc = self.cfg.unify
        # unify.groups: one expert per group of clients (grouping.py); report in metrics.json.
        # With group_expert=fedavg the experts are the groups' already (group_fl.py).
        if uc.group_expert == "merge":
            experts, self.group_report = group_experts(experts, uc.groups,
                                                       int(self.cfg.run.seed),
                                                       int(self.cfg.expert.rank))
        moe = self.expert_moe(experts, vectors=uc.router_init != "random")
        if uc.epochs == 0 or len(union_idx) == 0:
            return moe
        hist = finetune(moe, self.bench.pool_x[union_idx], self.bench.pool_y[union_idx], uc,
                        self.cfg.run.seed, uc.train_router, uc.train_experts, desc="unify")
        if hist["examples"]:
            log.info("unified MoE fine-tuned on %d public samples, loss %.4f, λ per layer %s",
                     len(union_idx), hist["loss"], [round(v, 3) for v in moe.lambdas()])
        return moe

    def groups_extra(self, fed: Federation) -> dict:
        """``metrics.json["groups"]``: the last unify's groups (unify.groups) and their purity
        against the domains the clients named when they identified."""
        rep = dict(self.group_report)
        if rep:
            rep["purity"] = purity(rep["groups"], {c.name: c.domain for c in fed.clients.values()})
        return rep

    def unify_data(self, selections) -> np.ndarray:
        chosen = [sel[self.cfg.select.method] for sel in selections.values()]
        union = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
        if self.cfg.unify.data == "random_public":
            return self.random_pool(sum(len(c) for c in chosen))
        return union

    def random_pool(self, size: int) -> np.ndarray:
        """A seeded uniform sample of ``size`` public pool items (at most the whole pool),
        sorted: the public data of the rows that train on random public samples."""
        rng = np.random.default_rng(self.cfg.run.seed)
        size = min(size, len(self.bench.pool_x))
        return np.sort(rng.choice(len(self.bench.pool_x), size=size, replace=False))

    # ---------------------------------------------------------------- phase 5: evaluate
    def configure_evaluate(self, fed: Federation, moe: MoEMixin, extra: dict) -> dict:
        state = torch_state_to_record(shipped_state(moe))
        cap = int(self.cfg.run.eval_references_max)
        self.eval_references = cap < 0 or len(moe.moe_cfg.expert_names) <= cap
        conf = encode_settings(MOE_SPEC, {"model": moe.cfg.to_dict(),
                                          "moe": moe.moe_cfg.to_dict(),
                                          "references": self.eval_references, **extra})
        return {nid: RecordDict({"moe": state, CONFIG: conf}) for nid in fed.clients}

    def aggregate_evaluate(self, fed: Federation, nid: int, content: RecordDict):
        name = fed.client_name(nid)
        return check_metrics(get_record(content, "metrics", MetricRecord, name),
                             ["acc_unified"] + (["acc_zero_shot"] if getattr(
                                 self, "eval_references", True) else []), name)

    def expert_extras(self, experts: dict[str, tuple]) -> dict:
        """Training metrics and the client-side proxy-coverage ablation, for metrics.json:
        ``proxy_coverage`` (mean nearest-proxy distance) and ``proxy_coverage_p90``."""
        stats = {"coverage": "proxy_coverage", "coverage_p90": "proxy_coverage_p90"}
        extra: dict = {"expert_train": {
            name: {k: v for k, v in e[2].items() if k.split("/", 1)[0] not in stats}
            for name, e in experts.items()}}
        for stat, key in stats.items():
            cov = {}
            for name, e in experts.items():
                c = {k.split("/", 1)[1]: v for k, v in e[2].items()
                     if k.split("/", 1)[0] == stat and "/" in k}
                if "selected" in c:
                    c[self.cfg.select.method] = c.pop("selected")
                if c:
                    cov[name] = c
            if cov:
                extra[key] = cov
        return extra
