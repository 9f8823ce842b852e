"""What every ClientApp handler starts from: this node's config, data and M0.

The client's private data is chosen by ``node_config["partition-id"]`` (injected by the
simulation engine; ``--node-config "partition-id=N"`` on a real SuperNode). M0 arrives in the
first message of a run (``query.sketch``, ``query.fl_seed``, or ``train.expert`` for methods
without a sketch phase) and is kept in ``context.state`` for the later phases (ClientApps are
ephemeral: no module globals hold run state).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from omegaconf import DictConfig
from torch import nn

from metamoe.config import resolve_config
from metamoe.data import Domain, VisionBenchmark, client_partition, load_benchmark
from metamoe.logging_utils import setup_logging
from metamoe.models.io import seed_from_state
from metamoe.protocol import get_record


@dataclass(frozen=True)
class NodeData:
    """This node's resolved config, partition, benchmark and private domain."""

    cfg: DictConfig
    partition_id: int
    bench: VisionBenchmark
    name: str  # the client's name (its partition's name in the benchmark)
    domain: Domain

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
    name, dom = client_partition(cfg, bench, pid)
    return NodeData(cfg, pid, bench, name, dom)


def store_seed(msg: Message, context: Context) -> None:
    """Keep M0 (sent by the server) in the node's state for the later phases."""
    context.state["seed"] = get_record(msg.content, "seed", ArrayRecord, "server")
    context.state["seed-config"] = get_record(msg.content, "seed-config", ConfigRecord, "server")


def seed_model(context: Context) -> nn.Module:
    """M0 as the server sent it in this run."""
    if "seed" not in context.state:
        raise RuntimeError("no seed model in this node's state: the sketch phase must run first")
    rec = context.state["seed-config"]
    cfg = json.loads(str(rec["model"] if "model" in rec else rec["vit"]))
    return seed_from_state(context.state["seed"].to_torch_state_dict(), cfg)
