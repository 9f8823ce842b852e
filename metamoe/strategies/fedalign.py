"""FedAvg-MoE and FedAlign-MoE: a K-expert MoE trained by federated rounds.

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

``fl.aggregation`` (mean | median | trimmed | krum, ``strategies/robust.py``) replaces FedAvg-MoE's
n-weighted average of the states. FedAlign-MoE refuses anything but ``mean``: its own
routing-consistency / semantic aggregation is the method. The rule is recorded in the Outcome's
``extra`` as ``fl_aggregation``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from metamoe.config import ConfigError, num_clients
from metamoe.models.lora import fresh_loras
from metamoe.models.moe import EXPERT_TENSORS, MoEConfig, build_moe
from metamoe.models.moe_state import load_moe_trainable, moe_trainable_shapes, moe_trainable_state
from metamoe.protocol import (
    CONFIG,
    FL_MOE_TRAIN,
    FL_ROUND,
    UploadError,
    check_arrays,
    encode_settings,
    from_record,
    get_record,
    to_record,
)
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.fl_common import FLStrategy, fedavg_states, n_examples, weighted_mean
from metamoe.strategies.robust import aggregator
from metamoe.training import derive_seed

log = logging.getLogger("metamoe")
EPS = 1e-8


def fl_moe_config(cfg, k: int) -> MoEConfig:
    """The FedAvg-MoE / FedAlign-MoE architecture: K experts, top-k gate [I]."""
    fl = cfg.fl
    return MoEConfig(num_experts=k, rank=int(cfg.expert.rank), alpha=float(cfg.expert.alpha),
                     top_k=min(int(fl.top_k), k), lambda_init=float(fl.lambda_init),
                     context=str(fl.context), renormalize=bool(fl.renormalize),
                     expert_names=[f"e{p}" for p in range(k)])


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
            for attr in EXPERT_TENSORS:
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


@register("fedavg_moe")
class FedAvgMoE(FLStrategy):
    name = "fedavg_moe"
    align = False

    def __init__(self, cfg, seed_model, bench, pool_features):
        super().__init__(cfg, seed_model, bench, pool_features)
        if self.align and str(cfg.fl.aggregation) != "mean":
            raise ConfigError(f"fl.aggregation={cfg.fl.aggregation} is not offered for "
                              f"{self.name}: its routing-consistency / semantic aggregation is "
                              "the method itself; use fl.aggregation=mean")
        self.aggregate = aggregator(cfg.fl)

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self.start(fed, node_ids)
        f, ec = self.cfg.fl, self.cfg.expert
        k = num_clients(self.cfg)
        moe = build_moe(self.seed_model, fl_moe_config(self.cfg, k),
                        fresh_loras(self.seed_model, int(ec.rank), float(ec.alpha),
                                    [derive_seed(self.cfg.run.seed, p) for p in range(k)]),
                        None)
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
                                  CONFIG: encode_settings(FL_ROUND, conf)})
            if self.align and global_p is not None:
                payload["global_p"] = to_record({"p": global_p})

            def val(nid, content):
                name = fed.client_name(nid)
                arrays = check_arrays(from_record(get_record(content, "moe", ArrayRecord, name)),
                                      shapes, name, "MoE state")
                m, n = n_examples(content, name, self.cfg.fl.weighting)
                stats = None
                if self.align:
                    stats = check_arrays(from_record(get_record(content, "stats", ArrayRecord,
                                                                name)),
                                         {"p": (L, E), "h": (L, E, d)}, name, "FedAlign stats")
                    if (stats["p"] < 0).any() or not np.allclose(stats["p"].sum(-1), 1.0,
                                                                 atol=1e-3):
                        raise UploadError(f"client {name}: routing distribution p is not a "
                                          "probability vector per layer")
                return arrays, n, stats, float(m.get("train_loss", float("nan"))), \
                    m.get("dp_epsilon")

            with fed.phase("train"):
                got = fed.exchange(f"train-r{r}", FL_MOE_TRAIN,
                                   {nid: payload for nid in fed.clients}, val)
            order = sorted(got, key=lambda nid: fed.clients[nid].partition_id)
            states = [got[nid][0] for nid in order]
            n = [got[nid][1] for nid in order]
            rec = {"round": r, "clients": [fed.client_name(nid) for nid in order],
                   "train_loss": {fed.client_name(nid): got[nid][3] for nid in order}}
            if any(got[nid][4] is not None for nid in order):  # DP-SGD: ε of the rounds so far
                rec["dp_epsilon"] = {fed.client_name(nid): float(got[nid][4]) for nid in order
                                     if got[nid][4] is not None}
            if self.align:
                p = np.stack([got[nid][2]["p"] for nid in order])
                h = np.stack([got[nid][2]["h"] for nid in order])
                state, global_p, diag = fedalign_aggregate(states, n, p, h, state, f)
                rec.update(diag)
            else:
                state = self.aggregate(states, n)
            history.append(rec)
            log.info("%s round %d/%d: losses %s", self.name, r, f.rounds, rec["train_loss"])
        load_moe_trainable(moe, state)
        evals = self.evaluate_moe(fed, moe)
        return Outcome(evaluations=evals, model=moe, model_extra=self.model_extra(),
                       extra={"fl_rounds": history, "lambdas": moe.lambdas(),
                              "fl_aggregation": str(f.aggregation)})


@register("fedalign_moe")
class FedAlignMoE(FedAvgMoE):
    name = "fedalign_moe"
    align = True
