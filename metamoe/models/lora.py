"""LoRA on the FFN sublayers (an expert), in the style of HF peft but FFN-only and tiny.

An expert is M0 plus low-rank deltas on every FFN's ``fc1`` and ``fc2``:
``W x + (alpha / r) * B A x`` with A kaiming-uniform, B zero (so a fresh expert equals M0).
Its state is only the A/B matrices: ``lora_state_dict`` is what a client uploads.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from metamoe import device

FFN_TARGETS = ("fc1", "fc2")
LORA_FACTORS = ("lora_A", "lora_B")


def lora_key(layer: int, target: str, factor: str) -> str:
    """The one spelling of an expert's state keys: ``layers.{l}.{fc1|fc2}.lora_{A|B}``."""
    return f"layers.{layer}.{target}.{factor}"


def is_lora_key(key: str, factor: str | None = None) -> bool:
    """Whether ``key`` is an expert state key (of ``factor`` "lora_A"/"lora_B" if given)."""
    parts = key.split(".")
    return (len(parts) == 4 and parts[0] == "layers" and parts[2] in FFN_TARGETS
            and parts[3] in LORA_FACTORS and (factor is None or parts[3] == factor))


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}  # where M0 lives
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A * self.scale


def inject_ffn_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze ``model`` and wrap ``fc1``/``fc2`` of every FFN in ``model.ffn_layers()``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for ffn in model.ffn_layers():
        for name in FFN_TARGETS:
            lin = getattr(ffn, name)
            if isinstance(lin, LoRALinear):
                raise ValueError(f"FFN {name} already carries a LoRA adapter")
            setattr(ffn, name, LoRALinear(lin, rank, alpha))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA A/B tensors (on the CPU: what a client uploads), keyed by
    :func:`lora_key`."""
    out = {}
    for l, ffn in enumerate(model.ffn_layers()):
        for name in FFN_TARGETS:
            lin = getattr(ffn, name)
            for factor in LORA_FACTORS:
                out[lora_key(l, name, factor)] = getattr(lin, factor).detach().cpu().clone()
    return out


def fresh_loras(seed_model: nn.Module, rank: int, alpha: float,
                rng_seeds: list[int]) -> list[dict[str, torch.Tensor]]:
    """One fresh FFN-LoRA expert per entry of ``rng_seeds`` (A kaiming-uniform drawn under
    that seed in a forked RNG, B = 0): each equals M0, but their A differ so that
    same-initialised experts can diverge. Torch's global RNG is left as it was."""
    out = []
    for s in rng_seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            out.append(lora_state_dict(inject_ffn_lora(copy.deepcopy(seed_model), rank, alpha)))
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = set()
    for l, ffn in enumerate(model.ffn_layers()):
        for name in FFN_TARGETS:
            lin = getattr(ffn, name)
            for factor in LORA_FACTORS:
                key = lora_key(l, name, factor)
                expected.add(key)
                if key not in state:
                    raise KeyError(f"LoRA state is missing {key}")
                t = torch.as_tensor(state[key])
                param = getattr(lin, factor)
                if t.shape != param.shape:
                    raise ValueError(f"LoRA {key}: shape {tuple(t.shape)} != {tuple(param.shape)}")
                param.data.copy_(t)
    extra = set(state) - expected
    if extra:
        raise KeyError(f"unexpected LoRA keys: {sorted(extra)[:5]}")


def lora_shapes(depth: int, dim: int, hidden: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Expected upload shapes of one expert (used to validate client uploads)."""
    shapes = {}
    for l in range(depth):
        shapes[lora_key(l, "fc1", "lora_A")] = (rank, dim)
        shapes[lora_key(l, "fc1", "lora_B")] = (hidden, rank)
        shapes[lora_key(l, "fc2", "lora_A")] = (rank, hidden)
        shapes[lora_key(l, "fc2", "lora_B")] = (dim, rank)
    return shapes


@torch.no_grad()
def ffn_input_means(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Router vectors e^(l): mean FFN input over all tokens of all samples, per layer [L, d].

    Computed with forward hooks on every FFN under the (LoRA-carrying) ``model``. Only this
    per-layer mean over the whole local set leaves the client, never a per-sample vector.
    """
    rt = device.current()
    rt.place(model)
    model.eval()
    layers = model.ffn_layers()
    sums: list = [None] * len(layers)
    counts: list = [None] * len(layers)

    def make_hook(i):
        def hook(module, inputs):
            z = inputs[0].detach().float()
            mask = getattr(module, "token_mask", None)  # text: padding is not a token
            if mask is not None:
                z = z * mask.unsqueeze(-1).to(z.dtype)
                c = mask.sum().to(torch.float64)
            else:
                c = torch.tensor(float(z.shape[0] * z.shape[1]), dtype=torch.float64,
                                 device=z.device)
            s = z.reshape(-1, z.shape[-1]).sum(0)
            sums[i] = s if sums[i] is None else sums[i] + s
            counts[i] = c if counts[i] is None else counts[i] + c
        return hook

    handles = [ffn.register_forward_pre_hook(make_hook(i)) for i, ffn in enumerate(layers)]
    try:
        for i in range(0, len(x), batch_size):
            with rt.autocast():
                model(rt.batch(torch.as_tensor(x[i:i + batch_size])))
    finally:
        for h in handles:
            h.remove()
    return device.host(torch.stack(sums) / torch.stack(counts).unsqueeze(1).float())
