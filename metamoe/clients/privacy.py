"""Client-side privacy: the ``privacy.min_count`` floor on every upload, and differential
privacy for the router vectors (optional; off by default).

**No aggregate of fewer than ``privacy.min_count`` private samples leaves a client.** Every
mean, sum, count or metric a client uploads is computed over its private data (train split
Dp or test split); before it is uploaded the client checks how many private samples it covers
(:func:`require_min_count`) and raises :class:`PrivacyError` (naming the artifact, the count and
``privacy.min_count``) when it would be fewer. Flower turns the exception into an error reply;
the server records the client as rejected ("client error: ...") and goes on without it. What
counts:

* an unweighted mean/sum over m private samples (accuracies, losses, coverage, DDOME's summed
  gate scores, the logistic sketch's positives, a trained expert's data): m;
* a weighted mean ``Σ_i w_i c_i / Σ_i w_i`` (router vectors over the tokens of text samples,
  FedAlign's gate-weighted descriptors h): :func:`effective_count` ``Σ w / max w``, the
  reciprocal of the largest single sample's share. It equals m for m equal weights (and for
  0/1 weights), and ``>= min_count`` means no sample moves the mean more than one of
  ``min_count`` equal samples would;
* public samples (the proxies in ``expert.router_data=union``) do not count: the server chose
  them and can subtract their contribution;
* the centroid sketch merges cells below the floor into their nearest cell
  (``proxy.sketch.merge_small_cells``), so every uploaded cell count is ``>= min_count`` (with
  ``sketch.dp_sigma > 0`` the merge runs on the noisy counts, as post-processing of the DP
  release).

The floor bounds one sample's share of each upload; it is no DP guarantee (it says nothing
about differences between uploads, or about what trained weights memorise).

**Router-vector DP** (``privacy.router_dp_*``). The router vectors
(``models.lora.ffn_input_means``) are, per FFN layer ``l``, the mean FFN input over all tokens
of all ``N`` samples the client routes on (``expert.router_data``: Dp ∪ proxies, or Dp alone).
With DP the release is the mean of per-sample contributions

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

__all__ = ["PrivacyError", "effective_count", "require_min_count", "sample_token_counts",
           "per_sample_ffn_means", "dp_mean", "private_router_vectors"]


class PrivacyError(RuntimeError):
    """A client refuses an upload that would aggregate fewer than ``privacy.min_count`` private
    samples. The message names the artifact, the count and the floor; the server sees it as the
    error reply's reason."""


def effective_count(weights) -> float:
    """How many private samples a weighted mean over ``weights`` (one per sample, >= 0)
    effectively covers: ``Σ w / max w`` (0 for no weight). m equal weights give m."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        return 0.0
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError("sample weights must be finite and >= 0")
    top = float(w.max())
    return float(w.sum() / top) if top > 0 else 0.0


def require_min_count(artifact: str, count: float, min_count: int,
                      what: str = "private samples") -> None:
    """:class:`PrivacyError` unless ``count >= min_count`` (``privacy.min_count``)."""
    if not count >= min_count:
        shown = f"{count:.1f}" if float(count) != int(count) else str(int(count))
        raise PrivacyError(
            f"privacy: refusing to upload {artifact}: it would aggregate {shown} {what}, fewer "
            f"than privacy.min_count={int(min_count)}")


def sample_token_counts(model: nn.Module, x) -> np.ndarray:
    """Real tokens per sample of ``x`` for ``model`` (token ids != ``model.cfg.pad_id``), the
    weight each sample has in a mean over all tokens; 1 per sample for images."""
    pad = getattr(getattr(model, "cfg", None), "pad_id", None)
    n = len(x)
    if pad is None or not isinstance(x, (np.ndarray, torch.Tensor)) or x.ndim != 2:
        return np.ones(n)
    a = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer):
        return np.ones(n)
    return (a != int(pad)).sum(1).astype(np.float64)


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


def dp_sigmas(cfg, n_private: int, fl: bool = False) -> dict[str, float]:
    """The noise multipliers z of this client's mechanisms: ``sketch``, ``router`` and
    ``expert`` (DP-SGD), 0 = off. As configured (``sketch.dp_sigma``,
    ``privacy.router_dp_sigma``, ``privacy.expert_dp_sigma``), or, with
    ``privacy.target_epsilon`` > 0, one z for all three, the smallest that keeps the client's
    total (replace-one, basic composition: ``metamoe/dpsgd.py``) at or below the target for
    its own |Dp| (plus ``select.m`` proxies in the expert's training set). ``fl``: the FL
    baselines, whose only upload from Dp is every round's update (``fl.rounds`` x DP-SGD)."""
    pc = cfg.privacy
    target = float(pc.target_epsilon)
    if target <= 0:
        return {"sketch": float(cfg.sketch.dp_sigma), "router": float(pc.router_dp_sigma),
                "expert": float(pc.expert_dp_sigma)}
    from metamoe.dpsgd import dpsgd_epsilon, replace_one
    from metamoe.proxy.privacy import gaussian_epsilon
    from metamoe.training import budget_steps

    sect = cfg.fl if fl else cfg.expert
    n = int(n_private) + (0 if fl or not cfg.expert.use_proxies else int(cfg.select.m))
    q = min(1.0, sect.batch_size / n)
    # every step of the run: fl.rounds rounds of fl.epochs passes (fractional when the
    # rounds outnumber expert.epochs) or expert.epochs passes, as training.train takes them
    steps = budget_steps(float(sect.epochs), int(cfg.fl.rounds) if fl else 1, n,
                         int(sect.batch_size))
    delta = float(pc.expert_dp_delta)

    def total(z: float) -> float:
        e = replace_one(dpsgd_epsilon(z, q, steps, delta), delta)[0]
        if not fl:  # sketch and router vectors: Gaussian mechanisms, ε depends on z and δ only
            e += gaussian_epsilon(z, 1.0, float(cfg.sketch.dp_delta))
            e += gaussian_epsilon(z, 1.0, float(pc.router_dp_delta))
        return e

    lo, hi = 0.2, 200.0
    if total(hi) > target:
        raise ValueError(f"privacy.target_epsilon={target} is below what z={hi} reaches here")
    for _ in range(50):  # bisection: total(z) decreases in z
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if total(mid) > target else (lo, mid)
    return {"sketch": 0.0 if fl else hi, "router": 0.0 if fl else hi, "expert": hi}


def expert_dp(cfg, z: float):
    """The DP-SGD settings (:class:`metamoe.dpsgd.DPSGD`) of this client's local training at
    noise multiplier ``z`` (``dp_sigmas(...)["expert"]``), or None when ``z`` is 0. The same
    settings apply to every method's local training: the one-shot expert and each FL round
    (FedAvg, FedAvg-MoE, FedAlign-MoE)."""
    from metamoe.dpsgd import DPSGD

    if z <= 0:
        return None
    pc = cfg.privacy
    return DPSGD(z, float(pc.expert_dp_clip), float(pc.expert_dp_delta))


def round_dp_metrics(dp, hist: dict) -> dict[str, float]:
    """What an FL client reports of its DP-SGD after a round (``hist``: that round's
    ``training.train`` result; the client trains in every round): ε of all its rounds so far
    (add/remove, Opacus' RDP accountant) over ``steps_so_far``, the steps of rounds 1..r
    (rounds may differ by one step), and δ. Both are functions of public settings only."""
    from metamoe.dpsgd import dpsgd_epsilon

    return {"dp_epsilon": dpsgd_epsilon(dp.noise_multiplier, hist["dp_sample_rate"],
                                        int(hist["steps_so_far"]), dp.delta), "dp_delta": dp.delta}
