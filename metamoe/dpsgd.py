"""DP-SGD for the one training loop (``privacy.expert_dp_*``), and its privacy accounting.

:class:`DPSGD` turns a step of :func:`metamoe.training.train` into DP-SGD (Abadi et al. 2016,
as Opacus implements it): each step's batch is a Poisson sample of the training set (every
item with probability q = batch_size / N, from the loop's seeded generator; an empty sample is a
noise-only step), every sample's gradient of the trainable parameters is clipped to L2 norm
``clip``, the clipped gradients are summed, Gaussian noise of std ``noise_multiplier · clip``
is added to the sum, and the result is divided by the expected batch size qN. Per-sample
gradients of the plain cross-entropy loss come, when the trained parameters are LoRA factors
(every expert), from one forward and backward pass with hooks on the LoRA layers
(:func:`lora_per_sample_grads`, Opacus' method for linear layers); for other parameters (the
FL-MoE's router and λ) from ``torch.func`` (``vmap`` of ``grad`` over the batch; a model with
``trim_inputs``, the text seed, trims the batch to its longest text before vmap); otherwise,
or when the model cannot be vmapped (e.g. the causal seed's left padding), from one backward
pass per sample (the reference; tests check that all three agree).

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


def lora_per_sample_grads(model: nn.Module, params: dict[str, nn.Parameter], xb, yb,
                          losses: list | None = None) -> dict[str, torch.Tensor] | None:
    """Per-sample cross-entropy gradients of LoRA factors from ONE forward and backward pass
    over the batch (as Opacus' grad samplers do for linear layers), or ``None`` when
    ``params`` are not all ``lora_A``/``lora_B`` of :class:`~metamoe.models.lora.LoRALinear`
    modules. A LoRA term is o = s · x Aᵀ Bᵀ; with h = x Aᵀ and g = ∂L/∂o for sample b's tokens t:
    ∂L_b/∂B = s Σ_t g_tᵀ h_t and ∂L_b/∂A = s Σ_t (g_t B)ᵀ x_t. Exact when samples do not
    interact in the forward pass (no batch statistics: true of the ViT and text seeds);
    tested equal to one backward pass per sample. Texts go in chunks of similar length
    (:func:`_length_chunks`). ``losses``: the batch's summed loss is appended to it."""
    from metamoe.models.lora import LoRALinear

    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)
            and (f"{n}.lora_A" in params or f"{n}.lora_B" in params)}
    if not mods or set(params) - {f"{n}.{f}" for n in mods for f in ("lora_A", "lora_B")}:
        return None
    acc = {k: torch.zeros((len(yb), *p.shape), dtype=torch.float32, device=p.device)
           for k, p in params.items()}
    total = 0.0
    for rows in _length_chunks(model, xb):
        total += _lora_chunk(model, mods, acc, rows, xb[rows], yb[rows])
    out = {k: v.to(params[k].dtype) for k, v in acc.items()}
    if losses is not None:
        losses.append(total)
    return out


def _length_chunks(model: nn.Module, xb, size: int = 8) -> list[torch.Tensor]:
    """Rows of the batch in chunks: for token ids of a model that trims its inputs (the text
    seed), chunks of ``size`` texts of similar length, each then trimmed to its own longest
    (per-sample gradients do not depend on the chunking; the padding FLOPs do); else one."""
    rows = torch.arange(len(xb), device=xb.device)
    if getattr(model, "trim_inputs", None) is None or xb.ndim != 2 or xb.is_floating_point():
        return [rows]
    lengths = (xb != model.cfg.pad_id).sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    return list(order.split(size))


def _lora_chunk(model, mods, acc, rows, xb, yb) -> float:
    """Add the per-sample LoRA gradients of ``xb`` (rows ``rows`` of the batch) to ``acc``;
    returns the chunk's summed loss."""
    b = len(yb)

    def hook(name: str):
        def forward(mod, inputs, out):
            x = inputs[0].detach().float().reshape(b, -1, mod.lora_A.shape[1])  # [B, T, in]
            h = x @ mod.lora_A.detach().float().t()  # [B, T, r]

            def backward(g):
                g = g.detach().float().reshape(b, -1, g.shape[-1]) * mod.scale  # [B, T, out]
                if f"{name}.lora_B" in acc:
                    acc[f"{name}.lora_B"][rows] += torch.einsum("bto,btr->bor", g, h)
                if f"{name}.lora_A" in acc:
                    gh = g @ mod.lora_B.detach().float()  # [B, T, r]
                    acc[f"{name}.lora_A"][rows] += torch.einsum("btr,bti->bri", gh, x)
            out.register_hook(backward)
        return forward

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        loss = F.cross_entropy(model(xb), yb, reduction="sum")  # sample b's loss: L_b
        leaves = [p for n, m in mods.items() for p in (m.lora_A, m.lora_B) if p.requires_grad]
        torch.autograd.grad(loss, leaves, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return float(loss.detach())


def vmap_per_sample_grads(model: nn.Module, params: dict[str, nn.Parameter], xb, yb
                          ) -> dict[str, torch.Tensor]:
    """Per-sample cross-entropy gradients of any ``params`` by ``torch.func`` (``vmap`` of
    ``grad`` over the batch); a model with ``trim_inputs`` (the text seed) gets the batch
    trimmed to its longest text first."""
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


def per_sample_grads(model: nn.Module, params: dict[str, nn.Parameter], loss_fn, xb, yb,
                     vectorised: bool = True, losses: list | None = None
                     ) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]} gradients of each sample's loss w.r.t. ``params``: for the plain
    cross-entropy (``vectorised``) from one pass when ``params`` are LoRA factors
    (:func:`lora_per_sample_grads`), else by ``vmap``; otherwise one backward per sample."""
    if vectorised:
        fast = lora_per_sample_grads(model, params, xb, yb, losses)
        if fast is not None:
            return fast
        return vmap_per_sample_grads(model, params, xb, yb)
    out = {k: [] for k in params}
    for i in range(len(yb)):
        model.zero_grad(set_to_none=True)
        loss_fn(model, xb[i:i + 1], yb[i:i + 1]).backward()
        for k, p in params.items():
            out[k].append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return {k: torch.stack(v) for k, v in out.items()}


def noisy_gradients(model: nn.Module, params: dict[str, nn.Parameter], loss_fn, xb, yb,
                    dp: DPSGD, expected_batch: float, gen: torch.Generator,
                    vectorised: bool) -> float | None:
    """Set ``p.grad`` of every parameter in ``params`` to the DP-SGD gradient of this batch
    (``len(yb)`` may be 0: noise only). Returns the batch's summed loss when the per-sample
    pass computed it (LoRA hooks), else ``None``."""
    losses: list = []
    if len(yb):
        if vectorised and not getattr(model, "_dp_loop", False):
            try:
                g = per_sample_grads(model, params, loss_fn, xb, yb, True, losses)
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
    return losses[0] if losses else None


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
