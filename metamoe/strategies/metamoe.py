"""The MetaMoE strategy: sketch → select → expert → unify → evaluate (paper Alg. 1).

Each phase is a ``configure`` (payloads per node) + ``aggregate`` (validate replies) pair
around :meth:`Federation.exchange`; the server-side work (proxy selection, MoE fine-tuning) is
plain PyTorch/numpy in this process.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from metamoe.clients.stages import optim
from metamoe.models.io import moe_from_state, seed_payload, shipped_state
from metamoe.models.lora import lora_shapes
from metamoe.models.moe import MoEConfig, MoEViT, build_moe
from metamoe.protocol import (
    UploadError,
    check_arrays,
    check_metrics,
    from_record,
    get_record,
    to_record,
    torch_state_to_record,
)
from metamoe.proxy import sketch as psk
from metamoe.proxy.select import select_proxies
from metamoe.strategies.base import Federation, Outcome, Strategy, pack, register, unpack
from metamoe.training import train

log = logging.getLogger("metamoe")


@register("metamoe")
class MetaMoE(Strategy):
    name = "metamoe"

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

    def aggregate_expert(self, fed: Federation, nid: int, content: RecordDict):
        name = fed.client_name(nid)
        mc, ec = self.seed_model.cfg, self.cfg.expert
        lora = check_arrays(from_record(get_record(content, "expert", ArrayRecord, name)),
                            lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, ec.rank), name,
                            "expert")
        router = check_arrays(from_record(get_record(content, "router", ArrayRecord, name)),
                              {"vectors": (mc.depth, mc.dim)}, name, "router vectors")
        metrics = check_metrics(get_record(content, "metrics", MetricRecord, name),
                                ["n_train"], name)
        return lora, router["vectors"], metrics

    # ---------------------------------------------------------------- phase 4: unify
    def unify_moe_config(self, names: list[str]) -> MoEConfig:
        """The MoE of experts ``names``: LoRA shape from ``expert``, routing from ``unify``."""
        uc, ec = self.cfg.unify, self.cfg.expert
        return MoEConfig(num_experts=len(names), rank=ec.rank, alpha=ec.alpha,
                         top_k=min(uc.top_k, len(names)), lambda_init=uc.lambda_init,
                         context=uc.context, renormalize=uc.renormalize,
                         logit_scale=uc.logit_scale, router_score=uc.router_score,
                         expert_names=names)

    def expert_moe(self, experts: dict[str, tuple], vectors: bool) -> MoEViT:
        """The clients' experts (name -> (LoRA, router vectors, metrics)) merged into a MoE
        with the ``unify`` section's routing; router rows from the router vectors or random."""
        names = list(experts)
        loras = [{k: torch.from_numpy(v) for k, v in experts[n][0].items()} for n in names]
        vecs = [torch.from_numpy(experts[n][1]) for n in names] if vectors else None
        return build_moe(self.seed_model, self.unify_moe_config(names), loras, vecs)

    def unify(self, experts: dict[str, tuple], union_idx: np.ndarray) -> MoEViT:
        uc = self.cfg.unify
        moe = self.expert_moe(experts, vectors=uc.router_init != "random")
        if uc.epochs == 0 or len(union_idx) == 0:
            return moe
        moe.freeze_base()
        groups = []
        if uc.train_router:
            groups.append({"params": moe.router_parameters(), "lr": uc.lr})
            if moe.lambda_parameters():
                groups.append({"params": moe.lambda_parameters(), "lr": uc.lambda_lr})
        else:
            for p in moe.router_parameters() + moe.lambda_parameters():
                p.requires_grad_(False)
        if uc.train_experts:
            groups.append({"params": moe.expert_parameters(), "lr": uc.lr})
        else:
            for p in moe.expert_parameters():
                p.requires_grad_(False)
        if not groups:
            return moe
        x = torch.from_numpy(self.bench.pool_x[union_idx])
        y = torch.from_numpy(self.bench.pool_y[union_idx])
        hist = train(moe, x, y, optim(uc), params=groups, seed=self.cfg.run.seed,
                     desc="unify", log_every=1)
        log.info("unified MoE fine-tuned on %d public samples, loss %.4f, λ per layer %s",
                 len(x), hist["loss"], [round(v, 3) for v in moe.lambdas()])
        return moe

    def unify_data(self, selections) -> np.ndarray:
        chosen = [sel[self.cfg.select.method] for sel in selections.values()]
        union = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
        if self.cfg.unify.data == "random_public":
            rng = np.random.default_rng(self.cfg.run.seed)
            size = min(sum(len(c) for c in chosen), len(self.bench.pool_x))
            return np.sort(rng.choice(len(self.bench.pool_x), size=size, replace=False))
        return union

    # ---------------------------------------------------------------- phase 5: evaluate
    def configure_evaluate(self, fed: Federation, moe: MoEViT, extra: dict) -> dict:
        state = torch_state_to_record(shipped_state(moe))
        conf = ConfigRecord({"moe": json.dumps({"model": moe.cfg.to_dict(),
                                                "moe": moe.moe_cfg.to_dict(), **extra})})
        return {nid: RecordDict({"moe": state, "config": conf}) for nid in fed.clients}

    def aggregate_evaluate(self, fed: Federation, nid: int, content: RecordDict):
        name = fed.client_name(nid)
        return check_metrics(get_record(content, "metrics", MetricRecord, name),
                             ["acc_unified", "acc_zero_shot"], name)

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
                got = fed.exchange("sketch", "query.sketch", self.configure_sketch(node_ids),
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
            fed.resumed.append("expert")
        else:
            with fed.phase("expert"):
                got = fed.exchange("expert", "train.expert",
                                   self.configure_expert(fed, selections, with_seed=not seed_sent),
                                   lambda nid, c: self.aggregate_expert(fed, nid, c))
            order = sorted(got, key=lambda n: fed.clients[n].partition_id)
            experts = {fed.client_name(n): got[n] for n in order}
            if ck:
                ck.save("expert", pack({c: {**e[0], "__router__": e[1]}
                                        for c, e in experts.items()}),
                        {"order": list(experts), "metrics": {c: e[2] for c, e in experts.items()}})
        extra.update(self.expert_extras(experts))

        used = {c: selections[c] for c in experts}
        saved = ck.load("unify") if ck else None
        if saved:
            moe = moe_from_state({k: torch.from_numpy(v) for k, v in saved[0].items()},
                                 saved[1])
            fed.resumed.append("unify")
        else:
            with fed.phase("unify"):
                moe = self.unify(experts, self.unify_data(used))
            if ck:
                ck.save("unify", {k: v.detach().numpy() for k, v in shipped_state(moe).items()},
                        {"model": moe.cfg.to_dict(), "moe": moe.moe_cfg.to_dict()})
        extra["lambdas"] = moe.lambdas()
        domains = {d.name: list(map(int, d.classes)) for d in self.bench.domains}
        model_extra = {"class_names": list(self.bench.class_names), "domains": domains}
        with fed.phase("evaluate"):
            evals = fed.exchange("evaluate", "evaluate",
                                 self.configure_evaluate(fed, moe, model_extra),
                                 lambda nid, c: self.aggregate_evaluate(fed, nid, c))
        evaluations = {fed.client_name(n): m for n, m in evals.items()}
        return Outcome(evaluations=evaluations, model=moe, model_extra=model_extra, extra=extra)

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
