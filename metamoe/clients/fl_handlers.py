"""ClientApp handlers of the iterative federated baselines (FedAvg, FedAvg-MoE, FedAlign-MoE,
DDOME): plain functions, registered in ``clients/client_app.py``.

====================  ==========================================  ===============================
message type          client uploads (record key)                 produced by
====================  ==========================================  ===============================
query.fl_seed         ``info`` name, n_private (ack of M0)         :func:`fl_seed`
train                 ``arrays`` FFN-LoRA (dense FedAvg)           :func:`fedavg_train`
                      ``metrics`` num-examples, train_loss
train.fl_moe          ``moe`` router rows, λ, all experts' LoRA    :func:`fl_moe_train`
                      ``stats`` p [L,E] routing distribution and  ``fl_local.moe_local_stats``
                      h [L,E,d] expert descriptors (FedAlign only)
query.ddome_select    ``select`` top-K expert indices              :func:`ddome_select`
train.ddome           ``gate`` gate MLP, ``experts`` trained LoRAs :func:`ddome_train`
evaluate.ddome        ``metrics`` accuracies (scalars)             :func:`ddome_evaluate`
====================  ==========================================  ===============================

Privacy: weights are weight deltas; p and h are means over *all* local tokens of the whole
local set; the DDOME selection is K integers from scores summed over the whole local set;
metrics are scalars. No sample, per-sample embedding or per-sample gradient is uploaded.
No aggregate covers fewer than ``privacy.min_count`` private samples (``clients/privacy.py``):
a client whose train split is smaller refuses already the seed acknowledgement (so it takes
no part in any round), one whose test split is smaller refuses the evaluation, and FedAlign's
descriptors h[l, e] whose effective support is below it are withheld (zeros; the count is
reported as ``stats_withheld``).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from metamoe.clients.ddome import ddome_local_train, ddome_pick, ddome_predict
from metamoe.clients.fl_local import fl_moe_local_train, moe_local_stats
from metamoe.clients.node import NodeData, node_data, seed_model, store_seed
from metamoe.clients.privacy import dp_sigmas, expert_dp, require_min_count, round_dp_metrics
from metamoe.data.dataset import as_inputs
from metamoe.models.gate import GateMLP, gate_from_arrays
from metamoe.models.lora import inject_ffn_lora, load_lora_state_dict, lora_state_dict
from metamoe.models.moe import MoEConfig, MoEMixin, build_moe, moe_from_seed
from metamoe.models.moe_state import (
    load_moe_trainable,
    module_arrays,
    moe_trainable_shapes,
    moe_trainable_state,
)
from metamoe.protocol import (
    CONFIG,
    DDOME_SPEC,
    FL_ROUND,
    check_arrays,
    decode_settings,
    from_record,
    get_record,
    to_record,
)
from metamoe.training import accuracy, derive_seed, features, train

log = logging.getLogger("metamoe")


def _require_train(node: NodeData, artifact: str) -> None:
    """PrivacyError unless the private train split has ``privacy.min_count`` samples."""
    require_min_count(artifact, node.n_private, int(node.cfg.privacy.min_count))


def fl_seed(msg: Message, context: Context) -> Message:
    """Keep M0 (sent once per run) in the node's state for the later rounds. A client whose
    train split is below ``privacy.min_count`` refuses here: every round's upload would be an
    aggregate of it, so it takes no part in the run."""
    node = node_data(context)
    _require_train(node, "federated training updates (every round aggregates the private "
                         "train split)")
    store_seed(msg, context)
    # Uploaded: an acknowledgement with the client's name and |Dp| (scalars).
    return Message(RecordDict({"info": ConfigRecord({"name": node.name,
                                                     "n_private": node.n_private})}),
                   reply_to=msg)


def fedavg_train(msg: Message, context: Context) -> Message:
    """Dense FedAvg (Flower's FedAvg strategy): local epochs of M0 + FFN-LoRA on Dp."""
    node = node_data(context)
    cfg, dom = node.cfg, node.domain
    _require_train(node, "the FedAvg update (LoRA trained on the private train split) and its "
                         "train loss")
    model = inject_ffn_lora(copy.deepcopy(seed_model(context, node)), int(cfg.expert.rank),
                            float(cfg.expert.alpha))
    arrays = from_record(get_record(msg.content, "arrays", ArrayRecord, "server"))
    load_lora_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    rnd = int(get_record(msg.content, CONFIG, ConfigRecord, "server").get("server-round", 0))
    x, y = as_inputs(dom.x_train), torch.from_numpy(dom.y_train)
    params = [p for p in model.parameters() if p.requires_grad]
    dp = expert_dp(cfg, dp_sigmas(cfg, node.n_private, fl=True)["expert"])
    hist = train(model, x, y, cfg.fl, params=params,
                 seed=derive_seed(cfg.run.seed, node.partition_id, rnd),
                 desc=f"fedavg[{node.name}]", dp=dp, round_of=(rnd, int(cfg.fl.rounds)))
    log.info("client %s: fedavg round %d loss %.4f", node.name, rnd, hist["loss"])
    lora = {k: v.numpy().astype(np.float32) for k, v in lora_state_dict(model).items()}
    metrics = {"num-examples": node.n_private, "train_loss": float(hist["loss"])}
    if dp is not None:  # DP-SGD: no metric over Dp; the ε of the rounds so far
        metrics.pop("train_loss")
        metrics.update(round_dp_metrics(dp, hist))
    # Uploaded: the LoRA weights after local training + |Dp| and the mean train loss (with
    # DP-SGD: ε and δ instead of the loss).
    return Message(RecordDict({"arrays": to_record(lora), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def fl_moe_train(msg: Message, context: Context) -> Message:
    """FedAvg-MoE / FedAlign-MoE local round on the global MoE state."""
    node = node_data(context)
    cfg, dom = node.cfg, node.domain
    _require_train(node, "the FL-MoE update (MoE trained on the private train split) and its "
                         "train loss")
    conf = decode_settings(msg.content, FL_ROUND)
    moe = moe_from_seed(seed_model(context, node), MoEConfig(**conf["moe"]))
    state = from_record(get_record(msg.content, "moe", ArrayRecord, "server"))
    load_moe_trainable(moe, check_arrays(state, moe_trainable_shapes(moe), "server",
                                         "MoE state"))
    global_p = None
    if "global_p" in msg.content:
        global_p = from_record(get_record(msg.content, "global_p", ArrayRecord, "server"))["p"]
    x, y = as_inputs(dom.x_train), torch.from_numpy(dom.y_train)
    rnd = int(conf.get("round", 0))
    dp = expert_dp(cfg, dp_sigmas(cfg, node.n_private, fl=True)["expert"])
    hist = fl_moe_local_train(cfg, moe, x, y, derive_seed(cfg.run.seed, node.partition_id, rnd),
                              global_p, float(conf.get("lambda_g", 0.0)), dp=dp, rnd=rnd)
    log.info("client %s: %s round %d loss %.4f", node.name, conf.get("method"), rnd,
             hist["loss"])
    metrics = {"num-examples": node.n_private, "train_loss": float(hist["loss"])}
    if dp is not None:  # DP-SGD: no metric over Dp; the ε of the rounds so far
        metrics.pop("train_loss")
        metrics.update(round_dp_metrics(dp, hist))
    content = {"moe": to_record(moe_trainable_state(moe))}
    if conf.get("stats"):
        p, h, withheld = moe_local_stats(moe, x, str(conf.get("descriptor", "output")),
                                         min_count=int(cfg.privacy.min_count))
        content["stats"] = to_record({"p": p, "h": h})
        metrics["stats_withheld"] = withheld
        if withheld:
            log.info("client %s: %d FedAlign descriptors h[l, e] withheld (effective support "
                     "below privacy.min_count=%d)", node.name, withheld, cfg.privacy.min_count)
    content["metrics"] = MetricRecord(metrics)
    # Uploaded: the trainable MoE weights; (FedAlign) p and h, means over all of Dp.
    return Message(RecordDict(content), reply_to=msg)


# ---------------------------------------------------------------------------- DDOME
def _ddome_model(seed: nn.Module, conf: dict, loras: dict[int, dict]
                 ) -> tuple[MoEMixin, list[int]]:
    ids = sorted(loras)
    moe_cfg = MoEConfig(num_experts=len(ids), rank=int(conf["rank"]), alpha=float(conf["alpha"]),
                        top_k=1, context="none", expert_names=[f"e{i}" for i in ids])
    return build_moe(seed, moe_cfg, [loras[i] for i in ids], None), ids


def _experts_from_record(rec: ArrayRecord) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for k, v in from_record(rec).items():
        e, key = k.split("/", 1)
        out.setdefault(int(e[1:]), {})[key] = v
    return out


def _ddome_inputs(msg: Message, context: Context
                  ) -> tuple[NodeData, nn.Module, dict, GateMLP]:
    """What every DDOME handler starts from: this node, M0, the round's DDOME settings and
    the current gate."""
    node = node_data(context)
    conf = decode_settings(msg.content, DDOME_SPEC)
    gate = gate_from_arrays(from_record(get_record(msg.content, "gate", ArrayRecord, "server")))
    return node, seed_model(context, node), conf, gate


def ddome_select(msg: Message, context: Context) -> Message:
    node, seed, conf, gate = _ddome_inputs(msg, context)
    _require_train(node, "the DDOME selection (gate scores summed over the private train "
                         "split)")
    feats = torch.from_numpy(features(seed, node.domain.x_train, "cls"))
    chosen = ddome_pick(gate, feats, int(conf["top_k"]))
    # Uploaded: K expert indices from gate scores summed over all of Dp.
    return Message(RecordDict({"select": to_record({"experts": np.asarray(chosen, np.int64)}),
                               "metrics": MetricRecord({"num-examples": node.n_private})}),
                   reply_to=msg)


def ddome_train(msg: Message, context: Context) -> Message:
    node, seed, conf, gate = _ddome_inputs(msg, context)
    cfg, dom = node.cfg, node.domain
    _require_train(node, "the DDOME update (gate and experts trained on the private train "
                         "split) and its train loss")
    loras = _experts_from_record(get_record(msg.content, "experts", ArrayRecord, "server"))
    anchor = conf.get("anchor")
    if anchor is not None and list(loras) != [int(anchor)]:
        raise ValueError(f"anchor for expert {anchor} received experts {sorted(loras)}")
    moe, ids = _ddome_model(seed, conf, loras)
    feats = torch.from_numpy(features(seed, dom.x_train, "cls"))
    x, y = as_inputs(dom.x_train), torch.from_numpy(dom.y_train)
    rnd = int(conf.get("round", 0))
    hist = ddome_local_train(cfg, moe, gate, feats, x, y, ids, anchor,
                             derive_seed(cfg.run.seed, node.partition_id, rnd), rnd=rnd)
    log.info("client %s: ddome round %d experts %s%s loss %.4f", node.name, rnd, ids,
             " (anchor)" if anchor is not None else "", hist["loss"])
    experts = {f"e{e}/{k}": v.numpy() for slot, e in enumerate(ids)
               for k, v in moe.export_expert(slot).items()}
    # Uploaded: the gate MLP and the K trained experts' LoRA weights + |Dp|.
    return Message(RecordDict({"gate": to_record(module_arrays(gate)),
                               "experts": to_record(experts),
                               "metrics": MetricRecord({"num-examples": node.n_private,
                                                        "train_loss": float(hist["loss"])})}),
                   reply_to=msg)


def ddome_evaluate(msg: Message, context: Context) -> Message:
    node, seed, conf, gate = _ddome_inputs(msg, context)
    dom = node.domain
    require_min_count("DDOME accuracies and expert choices on the private test split",
                      len(dom.x_test), int(node.cfg.privacy.min_count))
    loras = _experts_from_record(get_record(msg.content, "experts", ArrayRecord, "server"))
    moe, ids = _ddome_model(seed, conf, loras)
    if ids != list(range(len(ids))):
        raise ValueError(f"evaluate.ddome needs experts 0..M-1, got {ids}")
    x, y = as_inputs(dom.x_test), torch.from_numpy(dom.y_test)
    feats = torch.from_numpy(features(seed, dom.x_test, "cls"))  # unlabelled test inputs
    pred, chosen, routed = ddome_predict(moe, gate, feats, x, dom.classes, int(conf["top_k"]))
    out = {"n_test": float(len(y)), "acc_unified": float((pred == y).float().mean()),
           "acc_zero_shot": accuracy(seed, x, y, dom.classes)}
    for e in ids:
        moe.set_forced(e)
        out[f"acc_expert/e{e}"] = accuracy(moe, x, y, dom.classes)
        out[f"ddome_chosen/e{e}"] = float(e in chosen)
        out[f"ddome_share/e{e}"] = float((routed == e).float().mean())  # of the test samples
    moe.set_forced(None)
    log.info("client %s: ddome experts %s acc %.4f zero-shot %.4f", node.name, chosen,
             out["acc_unified"], out["acc_zero_shot"])
    # Uploaded: scalars only.
    return Message(RecordDict({"metrics": MetricRecord(out)}), reply_to=msg)
