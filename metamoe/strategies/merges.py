"""Server-side merges of the one-shot baselines: Model Soup's merged delta, M0 as a one-expert
MoE, and BTX's load-balancing loss (specs: docs/baselines.md)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from metamoe.models.lora import is_lora_key, lora_shapes
from metamoe.models.moe import MoEConfig, MoEMixin, build_moe
from metamoe.models.text import token_mean

BTX_LB_ALPHA = 0.01  # BTX's load-balancing weight (Sukhbaatar et al. 2024, §3)


def soup_lora(loras: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Uniform soup of K LoRA experts as ONE LoRA of rank K·r (use alpha·K to keep α/r):
    Σ_i B_i A_i / K == (concat_i B_i / K) @ (stack_i A_i)."""
    if not loras:
        raise ValueError("model soup of zero experts")
    k = len(loras)
    out = {}
    for key in loras[0]:
        if is_lora_key(key, "lora_A"):
            out[key] = np.concatenate([lo[key] for lo in loras], axis=0)
        elif is_lora_key(key, "lora_B"):
            out[key] = np.concatenate([lo[key] for lo in loras], axis=1) / k
        else:
            raise KeyError(f"unexpected LoRA key {key!r}")
    return {k_: v.astype(np.float32) for k_, v in out.items()}


def build_soup(seed, loras: list[dict[str, np.ndarray]], rank: int, alpha: float) -> MoEMixin:
    k = len(loras)
    cfg = MoEConfig(num_experts=1, rank=rank * k, alpha=alpha * k, top_k=1, context="none",
                    expert_names=["soup"])
    merged = {key: torch.from_numpy(v) for key, v in soup_lora(loras).items()}
    return build_moe(seed, cfg, [merged], None)


def build_m0(seed, rank: int, alpha: float) -> MoEMixin:
    """M0 as a one-expert MoE whose expert has zero LoRA (so it computes exactly M0)."""
    mc = seed.cfg
    zero = {k: torch.zeros(s) for k, s in lora_shapes(mc.depth, mc.dim, mc.mlp_hidden,
                                                      rank).items()}
    cfg = MoEConfig(num_experts=1, rank=rank, alpha=alpha, top_k=1, context="none",
                    expert_names=["M0"])
    return build_moe(seed, cfg, [zero], None)


def load_balancing_loss(alpha: float) -> tuple[Callable, Callable[[MoEMixin], list]]:
    """BTX/Switch load balancing: per layer α·N·Σ_i u_i p_i with u_i the batch mean of the
    (top-k) gate value of expert i and p_i the batch mean of its softmax probability, both
    over the batch's real tokens (text: padding excluded).

    Returns (loss_fn for :func:`train`, installer(model) -> hook handles)."""
    # (gate probabilities [B, T, N], token mask) per layer, taken inside the forward, where the
    # layer's token mask is set (its per-sample context mean excludes padding too)
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def install(model: MoEMixin) -> list:
        return model.capture_gates(captured, routed_training_only=True)

    def loss_fn(model: MoEMixin, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        captured.clear()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        layers = model.moe_layers()
        lb = loss.new_zeros(())
        for layer, (probs, mask) in zip(layers, captured, strict=False):
            topv, topi = probs.topk(layer.cfg.top_k, dim=-1)
            if layer.cfg.renormalize:
                topv = topv / topv.sum(-1, keepdim=True)
            gates = torch.zeros_like(probs).scatter(-1, topi, topv)
            n = probs.shape[-1]
            lb = lb + alpha * n * (token_mean(gates, mask) * token_mean(probs, mask)).sum()
        captured.clear()
        return loss + lb
    return loss_fn, install
