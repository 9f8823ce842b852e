"""Re-run the server's unify stage of a finished MetaMoE run offline, under variants, and score
each unified MoE on every client's evaluation split (the split the run was evaluated on).

    python -m bench.unify_probe RUN_DIR [--variants "metamoe;same_start;..."]
                                [--output results/unify-probe.json]

RUN_DIR is a ``metamoe`` or ``unrestricted_moe_same_start`` run directory (its
``checkpoints/select.npz`` and ``expert.npz`` and ``metrics.json``): the clients' uploads are
read from there, screened as the run screened them, and only the server stage is re-computed,
so a variant costs one fine-tuning and one evaluation, not a federation. A diagnostic for the
upper bound's recipe (docs/results.md "Upper bound same start"); it reads the clients' private
sets the way the NON-PRIVATE upper bound does (``strategies/unrestricted.py``).

Variants, separated by ``;`` (``name`` or ``name:key=value,key=value``; a key without a
section is the unify section's, e.g. ``same_start:expert.epochs=3,lr=1e-4``):

* ``metamoe`` — MetaMoE's unify (router, λ and experts on the union of the proxies);
* ``same_start`` — the upper bound's unify (``UnrestrictedSameStart.finetune_pooled`` on the
  MoE of the uploaded experts: ``expert.epochs`` passes over the pooled data);
* ``after`` — MetaMoE's unify, then the upper bound's fine-tuning on top of its result.

Printed: one line per variant (per-domain accuracy, average, the learnt λ); the last line is
one JSON object {variant: {domain: accuracy in [0, 1], "average": ..., "lambdas": [...],
"route_share": {domain: {expert: share of its tokens}}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load_run(run_dir: Path):
    """(strategy, experts after screening, selections, clients) of a finished run."""
    from omegaconf import OmegaConf

    from metamoe.data import client_names, client_partition, load_benchmark
    from metamoe.server.seed import get_seed_model
    from metamoe.strategies import get_strategy
    from metamoe.strategies.base import ClientInfo, unpack
    from metamoe.strategies.screen import screen_experts

    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = OmegaConf.create(metrics["config"])
    ck = run_dir / "checkpoints"
    with np.load(ck / "select.npz") as z:
        selections = unpack({k: z[k] for k in z.files})
    meta = json.loads((ck / "expert.json").read_text())
    with np.load(ck / "expert.npz") as z:
        flat = unpack({k: z[k] for k in z.files})
    experts = {}
    for c in meta["order"]:
        arrs = dict(flat[c])
        vec = arrs.pop("__router__")
        experts[c] = (arrs, vec, meta["metrics"][c])
    bench = load_benchmark(cfg)
    seed_model, pool_feats, _ = get_seed_model(cfg, bench)
    strat = get_strategy("unrestricted_moe_same_start")(cfg, seed_model, bench, pool_feats)
    if cfg.screen.enabled:
        method = cfg.select.method
        proxies = {c: np.asarray(selections[c][method], np.int64) for c in experts}
        _, rejected, vectors = screen_experts(seed_model, bench.pool_x, bench.pool_y, experts,
                                              proxies, cfg.screen, int(cfg.expert.rank),
                                              float(cfg.expert.alpha))
        experts = {c: (e[0], vectors[c], e[2]) for c, e in experts.items() if c not in rejected}
    names = client_names(cfg)
    clients = {}
    for p, name in enumerate(names):
        _, dom = client_partition(cfg, bench, p)
        clients[p] = ClientInfo(node_id=p, name=name, domain=dom.name, partition_id=p)
    return strat, experts, selections, clients


def evaluate(moe, cfg, bench) -> dict:
    """Per-domain accuracy on the clients' evaluation splits (mean over a domain's clients)
    and where each domain's tokens are routed, by the clients' own evaluation stage."""
    from metamoe.clients.stages import evaluate_stage
    from metamoe.data import client_names, client_partition

    per: dict[str, list[dict]] = {}
    names = list(moe.moe_cfg.expert_names)
    for p, _ in enumerate(client_names(cfg)):
        _, dom = client_partition(cfg, bench, p)
        per.setdefault(dom.name, []).append(evaluate_stage(moe, dom, names, references=False))
    out: dict = {d: float(np.mean([m["acc_unified"] for m in v])) for d, v in per.items()}
    out["average"] = float(np.mean(list(out.values())))
    out["route_share"] = {d: {e: round(float(np.mean([m[f"route_share/{e}"] for m in v])), 3)
                              for e in names} for d, v in per.items()}
    return out


KINDS = ("metamoe", "same_start", "after")


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, kv = spec.partition(":")
    if name.strip() not in KINDS:
        raise SystemExit(f"unknown variant {name.strip()!r} in {spec!r} (one of {KINDS}; "
                         "variants are separated by ';')")
    sets = {}
    for item in filter(None, kv.split(",")):
        k, _, v = item.partition("=")
        sets[k.strip()] = v.strip()
    return name.strip(), sets


def run_variant(strat, experts, selections, clients, spec: str) -> dict:
    from omegaconf import OmegaConf

    from metamoe.strategies.metamoe import MetaMoE

    kind, sets = parse_variant(spec)
    base = strat.cfg
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(
        [f"{k if '.' in k else 'unify.' + k}={v}" for k, v in sets.items()]))
    strat.cfg = cfg
    members = [c for c in clients.values() if c.name in experts]
    try:
        union = MetaMoE.unify_data(strat, selections)
        if kind == "metamoe":
            moe = MetaMoE.unify(strat, experts, union)
        elif kind == "same_start":
            moe = strat.expert_moe(experts, vectors=True)
            strat.finetune_pooled(moe, members, selections)
        elif kind == "after":
            strat.cfg = base  # MetaMoE's own unify first, then the variant's fine-tuning
            moe = MetaMoE.unify(strat, experts, union)
            strat.cfg = cfg
            strat.finetune_pooled(moe, members, selections)
    finally:
        strat.cfg = base
    res = evaluate(moe, cfg, strat.bench)
    res["lambdas"] = [round(v, 4) for v in moe.lambdas()]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unify_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--variants", default="metamoe;same_start",
                    help="';'-separated variants, e.g. 'metamoe;same_start:epochs=3,lr=1e-4'")
    ap.add_argument("--output", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    from metamoe.logging_utils import setup_logging

    specs = [s for s in (s.strip() for s in a.variants.split(";")) if s]
    for spec in specs:  # a bad variant fails before the run is loaded
        parse_variant(spec)
    setup_logging()
    strat, experts, selections, clients = load_run(Path(a.run_dir))
    results = {}
    for spec in specs:
        res = run_variant(strat, experts, selections, clients, spec)
        results[spec] = res
        doms = " ".join(f"{d} {100 * v:.2f}" for d, v in res.items()
                        if d not in ("average", "lambdas", "route_share"))
        print(f"{spec:50s} {doms} | average {100 * res['average']:.2f} | λ {res['lambdas']}",
              flush=True)
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
