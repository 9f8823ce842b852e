"""Whether a small end-to-end config learns: M0, each expert on its own domain and the unified
MoE, per seed, in-process (the stages of a MetaMoE run, as ``bench/attacks.py`` runs them).

    python -m bench.small_learn [--benchmark tiny_text_learn] [--seeds 0,1,2] [--overrides "..."]

Prints per seed each domain's accuracy of M0, of its own expert and of the unified MoE, the
MoE's average minus M0's and the smallest expert-minus-M0 gap (``tests/test_e2e.py`` asserts
both are at least 10 points), and the stages' wall time. Last line one JSON object keyed by
seed. Used to choose ``conf/benchmark/tiny_text_learn.yaml``'s expert budget.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.attacks import Run
from metamoe.clients import stages


def measure(benchmark: str, seed: int, overrides: str) -> dict:
    t0 = time.perf_counter()
    run = Run(benchmark, seed, overrides)
    names = [n for n, _ in run.clients]
    moe = run.strategy.unify(run.experts, run.strategy.unify_data(run.selections))
    per = {}
    for n, dom in run.clients:
        m = stages.evaluate_stage(moe, dom, names)
        per[n] = {"m0": m["acc_zero_shot"], "expert": m[f"acc_expert/{n}"],
                  "moe": m["acc_unified"]}
    return {"per_domain": per,
            "moe_minus_m0": float(np.mean([v["moe"] - v["m0"] for v in per.values()])),
            "min_expert_minus_m0": float(min(v["expert"] - v["m0"] for v in per.values())),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="tiny_text_learn")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--overrides", default="")
    args = ap.parse_args()
    out = {}
    for s in (int(x) for x in args.seeds.split(",")):
        r = out[str(s)] = measure(args.benchmark, s, args.overrides)
        cells = ", ".join(f"{d}: M0 {100 * v['m0']:.1f} expert {100 * v['expert']:.1f} "
                          f"MoE {100 * v['moe']:.1f}" for d, v in r["per_domain"].items())
        print(f"seed {s}: {cells}; MoE - M0 {100 * r['moe_minus_m0']:+.1f}, smallest expert - "
              f"M0 {100 * r['min_expert_minus_m0']:+.1f} ({r['seconds']} s)", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
