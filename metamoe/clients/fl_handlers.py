"""ClientApp handlers of the iterative federated baselines (FedAvg, FedAvg-MoE, FedAlign-MoE,
DDOME), registered on the ClientApp ``app`` of ``client_app.py``; plus the model helpers the
server strategies (``metamoe/strategies/fl.py``) share with them.

Message types handled here (the server side is in ``strategies/fl.py``):

====================  ==========================================  ===============================
message type          client uploads (record key)                 produced by
====================  ==========================================  ===============================
query.fl_seed         ``info`` name, n_private (ack of M0)         :func:`fl_seed`
train                 ``arrays`` FFN-LoRA (dense FedAvg)           :func:`fedavg_train`
                      ``metrics`` num-examples, train_loss
train.fl_moe          ``moe`` router rows, λ, all experts' LoRA    :func:`fl_moe_train`
                      ``stats`` p [L,E] routing distribution and  :func:`moe_local_stats`
                      h [L,E,d] expert descriptors (FedAlign only)
query.ddome_select    ``select`` top-K expert indices              :func:`ddome_select`
train.ddome           ``gate`` gate MLP, ``experts`` trained LoRAs :func:`ddome_train`
evaluate.ddome        ``metrics`` accuracies (scalars)             :func:`ddome_evaluate`
====================  ==========================================  ===============================

Privacy: weights are weight deltas; p and h are means over *all* local tokens of the whole
local set; the DDOME selection is K integers from scores summed over the whole local set;
metrics are scalars. No sample, per-sample embedding or per-sample gradient is uploaded.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from metamoe.clients import client_app as _ca
from metamoe.clients.stages import optim
from metamoe.models.lora import inject_ffn_lora, load_lora_state_dict, lora_state_dict
from metamoe.models.moe import MoEConfig, MoEFFN, MoEViT, _seed_state_for_moe, build_moe, moe_class
from metamoe.models.vit import ViT
from metamoe.protocol import check_arrays, from_record, get_record, to_record
from metamoe.training import accuracy, features, train

log = logging.getLogger("metamoe")
app = _ca.app

LORA_KINDS = (("A1", "fc1", "lora_A"), ("B1", "fc1", "lora_B"),
              ("A2", "fc2", "lora_A"), ("B2", "fc2", "lora_B"))


# ===================================================================== shared model helpers
def init_loras(seed: ViT, num: int, rank: int, alpha: float, rng_seed: int
               ) -> list[dict[str, torch.Tensor]]:
    """``num`` fresh FFN-LoRA experts (A kaiming-uniform from ``rng_seed + p``, B = 0: each
    equals M0, but their A differ so same-initialised experts can diverge)."""
    out = []
    for p in range(num):
        torch.manual_seed(int(rng_seed) * 1009 + p)
        out.append(lora_state_dict(inject_ffn_lora(copy.deepcopy(seed), rank, alpha)))
    return out


def moe_from_seed(seed: ViT, moe_cfg: MoEConfig) -> MoEViT:
    """A MoE on M0 whose router/λ/experts are still to be loaded (all zero)."""
    moe = moe_class(seed.cfg)(seed.cfg, moe_cfg)
    missing, unexpected = moe.load_state_dict(_seed_state_for_moe(seed), strict=False)
    if unexpected or any(not k.endswith((".A1", ".B1", ".A2", ".B2", ".router", ".lambda_raw"))
                         for k in missing):
        raise RuntimeError(f"seed/MoE mismatch: {missing[:3]} {unexpected[:3]}")
    moe.eval()
    return moe


def moe_trainable_keys(moe: MoEViT) -> list[str]:
    """State keys of what FL-MoE clients train and exchange: per layer router, λ, A1/B1/A2/B2."""
    return [f"{prefix}.{n}" for prefix, mod in moe.named_modules() if isinstance(mod, MoEFFN)
            for n in ("router", "lambda_raw", "A1", "B1", "A2", "B2")]


def moe_trainable_state(moe: MoEViT) -> dict[str, np.ndarray]:
    sd = moe.state_dict()  # (0-d λ travels as shape (1,): Flower arrays are >= 1-d)
    return {k: np.atleast_1d(sd[k].detach().cpu().numpy().astype(np.float32))
            for k in moe_trainable_keys(moe)}


def moe_trainable_shapes(moe: MoEViT) -> dict[str, tuple[int, ...]]:
    sd = moe.state_dict()
    return {k: tuple(sd[k].shape) or (1,) for k in moe_trainable_keys(moe)}


def load_moe_trainable(moe: MoEViT, arrays: dict[str, np.ndarray]) -> None:
    check_arrays(arrays, moe_trainable_shapes(moe), "server", "MoE state")
    sd = moe.state_dict()
    moe.load_state_dict({k: torch.from_numpy(np.array(v)).reshape(sd[k].shape)
                         for k, v in arrays.items()}, strict=False)


def expert_lora(moe: MoEViT, slot: int) -> dict[str, np.ndarray]:
    """Expert ``slot`` of a MoE as an FFN-LoRA state (``layers.{l}.{fc}.lora_{A|B}``)."""
    out = {}
    for l, layer in enumerate(moe.moe_layers()):
        for attr, fc, ab in LORA_KINDS:
            out[f"layers.{l}.{fc}.{ab}"] = getattr(layer, attr)[slot].detach().numpy().copy()
    return out


def set_expert_lora(moe: MoEViT, slot: int, lora: dict) -> None:
    with torch.no_grad():
        for l, layer in enumerate(moe.moe_layers()):
            for attr, fc, ab in LORA_KINDS:
                getattr(layer, attr)[slot].copy_(torch.as_tensor(np.asarray(
                    lora[f"layers.{l}.{fc}.{ab}"])))


def fl_moe_config(cfg, k: int) -> MoEConfig:
    """The FedAvg-MoE / FedAlign-MoE architecture: K experts, top-k gate [I]."""
    f = cfg.fl
    return MoEConfig(num_experts=k, rank=int(cfg.expert.rank), alpha=float(cfg.expert.alpha),
                     top_k=min(int(f.top_k), k), lambda_init=float(f.lambda_init),
                     context=str(f.context), renormalize=bool(f.renormalize),
                     expert_names=[f"e{p}" for p in range(k)])


class GateMLP(nn.Module):
    """DDOME's expert-ranking network: a 2-layer MLP over frozen common-expert (M0) features
    with a softmax over the M experts."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, num_experts)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # logits [B, M]
        return self.fc2(F.relu(self.fc1(feats)))


def gate_from_arrays(arrays: dict[str, np.ndarray]) -> GateMLP:
    w1, w2 = arrays["fc1.weight"], arrays["fc2.weight"]
    gate = GateMLP(w1.shape[1], w1.shape[0], w2.shape[0])
    gate.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return gate


def state_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}


# ===================================================================== client-side stages
def _capture_gates(moe: MoEViT):
    """Forward hooks that keep each MoE layer's (differentiable) gate probabilities."""
    probs: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda m, inp: probs.append(m.gate_probs(inp[0])))
               for layer in moe.moe_layers()]
    return probs, handles


def fl_moe_local_train(cfg, moe: MoEViT, x: torch.Tensor, y: torch.Tensor, rng_seed: int,
                       global_p: np.ndarray | None = None, lambda_g: float = 0.0) -> dict:
    """Local epochs on Dp of router + λ + all experts, CE plus (FedAlign) the regulariser
    λ_g Σ_l KL(P̄_l ‖ p̂_l), p̂_l the batch-mean gate distribution of layer l."""
    f = cfg.fl
    moe.freeze_base()
    groups = [{"params": moe.router_parameters() + moe.expert_parameters(), "lr": f.lr}]
    if moe.lambda_parameters():
        groups.append({"params": moe.lambda_parameters(), "lr": f.lambda_lr})
    use_kl = global_p is not None and lambda_g > 0
    pbar = torch.as_tensor(global_p, dtype=torch.float32).clamp_min(1e-8) if use_kl else None

    def loss_fn(model, xb, yb):
        if not use_kl:
            return F.cross_entropy(model(xb), yb)
        probs, handles = _capture_gates(model)
        try:
            loss = F.cross_entropy(model(xb), yb)
        finally:
            for h in handles:
                h.remove()
        kl = 0.0
        for l, pr in enumerate(probs):
            phat = pr.reshape(-1, pr.shape[-1]).mean(0).clamp_min(1e-8)
            kl = kl + (pbar[l] * (pbar[l].log() - phat.log())).sum()
        return loss + lambda_g * kl

    return train(moe, x, y, optim(f), params=groups, loss_fn=loss_fn, seed=rng_seed,
                 desc="fl-moe")


@torch.no_grad()
def moe_local_stats(moe: MoEViT, x: torch.Tensor, descriptor: str = "output",
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per layer over *all* local tokens: p [L, E] = mean softmax gate distribution, and the
    expert descriptors h [L, E, d] = Σ_t g_e(z_t) v_e(z_t) / Σ_t g_e(z_t) with v_e the output
    of expert e ("output"), its LoRA delta over M0's FFN ("delta") or its input ("input").
    Only these whole-set averages leave the client."""
    layers = moe.moe_layers()
    L, E = len(layers), moe.moe_cfg.num_experts
    d = layers[0].fc1.in_features
    num = torch.zeros(L, E, d, dtype=torch.float64)
    den = torch.zeros(L, E, dtype=torch.float64)
    tokens = [0]

    def make_hook(l):
        def hook(m, inp):
            z = inp[0]
            g = m.gate_probs(z)  # [B, T, E]
            if descriptor == "input":
                v = z.unsqueeze(0).expand(E, *z.shape)
            else:
                v = m._experts(z, slice(None))  # [E, B, T, d]
                if descriptor == "delta":
                    v = v - m.fc2(F.gelu(m.fc1(z))).unsqueeze(0)
            num[l] += torch.einsum("bte,ebtd->ed", g, v).double()
            den[l] += g.sum((0, 1)).double()
            if l == 0:
                tokens[0] += g.shape[0] * g.shape[1]
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(l)) for l, layer in enumerate(layers)]
    try:
        moe.eval()
        moe.set_forced(None)
        for i in range(0, len(x), batch_size):
            moe(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    p = (den / max(tokens[0], 1)).float().numpy()
    h = (num / den.clamp_min(1e-12).unsqueeze(-1)).float().numpy()
    return p.astype(np.float32), h.astype(np.float32)


def ddome_scores(gate: GateMLP, feats: torch.Tensor) -> torch.Tensor:
    """Σ over the local samples of the gate's softmax scores: [M]."""
    with torch.no_grad():
        return gate(feats).softmax(-1).sum(0)


def ddome_pick(gate: GateMLP, feats: torch.Tensor, k: int) -> list[int]:
    """DDOME's per-client expert subset: TOPK of the summed gate scores (sorted indices)."""
    s = ddome_scores(gate, feats)
    return sorted(int(i) for i in s.topk(min(k, len(s))).indices)


def ddome_local_train(cfg, moe: MoEViT, gate: GateMLP, feats: torch.Tensor, x: torch.Tensor,
                      y: torch.Tensor, experts: list[int], anchor: int | None,
                      rng_seed: int) -> dict:
    """One DDOME local step set. ``moe`` holds the client's experts in slots 0..K-1 (global ids
    ``experts``). Normal client: CE of the gate-renormalised mixture Σ_k ĝ_k softmax(f_k(x))
    (gate + experts jointly). Anchor client for expert q (``anchor``, slot 0): CE(f_q(x), y) +
    CE(gate(x̂), q)."""
    f = cfg.fl
    moe.freeze_base()
    for p in moe.router_parameters() + moe.lambda_parameters():
        p.requires_grad_(False)
    wrapper = nn.ModuleDict({"moe": moe, "gate": gate})
    groups = [{"params": moe.expert_parameters(), "lr": f.lr},
              {"params": list(gate.parameters()), "lr": f.ddome_gate_lr}]
    idx_experts = torch.as_tensor(experts)

    def loss_fn(model, ib, yb):
        xb, fb = x[ib], feats[ib]
        logits_g = model["gate"](fb)
        if anchor is not None:
            model["moe"].set_forced(0)
            out = F.cross_entropy(model["moe"](xb), yb)
            target = torch.full_like(yb, int(anchor))
            return out + F.cross_entropy(logits_g, target)
        g = logits_g[:, idx_experts].softmax(-1)  # renormalised over the client's subset
        logp = []
        for slot in range(len(experts)):
            model["moe"].set_forced(slot)
            logp.append(model["moe"](xb).log_softmax(-1).gather(1, yb[:, None])[:, 0])
        mix = torch.logsumexp(torch.stack(logp, 1) + g.clamp_min(1e-12).log(), dim=1)
        return -mix.mean()

    try:
        hist = train(wrapper, torch.arange(len(x)), y, optim(f), params=groups,
                     loss_fn=loss_fn, seed=rng_seed, desc="ddome")
    finally:
        moe.set_forced(None)
    return hist


@torch.no_grad()
def ddome_predict(moe: MoEViT, gate: GateMLP, feats: torch.Tensor, x: torch.Tensor,
                  classes, k: int) -> tuple[torch.Tensor, list[int]]:
    """DDOME test time on unlabelled data: the client's top-K experts from the summed gate
    scores, then per sample the single expert with the highest gate score among those K."""
    chosen = ddome_pick(gate, feats, k)
    per = gate(feats)[:, chosen].argmax(1)
    cls = torch.as_tensor(list(classes))
    pred = torch.empty(len(x), dtype=torch.long)
    for j, e in enumerate(chosen):
        sel = (per == j).nonzero().flatten()
        if len(sel) == 0:
            continue
        moe.set_forced(e)
        logits = torch.cat([moe(x[sel[i:i + 512]]) for i in range(0, len(sel), 512)])
        pred[sel] = cls[logits[:, cls].argmax(1)]
    moe.set_forced(None)
    return pred, chosen


# ===================================================================== handlers
def _state_seed(context: Context) -> ViT:
    return _ca._seed_model(context)


def _n(dom) -> int:
    return int(len(dom.x_train))


@app.query("fl_seed")
def fl_seed(msg: Message, context: Context) -> Message:
    """Keep M0 (sent once per run) in the node's state for the later rounds."""
    cfg, pid, bench, name, dom = _ca._setup(context)
    _ca._store_seed(msg, context)
    # Uploaded: an acknowledgement with the client's name and |Dp| (scalars).
    return Message(RecordDict({"info": ConfigRecord({"name": name, "n_private": _n(dom)})}),
                   reply_to=msg)


@app.train()
def fedavg_train(msg: Message, context: Context) -> Message:
    """Dense FedAvg (Flower's FedAvg strategy): local epochs of M0 + FFN-LoRA on Dp."""
    cfg, pid, bench, name, dom = _ca._setup(context)
    seed = _state_seed(context)
    model = inject_ffn_lora(copy.deepcopy(seed), int(cfg.expert.rank), float(cfg.expert.alpha))
    arrays = from_record(get_record(msg.content, "arrays", ArrayRecord, "server"))
    load_lora_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    rnd = int(get_record(msg.content, "config", ConfigRecord, "server").get("server-round", 0))
    x, y = torch.from_numpy(dom.x_train), torch.from_numpy(dom.y_train)
    params = [p for p in model.parameters() if p.requires_grad]
    hist = train(model, x, y, optim(cfg.fl), params=params,
                 seed=cfg.run.seed * 1000 + pid * 31 + rnd, desc=f"fedavg[{name}]")
    log.info("client %s: fedavg round %d loss %.4f", name, rnd, hist["loss"])
    lora = {k: v.numpy().astype(np.float32) for k, v in lora_state_dict(model).items()}
    # Uploaded: the LoRA weights after local training + |Dp| and the mean train loss.
    return Message(RecordDict({"arrays": to_record(lora), "metrics": MetricRecord(
        {"num-examples": _n(dom), "train_loss": float(hist["loss"])})}), reply_to=msg)


@app.train("fl_moe")
def fl_moe_train(msg: Message, context: Context) -> Message:
    """FedAvg-MoE / FedAlign-MoE local round on the global MoE state."""
    cfg, pid, bench, name, dom = _ca._setup(context)
    seed = _state_seed(context)
    conf = json.loads(str(get_record(msg.content, "config", ConfigRecord, "server")["fl"]))
    moe = moe_from_seed(seed, MoEConfig(**conf["moe"]))
    load_moe_trainable(moe, from_record(get_record(msg.content, "moe", ArrayRecord, "server")))
    gp = None
    if "global_p" in msg.content:
        gp = from_record(get_record(msg.content, "global_p", ArrayRecord, "server"))["p"]
    x, y = torch.from_numpy(dom.x_train), torch.from_numpy(dom.y_train)
    rnd = int(conf.get("round", 0))
    hist = fl_moe_local_train(cfg, moe, x, y, cfg.run.seed * 1000 + pid * 31 + rnd, gp,
                              float(conf.get("lambda_g", 0.0)))
    log.info("client %s: %s round %d loss %.4f", name, conf.get("method"), rnd, hist["loss"])
    content = {"moe": to_record(moe_trainable_state(moe)), "metrics": MetricRecord(
        {"num-examples": _n(dom), "train_loss": float(hist["loss"])})}
    if conf.get("stats"):
        p, h = moe_local_stats(moe, x, str(conf.get("descriptor", "output")))
        content["stats"] = to_record({"p": p, "h": h})
    # Uploaded: the trainable MoE weights; (FedAlign) p and h, means over all of Dp.
    return Message(RecordDict(content), reply_to=msg)


def _ddome_model(seed: ViT, conf: dict, loras: dict[int, dict]) -> tuple[MoEViT, list[int]]:
    ids = sorted(loras)
    mc = MoEConfig(num_experts=len(ids), rank=int(conf["rank"]), alpha=float(conf["alpha"]),
                   top_k=1, context="none", expert_names=[f"e{i}" for i in ids])
    return build_moe(seed, mc, [loras[i] for i in ids], None), ids


def _experts_from_record(rec: ArrayRecord) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for k, v in from_record(rec).items():
        e, key = k.split("/", 1)
        out.setdefault(int(e[1:]), {})[key] = v
    return out


def _ddome_inputs(msg: Message, context: Context):
    """What every DDOME handler starts from: this node's config, partition and data, M0, the
    round's DDOME settings and the current gate."""
    cfg, pid, _bench, name, dom = _ca._setup(context)
    seed = _state_seed(context)
    conf = json.loads(str(get_record(msg.content, "config", ConfigRecord, "server")["ddome"]))
    gate = gate_from_arrays(from_record(get_record(msg.content, "gate", ArrayRecord, "server")))
    return cfg, pid, name, dom, seed, conf, gate


@app.query("ddome_select")
def ddome_select(msg: Message, context: Context) -> Message:
    cfg, pid, name, dom, seed, conf, gate = _ddome_inputs(msg, context)
    feats = torch.from_numpy(features(seed, dom.x_train, "cls"))
    chosen = ddome_pick(gate, feats, int(conf["top_k"]))
    # Uploaded: K expert indices from gate scores summed over all of Dp.
    return Message(RecordDict({"select": to_record({"experts": np.asarray(chosen, np.int64)}),
                               "metrics": MetricRecord({"num-examples": _n(dom)})}),
                   reply_to=msg)


@app.train("ddome")
def ddome_train(msg: Message, context: Context) -> Message:
    cfg, pid, name, dom, seed, conf, gate = _ddome_inputs(msg, context)
    loras = _experts_from_record(get_record(msg.content, "experts", ArrayRecord, "server"))
    anchor = conf.get("anchor")
    if anchor is not None and list(loras) != [int(anchor)]:
        raise ValueError(f"anchor for expert {anchor} received experts {sorted(loras)}")
    moe, ids = _ddome_model(seed, conf, loras)
    feats = torch.from_numpy(features(seed, dom.x_train, "cls"))
    x, y = torch.from_numpy(dom.x_train), torch.from_numpy(dom.y_train)
    rnd = int(conf.get("round", 0))
    hist = ddome_local_train(cfg, moe, gate, feats, x, y, ids, anchor,
                             cfg.run.seed * 1000 + pid * 31 + rnd)
    log.info("client %s: ddome round %d experts %s%s loss %.4f", name, rnd, ids,
             " (anchor)" if anchor is not None else "", hist["loss"])
    experts = {f"e{e}/{k}": v for slot, e in enumerate(ids)
               for k, v in expert_lora(moe, slot).items()}
    # Uploaded: the gate MLP and the K trained experts' LoRA weights + |Dp|.
    return Message(RecordDict({"gate": to_record(state_arrays(gate)),
                               "experts": to_record(experts),
                               "metrics": MetricRecord({"num-examples": _n(dom),
                                                        "train_loss": float(hist["loss"])})}),
                   reply_to=msg)


@app.evaluate("ddome")
def ddome_evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, name, dom, seed, conf, gate = _ddome_inputs(msg, context)
    loras = _experts_from_record(get_record(msg.content, "experts", ArrayRecord, "server"))
    moe, ids = _ddome_model(seed, conf, loras)
    if ids != list(range(len(ids))):
        raise ValueError(f"evaluate.ddome needs experts 0..M-1, got {ids}")
    x, y = torch.from_numpy(dom.x_test), torch.from_numpy(dom.y_test)
    feats = torch.from_numpy(features(seed, dom.x_test, "cls"))  # unlabelled test inputs
    pred, chosen = ddome_predict(moe, gate, feats, x, dom.classes, int(conf["top_k"]))
    out = {"n_test": float(len(y)), "acc_unified": float((pred == y).float().mean()),
           "acc_zero_shot": accuracy(seed, x, y, dom.classes)}
    for e in ids:
        moe.set_forced(e)
        out[f"acc_expert/e{e}"] = accuracy(moe, x, y, dom.classes)
        out[f"ddome_chosen/e{e}"] = float(e in chosen)
    moe.set_forced(None)
    log.info("client %s: ddome experts %s acc %.4f zero-shot %.4f", name, chosen,
             out["acc_unified"], out["acc_zero_shot"])
    # Uploaded: scalars only.
    return Message(RecordDict({"metrics": MetricRecord(out)}), reply_to=msg)


__all__ = ["GateMLP", "ddome_pick", "ddome_predict", "ddome_local_train", "expert_lora",
           "fl_moe_config", "fl_moe_local_train", "init_loras", "moe_local_stats",
           "moe_from_seed", "moe_trainable_state", "set_expert_lora"]
