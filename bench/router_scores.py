"""Where a unified MoE routes each client's test tokens: trained router vs its initialisation.

    python -m bench.router_scores <run_dir> [<run_dir> ...]

For a finished MetaMoE-family run (its ``moe.safetensors`` and ``checkpoints/expert.npz``, the
experts and router vectors as uploaded), it evaluates the unified MoE on every client's test
split three ways and prints the accuracy and the share of that client's tokens (all layers,
top-1) routed to each expert:

* ``trained``: the router as the server's fine-tuning left it (what the run reported);
* ``init/dot``: the router rows reset to the clients' router vectors e_p^(l), scored by the
  paper's dot product z̃ · e_p;
* ``init/euclidean``: the same rows scored by -½‖z̃ - e_p‖² (``unify.router_score=euclidean``).

It first prints, per layer, the norm of each client's router vector and the range of the cosines
between two clients' vectors.

The experts, λ and everything else stay as trained. The difference between ``trained`` and
``init/<the run's score>`` is what the router's fine-tuning did; the difference between the two
``init`` rows is what the score does to the same vectors. Last line: one JSON object keyed by run
directory. The run's benchmark is rebuilt from the config recorded in its metrics.json; the
MoE file carries every weight the evaluation needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from metamoe.clients.stages import evaluate_stage
from metamoe.data import client_names, client_partition, load_benchmark
from metamoe.models.io import load_moe
from metamoe.strategies.base import unpack


def _set_router(moe, rows: list[torch.Tensor], score: str) -> None:
    for layer, r in zip(moe.moe_layers(), rows):
        layer.router.data.copy_(r)
        layer.cfg = dataclasses.replace(layer.cfg, router_score=score)


def run(run_dir: str) -> dict:
    d = Path(run_dir)
    metrics = json.loads((d / "metrics.json").read_text())
    cfg = OmegaConf.create(metrics["config"])
    bench = load_benchmark(cfg)
    moe = load_moe(d)
    names = list(moe.moe_cfg.expert_names)
    with np.load(d / "checkpoints" / "expert.npz") as z:
        uploads = unpack({k: z[k] for k in z.files})
    vectors = torch.stack([torch.from_numpy(uploads[n]["__router__"]) for n in names], 1)  # [L, K, d]
    trained = [layer.router.detach().clone() for layer in moe.moe_layers()]
    run_score = moe.moe_cfg.router_score
    variants = {"trained": (trained, run_score), "init/dot": (list(vectors), "dot"),
                "init/euclidean": (list(vectors), "euclidean")}
    # The uploaded vectors per layer: their norms and the smallest / largest cosine between
    # two clients' vectors (a large shared component makes the dot product favour the longest).
    norms = vectors.norm(dim=-1)  # [L, K]
    unit = vectors / norms[..., None]
    cos = unit @ unit.transpose(1, 2)
    pairs = torch.triu_indices(len(names), len(names), 1)
    cos = cos[:, pairs[0], pairs[1]]  # [L, K(K-1)/2]
    out: dict = {"router_score": run_score, "vector_norms": norms.tolist(),
                 "vector_cos_min": cos.min(1).values.tolist(),
                 "vector_cos_max": cos.max(1).values.tolist()}
    print(f"{d}: router_score = {run_score}, λ = "
          + ", ".join(f"{v:.3f}" for v in moe.lambdas()))
    for l in range(len(norms)):
        print(f"  layer {l}: |e_p| " + " ".join(f"{n} {v:.2f}" for n, v in zip(names, norms[l]))
              + f"; cos between clients' vectors {cos[l].min():.3f}..{cos[l].max():.3f}")
    print(f"{'variant':>15} {'client':>12} {'acc':>7}  " + " ".join(f"{n:>12}" for n in names))
    for label, (rows, score) in variants.items():
        _set_router(moe, rows, score)
        res = {}
        for pid, client in enumerate(client_names(cfg)):
            _, dom = client_partition(cfg, bench, pid)
            ev = evaluate_stage(moe, dom, names, references=False)
            share = {n: ev[f"route_share/{n}"] for n in names}
            res[client] = {"acc": ev["acc_unified"], "route_share": share}
            print(f"{label:>15} {client:>12} {ev['acc_unified']:>7.4f}  "
                  + " ".join(f"{share[n]:>12.3f}" for n in names))
        res["average"] = float(np.mean([v["acc"] for v in res.values()]))
        print(f"{label:>15} {'average':>12} {res['average']:>7.4f}")
        out[label] = res
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", help="finished MetaMoE run directories")
    a = ap.parse_args(argv)
    out = {r: run(r) for r in a.run_dirs}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
