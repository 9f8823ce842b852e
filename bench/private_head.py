"""How a client that brings its own classes should score them: class-mean rows or a linear probe.

    python -m bench.private_head [--benchmark tiny_learn] [--seeds 0,1,2] [--l2 ...]

A client of ``benchmark.kind=local`` has classes M0's head does not know; its node appends head
rows of its own (``metamoe/clients/private_head.py``). This script exports the embedded
``--benchmark`` (mnist, uci, fashion) to disk (``metamoe/data/export.py``), reads it back as a
local federation with a 20 % validation split per client, and for each head variant (class-mean
rows only: ``l2=-1``; a linear probe from them with L2 penalty ``l2``) reports, on each client's
*validation* split: M0 with those rows, and the client's proxy-aligned expert (the real
``expert_stage`` on Dp and 40 seeded random pool proxies) with them. ``benchmark.head_l2``'s
default is the variant with the best mean expert validation accuracy over the seeds. Last line:
one JSON object keyed by variant, each with ``m0_val`` and ``expert_val`` (means over clients
and seeds) and ``per_client``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from metamoe.clients import stages
from metamoe.clients.node import _read_local
from metamoe.clients.private_head import private_head_rows
from metamoe.config import resolve_config
from metamoe.data import load_benchmark
from metamoe.data.export import export
from metamoe.models.head import extend_head
from metamoe.models.lora import inject_ffn_lora, load_lora_state_dict
from metamoe.server.seed import get_seed_model
from metamoe.training import accuracy, derive_seed


def run(benchmark: str, seeds: list[int], l2s: list[float], work: Path) -> dict:
    doms = "[mnist,uci,fashion]"
    paths = export(benchmark, work / "data", overrides=f"benchmark.domains={doms}")
    clients = ",".join(str(p) for p in paths)
    out: dict = {}
    for seed in seeds:
        cfg = resolve_config({"benchmark": "tiny_local", "seed": seed,
                              "cache-dir": str(work / "cache"), "overrides":
                              f"benchmark.client_data=[{clients}] "
                              f"benchmark.pool_data={work / 'data' / 'pool'} "
                              "benchmark.val_fraction=0.2"})
        bench = load_benchmark(cfg)
        seed_model, _, _ = get_seed_model(cfg, bench)
        bjson = json.dumps(OmegaConf.to_container(cfg.benchmark, resolve=True), sort_keys=True)
        for i, path in enumerate(paths):
            dom, priv = _read_local(str(path), "auto", f"client-{i}", bjson, "vit",
                                    str(cfg.model.encoder), int(cfg.model.max_len),
                                    bench.num_classes)
            rng = np.random.default_rng(derive_seed(seed, i))
            proxies = np.sort(rng.choice(len(bench.pool_y), 40, replace=False))
            for l2 in l2s:
                rows = private_head_rows(seed_model, dom, None if l2 < 0 else l2)
                m0 = extend_head(copy.deepcopy(seed_model), *rows)
                lora, _, _ = stages.expert_stage(cfg, m0, dom, bench, proxies,
                                                 derive_seed(seed, i))
                ex = inject_ffn_lora(copy.deepcopy(m0), cfg.expert.rank, cfg.expert.alpha)
                load_lora_state_dict(ex, {k: torch.from_numpy(v) for k, v in lora.items()})
                rec = out.setdefault(str(l2), {"per_client": {}})
                pc = rec["per_client"].setdefault(path.name, {"m0_val": [], "expert_val": []})
                pc["m0_val"].append(accuracy(m0, priv["x_val"], priv["y_val"], dom.classes))
                pc["expert_val"].append(accuracy(ex, priv["x_val"], priv["y_val"], dom.classes))
    for rec in out.values():
        for key in ("m0_val", "expert_val"):
            rec[key] = float(np.mean([np.mean(c[key]) for c in rec["per_client"].values()]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default="tiny_learn")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--l2", default="-1,1e-4,1e-3,1e-2,1e-1",
                    help="variants: -1 = class-mean rows only, else the probe's L2 penalty")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    l2s = [float(v) for v in a.l2.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        res = run(a.benchmark, seeds, l2s, Path(tmp))
    print(f"{'head':>12} {'M0 val':>8} {'expert val':>11}  per client (expert val)")
    for k, rec in res.items():
        name = "class-mean" if float(k) < 0 else f"probe {k}"
        per = "  ".join(f"{c} {np.mean(v['expert_val']):.3f}" for c, v in rec["per_client"].items())
        print(f"{name:>12} {rec['m0_val']:8.3f} {rec['expert_val']:11.3f}  {per}")
    best = max(res, key=lambda k: res[k]["expert_val"])
    print(f"best on validation (mean expert accuracy): {best}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
