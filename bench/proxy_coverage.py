"""Selection-quality ablation on the embedded vision benchmark: coverage per method and n.

    python -m bench.proxy_coverage [--n 600,1000,2000] [--m 500] [--seeds 0,1,2]
                                   [--overrides "sketch.l2=1e-5"]

For each seed, candidate-pool size n and selection method (RW-DPP, relevance-only top-m, random
among the candidates, plain DPP, k-center greedy) it prints, per client, the distance from each
private *test* embedding to its nearest proxy (cosine geometry on M0's token embedding, the
space the selection works in; lower is better): its mean (the issue's coverage metric) and its
90th percentile (how well the tail of the private distribution is covered). The row ``all n``
uses every candidate as a proxy: no m-subset of the candidates can have a lower mean, so it is
the floor any selection rule is measured against. Per client it also prints the relevance
sketch's held-out log-loss (the client's test split against as many random pool images): how
well calibrated the relevance r that weights the DPP is. The runs compute the same two
statistics on the clients (``proxy_coverage`` / ``proxy_coverage_p90`` in metrics.json); this
bench only sweeps n, m and the seed without training anything. It uses M0 from the cache
(``METAMOE_CACHE_DIR``, default ``.cache/``) or pre-trains it (about a minute per seed). It
also compares the blocked DPP loop with the plain one on the first n (same picks as a set; the
first pick, counted from 0, where their orders differ). Last line: one JSON object.
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
from metamoe.proxy.dpp import greedy_dpp
from metamoe.proxy.retrieval import retrieve_candidates
from metamoe.proxy.scoring import pool_keys
from metamoe.proxy.select import METHODS, select_proxies
from metamoe.proxy.sketch import sketch_from_arrays
from metamoe.server.seed import get_seed_model
from metamoe.training import features


def _distances(test: torch.Tensor, pool_n: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    return torch.cdist(test, pool_n[idx]).min(1).values.double().numpy()


def _heldout_logloss(sketch, test: np.ndarray, pool: np.ndarray, seed: int) -> float:
    """Mean logistic loss of the sketch's key on the private test split (label 1) and as many
    random pool rows (label 0); only meaningful for the logistic sketch."""
    neg = pool[np.random.default_rng(seed).choice(len(pool), size=len(test), replace=False)]
    kp, kn = pool_keys(test, [sketch])[0], pool_keys(neg, [sketch])[0]
    return float(0.5 * (np.logaddexp(0, -kp).mean() + np.logaddexp(0, kn).mean()))


def run_seed(seed: int, ns: list[int], m: int, cache: str, overrides: str = "",
             benchmark: str = "vision") -> dict:
    cfg = resolve_config({"benchmark": benchmark, "cache-dir": cache, "seed": seed,
                          "overrides": overrides})
    bench = load_benchmark(cfg)
    model, pool, _ = get_seed_model(cfg, bench)
    names = client_names(cfg)
    sketches, tests = {}, {}
    for pid, name in enumerate(names):
        _, dom = client_partition(cfg, bench, pid)
        arrays, _ = stages.sketch_stage(cfg, model, dom, bench, cfg.run.seed * 1000 + pid)
        sketches[name] = sketch_from_arrays(arrays)
        tests[name] = torch.nn.functional.normalize(
            torch.from_numpy(features(model, dom.x_test, cfg.select.embedding)), dim=1)
    pool_n = torch.nn.functional.normalize(torch.from_numpy(pool), dim=1)
    out: dict = {}
    if cfg.sketch.kind == "logistic":
        ll = {c: _heldout_logloss(sketches[c], tests[c].numpy(), pool, seed) for c in names}
        out["sketch_heldout_logloss"] = ll
        print(f"seed {seed}: sketch held-out log-loss "
              + ", ".join(f"{c} {v:.4f}" for c, v in ll.items()))
    print(f"seed {seed}: mean (p90) nearest-proxy distance, m = {m}")
    print(f"{'n':>6} {'method':>10} " + " ".join(f"{c:>17}" for c in names) + f" {'mean':>8}")
    for n in ns:
        # "relevance" with m = n returns every candidate: the floor of any m-subset's mean
        rows = [(meth, select_proxies(pool, sketches, n=n, m=m, method=meth, seed=cfg.run.seed))
                for meth in METHODS]
        rows.append(("all n", select_proxies(pool, sketches, n=n, m=n, method="relevance")))
        for method, res in rows:
            d = {c: _distances(tests[c], pool_n, r.indices) for c, r in res.items()}
            cov = {c: float(v.mean()) for c, v in d.items()}
            p90 = {c: float(np.quantile(v, 0.9)) for c, v in d.items()}
            mix = {c: {str(s): int((bench.pool_source[r.indices] == s).sum())
                       for s in np.unique(bench.pool_source[r.indices])} for c, r in res.items()}
            out.setdefault(str(n), {})[method] = {"coverage": cov, "coverage_p90": p90,
                                                  "sources": mix,
                                                  "mean": float(np.mean(list(cov.values())))}
            print(f"{n:>6} {method:>10} "
                  + " ".join(f"{cov[c]:>8.4f} ({p90[c]:.4f})" for c in names)
                  + f" {np.mean(list(cov.values())):>8.4f}")
    # The blocked DPP (the default) against the plain greedy loop on the same candidates: the
    # same proxies, but in float32 near-tied picks may swap places late in the path.
    order = {}
    for c, cand in zip(names, retrieve_candidates(pool, [sketches[c] for c in names], ns[0])):
        z = cand.embeddings
        a = greedy_dpp(z, cand.relevance, m, block=1).indices
        b = greedy_dpp(z, cand.relevance, m).indices
        k = min(len(a), len(b))
        diff = np.flatnonzero(a[:k] != b[:k])
        order[c] = {"same_set": set(a.tolist()) == set(b.tolist()),
                    "first_order_difference": int(diff[0]) if len(diff) else None}
    out["dpp_plain_vs_blocked"] = order
    print(f"seed {seed}: RW-DPP plain vs blocked loop (n = {ns[0]}): "
          + ", ".join(f"{c} same set {v['same_set']}, first pick in another place "
                      f"{v['first_order_difference']}" for c, v in order.items()))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="600,1000,2000")
    ap.add_argument("--m", type=int, default=500)
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds")
    ap.add_argument("--overrides", default="", help="OmegaConf dotlist, e.g. 'sketch.l2=1e-5'")
    ap.add_argument("--benchmark", default="vision",
                    help="conf/benchmark/<name>.yaml (an image benchmark; tests use 'tiny')")
    a = ap.parse_args(argv)
    cache = os.environ.get("METAMOE_CACHE_DIR") or str(Path(__file__).resolve().parents[1] / ".cache")
    ns = [int(v) for v in a.n.split(",")]
    out = {str(s): run_seed(int(s), ns, a.m, cache, a.overrides, a.benchmark)
           for s in a.seeds.split(",")}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
