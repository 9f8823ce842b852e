"""One malicious client with a well-formed upload: the honest clients' accuracy without and with
the server's screening (``metamoe/strategies/screen.py``).

    python -m bench.attacks [--benchmark vision] [--seed 0] [--attacker 2] [--victim 0]
    python -m bench.attacks --clean [--benchmarks vision,text,vision_k20] [--seeds 3]

In-process (no Flower): the stages the ClientApps and the ServerApp run — sketches, the
strategy's proxy selection, the clients' experts, the server's screening and unify
(``MetaMoE.select`` / ``screen_experts`` / ``MetaMoE.unify``, the code the ServerApp calls), the
clients' evaluation. Client ``--attacker`` then replaces its upload with each attack in turn:

* ``scaled_delta``: its LoRA delta x10 (B matrices scaled);
* ``scaled_router``: its router vectors x10;
* ``permuted_labels``: an expert trained as usual but on labels shifted by one class (its own
  and its proxies');
* ``copied_router``: client ``--victim``'s router vectors instead of its own;
* ``replay``: client ``--victim``'s whole upload (LoRA, router vectors, metrics);
* ``steered_sketch``: client ``--victim``'s sketch instead of its own (it is given the
  victim's proxies), then an honestly trained expert on its data and those proxies.

For each it prints the honest clients' average accuracy for the clean run, the attacked run
merged without screening and with screening, and whether the attacker was rejected. Last line:
one JSON object keyed by attack, each with ``clean``, ``attacked``, ``screened`` (honest
average in [0, 1]) and ``flagged``. ``--clean`` instead screens the honest uploads of every
benchmark and seed and prints each statistic's range and the false rejections (the data the
``screen.*`` defaults were chosen on); last line one JSON object keyed by benchmark.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np

from metamoe.clients import stages
from metamoe.config import resolve_config
from metamoe.data import client_names, client_partition, load_benchmark
from metamoe.proxy.sketch import sketch_from_arrays
from metamoe.server.seed import get_seed_model
from metamoe.strategies.metamoe import MetaMoE
from metamoe.strategies.screen import STATS, screen_experts
from metamoe.training import derive_seed

ATTACKS = ("scaled_delta", "scaled_router", "permuted_labels", "copied_router", "replay",
           "steered_sketch")


def scale_delta(lora: dict[str, np.ndarray], s: float) -> dict[str, np.ndarray]:
    """The LoRA upload with every ΔW = B A scaled by ``s`` (B matrices scaled)."""
    return {k: (v * s if k.endswith("lora_B") else v).astype(np.float32) for k, v in lora.items()}


def shift_labels(y: np.ndarray, classes) -> np.ndarray:
    """Each label replaced by the next class of ``classes`` (a derangement)."""
    cls = np.asarray(sorted(int(c) for c in classes))
    pos = np.searchsorted(cls, y)
    return cls[(pos + 1) % len(cls)].astype(y.dtype)


def permuted_expert(cfg, seed, dom, bench, idx: np.ndarray, rng_seed: int):
    """An expert trained like an honest one, on shifted labels (its own and its proxies')."""
    bad_dom = copy.copy(dom)
    bad_dom.y_train = shift_labels(dom.y_train, dom.classes)
    bad_bench = copy.copy(bench)
    bad_bench.pool_y = shift_labels(bench.pool_y, np.unique(bench.pool_y))
    return stages.expert_stage(cfg, seed, bad_dom, bad_bench, idx, rng_seed)


class Run:
    """One benchmark's clients, sketches, selections and honest experts, in-process."""

    def __init__(self, benchmark: str, seed: int, overrides: str = ""):
        self.cfg = cfg = resolve_config({"benchmark": benchmark, "seed": seed,
                                         "overrides": overrides})
        self.bench = load_benchmark(cfg)
        self.m0, pool, _ = get_seed_model(cfg, self.bench)
        self.strategy = MetaMoE(cfg, self.m0, self.bench, pool)
        self.clients = [client_partition(cfg, self.bench, p)
                        for p in range(len(client_names(cfg)))]
        self.sketches = {name: sketch_from_arrays(stages.sketch_stage(
            cfg, self.m0, dom, self.bench, derive_seed(cfg.run.seed, p))[0])
            for p, (name, dom) in enumerate(self.clients)}
        self.selections = self.strategy.select(self.sketches)
        self.experts = {name: self.train(p, self.selections[name])
                        for p, (name, _) in enumerate(self.clients)}

    def proxies(self, selections) -> dict[str, np.ndarray]:
        return {c: np.asarray(s[self.cfg.select.method], np.int64) for c, s in selections.items()}

    def train(self, p: int, sel, expert=stages.expert_stage):
        name, dom = self.clients[p]
        return expert(self.cfg, self.m0, dom, self.bench, self.proxies({name: sel})[name],
                      derive_seed(self.cfg.run.seed, p))

    def screen(self, experts, selections):
        return screen_experts(self.m0, self.bench.pool_x, self.bench.pool_y, experts,
                              self.proxies(selections), self.cfg.screen,
                              int(self.cfg.expert.rank), float(self.cfg.expert.alpha))

    def honest_average(self, experts, selections, honest: list[str]) -> float:
        moe = self.strategy.unify(experts, self.strategy.unify_data(
            {c: selections[c] for c in experts}))
        doms = dict(self.clients)
        return float(np.mean([stages.evaluate_stage(moe, doms[c], list(experts),
                                                     references=False)["acc_unified"]
                              for c in honest]))


def attacked(run: Run, attack: str, a: int, v: int) -> tuple[dict, dict]:
    """(experts, selections) with client ``a``'s upload replaced by ``attack``."""
    names = [n for n, _ in run.clients]
    att, vic = names[a], names[v]
    experts, selections = dict(run.experts), dict(run.selections)
    lora, vec, met = experts[att]
    if attack == "scaled_delta":
        experts[att] = (scale_delta(lora, 10.0), vec, met)
    elif attack == "scaled_router":
        experts[att] = (lora, vec * 10.0, met)
    elif attack == "permuted_labels":
        experts[att] = run.train(a, selections[att], permuted_expert)
    elif attack == "copied_router":
        experts[att] = (lora, run.experts[vic][1].copy(), met)
    elif attack == "replay":
        experts[att] = tuple(copy.deepcopy(run.experts[vic]))
    elif attack == "steered_sketch":
        sk = dict(run.sketches)
        sk[att] = run.sketches[vic]
        selections[att] = run.strategy.select(sk)[att]
        experts[att] = run.train(a, selections[att])
    else:
        raise ValueError(f"unknown attack {attack!r}; one of {ATTACKS}")
    return experts, selections


def attack_table(benchmark: str, seed: int, a: int, v: int) -> dict:
    run = Run(benchmark, seed)
    names = [n for n, _ in run.clients]
    honest = [n for i, n in enumerate(names) if i != a]
    stats, rejected, vectors = run.screen(run.experts, run.selections)
    assert not rejected, f"false rejection on the clean run: {rejected}"
    for c, st in stats.items():
        print(f"clean {c}: " + ", ".join(f"{k} {v:.3g}" for k, v in st.items()
                                         if isinstance(v, float)), flush=True)
    clean = run.honest_average({c: (e[0], vectors[c], e[2]) for c, e in run.experts.items()},
                               run.selections, honest)
    out = {}
    print(f"{benchmark} seed {seed}: attacker {names[a]}, victim {names[v]}; honest clients' "
          f"average accuracy (%)\n| attack | clean | attacked | screened | attacker rejected |"
          f"\n|---|---|---|---|---|", flush=True)
    for attack in ATTACKS:
        experts, selections = attacked(run, attack, a, v)
        plain = run.honest_average(experts, selections, honest)
        _, rej, vec = run.screen(experts, selections)
        kept = {c: (e[0], vec[c], e[2]) for c, e in experts.items() if c not in rej}
        screened = run.honest_average(kept, selections, [c for c in honest if c in kept])
        out[attack] = {"clean": round(clean, 4), "attacked": round(plain, 4),
                       "screened": round(screened, 4), "flagged": names[a] in rej,
                       "false_rejections": sorted(c for c in rej if c != names[a]),
                       "reason": rej.get(names[a], "")}
        print(f"| {attack} | {100 * clean:.2f} | {100 * plain:.2f} | {100 * screened:.2f} | "
              f"{'yes' if names[a] in rej else 'NO'} |", flush=True)
    for attack, r in out.items():
        print(f"  {attack}: {r['reason'] or 'not rejected'}")
    return out


def clean_check(benchmarks: list[str], seeds: list[int]) -> dict:
    out = {}
    for b in benchmarks:
        rows, rejections = [], []
        for s in seeds:
            run = Run(b, s)
            stats, rejected, _ = run.screen(run.experts, run.selections)
            rows += list(stats.values())
            rejections += [f"seed {s} {c}: {why}" for c, why in rejected.items()]
            print(f"{b} seed {s}: {len(stats)} clients, {len(rejected)} rejected; "
                  + "; ".join(f"{k} {min(v):.3g}..{max(v):.3g}" for k in STATS
                              if (v := [st[k] for st in stats.values() if k in st])),
                  flush=True)
        ranges = {k: [round(float(np.min(v)), 4), round(float(np.max(v)), 4)]
                  for k in STATS if (v := [r[k] for r in rows if k in r])}
        out[b] = {"clients": len(rows), "false_rejections": rejections, "ranges": ranges}
        print(f"{b}: statistic ranges over {len(rows)} clean uploads {ranges}; "
              f"false rejections {rejections or 'none'}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--benchmark", default="vision")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacker", type=int, default=2, help="partition id of the attacker")
    ap.add_argument("--victim", type=int, default=0, help="whose upload/sketch is copied")
    ap.add_argument("--clean", action="store_true", help="screen clean runs only")
    ap.add_argument("--benchmarks", default="vision,text,vision_k20")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    if args.clean:
        res = clean_check(args.benchmarks.split(","), list(range(args.seeds)))
    else:
        res = attack_table(args.benchmark, args.seed, args.attacker, args.victim)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
