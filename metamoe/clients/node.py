"""What every ClientApp handler starts from: this node's config, data and M0.

The client's private data is chosen by ``node_config["partition-id"]`` (injected by the
simulation engine; ``--node-config "partition-id=N"`` on a real SuperNode). With
``benchmark.kind=local`` the node reads its own data instead: ``node_config["data"]`` (and
``"format"``) on a deployed SuperNode, else ``benchmark.client_data[partition-id]``
(``metamoe/data/local.py``); its class names stay in :attr:`NodeData.private`, and every model
it uses gets its own head rows (:func:`seed_model`, ``clients/private_head.py``). M0 arrives in the
first message of a run (``query.sketch``, ``query.fl_seed``, or ``train.expert`` for methods
without a sketch phase) and is kept in ``context.state`` for the later phases (ClientApps are
ephemeral: no module globals hold run state).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metamoe.config import resolve_config
from metamoe.data import (
    Domain,
    VisionBenchmark,
    client_names,
    client_partition,
    eval_split,
    load_benchmark,
    seed_encoder,
)
from metamoe.logging_utils import setup_logging
from metamoe.models.io import seed_from_state
from metamoe.protocol import get_record

log = logging.getLogger("metamoe")


@dataclass(frozen=True)
class NodeData:
    """This node's resolved config, partition, benchmark and private domain."""

    cfg: DictConfig
    partition_id: int
    bench: VisionBenchmark
    name: str  # the client's name (its partition's name in the benchmark)
    domain: Domain
    private: dict | None = None  # kind=local: class names, split sizes (never uploaded)

    @property
    def n_private(self) -> int:
        return int(len(self.domain.x_train))


def node_data(context: Context) -> NodeData:
    setup_logging()
    cfg = resolve_config(context.run_config)
    if "partition-id" not in context.node_config:
        raise ValueError("node_config has no 'partition-id': start the SuperNode with "
                         "--node-config \"partition-id=N\"")
    pid = int(context.node_config["partition-id"])
    bench = load_benchmark(cfg)
    if cfg.benchmark.kind == "local":
        return _local_node(cfg, pid, bench, context.node_config)
    name, dom = client_partition(cfg, bench, pid)
    return NodeData(cfg, pid, bench, name, dom)


def _local_node(cfg: DictConfig, pid: int, bench: VisionBenchmark, node_config) -> NodeData:
    names = client_names(cfg)
    if not 0 <= pid < len(names):
        raise ValueError(f"partition-id {pid} out of range: the run has {len(names)} clients")
    b = cfg.benchmark
    path = str(node_config.get("data", "") or (b.client_data[pid] if b.client_data else ""))
    if not path:
        raise ValueError("benchmark.kind=local: this SuperNode has no data; start it with "
                         "--node-config \"partition-id=N data=<path>\"")
    fmt = str(node_config.get("format", "") or b.client_format)
    from metamoe.data.local import DataError, data_problem

    try:
        dom, private = _read_local(path, fmt, names[pid], json.dumps(
            OmegaConf.to_container(b, resolve=True), sort_keys=True), str(cfg.model.arch),
            str(cfg.model.encoder), int(cfg.model.max_len), bench.num_classes)
    except DataError as e:
        # The node's log names the file; the server hears the kind of problem only (file,
        # folder and class names stay on the node).
        log.error("%s refuses its own data: %s", names[pid], e)
        raise LocalDataRefused(f"{names[pid]} refused its own data: {data_problem(e)} (the "
                               "node's log names the file or folder)") from None
    return NodeData(cfg, pid, bench, names[pid], eval_split(cfg, names[pid], dom), private)


class LocalDataRefused(ValueError):
    """This node's own data is unusable (the reason the server is sent names no file)."""


@lru_cache(maxsize=2)
def _read_local(path: str, fmt: str, name: str, bench_json: str, arch: str, encoder: str,
                max_len: int, num_pool: int) -> tuple[Domain, dict]:
    from metamoe.data.local import local_domain

    return local_domain(path, fmt, name, json.loads(bench_json),
                        seed_encoder(arch, encoder, max_len), num_pool)


def store_seed(msg: Message, context: Context) -> None:
    """Keep M0 (sent by the server) in the node's state for the later phases."""
    context.state["seed"] = get_record(msg.content, "seed", ArrayRecord, "server")
    context.state["seed-config"] = get_record(msg.content, "seed-config", ConfigRecord, "server")


def seed_model(context: Context, node: NodeData | None = None) -> nn.Module:
    """M0 as the server sent it in this run; for a node with its own classes
    (``node.private``), with this node's head rows appended (:func:`localize`)."""
    if "seed" not in context.state:
        raise RuntimeError("no seed model in this node's state: the sketch phase must run first")
    rec = context.state["seed-config"]
    cfg = json.loads(str(rec["model"] if "model" in rec else rec["vit"]))
    seed = seed_from_state(context.state["seed"].to_torch_state_dict(), cfg)
    return seed if node is None or node.private is None else localize(node, seed, seed)


def localize(node: NodeData, model: nn.Module, seed: nn.Module | None) -> nn.Module:
    """``model`` with the node's own head rows (made from M0 ``seed``; ``None``: from the MoE
    ``model`` run as M0) appended; unchanged for the embedded benchmarks, whose classes are
    all in M0's head."""
    if node.private is None:
        return model
    from metamoe.clients.private_head import localize as extend
    from metamoe.clients.private_head import private_head_rows
    from metamoe.models.moe import M0_FFN

    base = model if seed is None else seed
    if hasattr(base, "class_head"):  # CLIP: the text embeddings of the node's class names
        return extend(model, base.class_head(list(node.private["class_names"])))
    if seed is None:
        model.set_forced(M0_FFN)
        try:
            rows = private_head_rows(model, node.domain, _l2(node))
        finally:
            model.set_forced(None)
    else:
        rows = private_head_rows(seed, node.domain, _l2(node))
    return extend(model, rows)


def _l2(node: NodeData) -> float | None:
    l2 = float(node.cfg.benchmark.head_l2)
    return None if l2 < 0 else l2
