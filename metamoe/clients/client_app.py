"""The ClientApp: one handler per MetaMoE phase (Flower Message API).

The client's private data is chosen by ``node_config["partition-id"]`` (injected by the
simulation engine; ``--node-config "partition-id=N"`` on a real SuperNode). M0 arrives in the
sketch message and is kept in ``context.state`` for the later phases (ClientApps are
ephemeral: no module globals hold run state).
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from metamoe.clients import stages
from metamoe.config import resolve_config
from metamoe.data import client_partition, load_benchmark
from metamoe.logging_utils import setup_logging
from metamoe.models.io import moe_from_state, seed_from_state
from metamoe.protocol import from_record, get_record, to_record

app = ClientApp()
log = logging.getLogger("metamoe")


def _setup(context: Context):
    setup_logging()
    cfg = resolve_config(context.run_config)
    if "partition-id" not in context.node_config:
        raise ValueError("node_config has no 'partition-id': start the SuperNode with "
                         "--node-config \"partition-id=N\"")
    pid = int(context.node_config["partition-id"])
    bench = load_benchmark(cfg)
    name, dom = client_partition(cfg, bench, pid)
    return cfg, pid, bench, name, dom


def _store_seed(msg: Message, context: Context) -> None:
    """Keep M0 (sent by the server) in the node's state for the later phases."""
    context.state["seed"] = get_record(msg.content, "seed", ArrayRecord, "server")
    context.state["seed-config"] = get_record(msg.content, "seed-config", ConfigRecord, "server")


def _seed_model(context: Context):
    if "seed" not in context.state:
        raise RuntimeError("no seed model in this node's state: the sketch phase must run first")
    rec = context.state["seed-config"]
    cfg = json.loads(str(rec["model"] if "model" in rec else rec["vit"]))
    return seed_from_state(context.state["seed"].to_torch_state_dict(), cfg)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """Who this node is (client name, domain, partition, private-set size): no data."""
    cfg, pid, bench, name, dom = _setup(context)
    info = ConfigRecord({"name": name, "domain": dom.name, "partition-id": pid,
                         "n_private": len(dom.x_train)})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.query("sketch")
def sketch(msg: Message, context: Context) -> Message:
    cfg, pid, bench, name, dom = _setup(context)
    _store_seed(msg, context)
    seed = _seed_model(context)
    arrays, info = stages.sketch_stage(cfg, seed, dom, bench, cfg.run.seed * 1000 + pid)
    log.info("client %s: sketch of %d private samples (%s)", name, info["n_private"],
             cfg.sketch.kind)
    meta = ConfigRecord({"name": name, "domain": dom.name, "partition-id": pid,
                         **{k: v for k, v in info.items()}})
    return Message(RecordDict({"sketch": to_record(arrays), "info": meta}), reply_to=msg)


@app.train("expert")
def expert(msg: Message, context: Context) -> Message:
    cfg, pid, bench, name, dom = _setup(context)
    if "seed" in msg.content:  # methods without a sketch phase send M0 here
        _store_seed(msg, context)
    seed = _seed_model(context)
    sel = from_record(get_record(msg.content, "proxies", ArrayRecord, "server"))
    idx = np.asarray(sel.pop("selected"), dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(bench.pool_x)):
        raise ValueError(f"proxy index out of range [0, {len(bench.pool_x)})")
    lora, vectors, metrics = stages.expert_stage(cfg, seed, dom, bench, idx,
                                                 cfg.run.seed * 1000 + pid)
    if sel:  # selection-quality ablation: coverage of each method's picks
        sel["selected"] = idx
        metrics.update(stages.coverage(seed, dom, bench, sel, cfg.select.embedding))
    log.info("client %s: expert trained on %d samples (%d proxies), loss %.3f", name,
             metrics["n_train"], metrics["n_proxies"], metrics["train_loss"])
    return Message(RecordDict({"expert": to_record(lora),
                               "router": to_record({"vectors": vectors}),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, pid, bench, name, dom = _setup(context)
    conf = json.loads(str(get_record(msg.content, "config", ConfigRecord, "server")["moe"]))
    moe = moe_from_state(get_record(msg.content, "moe", ArrayRecord, "server")
                         .to_torch_state_dict(), conf)
    metrics = stages.evaluate_stage(moe, dom, list(conf["moe"]["expert_names"]),
                                    mode=str(conf.get("mode", "routed")))
    log.info("client %s: unified %.4f zero-shot %.4f", name, metrics["acc_unified"],
             metrics["acc_zero_shot"])
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# Handlers of the iterative federated baselines register on the same `app`.
from metamoe.clients import fl_handlers  # noqa: E402,F401
