"""MetaMoE's stages in-process on a GPU (fp32 and bf16) and on the CPU: wall time per stage,
expert-training samples/s and the accuracies.

    python -m bench.gpu_check [--benchmark vision] [--runtimes cuda:fp32,cuda:bf16,cpu:fp32]

No Flower or Ray: the stages the ClientApps and the ServerApp run (M0 pre-training on the
public pool, each client's sketch, proxy selection, each client's proxy-aligned expert and
router vectors, the unify stage, each client's evaluation) are called one after the other in
this process under one :class:`metamoe.device.Runtime` each, with a fresh M0 cache per
runtime so that pre-training is timed too. A GPU machine without flwr/ray can run it: it
needs torch, numpy, omegaconf, safetensors, scikit-learn, faiss-cpu, mlxtend and the
Fashion-MNIST files of the vision benchmark. Prints one table; last line one JSON object
{runtime: {"seconds": {stage: s}, "expert_samples_per_s": float, "accuracy": {domain: acc},
"average": acc}}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from metamoe import device
from metamoe.clients import stages
from metamoe.config import resolve_config
from metamoe.data import client_names, client_partition, load_benchmark
from metamoe.models.moe import build_moe, unify_moe_config
from metamoe.proxy.select import select_proxies
from metamoe.proxy.sketch import sketch_from_arrays
from metamoe.server.seed import get_seed_model
from metamoe.training import derive_seed, finetune


def run_stages(benchmark: str, overrides: str, rt: device.Runtime) -> dict:
    """Every stage of one MetaMoE run under ``rt``; timings and accuracies."""
    secs: dict[str, float] = {}

    def timed(stage, fn):
        t0 = time.perf_counter()
        out = fn()
        secs[stage] = secs.get(stage, 0.0) + time.perf_counter() - t0
        return out

    with tempfile.TemporaryDirectory() as cache, device.use(rt):
        cfg = resolve_config({"benchmark": benchmark, "cache-dir": cache, "overrides": overrides})
        bench = timed("data", lambda: load_benchmark(cfg))
        seed, pool, _ = timed("seed", lambda: get_seed_model(cfg, bench))
        clients = [client_partition(cfg, bench, p) for p in range(len(client_names(cfg)))]
        sketches = {name: timed("sketch", lambda p=p, dom=dom: sketch_from_arrays(
            stages.sketch_stage(cfg, seed, dom, bench, derive_seed(cfg.run.seed, p))[0]))
            for p, (name, dom) in enumerate(clients)}
        sel = timed("select", lambda: select_proxies(pool, sketches, n=cfg.select.n,
                                                     m=cfg.select.m, method=cfg.select.method,
                                                     seed=cfg.run.seed, eps=cfg.select.eps))
        experts, samples, train_s = {}, 0, 0.0
        for p, (name, dom) in enumerate(clients):
            idx = np.asarray(sel[name].indices, dtype=np.int64)
            lora, vec, m = timed("expert", lambda dom=dom, idx=idx, p=p: stages.expert_stage(
                cfg, seed, dom, bench, idx, derive_seed(cfg.run.seed, p)))
            experts[name] = (lora, vec)
            samples += m["n_train"] * cfg.expert.epochs
            train_s += m["train_seconds"]
        names = list(experts)

        def unify():
            import torch

            moe = build_moe(seed, unify_moe_config(cfg, names),
                            [{k: torch.from_numpy(v) for k, v in experts[n][0].items()}
                             for n in names],
                            [torch.from_numpy(experts[n][1]) for n in names])
            union = np.unique(np.concatenate([sel[n].indices for n in names]))
            finetune(moe, bench.pool_x[union], bench.pool_y[union], cfg.unify, cfg.run.seed,
                     True, True, desc="unify")
            return moe

        moe = timed("unify", unify)
        acc = {dom.name: timed("evaluate", lambda dom=dom: stages.evaluate_stage(
            moe, dom, names, references=False))["acc_unified"] for _, dom in clients}
    return {"seconds": {k: round(v, 2) for k, v in secs.items()},
            "expert_samples_per_s": round(samples / max(train_s, 1e-9), 1),
            "accuracy": {k: round(v, 4) for k, v in acc.items()},
            "average": round(float(np.mean(list(acc.values()))), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="vision")
    ap.add_argument("--overrides", default="")
    ap.add_argument("--runtimes", default="cuda:fp32,cuda:bf16,cpu:fp32",
                    help="device:precision list; cuda ones are skipped (and said so) without a GPU")
    args = ap.parse_args()
    import torch

    out = {}
    for spec in args.runtimes.split(","):
        dev, _, prec = spec.partition(":")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            print(f"{spec}: skipped, no GPU visible")
            continue
        rt = device.Runtime.resolve(dev, prec or "fp32")
        print(f"{spec}: running the {args.benchmark} stages on {rt.device} ({rt.precision})",
              flush=True)
        out[spec] = run_stages(args.benchmark, args.overrides, rt)
        r = out[spec]
        print(f"  seconds per stage {r['seconds']}")
        print(f"  expert training {r['expert_samples_per_s']} samples/s; accuracy "
              f"{r['accuracy']} average {r['average']}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
