"""Client-side local training of the FL-MoE baselines (FedAvg-MoE, FedAlign-MoE).

One round on a client: router + λ + every expert trained on Dp with the shared loop
(:func:`metamoe.training.train`); FedAlign adds a KL regulariser towards the server's global
routing distribution and uploads whole-set routing statistics (:func:`moe_local_stats`).
Handlers: ``clients/fl_handlers.py``; server side: ``strategies/fedalign.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from metamoe import device
from metamoe.clients.privacy import require_min_count
from metamoe.models.moe import MoEMixin
from metamoe.models.text import token_mean
from metamoe.training import batched_apply, train


def fl_moe_local_train(cfg, moe: MoEMixin, x: torch.Tensor, y: torch.Tensor, rng_seed: int,
                       global_p: np.ndarray | None = None, lambda_g: float = 0.0,
                       dp=None, rnd: int = 1) -> dict:
    """Local epochs on Dp of router + λ + all experts, CE plus (FedAlign) the regulariser
    λ_g Σ_l KL(P̄_l ‖ p̂_l), p̂_l the mean gate distribution of layer l over the batch's real
    tokens (:func:`~metamoe.models.text.token_mean`). ``rnd``: this round (1-based) of
    ``fl.rounds``; it takes its share of the budget's steps."""
    f = cfg.fl
    moe.freeze_base()
    groups = [{"params": moe.expert_parameters(), "lr": f.lr},
              {"params": moe.router_parameters(), "lr": f.router_lr}]
    if moe.lambda_parameters():
        groups.append({"params": moe.lambda_parameters(), "lr": f.lambda_lr})
    use_kl = global_p is not None and lambda_g > 0
    rt = device.current()
    pbar = rt.batch(torch.as_tensor(global_p, dtype=torch.float32).clamp_min(1e-8)) \
        if use_kl else None

    def loss_fn(model, xb, yb):
        if not use_kl:
            return F.cross_entropy(model(xb), yb)
        probs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        handles = model.capture_gates(probs)
        try:
            loss = F.cross_entropy(model(xb), yb)
        finally:
            for h in handles:
                h.remove()
        kl = 0.0
        for l, (pr, mask) in enumerate(probs):
            phat = token_mean(pr, mask).clamp_min(1e-8)
            kl = kl + (pbar[l] * (pbar[l].log() - phat.log())).sum()
        return loss + lambda_g * kl

    return train(moe, x, y, f, params=groups, loss_fn=loss_fn, seed=rng_seed,
                 desc="fl-moe", dp=dp, round_of=(rnd, int(f.rounds)))


@torch.no_grad()
def moe_local_stats(moe: MoEMixin, x: torch.Tensor, descriptor: str = "output",
                    batch_size: int = 256, min_count: int = 1
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Per layer over *all* local tokens (text: the real tokens, padding excluded): p [L, E] =
    mean softmax gate distribution, and the expert descriptors h [L, E, d] = Σ_t g_e(z_t)
    v_e(z_t) / Σ_t g_e(z_t) with v_e the output of expert e ("output"), its LoRA delta over
    M0's FFN ("delta") or its input ("input"). Only these whole-set averages leave the client.

    ``min_count`` (``privacy.min_count``): p is a mean over every sample (refused,
    :class:`~metamoe.clients.privacy.PrivacyError`, when ``len(x) < min_count``). h[l, e] is a
    mean weighted by sample i's gate mass w_i = Σ_{t∈i} g_e(z_t); its support is the
    effective count Σ_i w_i / max_i w_i (the reciprocal of the largest single sample's share;
    n for equal weights). A descriptor below ``min_count`` is withheld: sent as zeros, which
    the server's cosine agreement reads as "no evidence" for that (layer, expert). Returns
    (p, h, number of withheld descriptors)."""
    require_min_count("FedAlign routing statistics p (mean gate distribution over the private "
                      "train split)", len(x), min_count)
    rt = device.current()
    rt.place(moe)
    layers = moe.moe_layers()
    L, E = len(layers), moe.moe_cfg.num_experts
    d = layers[0].fc1.in_features
    num = torch.zeros(L, E, d, dtype=torch.float64, device=rt.device)
    den = torch.zeros(L, E, dtype=torch.float64, device=rt.device)
    top = torch.zeros(L, E, dtype=torch.float64, device=rt.device)  # max_i w_i
    tokens = [0]

    def observer(l):
        def observe(m, z, g, v):  # inside layer l's forward: gate probs g, all experts' outputs v
            mask = m.token_mask  # text: padding is not a token
            if mask is not None:
                g = g * mask.unsqueeze(-1).to(g.dtype)
            if descriptor == "input":
                v = z.unsqueeze(0).expand(E, *z.shape)
            elif descriptor == "delta":
                v = v - m.fc2(m._act(z, m.fc1(z))).unsqueeze(0)  # minus M0's FFN
            num[l] += torch.einsum("bte,ebtd->ed", g.float(), v.float()).double()
            w = g.sum(1).double()  # [B, E] each sample's gate mass on each expert
            den[l] += w.sum(0)
            top[l] = torch.maximum(top[l], w.max(0).values)
            if l == 0:
                tokens[0] += g.shape[0] * g.shape[1] if mask is None else int(mask.sum())
        return observe

    moe.set_forced(None)
    for l, m in enumerate(layers):
        m.observe = observer(l)
    try:
        # Texts grouped by length (the sums do not depend on the order): a batch is trimmed to
        # its longest text, and every expert runs on every position of it.
        batched_apply(moe, moe, x, batch_size)
    finally:
        for m in layers:
            m.observe = None
    p = (den / max(tokens[0], 1)).float().cpu().numpy()
    h = (num / den.clamp_min(1e-12).unsqueeze(-1)).float().cpu().numpy()
    support = (den / top.clamp_min(1e-300)).cpu().numpy()  # effective count per (l, e)
    low = ~(support >= min_count)
    h[low] = 0.0
    return p.astype(np.float32), h.astype(np.float32), int(low.sum())
