"""DP-SGD for the one training loop (``privacy.expert_dp_*``), and its privacy accounting.

:class:`DPSGD` turns a step of :func:`metamoe.training.train` into DP-SGD (Abadi et al. 2016,
as Opacus implements it): each step's batch is a Poisson sample of the training set (every
item with probability q = batch_size / N, from the loop's seeded generator; an empty sample is a
noise-only step), every sample's gradient of the trainable parameters is clipped to L2 norm
``clip``, the clipped gradients are summed, Gaussian noise of std ``noise_multiplier · clip``
is added to the sum, and the result is divided by the expected batch size qN. Per-sample
gradients come from ``torch.func`` (``vmap`` of ``grad`` over the batch) for the plain
cross-entropy loss — a model with ``trim_inputs`` (the text seed: each batch trimmed to its
longest text) trims the batch before vmap — and otherwise, or when the model cannot be vmapped
(e.g. the causal seed's left padding), from one backward pass per sample (the reference; tests
check that the two agree).

Accounting: :func:`dpsgd_epsilon` is Opacus' RDP accountant for the Poisson-subsampled Gaussian
mechanism over ``steps`` steps (add/remove-one adjacency), converted to (ε, δ). The project's
other mechanisms (sketch, router vectors) are calibrated for replace-one adjacency; a
replace-one neighbour is one removal and one addition, so an add/remove (ε, δ) mechanism is
(2ε, (1 + e^ε) δ) under replace-one (group privacy), and :func:`compose` adds the mechanisms'
replace-one (ε, δ) (basic composition: valid whatever each mechanism is, loose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DPSGD:
    noise_multiplier: float  # z: noise std = z * clip on the clipped per-sample gradient sum
    clip: float  # C: L2 bound of one sample's gradient (all trainable parameters together)
    delta: float = 1e-5

    def __post_init__(self):
        if self.noise_multiplier <= 0 or self.clip <= 0 or not 0 < self.delta < 1:
            raise ValueError(f"DP-SGD needs noise_multiplier > 0, clip > 0, 0 < delta < 1; got "
                             f"{self.noise_multiplier}, {self.clip}, {self.delta}")


def per_sample_grads(model: nn.Module, params: dict[str, nn.Parameter], loss_fn, xb, yb,
                     vectorised: bool = True) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]} gradients of each sample's loss w.r.t. ``params``."""
    if vectorised:
        from torch.func import functional_call, grad, vmap

        trim = getattr(model, "trim_inputs", None)
        if trim is not None:  # a length inside vmap would be data-dependent
            xb = trim(xb)
        frozen = {k: v for k, v in model.named_parameters() if k not in params}
        buffers = dict(model.named_buffers())

        def one(p, x, y):
            out = functional_call(model, ({**frozen, **p}, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        detached = {k: v.detach() for k, v in params.items()}
        return vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(detached, xb, yb)
    out = {k: [] for k in params}
    for i in range(len(yb)):
        model.zero_grad(set_to_none=True)
        loss_fn(model, xb[i:i + 1], yb[i:i + 1]).backward()
        for k, p in params.items():
            out[k].append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return {k: torch.stack(v) for k, v in out.items()}


def noisy_gradients(model: nn.Module, params: dict[str, nn.Parameter], loss_fn, xb, yb,
                    dp: DPSGD, expected_batch: float, gen: torch.Generator,
                    vectorised: bool) -> None:
    """Set ``p.grad`` of every parameter in ``params`` to the DP-SGD gradient of this batch
    (``len(yb)`` may be 0: noise only)."""
    if len(yb):
        if vectorised and not getattr(model, "_dp_loop", False):
            try:
                g = per_sample_grads(model, params, loss_fn, xb, yb, True)
            except RuntimeError:  # e.g. a data-dependent shape (text batches trimmed to length)
                model._dp_loop = True
        if not vectorised or getattr(model, "_dp_loop", False):
            g = per_sample_grads(model, params, loss_fn, xb, yb, False)
        norms = torch.sqrt(sum(v.flatten(1).float().pow(2).sum(1) for v in g.values()))
        factor = (dp.clip / (norms + 1e-6)).clamp(max=1.0)
    for k, p in params.items():
        total = torch.einsum("b,b...->...", factor, g[k].float()) if len(yb) else \
            torch.zeros_like(p, dtype=torch.float32)
        noise = torch.normal(0.0, dp.noise_multiplier * dp.clip, size=p.shape, generator=gen)
        p.grad = ((total + noise.to(total.device)) / expected_batch).to(p.dtype)


def dpsgd_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """(ε at ``delta``) of ``steps`` Poisson-subsampled Gaussian steps, add/remove adjacency
    (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta)))


def replace_one(epsilon: float, delta: float) -> tuple[float, float]:
    """An add/remove (ε, δ) guarantee restated for replace-one adjacency (group of 2)."""
    return 2.0 * epsilon, (1.0 + math.exp(min(epsilon, 700.0))) * delta


def compose(parts: list[tuple[float, float]]) -> tuple[float, float]:
    """Basic composition of replace-one (ε, δ) guarantees."""
    return float(sum(e for e, _ in parts)), float(sum(d for _, d in parts))
