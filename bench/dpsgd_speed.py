"""Per-sample gradients for DP-SGD on the text seed: one pass with LoRA hooks vs vmap vs one
backward per sample, on one batch of the text benchmark's shape (MiniLM, LoRA r = 8 on every
FFN, 32 texts of 8-63 real tokens, padded to 64). Prints the median seconds per batch of each
way and the ratios, measured in one run; last line one JSON object.

    python -m bench.dpsgd_speed [--batch 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metamoe.dpsgd import lora_per_sample_grads, per_sample_grads, vmap_per_sample_grads
from metamoe.models.lora import inject_ffn_lora
from metamoe.models.text import TextClassifier, TextConfig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dpsgd_speed")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = inject_ffn_lora(TextClassifier(TextConfig(max_len=64, num_classes=20)), 8, 16.0)
    model.train()
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.01)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 5000, (a.batch, 64), generator=g)
    for i, n in enumerate(torch.randint(8, 64, (a.batch,), generator=g).tolist()):
        x[i, n:] = model.cfg.pad_id
    y = torch.randint(0, 20, (a.batch,), generator=g)

    ways = {"hooks": lambda: lora_per_sample_grads(model, params, x, y),
            "vmap": lambda: vmap_per_sample_grads(model, params, x, y),
            "loop": lambda: _loop(model, params, x, y)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(a.repeats):  # interleaved, so a busy machine slows every way alike
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    sec = {name: sorted(t)[len(t) // 2] for name, t in times.items()}  # median
    for name, t in sec.items():
        print(f"{name:6s} {t:.3f} s per batch of {a.batch} (median of {a.repeats})", flush=True)
    out = {"seconds": sec, "vmap_over_hooks": sec["vmap"] / sec["hooks"],
           "loop_over_hooks": sec["loop"] / sec["hooks"], "batch": a.batch,
           "threads": torch.get_num_threads()}
    print(json.dumps(out))
    return 0


def _loop(model, params, x, y):
    from metamoe.training import cross_entropy_loss
    return per_sample_grads(model, params, cross_entropy_loss, x, y, vectorised=False)


if __name__ == "__main__":
    raise SystemExit(main())
