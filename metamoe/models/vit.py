"""Seed model M0 for the vision benchmark: a small vision transformer with FFN sublayers.

A conv stem turns a 28x28 grey image into 7x7 = 49 patch tokens (plus a CLS token); each of
the ``depth`` pre-norm blocks is attention + an FFN sublayer ``fc2(gelu(fc1(ln2(x))))``. The
FFN sublayers are where MetaMoE's LoRA experts live; everything else stays frozen after the
server pre-trains M0 on the public pool. The head is one linear layer over the benchmark's
named classes (the analogue of CLIP's class-name text head), frozen too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ViTConfig:
    arch: str = "vit"
    image_size: int = 28
    in_chans: int = 1
    stem_channels: int = 16
    patch_size: int = 7
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 128
    num_classes: int = 20

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


def activation(name: str):
    """The FFN nonlinearity by name (exact GELU by default, as BERT and this ViT use)."""
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    from transformers.activations import ACT2FN  # e.g. "gelu_pytorch_tanh" (Gemma)

    return ACT2FN[name]


class FFN(nn.Module):
    """The FFN sublayer: ``fc2(act(fc1(x)))``, or gated (LLaMA-style SwiGLU) when ``gate`` is
    set: ``fc2(act(gate(x)) * fc1(x))`` with fc1 = up_proj, gate = gate_proj, fc2 = down_proj.
    LoRA experts adapt ``fc1`` and ``fc2``; a gate projection stays M0's."""

    token_mask = None  # [B, T] real tokens, set per forward by models with padding (text)

    def __init__(self, dim: int, hidden: int, act: str = "gelu", gated: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gate = nn.Linear(dim, hidden, bias=False) if gated else None
        self.act_name = act
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        a = self.act(self.gate(x)) * h if self.gate is not None else self.act(h)
        return self.fc2(a)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp: nn.Module = FFN(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.stem_channels
        p = cfg.patch_size
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, cfg.dim, p, stride=p),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_hidden)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature (CLS token after the final norm): relevance/DPP embedding."""
        h = self.tokens(x)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h[:, 0])

    def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Every token of the last hidden state (after the final norm), flattened [B, T*d]:
        the frozen-M0 embedding used for relevance sketches and the DPP kernel. The pooled
        d-dim feature would cap the DPP's rank, hence the number of proxies, at d."""
        h = self.tokens(x)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def ffn_layers(self) -> list[nn.Module]:
        return [blk.mlp for blk in self.blocks]
