"""Selection-quality ablation on the embedded vision benchmark: coverage per method and n.

    python -m bench.proxy_coverage [--n 600,1000,2000] [--m 500]

For each candidate-pool size n and each selection method (RW-DPP, relevance-only top-m,
random among the candidates, plain DPP) it prints, per client, the mean distance from each
private *test* embedding to its nearest proxy (cosine geometry on M0's token embedding, the
space the selection works in; lower is better), and the mix of pool sources among the picks.
The runs themselves compute the same metric on the clients (``proxy_coverage`` in
metrics.json); this bench only sweeps n without training anything. It uses M0 from the cache
(``METAMOE_CACHE_DIR``, default ``.cache/``) or pre-trains it once (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from metamoe.clients import stages
from metamoe.config import resolve_config
from metamoe.data import client_names, client_partition, load_benchmark
from metamoe.proxy.select import select_proxies
from metamoe.proxy.sketch import sketch_from_arrays
from metamoe.server.seed import get_seed_model
from metamoe.training import features

METHODS = ("rw_dpp", "relevance", "random", "dpp")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="600,1000,2000")
    ap.add_argument("--m", type=int, default=500)
    a = ap.parse_args(argv)
    cache = os.environ.get("METAMOE_CACHE_DIR") or str(Path(__file__).resolve().parents[1] / ".cache")
    cfg = resolve_config({"cache-dir": cache})
    bench = load_benchmark(cfg)
    seed, pool, _ = get_seed_model(cfg, bench)
    names = client_names(cfg)
    sketches, tests = {}, {}
    for pid, name in enumerate(names):
        _, dom = client_partition(cfg, bench, pid)
        arrays, _ = stages.sketch_stage(cfg, seed, dom, bench, cfg.run.seed * 1000 + pid)
        sketches[name] = sketch_from_arrays(arrays)
        tests[name] = torch.nn.functional.normalize(
            torch.from_numpy(features(seed, dom.x_test, cfg.select.embedding)), dim=1)
    pool_n = torch.nn.functional.normalize(torch.from_numpy(pool), dim=1)
    out: dict = {}
    print(f"{'n':>6} {'method':>10} " + " ".join(f"{c:>9}" for c in names) + f" {'mean':>8}")
    for n in (int(v) for v in a.n.split(",")):
        for method in METHODS:
            res = select_proxies(pool, sketches, n=n, m=a.m, method=method, seed=cfg.run.seed)
            cov = {c: float(torch.cdist(tests[c], pool_n[r.indices]).min(1).values.mean())
                   for c, r in res.items()}
            mix = {c: {str(s): int((bench.pool_source[r.indices] == s).sum())
                       for s in np.unique(bench.pool_source[r.indices])} for c, r in res.items()}
            out.setdefault(str(n), {})[method] = {"coverage": cov, "sources": mix,
                                                  "mean": float(np.mean(list(cov.values())))}
            print(f"{n:>6} {method:>10} " + " ".join(f"{cov[c]:>9.4f}" for c in names)
                  + f" {np.mean(list(cov.values())):>8.4f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
