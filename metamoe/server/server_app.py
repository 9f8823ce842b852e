"""The ServerApp: resolve config, build M0, drive the method's phases, emit the results."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from metamoe import device
from metamoe.config import config_hash, num_clients, resolve_config
from metamoe.data import load_benchmark
from metamoe.logging_utils import setup_logging
from metamoe.models.io import load_moe, save_moe
from metamoe.server.report import accuracy_table, build_metrics, write_metrics, write_report
from metamoe.server.seed import get_seed_model
from metamoe.strategies import Federation, get_strategy
from metamoe.strategies.base import Checkpoint
from metamoe.training import predict_logits

app = ServerApp()
log = logging.getLogger("metamoe")


def run_dir_for(cfg) -> Path:
    run_id = cfg.run.run_id or (f"{cfg.benchmark.name}-{cfg.method}-"
                                f"{datetime.now(UTC):%Y%m%d-%H%M%S}")
    root = Path(cfg.run.output_dir) if cfg.run.output_dir else Path.cwd() / "results"
    return root.resolve() / run_id


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    cfg = resolve_config(context.run_config)  # bad config fails here, before any training
    if cfg.run.threads:
        torch.set_num_threads(int(cfg.run.threads))
    # The ServerApp is the simulation's Ray driver: it sees every GPU of the machine.
    with device.use(device.from_run_config(cfg.run)) as rt:
        log.info("server computes on %s (%s)", rt.device, rt.precision)
        run(grid, cfg)


def run(grid: Grid, cfg) -> None:
    """The ServerApp's work for a resolved config: M0, the strategy, the reports."""
    t0 = time.perf_counter()
    run_dir = run_dir_for(cfg)
    log.info("run %s: method=%s benchmark=%s seed=%d -> %s", run_dir.name, cfg.method,
             cfg.benchmark.name, cfg.run.seed, run_dir)
    strategy_cls = get_strategy(cfg.method)
    # Phase outputs are checkpointed: the same run-id resumes after the last finished phase.
    ckpt = Checkpoint(run_dir / "checkpoints", config_hash(cfg))
    fed = Federation(grid, cfg, checkpoint=ckpt)
    with fed.phase("seed"):
        bench = load_benchmark(cfg)
        seed_model, pool_feats, seed_info = get_seed_model(cfg, bench)
    node_ids = fed.wait_for_nodes(num_clients(cfg))
    strategy = strategy_cls(cfg, seed_model, bench, pool_feats)
    outcome = strategy.run(fed, node_ids)

    run_dir.mkdir(parents=True, exist_ok=True)
    if outcome.model is not None:
        save_moe(outcome.model, run_dir, extra=outcome.model_extra)
        # The artifact must hold exactly the in-memory tensors and give the same logits (up to
        # float rounding: BLAS kernels may round differently for differently aligned buffers).
        saved = load_moe(run_dir)
        mem = {k: v.cpu() for k, v in outcome.model.state_dict().items()}
        bad = [k for k, v in saved.state_dict().items() if not torch.equal(v, mem[k])]
        probe = bench.domains[0].x_test[:64] if bench.domains else \
            bench.pool_x[np.arange(min(64, len(bench.pool_x)))]  # kind=local: public items
        close = torch.allclose(predict_logits(saved, probe), predict_logits(outcome.model, probe),
                               rtol=1e-5, atol=1e-5)
        if bad or not close:
            raise RuntimeError(f"the saved MoE does not reproduce the in-memory model "
                               f"(differing tensors: {bad[:3]}, logits close: {close})")
    metrics = build_metrics(cfg, fed, outcome, time.perf_counter() - t0, seed_info)
    write_metrics(run_dir, metrics)
    write_report(run_dir, metrics)
    log.info("per-domain accuracy (%%):\n%s", accuracy_table(metrics))
    log.info("results written to %s", run_dir)
