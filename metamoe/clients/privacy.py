"""Differential privacy for the router vectors a client uploads (optional; off by default).

The router vectors (``models.lora.ffn_input_means``) are, per FFN layer ``l``, the mean FFN
input over all tokens of all ``N`` samples the client routes on (``expert.router_data``:
Dp ∪ proxies, or Dp alone). With DP the release is the mean of per-sample contributions

    c_i = [ (1/T_i) Σ_t z^(l)_{i,t} ]_{l=1..L}        (one vector of size L·d per sample)
    v   = (1/N) Σ_i c_i,

``T_i`` the sample's number of real (non-padding) tokens. For images every ``T_i`` is the same
and ``v`` equals the non-private router vectors; for padded text the non-private vectors weight
each sample by ``T_i``, the DP release weights every sample equally (that is what bounds one
sample's influence).

**Gaussian mechanism** (:func:`dp_mean`): each ``c_i`` (all layers together) is clipped to L2 norm
``C``, the clipped mean is released with i.i.d. noise ``N(0, (z·Δ)²)`` per coordinate.

**Neighbouring datasets: replace-one** (bounded DP): D and D' have the same size ``N`` and
differ in one private sample. ``N`` is public (the client reports ``n_train``), so the L2
sensitivity of the clipped mean is ``Δ = 2C/N``. (Add/remove-one would change ``N`` itself; it
is not used, the sketch's accounting in ``proxy.sketch`` uses replace-one as well.) Public
proxies in the union are clipped the same way; they only enlarge ``N``.

ε is computed with the analytic Gaussian mechanism (Balle & Wang 2018,
:func:`metamoe.proxy.privacy.gaussian_epsilon`) for the configured δ; with noise std ``z·Δ`` it
depends on ``z`` and δ only (z=1, δ=1e-5 → ε≈4.38).

**Scope of the guarantee.** The per-sample features are computed through the client's trained
expert (M0 + LoRA), and that LoRA is uploaded *without* DP (no DP-SGD). The (ε, δ) therefore
bounds what the router-vector release adds on top of the released expert (adaptive composition
with a non-private mechanism): it is a guarantee for the router vectors, not for the client's
whole upload. The sketch has its own, independent guarantee (``sketch.dp_*``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from metamoe import device
from metamoe.models.text import masked_mean
from metamoe.proxy.privacy import gaussian_epsilon

__all__ = ["per_sample_ffn_means", "dp_mean", "private_router_vectors"]


@torch.no_grad()
def per_sample_ffn_means(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Per-sample contributions ``c_i`` [N, L, d]: each sample's mean FFN input per layer, over
    its real tokens (padding excluded, as in ``ffn_input_means``).

    Computed and used on the client only (for clipping); never uploaded. When every sample has
    the same number of tokens (images) their mean equals ``ffn_input_means(model, x)``; for
    padded text, ``ffn_input_means`` is their average weighted by each sample's token count.
    """
    rt = device.current()
    rt.place(model)
    layers = model.ffn_layers()
    cur: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(i):
        def hook(module, inputs):
            z = inputs[0].detach().float()
            z = z.reshape(z.shape[0], -1, z.shape[-1])
            mask = getattr(module, "token_mask", None)  # text: padding is not a token
            cur[i] = z.mean(1) if mask is None else masked_mean(z, mask.reshape(z.shape[:2]))
        return hook

    handles = [ffn.register_forward_pre_hook(make_hook(i)) for i, ffn in enumerate(layers)]
    out = []
    try:
        model.eval()
        for s in range(0, len(x), batch_size):
            with rt.autocast():
                model(rt.batch(x[s:s + batch_size]))
            out.append(torch.stack(cur, dim=1).cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def dp_mean(contrib: np.ndarray, clip: float, noise_multiplier: float, delta: float,
            seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """Gaussian mechanism on the mean of per-sample contributions ``contrib`` [N, ...].

    Each row (flattened) is clipped to L2 norm ``clip``; noise std ``noise_multiplier * Δ`` with
    ``Δ = 2·clip/N`` (replace-one). Returns (noisy mean with the trailing shape, accounting).
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy.router_dp_clip must be finite and > 0, got {clip}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"privacy.router_dp_sigma must be finite and > 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"privacy.router_dp_delta must be in (0, 1), got {delta}")
    n = len(contrib)
    if n == 0:
        raise ValueError("no samples to average")
    flat = np.asarray(contrib, dtype=np.float64).reshape(n, -1)
    norms = np.linalg.norm(flat, axis=1)
    clipped = flat * np.minimum(1.0, clip / np.maximum(norms, 1e-30))[:, None]
    sensitivity = 2.0 * clip / n
    std = noise_multiplier * sensitivity
    rng = np.random.default_rng(seed)
    noisy = clipped.mean(0) + rng.normal(0.0, std, size=flat.shape[1])
    info = {"router_dp_epsilon": float(gaussian_epsilon(std, sensitivity, delta)),
            "router_dp_delta": float(delta), "router_dp_noise_std": float(std),
            "router_dp_sensitivity": float(sensitivity),
            "router_dp_clipped_frac": float(np.mean(norms > clip))}
    return noisy.reshape(np.shape(contrib)[1:]).astype(np.float32), info


def private_router_vectors(model: nn.Module, x: torch.Tensor, clip: float,
                           noise_multiplier: float, delta: float, seed: int
                           ) -> tuple[np.ndarray, dict[str, float]]:
    """DP router vectors [L, d] of ``model`` on ``x`` (see the module docstring)."""
    contrib = per_sample_ffn_means(model, x).numpy()
    return dp_mean(contrib, clip, noise_multiplier, delta, seed)
