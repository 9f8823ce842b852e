"""A model's classification head with extra rows appended (a client's private classes).

Every seed (ViT, text classifier) and its MoE score classes with ``model.head``, a linear
layer over the pooled feature. :func:`extend_head` appends rows for classes the model did not
know (ids ``P..P+C-1`` after its ``P``) and records the new size in ``model.cfg``, so the
model is rebuilt with the right shape wherever a config is read from it (``moe_from_seed``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn


def extend_head(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """``model`` (in place, returned) with ``weight`` [C, d] / ``bias`` [C] appended to its
    head; the head stays frozen (it is M0's, or the client's own fixed rows)."""
    old = model.head
    if weight.ndim != 2 or weight.shape[1] != old.in_features or bias.shape != weight.shape[:1]:
        raise ValueError(f"head rows {tuple(weight.shape)}/{tuple(bias.shape)} do not fit a head "
                         f"over {old.in_features} features")
    new = nn.Linear(old.in_features, old.out_features + len(weight),
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(torch.cat([old.weight, weight.to(old.weight)]))
        new.bias.copy_(torch.cat([old.bias, bias.to(old.bias)]))
    new.requires_grad_(False)
    model.head = new
    model.cfg = replace(model.cfg, num_classes=new.out_features)
    return model
