"""ClientApp handlers of MetaMoE and the one-shot baselines: identify, sketch, expert, evaluate.

Each handler reads like Flower's quickstart: decode the message, call a stage of
``clients/stages.py`` on this node's data (``clients/node.py``), encode the reply. They are
plain functions; ``clients/client_app.py`` registers them. What each reply uploads is said
above its return, and listed in ``metamoe/protocol.py``. An upload that would aggregate fewer
than ``privacy.min_count`` private samples is refused by the stage
(:class:`~metamoe.clients.privacy.PrivacyError`); Flower sends the server an error reply naming
the reason, and the server goes on without this client. ``identify`` uploads no aggregate and
always answers, so the server can name a client that refuses later.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from metamoe.clients import stages
from metamoe.clients.node import localize, node_data, seed_model, store_seed
from metamoe.models.io import moe_from_state
from metamoe.models.lora import lora_shapes
from metamoe.protocol import MOE_SPEC, check_arrays, decode_settings, from_record, get_record, to_record
from metamoe.training import derive_seed

log = logging.getLogger("metamoe")


def identify(msg: Message, context: Context) -> Message:
    """Who this node is (client name, domain, partition, private-set size): no data."""
    node = node_data(context)
    info = ConfigRecord({"name": node.name, "domain": node.domain.name,
                         "partition-id": node.partition_id, "n_private": node.n_private})
    # Uploaded: the client's name, domain, partition id and |Dp| (scalars).
    return Message(RecordDict({"info": info}), reply_to=msg)


def sketch(msg: Message, context: Context) -> Message:
    node = node_data(context)
    cfg = node.cfg
    store_seed(msg, context)
    arrays, info = stages.sketch_stage(cfg, seed_model(context, node), node.domain, node.bench,
                                       derive_seed(cfg.run.seed, node.partition_id))
    log.info("client %s: sketch of %d private samples (%s)", node.name, info["n_private"],
             cfg.sketch.kind)
    meta = ConfigRecord({"name": node.name, "domain": node.domain.name,
                         "partition-id": node.partition_id, **dict(info.items())})
    # Uploaded: the relevance sketch (stages.sketch_stage) and scalars about it.
    return Message(RecordDict({"sketch": to_record(arrays), "info": meta}), reply_to=msg)


def expert(msg: Message, context: Context) -> Message:
    node = node_data(context)
    cfg, bench = node.cfg, node.bench
    if "seed" in msg.content:  # methods without a sketch phase send M0 here
        store_seed(msg, context)
    seed = seed_model(context, node)
    sel = from_record(get_record(msg.content, "proxies", ArrayRecord, "server"))
    idx = np.asarray(sel.pop("selected"), dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(bench.pool_x)):
        raise ValueError(f"proxy index out of range [0, {len(bench.pool_x)})")
    init, epochs, final, round_of = None, None, True, None
    rng = derive_seed(cfg.run.seed, node.partition_id)
    if "group-round" in msg.content:  # unify.group_expert=fedavg: a round of a group's expert
        rnd = get_record(msg.content, "group-round", ConfigRecord, "server")
        init = check_arrays(from_record(get_record(msg.content, "init", ArrayRecord, "server")),
                            lora_shapes(seed.cfg.depth, seed.cfg.dim, seed.cfg.mlp_hidden,
                                        int(cfg.expert.rank)), "server", "group expert")
        epochs = float(rnd["epochs"])
        final = bool(rnd.get("final", True))  # earlier rounds: the LoRA only
        rng = derive_seed(cfg.run.seed, node.partition_id, int(rnd["round"]))
        round_of = (int(rnd["round"]), int(cfg.unify.group_rounds))
    lora, vectors, metrics = stages.expert_stage(cfg, seed, node.domain, bench, idx, rng,
                                                 init=init, epochs=epochs, final=final,
                                                 round_of=round_of)
    if sel:  # selection-quality ablation: coverage of each method's picks
        sel["selected"] = idx
        metrics.update(stages.coverage(seed, node.domain, bench, sel, cfg.select.embedding,
                                       min_count=int(cfg.privacy.min_count)))
    log.info("client %s: expert trained on %d samples (%d proxies), loss %.3f", node.name,
             metrics["n_train"], metrics["n_proxies"], metrics.get("train_loss", float("nan")))
    # Uploaded: the expert's LoRA, its router vectors (not in a group's non-final rounds) and
    # scalars (stages.expert_stage).
    reply = RecordDict({"expert": to_record(lora), "metrics": MetricRecord(metrics)})
    if vectors is not None:
        reply["router"] = to_record({"vectors": vectors})
    return Message(reply, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    node = node_data(context)
    conf = decode_settings(msg.content, MOE_SPEC)
    moe = moe_from_state(get_record(msg.content, "moe", ArrayRecord, "server")
                         .to_torch_state_dict(), conf)
    if node.private is not None:  # this node's own classes: its head rows, made from M0
        moe = localize(node, moe, seed_model(context) if "seed" in context.state else None)
    metrics = stages.evaluate_stage(moe, node.domain, list(conf["moe"]["expert_names"]),
                                    mode=str(conf.get("mode", "routed")),
                                    references=bool(conf.get("references", True)),
                                    min_count=int(node.cfg.privacy.min_count))
    log.info("client %s: unified %.4f zero-shot %.4f", node.name, metrics["acc_unified"],
             metrics.get("acc_zero_shot", float("nan")))
    # Uploaded: accuracies and routing shares on the client's test split (scalars).
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
