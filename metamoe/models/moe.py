"""The unified model: every FFN becomes a MoE of the clients' FFN-LoRA experts.

Per layer l, expert p computes the *full* FFN with M0's weights plus expert p's LoRA deltas
(``fc2(gelu(fc1 z + ΔA_p z)) + Δ2_p(.)``); attention, norms, embeddings and head stay M0's.

Context-aware router (MetaMoE §3.4): the gate sees
``z̃_t = (1 - λ) z_t + λ c`` with ``λ = clamp(λ_raw, 0, 1)`` learnable per layer and ``c`` the
**per-sample** mean of the layer's FFN input over that sample's tokens; logits are
``scale * z̃_t · e_p`` with router rows initialised to the clients' router vectors e_p^(l).
``router_score="euclidean"`` (a switch; the default ``"dot"`` is the paper's) scores
``-½‖z̃_t - e_p‖²`` instead, i.e. ``z̃_t · e_p - ½‖e_p‖²`` up to a per-token constant: with
mean-input router vectors the raw dot product favours the expert whose vector is longest,
whatever the token; the Euclidean score sends a token to the nearest vector.
Output ``Σ_{p ∈ top-k} π_p FFN_p(z_t)`` with π = softmax(logits) (paper Eq. 6), so the router
and λ receive gradient.

The authors' code differs in two ways, kept only as switches for ablations:
``renormalize=True`` divides the top-k weights by their sum (with k = 1 the weight is ≡ 1 and
router and λ get no gradient), and ``context="batch"`` uses the per-position batch mean, which
depends on what else is in the batch. ``context="none"`` is the "w/o context-aware router"
ablation (λ fixed at 0).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metamoe.models.causal import CausalConfig, CausalLMChoice
from metamoe.models.clip import CLIPClassifier, CLIPSeedConfig
from metamoe.models.lora import lora_key
from metamoe.models.text import TextClassifier, TextConfig, masked_mean
from metamoe.models.vit import FFN, ViT, ViTConfig

CONTEXT_MODES = ("sample", "batch", "none")
ROUTER_SCORES = ("dot", "euclidean")
DISPATCH_MODES = ("sparse", "dense")
M0_FFN = -1  # ``set_forced(M0_FFN)``: every layer computes M0's own FFN (no expert)
# Each stacked expert tensor of a MoE layer and the LoRA factor it holds (slot p = expert p).
EXPERT_TENSORS = {"A1": ("fc1", "lora_A"), "B1": ("fc1", "lora_B"),
                  "A2": ("fc2", "lora_A"), "B2": ("fc2", "lora_B")}


@dataclass
class MoEConfig:
    num_experts: int
    rank: int
    alpha: float
    top_k: int = 1
    lambda_init: float = 0.3
    context: str = "sample"  # sample | batch (authors' code) | none (w/o CA router)
    renormalize: bool = False  # authors' code: renormalised top-k weights (frozen router at k=1)
    logit_scale: float = 1.0  # logits = scale * z̃ · e_p ; the paper uses the raw dot product
    router_score: str = "dot"  # dot (paper) | euclidean (-½‖z̃ - e_p‖²: nearest router vector)
    expert_names: list[str] = field(default_factory=list)
    # sparse: each expert on the tokens routed to it; dense: every expert on every token,
    # weighted by the (zero outside the top-k) gates -- same output, fixed shapes (GPU, meta)
    dispatch: str = "sparse"

    def __post_init__(self) -> None:
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"moe.context must be one of {CONTEXT_MODES}, got {self.context!r}")
        if self.router_score not in ROUTER_SCORES:
            raise ValueError(f"moe.router_score must be one of {ROUTER_SCORES}, "
                             f"got {self.router_score!r}")
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"moe.dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be in [1, {self.num_experts}]")
        if not 0.0 <= self.lambda_init <= 1.0:
            raise ValueError(f"moe.lambda_init={self.lambda_init} must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def _full_precision(z: torch.Tensor):
    """Autocast off for the block (fp32 compute), where autocast exists for z's device."""
    if z.device.type in ("cuda", "cpu"):
        return torch.autocast(z.device.type, enabled=False)
    return contextlib.nullcontext()


class MoEFFN(nn.Module):
    """K FFN-LoRA experts sharing M0's FFN weights, with a context-aware top-k router."""

    # What the unify stage and the FL-MoE clients train (and exchange), in this order.
    trainable_names = ("router", "lambda_raw", *EXPERT_TENSORS)

    def __init__(self, base: FFN, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.fc1, self.fc2 = base.fc1, base.fc2
        self.gate = getattr(base, "gate", None)  # gated FFN (LLaMA family): M0's gate_proj
        self.act = getattr(base, "act", F.gelu)
        for p in self.parameters():
            p.requires_grad_(False)
        k, r = cfg.num_experts, cfg.rank
        d, h = self.fc1.in_features, self.fc1.out_features
        self.scale = cfg.alpha / r
        self.A1 = nn.Parameter(torch.zeros(k, r, d))
        self.B1 = nn.Parameter(torch.zeros(k, h, r))
        self.A2 = nn.Parameter(torch.zeros(k, r, h))
        self.B2 = nn.Parameter(torch.zeros(k, d, r))
        self.router = nn.Parameter(torch.zeros(k, d))
        self.lambda_raw = nn.Parameter(torch.tensor(float(cfg.lambda_init)))
        if cfg.context == "none":
            self.lambda_raw.requires_grad_(False)
            self.lambda_raw.data.zero_()
        self.forced: int | None = None  # None: routed; M0_FFN: M0's FFN; p: expert p only
        self.token_mask: torch.Tensor | None = None  # [B, T] real tokens (text), set per forward
        self.record = False
        # observe(layer, z, gate probs [B, T, K], every expert's output [K, B, T, d]): set for
        # one pass, the layer runs every expert on every token and hands them over (FedAlign's
        # whole-set statistics, clients/fl_local.py), then mixes them as dense dispatch does.
        self.observe: Callable | None = None
        # Top-1 token counts per expert while ``record`` is on (not saved; moves with .to()).
        self.register_buffer("route_counts", torch.zeros(k), persistent=False)

    # --- parameter groups and expert slots ---------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in EXPERT_TENSORS]

    @torch.no_grad()
    def load_expert(self, slot: int, lora: dict) -> None:
        """Expert ``slot`` := one layer's LoRA, keyed ``{fc1|fc2}.lora_{A|B}``."""
        for name, (target, factor) in EXPERT_TENSORS.items():
            getattr(self, name)[slot].copy_(torch.as_tensor(lora[f"{target}.{factor}"]))

    def export_expert(self, slot: int) -> dict[str, torch.Tensor]:
        """Expert ``slot`` of this layer as LoRA tensors keyed ``{fc1|fc2}.lora_{A|B}``."""
        return {f"{target}.{factor}": getattr(self, name)[slot].detach().cpu().clone()
                for name, (target, factor) in EXPERT_TENSORS.items()}

    @property
    def lam(self) -> torch.Tensor:
        return self.lambda_raw.clamp(0.0, 1.0)

    # --- forward ------------------------------------------------------------------------
    def _experts(self, z: torch.Tensor, idx: slice | list[int]) -> torch.Tensor:
        """Outputs of experts ``idx`` on every token: [k, B, T, d]."""
        A1, B1, A2, B2 = self.A1[idx], self.B1[idx], self.A2[idx], self.B2[idx]
        h = self.fc1(z).unsqueeze(0) + torch.einsum(
            "btd,krd,khr->kbth", z, A1, B1) * self.scale
        a = self._act(z, h)
        return self.fc2(a) + torch.einsum("kbth,krh,kdr->kbtd", a, A2, B2) * self.scale

    def _act(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.gate(z)) * h if self.gate is not None else self.act(h)

    def _expert(self, z: torch.Tensor, p: int) -> torch.Tensor:
        """Expert p's FFN on tokens z [..., d] (any leading shape)."""
        h = self.fc1(z) + (z @ self.A1[p].t()) @ self.B1[p].t() * self.scale
        a = self._act(z, h)
        return self.fc2(a) + (a @ self.A2[p].t()) @ self.B2[p].t() * self.scale

    def gate_input(self, z: torch.Tensor) -> torch.Tensor:
        mode = self.cfg.context
        if mode == "none":
            return z
        if mode == "batch":
            c = z.mean(dim=0, keepdim=True)
        elif self.token_mask is None:
            c = z.mean(dim=1, keepdim=True)
        else:  # per-sample mean over that sample's real tokens (padding excluded)
            c = masked_mean(z, self.token_mask, keepdim=True)
        lam = self.lam
        return (1.0 - lam) * z + lam * c

    def gate_probs(self, z: torch.Tensor) -> torch.Tensor:
        with _full_precision(z):  # routing decisions in fp32 under mixed precision too
            logits = self.gate_input(z.float()) @ self.router.t()
        if self.cfg.router_score == "euclidean":  # the per-token -½‖z̃‖² cancels in the softmax
            logits = logits - 0.5 * (self.router * self.router).sum(dim=1)
        return (logits * self.cfg.logit_scale).softmax(dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.forced is not None:
            if self.forced < 0:
                return self.fc2(self._act(z, self.fc1(z)))
            return self._expert(z, self.forced)
        probs = self.gate_probs(z)  # [B, T, K]
        topv, topi = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.renormalize:
            topv = topv / topv.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, topi, topv)
        if self.record:
            hits = F.one_hot(topi[..., 0], self.cfg.num_experts).float()
            if self.token_mask is not None:
                hits = hits * self.token_mask.unsqueeze(-1).to(hits.dtype)
            self.route_counts += hits.reshape(-1, self.cfg.num_experts).sum(0)
        b, t, d = z.shape
        zf = z.reshape(b * t, d)
        weight = gates.reshape(b * t, -1)
        active = None if self.token_mask is None else self.token_mask.reshape(-1)
        if self.cfg.dispatch == "dense" or self.observe is not None:
            # every expert on every token: no data-dependent shapes
            if active is not None:
                weight = weight * active.unsqueeze(1).to(weight.dtype)
            ys = self._experts(z, slice(None))
            if self.observe is not None:
                self.observe(self, z, probs, ys)
            ys = ys.reshape(self.cfg.num_experts, b * t, d)
            return torch.einsum("ke,ekd->kd", weight.to(ys.dtype), ys).reshape(b, t, d)
        # Sparse dispatch: each expert runs only on the tokens routed to it (padding skipped).
        out = torch.zeros_like(zf)
        for p in range(self.cfg.num_experts):
            hit = (topi == p).any(-1).reshape(-1)
            if active is not None:
                hit = hit & active
            rows = hit.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            y = self._expert(zf.index_select(0, rows), p) * weight[rows, p:p + 1]
            out = out.index_add(0, rows, y.to(out.dtype))
        return out.reshape(b, t, d)


class MoEMixin:
    """The MoE-model interface shared by every seed architecture (vision, text)."""

    moe_cfg: MoEConfig

    def moe_layers(self) -> list[MoEFFN]:
        return self.ffn_layers()  # type: ignore[attr-defined]

    def capture_gates(self, into: list, routed_training_only: bool = False) -> list:
        """Forward pre-hooks that append (gate probabilities [B, T, E], differentiable; token
        mask [B, T] or None) of every MoE layer to ``into``, taken inside the forward, where
        the layer's token mask is set. ``routed_training_only``: only for layers in training
        mode and not forced to one expert. Returns the hook handles (remove them after)."""
        def hook(layer, inputs):
            if not routed_training_only or (layer.forced is None and layer.training):
                into.append((layer.gate_probs(inputs[0]), getattr(layer, "token_mask", None)))
        return [layer.register_forward_pre_hook(hook) for layer in self.moe_layers()]

    def set_forced(self, expert: int | None) -> None:
        """Route every token to ``expert`` (``M0_FFN`` = M0's own FFN, None = learned routing)."""
        for m in self.moe_layers():
            m.forced = expert

    def load_expert(self, slot: int, lora: dict) -> None:
        """Expert ``slot`` of every layer := an FFN-LoRA state (:func:`~metamoe.models.lora.lora_key`)."""
        for l, layer in enumerate(self.moe_layers()):
            layer.load_expert(slot, {f"{t}.{f}": lora[lora_key(l, t, f)]
                                     for t, f in EXPERT_TENSORS.values()})

    def export_expert(self, slot: int) -> dict[str, torch.Tensor]:
        """Expert ``slot`` as an FFN-LoRA state, the format a client uploads."""
        return {lora_key(l, *k.split(".")): v for l, layer in enumerate(self.moe_layers())
                for k, v in layer.export_expert(slot).items()}

    def trainable_keys(self) -> list[str]:
        """State keys of router, λ and the experts of every layer (model order)."""
        return [f"{prefix}.{n}" for prefix, mod in self.named_modules()  # type: ignore[attr-defined]
                if isinstance(mod, MoEFFN) for n in MoEFFN.trainable_names]

    def router_parameters(self) -> list[nn.Parameter]:
        return [m.router for m in self.moe_layers()]

    def lambda_parameters(self) -> list[nn.Parameter]:
        if self.moe_cfg.context == "none":
            return []  # λ is fixed at 0 in the "w/o context-aware router" ablation
        return [m.lambda_raw for m in self.moe_layers()]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.moe_layers() for p in m.expert_parameters()]

    def freeze_base(self) -> None:
        """Only router, λ and the experts' LoRA stay trainable."""
        for p in self.parameters():  # type: ignore[attr-defined]
            p.requires_grad_(False)
        for p in self.router_parameters() + self.lambda_parameters() + self.expert_parameters():
            p.requires_grad_(True)

    def lambdas(self) -> list[float]:
        return [float(m.lam.detach()) for m in self.moe_layers()]


class MoEViT(MoEMixin, ViT):
    """The vision M0 with every FFN replaced by a :class:`MoEFFN`."""

    def __init__(self, vit_cfg: ViTConfig, moe_cfg: MoEConfig):
        super().__init__(vit_cfg)
        self.moe_cfg = moe_cfg
        for blk in self.blocks:
            blk.mlp = MoEFFN(blk.mlp, moe_cfg)


class MoEText(MoEMixin, TextClassifier):
    """The text M0 (pretrained encoder + head) with every FFN replaced by a :class:`MoEFFN`."""

    def __init__(self, text_cfg: TextConfig, moe_cfg: MoEConfig):
        super().__init__(text_cfg)
        self.moe_cfg = moe_cfg
        for layer in self.encoder.encoder.layer:
            layer.intermediate.mlp = MoEFFN(layer.intermediate.mlp, moe_cfg)


class MoECLIP(MoEMixin, CLIPClassifier):
    """The CLIP M0 (vision tower + class-name head) with every MLP replaced by a
    :class:`MoEFFN`."""

    def __init__(self, clip_cfg: CLIPSeedConfig, moe_cfg: MoEConfig):
        super().__init__(clip_cfg)
        self.moe_cfg = moe_cfg
        for layer in self.vision.encoder.layers:
            layer.mlp = MoEFFN(layer.mlp, moe_cfg)


class MoECausal(MoEMixin, CausalLMChoice):
    """The causal-LM M0 with every (gated) MLP replaced by a :class:`MoEFFN`."""

    def __init__(self, lm_cfg: CausalConfig, moe_cfg: MoEConfig):
        super().__init__(lm_cfg)
        self.moe_cfg = moe_cfg
        for layer in self._layers():
            layer.mlp = MoEFFN(layer.mlp, moe_cfg)


def moe_class(seed_cfg) -> type:
    """The MoE model class for a seed model's config (ViT / Text / CausalConfig)."""
    return {"bert": MoEText, "causal": MoECausal, "clip": MoECLIP}.get(
        getattr(seed_cfg, "arch", "vit"), MoEViT)


def unify_moe_config(cfg, names: list[str]) -> MoEConfig:
    """The unified MoE of experts ``names`` for a resolved config: the LoRA shape from its
    ``expert`` section, the routing from its ``unify`` section."""
    uc, ec = cfg.unify, cfg.expert
    return MoEConfig(num_experts=len(names), rank=ec.rank, alpha=ec.alpha,
                     top_k=min(uc.top_k, len(names)), lambda_init=uc.lambda_init,
                     context=uc.context, renormalize=uc.renormalize,
                     logit_scale=uc.logit_scale, router_score=uc.router_score,
                     expert_names=list(names))


def build_moe(seed: nn.Module, moe_cfg: MoEConfig, experts: list[dict[str, torch.Tensor]],
              router_vectors: list[torch.Tensor] | None) -> MoEMixin:
    """Merge the clients' FFN-LoRA experts into one MoE on top of a copy of M0.

    ``experts[p]`` is client p's :func:`~metamoe.models.lora.lora_state_dict`;
    ``router_vectors[p]`` its [L, d] router vectors (rows of the router), or None for a
    randomly initialised router (BTX-style).
    """
    if len(experts) != moe_cfg.num_experts:
        raise ValueError(f"{len(experts)} experts for a MoE with {moe_cfg.num_experts} slots")
    model = moe_from_seed(seed, moe_cfg)
    for p, ex in enumerate(experts):
        model.load_expert(p, ex)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l, layer in enumerate(model.moe_layers()):
            if router_vectors is not None:
                for p in range(len(experts)):
                    layer.router[p].copy_(torch.as_tensor(router_vectors[p][l]))
            else:
                d = layer.router.shape[1]
                layer.router.copy_(torch.randn(layer.router.shape, generator=gen) / math.sqrt(d))
    model.eval()
    return model


def moe_from_seed(seed: nn.Module, moe_cfg: MoEConfig) -> MoEMixin:
    """A MoE on a copy of M0 whose router, λ and experts are still to be loaded (all zero)."""
    model = moe_class(seed.cfg)(seed.cfg, moe_cfg)
    missing, unexpected = model.load_state_dict(seed_state_for_moe(seed), strict=False)
    bad = [k for k in missing if not is_moe_param(k)]
    if bad or unexpected:
        raise RuntimeError(f"seed/MoE mismatch: missing {bad[:3]} unexpected {unexpected[:3]}")
    model.eval()
    return model


def is_moe_param(key: str) -> bool:
    """Whether a MoE state key is one of the MoE's own (router, λ, experts), not M0's."""
    return key.rsplit(".", 1)[-1] in MoEFFN.trainable_names


def seed_state_for_moe(seed: nn.Module) -> dict[str, torch.Tensor]:
    """M0's state dict with plain FFN weights (LoRA wrappers, if any, are unwrapped)."""
    state = copy.deepcopy(seed.state_dict())
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        out[k.replace(".base.", ".")] = v
    return out
