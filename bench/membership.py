"""Membership inference on the uploaded expert: can its weights tell a client's training samples
from held-out samples of the same domain?

    python -m bench.membership [--benchmark vision] [--client 0] [--seed 0] [--epsilon 8]

For one client of ``--benchmark`` it trains the proxy-aligned expert as the client does
(``clients.stages.expert_stage`` on Dp and ``select.m`` seeded random pool proxies), without DP
and with DP-SGD at the noise multiplier that ``privacy.target_epsilon=--epsilon`` gives this
client (``clients/privacy.py dp_sigmas``), loads each uploaded LoRA onto M0 (what the server
and, after unify, every other client holds) and runs a loss-threshold attack (Yeom et al.
2018): score = -loss of the expert on a sample, members = the client's train split, non-members
= its test split (same distribution, never trained on). It prints, per expert: the attack's ROC
AUC, its TPR at 1 % FPR, the expert's test accuracy on its own domain, and M0's (the no-training
reference: its AUC is the split's own, ~0.5). Last line: one JSON object keyed by variant
(``m0``, ``expert``, ``expert_dp``), each with ``auc``, ``tpr_at_1fpr``, ``test_acc`` and, for
the DP expert, ``epsilon`` (its total, replace-one) and ``noise_multiplier``.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch
import torch.nn.functional as F

from metamoe.clients import stages
from metamoe.clients.privacy import dp_sigmas
from metamoe.config import resolve_config
from metamoe.data import client_partition, load_benchmark
from metamoe.dpsgd import replace_one
from metamoe.models.lora import inject_ffn_lora, load_lora_state_dict
from metamoe.proxy.privacy import gaussian_epsilon
from metamoe.server.seed import get_seed_model
from metamoe.training import accuracy, predict_logits


def per_sample_loss(model, x, y, classes) -> np.ndarray:
    """Cross-entropy of each sample over its domain's classes (the attack's signal)."""
    logits = predict_logits(model, torch.as_tensor(x))
    cls = torch.as_tensor(list(classes))
    target = torch.searchsorted(cls, torch.as_tensor(y))
    return F.cross_entropy(logits[:, cls], target, reduction="none").numpy()


def attack(model, dom) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    member = -per_sample_loss(model, dom.x_train, dom.y_train, dom.classes)
    non = -per_sample_loss(model, dom.x_test, dom.y_test, dom.classes)
    scores = np.concatenate([member, non])
    labels = np.concatenate([np.ones(len(member)), np.zeros(len(non))])
    fpr, tpr, _ = roc_curve(labels, scores)
    return {"auc": float(roc_auc_score(labels, scores)),
            "tpr_at_1fpr": float(np.interp(0.01, fpr, tpr)),
            "test_acc": accuracy(model, dom.x_test, dom.y_test, dom.classes)}


def run(benchmark: str, client: int, seed: int, epsilon: float) -> dict:
    cfg = resolve_config({"benchmark": benchmark, "seed": seed})
    bench = load_benchmark(cfg)
    m0, _, _ = get_seed_model(cfg, bench)
    name, dom = client_partition(cfg, bench, client)
    rng = np.random.default_rng(seed)
    proxies = np.sort(rng.choice(len(bench.pool_y), int(cfg.select.m), replace=False))
    out = {"client": name, "m0": attack(m0, dom)}
    dp_cfg = resolve_config({"benchmark": benchmark, "seed": seed,
                             "overrides": f"privacy.target_epsilon={epsilon}"})
    z = dp_sigmas(dp_cfg, len(dom.x_train))["expert"]
    for key, c in (("expert", cfg), ("expert_dp", dp_cfg)):
        lora, _, metrics = stages.expert_stage(c, copy.deepcopy(m0), dom, bench, proxies,
                                               seed * 1000 + client)
        ex = inject_ffn_lora(copy.deepcopy(m0), int(c.expert.rank), float(c.expert.alpha))
        load_lora_state_dict(ex, {k: torch.from_numpy(v) for k, v in lora.items()})
        out[key] = attack(ex, dom)
        if key == "expert_dp":
            # the expert's share of the client's total, plus the sketch and router vectors that
            # privacy.target_epsilon noises with the same z
            eps = replace_one(metrics["expert_dp_epsilon"], metrics["expert_dp_delta"])[0] + \
                2 * gaussian_epsilon(z, 1.0, 1e-5)
            out[key].update(epsilon=float(eps), noise_multiplier=float(z),
                            expert_dp_epsilon=float(metrics["expert_dp_epsilon"]))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark", default="vision")
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epsilon", type=float, default=8.0)
    a = ap.parse_args(argv)
    res = run(a.benchmark, a.client, a.seed, a.epsilon)
    print(f"{a.benchmark}, client {res['client']}, seed {a.seed}: loss-threshold attack "
          "(members = its train split, non-members = its test split)")
    print(f"{'model':>12} {'AUC':>6} {'TPR@1%FPR':>10} {'test acc':>9}")
    for k in ("m0", "expert", "expert_dp"):
        r = res[k]
        extra = f"  (total ε {r['epsilon']:.2f}, z {r['noise_multiplier']:.3f})" \
            if "epsilon" in r else ""
        print(f"{k:>12} {r['auc']:6.3f} {r['tpr_at_1fpr']:10.3f} {r['test_acc']:9.3f}{extra}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
