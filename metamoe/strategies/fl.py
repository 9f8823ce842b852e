"""Iterative federated baselines: FedAvg (dense), FedAvg-MoE, FedAlign-MoE, DDOME.

All start from the server's seed model M0 (frozen), train FFN-LoRA with ``expert.rank`` /
``expert.alpha`` (the same family as MetaMoE's experts) through the shared loop
``metamoe.training.train``, and report each client's ``acc_unified`` on its own test split.
Client handlers: ``metamoe/clients/fl_handlers.py``. Knobs: the ``fl`` config section.

Fair budget (``conf/method/*.yaml``): ``fl.rounds`` R x ``fl.epochs`` E local epochs on Dp,
R=4 x E=2 = 8 passes over Dp per client, as MetaMoE's one expert training (expert.epochs=8 over
Dp ∪ 500 proxies); same optimizer (Adam, lr 3e-3). The iterative methods use no public data.

* ``fedavg`` — dense M0 + FFN-LoRA (rank ``expert.rank``) fine-tuned with Flower's own
  ``flwr.serverapp.strategy.FedAvg`` (weighted by ``num-examples``). Only the LoRA is trained
  (the fair comparison with LoRA experts; full fine-tuning is not offered, ``fl.train=lora``).
  The result is emitted as a 1-expert MoE (exactly M0 + the LoRA) so that the common
  ``evaluate`` handler and the artifact format apply.
* ``fedavg_moe`` — a MoE with K = number of clients FFN-LoRA experts and MetaMoE's
  context-aware router (``fl.context``), top-``fl.top_k`` renormalised gate [I] (so the initial
  MoE equals M0 exactly and the router gets gradient); every trainable parameter (router rows,
  λ, all experts' LoRA) is averaged element-wise, same index with same index, weighted by n_i.
* ``fedalign_moe`` — FedAlign-MoE, baselines_detail.md §3.2. Everything but the form
  ω_i(e) = s_i(e)/Σ_j s_j(e) and τ_e = M(e) − β Σ(e) is designed here [I]:
    - client loss: CE + ``fl.align_lambda_g`` Σ_l KL(P̄_l ‖ p̂_l), p̂_l the *batch-mean* gate
      distribution (per-token routing stays free); no regulariser in round 1 (no P̄ yet) [I];
    - client uploads, besides the weights, p_i [L,E] (mean softmax gate over all local tokens)
      and h_i [L,E,d] (gate-weighted mean output of expert e over all local tokens;
      ``fl.align_descriptor``: output | delta (its LoRA delta) | input) — whole-set means [I];
    - gate: P̄ = Σ n_i p_i / Σ n_i; s_i(e) = n_i exp(−κ |p_i(e) − P̄(e)| / (P̄(e)+ε))
      (``fl.align_score=expert``; ``client``: n_i exp(−κ KL(p_i‖P̄)); ``usage``: n_i p_i(e));
      router row e ← Σ_i ω_i(e) W_i(e), per layer [I]; λ (shared) plain FedAvg [I];
    - experts: S_ij(e) = cos(h_i(e), h_j(e)) per layer; τ_e = mean − β·std over pairs i<j
      (``fl.align_threshold=fixed``: τ = ``fl.align_fixed_tau``); γ_ij = max(S_ij,0)·1[S_ij≥τ]
      [I: a negative similarity never adds weight]; a_i(e) = Σ_{j≠i} γ_ij/(N−1); expert e of
      layer l ← Σ_{a_i>0} a_i n_i θ_i(e) / Σ a_i n_i; all a_i = 0 → keep θ^t(e); all S_ij equal
      (std 0, e.g. N = 2) → FedAvg. Ablations: ``fl.align_gate=false`` (FedAvg gate),
      ``fl.align_lambda_g=0``, ``fl.align_experts=false`` (FedAvg experts), fixed threshold.
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

Upload bytes per client are counted by ``Federation.exchange``; for Flower's FedAvg the reply
bytes are counted in :meth:`CountingFedAvg.aggregate_train`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from metamoe.clients.fl_handlers import (
    GateMLP,
    expert_lora,
    fl_moe_config,
    init_loras,
    load_moe_trainable,
    moe_trainable_shapes,
    moe_trainable_state,
    set_expert_lora,
    state_arrays,
)
from metamoe.config import ConfigError, num_clients
from metamoe.models.io import seed_payload, shipped_state
from metamoe.models.lora import lora_shapes
from metamoe.models.moe import MoEConfig, MoEViT, build_moe
from metamoe.protocol import (
    UploadError,
    check_arrays,
    check_metrics,
    from_record,
    get_record,
    record_nbytes,
    to_record,
    torch_state_to_record,
)
from metamoe.strategies.base import Federation, Outcome, Strategy, register

log = logging.getLogger("metamoe")
EPS = 1e-8


# ============================================================ aggregation (pure numpy)
def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(arrays) == 0 or w.sum() <= 0:
        raise ValueError("weighted_mean needs at least one array with positive weight")
    w = w / w.sum()
    total = sum(wi * np.asarray(a, np.float64) for wi, a in zip(w, arrays, strict=True))
    return total.astype(np.float32)


def fedavg_states(states: Sequence[dict[str, np.ndarray]], n: Sequence[float]
                  ) -> dict[str, np.ndarray]:
    """Element-wise, n-weighted average of same-keyed states (FedAvg)."""
    return {k: weighted_mean([s[k] for s in states], n) for k in states[0]}


def routing_consistency_weights(p: np.ndarray, n: Sequence[float], kappa: float = 1.0,
                                score: str = "expert") -> tuple[np.ndarray, np.ndarray]:
    """FedAlign-MoE routing-consistency weights. ``p`` [N, L, E] clients' routing
    distributions. Returns (ω [N, L, E] with Σ_i ω_i(e) = 1, P̄ [L, E])."""
    p = np.asarray(p, np.float64)
    nn_ = np.asarray(n, np.float64)[:, None, None]
    pbar = (nn_ * p).sum(0) / nn_.sum()
    if score == "expert":
        s = nn_ * np.exp(-kappa * np.abs(p - pbar) / (pbar + EPS))
    elif score == "client":
        kl = (p * (np.log(p + EPS) - np.log(pbar + EPS))).sum(-1, keepdims=True)  # [N, L, 1]
        s = nn_ * np.exp(-kappa * np.broadcast_to(kl, p.shape))
    elif score == "usage":
        s = nn_ * p
    else:
        raise ValueError(f"unknown FedAlign consistency score {score!r}")
    tot = s.sum(0, keepdims=True)
    omega = np.where(tot > 0, s / np.where(tot > 0, tot, 1.0), 1.0 / len(p))
    return omega.astype(np.float64), pbar


def semantic_agreement(h: np.ndarray, beta: float = 1.0, threshold: str = "adaptive",
                       fixed_tau: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """FedAlign-MoE semantic agreement a_i(e) per (layer, expert) from descriptors
    ``h`` [N, L, E, d]. Returns (a [N, L, E], τ [L, E]). Where all pairwise similarities are
    equal (std 0, e.g. N = 2) a = 1 for everyone (FedAvg fallback, τ = NaN)."""
    h = np.asarray(h, np.float64)
    N, L, E, _ = h.shape
    a = np.ones((N, L, E))
    tau = np.full((L, E), np.nan)
    if N < 2:
        return a, tau
    hn = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), EPS)
    iu = np.triu_indices(N, 1)
    for l in range(L):
        for e in range(E):
            v = hn[:, l, e]
            S = v @ v.T
            pairs = S[iu]
            if threshold == "adaptive":
                if pairs.std() < 1e-9:
                    continue  # every S_ij equal: FedAvg
                t = pairs.mean() - beta * pairs.std()
            else:
                t = fixed_tau
            gamma = np.where(S >= t, np.maximum(S, 0.0), 0.0)
            np.fill_diagonal(gamma, 0.0)
            a[:, l, e] = gamma.sum(1) / (N - 1)
            tau[l, e] = t
    return a, tau


def fedalign_aggregate(states: Sequence[dict[str, np.ndarray]], n: Sequence[float],
                       p: np.ndarray, h: np.ndarray, prev: dict[str, np.ndarray], fl
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """One FedAlign-MoE server step over the clients' trainable MoE states (keys
    ``<layer l's MoE module>.{router|lambda_raw|A1|B1|A2|B2}``, layers in model order, e.g.
    ``blocks.{l}.mlp`` for the ViT). Returns (new state, P̄ [L, E], diagnostics)."""
    out = fedavg_states(states, n)  # λ (shared) and the FedAvg fallbacks
    omega, pbar = routing_consistency_weights(p, n, fl.align_kappa, fl.align_score)
    a, tau = semantic_agreement(h, fl.align_beta, fl.align_threshold, fl.align_fixed_tau)
    N, L, E = omega.shape
    nv = np.asarray(n, np.float64)
    kept = 0
    prefixes = [k[: -len(".router")] for k in prev if k.endswith(".router")]  # model order
    if len(prefixes) != L:
        raise ValueError(f"{len(prefixes)} MoE layers in the uploaded states, {L} in the stats")
    for l, prefix in enumerate(prefixes):
        if fl.align_gate:
            key = f"{prefix}.router"
            W = np.stack([s[key] for s in states]).astype(np.float64)  # [N, E, d]
            out[key] = np.einsum("ne,ned->ed", omega[:, l], W).astype(np.float32)
        if not fl.align_experts:
            continue
        for e in range(E):
            w = a[:, l, e] * nv
            for attr in ("A1", "B1", "A2", "B2"):
                key = f"{prefix}.{attr}"
                if w.sum() <= 0:
                    out[key][e] = prev[key][e]
                else:
                    out[key][e] = weighted_mean([s[key][e] for s in states], w)
            kept += int(w.sum() <= 0)
    diag = {"omega_mean": omega.mean(1).mean(1).tolist(),  # per client
            "omega_min": float(omega.min()), "agreement_mean": a.mean((1, 2)).tolist(),
            "tau_mean": float(np.nanmean(tau)) if np.isfinite(tau).any() else None,
            "experts_kept": kept}
    return out, pbar.astype(np.float32), diag


def ddome_aggregate(gates: Sequence[dict[str, np.ndarray]], n: Sequence[float],
                    trained: Sequence[dict[int, dict[str, np.ndarray]]],
                    prev_experts: list[dict[str, np.ndarray]]
                    ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """DDOME server step: the gate averaged over every participant, expert e over the
    clients that trained it (n-weighted); experts nobody trained keep their weights."""
    gate = fedavg_states(gates, n)
    experts = []
    for e, prev in enumerate(prev_experts):
        who = [(t[e], w) for t, w in zip(trained, n, strict=False) if e in t]
        experts.append(fedavg_states([s for s, _ in who], [w for _, w in who]) if who
                       else prev)
    return gate, experts


# ============================================================ shared strategy helpers
class _FLBase(Strategy):
    def __init__(self, cfg, seed_model, bench, pool_features):
        super().__init__(cfg, seed_model, bench, pool_features)
        f = cfg.fl
        if f.rounds < 1 or f.epochs < 1 or f.lr <= 0 or f.batch_size <= 0:
            raise ConfigError(f"fl.rounds={f.rounds}, fl.epochs={f.epochs} must be >= 1 and "
                              f"fl.lr={f.lr}, fl.batch_size={f.batch_size} positive")
        if f.top_k < 1 or f.ddome_top_k < 1 or f.ddome_gate_hidden < 1:
            raise ConfigError("fl.top_k, fl.ddome_top_k and fl.ddome_gate_hidden must be >= 1")

    def start(self, fed: Federation, node_ids: list[int]) -> None:
        """Register the clients (query.identify) and send M0 once (query.fl_seed)."""
        fed.identify(node_ids)
        seed_rec, seed_cfg = seed_payload(self.seed_model)

        def ack(nid, content):
            info = get_record(content, "info", ConfigRecord, fed.client_name(nid))
            if str(info.get("name", "")) != fed.client_name(nid):
                raise UploadError(f"client {fed.client_name(nid)}: seed ack claims to be "
                                  f"{info.get('name')!r}")
            return True

        with fed.phase("seed-send"):
            got = fed.exchange("seed-send", "query.fl_seed",
                               {nid: RecordDict({"seed": seed_rec, "seed-config": seed_cfg})
                                for nid in fed.clients}, ack)
        fed.drop_missing(got)

    def model_extra(self) -> dict:
        return {"class_names": list(self.bench.class_names),
                "domains": {d.name: list(map(int, d.classes)) for d in self.bench.domains}}

    def evaluate_moe(self, fed: Federation, moe: MoEViT) -> dict[str, dict]:
        """The common ``evaluate`` handler (routed MoE; acc_unified, acc_zero_shot, ...)."""
        state = torch_state_to_record(shipped_state(moe))
        conf = ConfigRecord({"moe": json.dumps({"model": moe.cfg.to_dict(),
                                                "moe": moe.moe_cfg.to_dict(),
                                                **self.model_extra()})})

        def val(nid, content):
            name = fed.client_name(nid)
            return check_metrics(get_record(content, "metrics", MetricRecord, name),
                                 ["acc_unified", "acc_zero_shot"], name)

        with fed.phase("evaluate"):
            got = fed.exchange("evaluate", "evaluate",
                               {nid: RecordDict({"moe": state, "config": conf})
                                for nid in fed.clients}, val)
        return {fed.client_name(n): m for n, m in got.items()}


def _n_examples(content: RecordDict, name: str) -> tuple[dict, int]:
    m = check_metrics(get_record(content, "metrics", MetricRecord, name), ["num-examples"], name)
    n = int(m["num-examples"])
    if n <= 0:
        raise UploadError(f"client {name}: num-examples={n} must be positive")
    return m, n


# ============================================================ FedAvg (dense, Flower FedAvg)
class CountingFedAvg(FedAvg):
    """Flower's FedAvg plus this project's upload rules: each reply is validated (exact LoRA
    shapes, finite values, size limit; bad ones rejected and logged on the Federation) and its
    bytes are added to ``fed.upload_bytes`` under the client's name."""

    def __init__(self, fed: Federation, shapes: dict[str, tuple[int, ...]], **kw):
        super().__init__(**kw)
        self.fed, self.shapes = fed, shapes
        self.history: list[dict] = []

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        for m in msgs:
            self.fed.download_bytes[self.fed.client_name(m.metadata.dst_node_id)] += \
                record_nbytes(m.content)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        fed = self.fed
        replies = list(replies)

        def validate(nid: int, content: RecordDict) -> tuple[float, RecordDict]:
            who = fed.client_name(nid)
            check_arrays(from_record(get_record(content, "arrays", ArrayRecord, who)),
                         self.shapes, who, "LoRA")
            m, _ = _n_examples(content, who)
            if set(content) != {"arrays", "metrics"}:
                raise UploadError(f"client {who}: unexpected records "
                                  f"{sorted(set(content) - {'arrays', 'metrics'})}")
            return float(m.get("train_loss", float("nan"))), content

        # The same screening as every other phase (errors, strays, size, validation, bytes).
        ok = fed.collect(f"train-r{server_round}", fed.clients, replies, validate)
        accepted = {id(content) for _, content in ok.values()}
        valid = [rep for rep in replies if id(rep.content) in accepted]
        losses = {fed.client_name(nid): loss for nid, (loss, _) in ok.items()}
        self.history.append({"round": server_round, "train_loss": losses})
        return super().aggregate_train(server_round, valid)


@register("fedavg")
class FedAvgDense(_FLBase):
    name = "fedavg"

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self.start(fed, node_ids)
        mc, ec, f = self.seed_model.cfg, self.cfg.expert, self.cfg.fl
        init = init_loras(self.seed_model, 1, int(ec.rank), float(ec.alpha), self.cfg.run.seed)[0]
        strat = CountingFedAvg(fed, lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, int(ec.rank)),
                               fraction_train=1.0, fraction_evaluate=0.0,
                               min_train_nodes=int(fed.cfg.federation.min_clients),
                               min_available_nodes=len(fed.clients))
        with fed.phase("train"):
            result = strat.start(grid=fed.grid, initial_arrays=to_record(
                {k: v.numpy() for k, v in init.items()}), num_rounds=int(f.rounds),
                timeout=float(fed.cfg.federation.phase_timeout_s),
                train_config=ConfigRecord({"method": "fedavg"}))
        lora = {k: torch.from_numpy(v) for k, v in from_record(result.arrays).items()}
        moe = build_moe(self.seed_model, MoEConfig(num_experts=1, rank=int(ec.rank),
                                                   alpha=float(ec.alpha), top_k=1,
                                                   context="none", expert_names=["fedavg"]),
                        [lora], None)
        evals = self.evaluate_moe(fed, moe)
        return Outcome(evaluations=evals, model=moe, model_extra=self.model_extra(),
                       extra={"fl_rounds": strat.history})


# ============================================================ FedAvg-MoE / FedAlign-MoE
@register("fedavg_moe")
class FedAvgMoE(_FLBase):
    name = "fedavg_moe"
    align = False

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self.start(fed, node_ids)
        f, ec = self.cfg.fl, self.cfg.expert
        k = num_clients(self.cfg)
        moe = build_moe(self.seed_model, fl_moe_config(self.cfg, k),
                        init_loras(self.seed_model, k, int(ec.rank), float(ec.alpha),
                                   self.cfg.run.seed), None)
        state = moe_trainable_state(moe)
        shapes = moe_trainable_shapes(moe)
        L, E, d = moe.cfg.depth, k, moe.cfg.dim
        global_p: np.ndarray | None = None
        history = []
        for r in range(1, int(f.rounds) + 1):
            conf = {"moe": moe.moe_cfg.to_dict(), "round": r, "method": self.name,
                    "stats": self.align, "descriptor": str(f.align_descriptor),
                    "lambda_g": float(f.align_lambda_g) if self.align
                    else 0.0}
            payload = RecordDict({"moe": to_record(state),
                                  "config": ConfigRecord({"fl": json.dumps(conf)})})
            if self.align and global_p is not None:
                payload["global_p"] = to_record({"p": global_p})

            def val(nid, content):
                name = fed.client_name(nid)
                arrays = check_arrays(from_record(get_record(content, "moe", ArrayRecord, name)),
                                      shapes, name, "MoE state")
                m, n = _n_examples(content, name)
                stats = None
                if self.align:
                    stats = check_arrays(from_record(get_record(content, "stats", ArrayRecord,
                                                                name)),
                                         {"p": (L, E), "h": (L, E, d)}, name, "FedAlign stats")
                    if (stats["p"] < 0).any() or not np.allclose(stats["p"].sum(-1), 1.0,
                                                                 atol=1e-3):
                        raise UploadError(f"client {name}: routing distribution p is not a "
                                          "probability vector per layer")
                return arrays, n, stats, float(m.get("train_loss", float("nan")))

            with fed.phase("train"):
                got = fed.exchange(f"train-r{r}", "train.fl_moe",
                                   {nid: payload for nid in fed.clients}, val)
            order = sorted(got, key=lambda nid: fed.clients[nid].partition_id)
            states = [got[nid][0] for nid in order]
            n = [got[nid][1] for nid in order]
            rec = {"round": r, "clients": [fed.client_name(nid) for nid in order],
                   "train_loss": {fed.client_name(nid): got[nid][3] for nid in order}}
            if self.align:
                p = np.stack([got[nid][2]["p"] for nid in order])
                h = np.stack([got[nid][2]["h"] for nid in order])
                state, global_p, diag = fedalign_aggregate(states, n, p, h, state, f)
                rec.update(diag)
            else:
                state = fedavg_states(states, n)
            history.append(rec)
            log.info("%s round %d/%d: losses %s", self.name, r, f.rounds, rec["train_loss"])
        load_moe_trainable(moe, state)
        evals = self.evaluate_moe(fed, moe)
        return Outcome(evaluations=evals, model=moe, model_extra=self.model_extra(),
                       extra={"fl_rounds": history, "lambdas": moe.lambdas()})


@register("fedalign_moe")
class FedAlignMoE(FedAvgMoE):
    name = "fedalign_moe"
    align = True


# ============================================================ DDOME
@register("ddome")
class DDOME(_FLBase):
    name = "ddome"

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self.start(fed, node_ids)
        f, ec, mc = self.cfg.fl, self.cfg.expert, self.seed_model.cfg
        M = int(f.ddome_experts) if f.ddome_experts > 0 else num_clients(self.cfg)
        K = min(int(f.ddome_top_k), M)
        torch.manual_seed(self.cfg.run.seed)
        gate = state_arrays(GateMLP(mc.dim, int(f.ddome_gate_hidden), M))
        experts = [{k: v.numpy() for k, v in e.items()} for e in
                   init_loras(self.seed_model, M, int(ec.rank), float(ec.alpha),
                              self.cfg.run.seed)]
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
                    got = fed.exchange(f"select-r{r}", "query.ddome_select",
                                       {nid: RecordDict({"gate": to_record(gate), "config":
                                                         ConfigRecord({"ddome": json.dumps(conf)})})
                                        for nid in normal}, val_sel)
                subsets.update(got)
            payloads = {}
            for nid, ids in subsets.items():
                c = {**conf, "anchor": anchors.get(nid)}
                payloads[nid] = RecordDict({
                    "gate": to_record(gate),
                    "experts": to_record({f"e{e}/{k}": v for e in ids
                                          for k, v in experts[e].items()}),
                    "config": ConfigRecord({"ddome": json.dumps(c)})})

            def val_train(nid, content, subsets=subsets):
                name = fed.client_name(nid)
                g = check_arrays(from_record(get_record(content, "gate", ArrayRecord, name)),
                                 gshapes, name, "gate")
                spec = {f"e{e}/{k}": s for e in subsets[nid] for k, s in lshapes.items()}
                ex = check_arrays(from_record(get_record(content, "experts", ArrayRecord, name)),
                                  spec, name, "experts")
                m, n = _n_examples(content, name)
                trained = {e: {k: ex[f"e{e}/{k}"] for k in lshapes} for e in subsets[nid]}
                return g, n, trained, float(m.get("train_loss", float("nan")))

            with fed.phase("train"):
                got = fed.exchange(f"train-r{r}", "train.ddome", payloads, val_train)
            ids = sorted(got, key=lambda nid: fed.clients[nid].partition_id)
            gate, experts = ddome_aggregate([got[i][0] for i in ids], [got[i][1] for i in ids],
                                            [got[i][2] for i in ids], experts)
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
        with fed.phase("evaluate"):
            got = fed.exchange("evaluate", "evaluate.ddome",
                               {nid: RecordDict({"gate": to_record(gate), "experts": all_experts,
                                                 "config": ConfigRecord(
                                                     {"ddome": json.dumps(base)})})
                                for nid in fed.clients}, val_eval)
        evals = {fed.client_name(n): m for n, m in got.items()}
        chosen = {c: [int(k.split("/e")[1]) for k, v in m.items()
                      if k.startswith("ddome_chosen/") and v > 0] for c, m in evals.items()}
        return Outcome(evaluations=evals, model=None,
                       extra={"fl_rounds": history, "ddome_test_experts": chosen,
                              "ddome_M": M, "ddome_K": K})


__all__ = ["CountingFedAvg", "DDOME", "FedAlignMoE", "FedAvgDense", "FedAvgMoE",
           "ddome_aggregate", "fedalign_aggregate", "fedavg_states",
           "routing_consistency_weights", "semantic_agreement", "weighted_mean",
           "expert_lora", "set_expert_lora"]
