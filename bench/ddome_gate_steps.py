"""How far DDOME's gate can learn the domains in the steps the budget rule gives its anchors.

    python -m bench.ddome_gate_steps [--benchmark text] [--experiment ddome_paper]
                                     [--passes-x 1,4,16] [--lr-x 1,20] [--seed 0]

DDOME's anchor clients train the gate (``models.gate.GateMLP`` over M0's pooled features) to
send their own samples to their own expert: CE(gate(x), q). This bench gives that objective
a favourable case: one gate and one optimiser, trained centrally on the anchors' private
train features, each anchor's single-domain batches in turn as that anchor sees them (no
averaging across clients, no normal clients pulling it elsewhere), from the same init
(``nn.Linear``'s default) with the run's optimiser settings: Adam at ``fl.ddome_gate_lr``,
``expert.batch_size``, ``fl.rounds × fl.epochs`` passes (the budget rule's). It reports the
gate's domain accuracy on the domains' validation splits and the spread of its logits, at
the budget (``x1``) and at multiples of the passes and of the learning rate. A gate that
cannot separate the domains here is unlikely to in the federated run. (Shuffling the
anchors' data together into mixed batches is easier still; this bench does not, which is why
it keeps its own loop instead of ``metamoe.training.train``.) Nothing is trained on
validation data. Prints one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    from metamoe.config import resolve_config
    from metamoe.data import client_partition, load_benchmark
    from metamoe.models.gate import GateMLP
    from metamoe.server.seed import get_seed_model
    from metamoe.training import features

    ap = argparse.ArgumentParser(prog="python -m bench.ddome_gate_steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="text")
    ap.add_argument("--experiment", default="ddome_paper")
    ap.add_argument("--passes-x", default="1,4,16")
    ap.add_argument("--lr-x", default="1,20")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = resolve_config({"benchmark": a.benchmark, "method": "ddome",
                          "experiment": a.experiment, "seed": a.seed,
                          "overrides": "benchmark.eval_split=val"})
    bench = load_benchmark(cfg)
    seed_model, _, _ = get_seed_model(cfg, bench)
    n_dom = len(cfg.benchmark.domains)
    train, val = [], []  # anchors: partitions 0..n_dom-1 hold one domain each
    for pid in range(n_dom):
        _, dom = client_partition(cfg, bench, pid)
        train.append(torch.from_numpy(features(seed_model, dom.x_train, "cls")))
        val.append(torch.from_numpy(features(seed_model, dom.x_test, "cls")))  # = val split
    xv = torch.cat(val)
    yv = torch.cat([torch.full((len(v),), q) for q, v in enumerate(val)])
    passes = float(cfg.fl.rounds) * float(cfg.fl.epochs)
    bs, lr0 = int(cfg.expert.batch_size), float(cfg.fl.ddome_gate_lr)
    rows = []
    for px in [float(x) for x in a.passes_x.split(",")]:
        for lx in [float(x) for x in a.lr_x.split(",")]:
            torch.manual_seed(a.seed)
            gate = GateMLP(xv.shape[1], int(cfg.fl.ddome_gate_hidden), n_dom)
            opt = torch.optim.Adam(gate.parameters(), lr=lr0 * lx)
            g = torch.Generator().manual_seed(a.seed)
            steps, todo = 0, passes * px
            while todo > 1e-9:
                frac = min(1.0, todo)
                for q, xq in enumerate(train):
                    perm = torch.randperm(len(xq), generator=g)[:max(1, round(frac * len(xq)))]
                    for b in range(0, len(perm), bs):
                        idx = perm[b:b + bs]
                        loss = F.cross_entropy(gate(xq[idx]), torch.full((len(idx),), q))
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        steps += 1
                todo -= frac
            with torch.no_grad():
                out = gate(xv)
            rows.append({"passes": passes * px, "lr": lr0 * lx,
                         "steps_per_anchor": steps / n_dom,
                         "val_domain_acc": float((out.argmax(1) == yv).float().mean()),
                         "logit_std": float(out.std(0).mean())})
            print(f"passes {passes * px:5.1f}  lr {lr0 * lx:.1e}  steps/anchor "
                  f"{steps / n_dom:6.1f}  gate domain acc on val {rows[-1]['val_domain_acc']:.3f}"
                  f"  logit std {rows[-1]['logit_std']:.3f}")
    print(json.dumps({"benchmark": a.benchmark, "experiment": a.experiment, "seed": a.seed,
                      "n_train": [len(t) for t in train], "batch_size": bs, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
