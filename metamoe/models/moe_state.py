"""A MoE's trainable state as the arrays the iterative FL-MoE baselines exchange.

Router rows, λ and every expert's stacked LoRA tensors of every MoE layer, keyed by their
state-dict names (:meth:`MoEMixin.trainable_keys`); the 0-d λ travels as shape ``(1,)``
because Flower arrays are at least 1-d. Validation of a received state against
:func:`moe_trainable_shapes` is the caller's (``metamoe.protocol.check_arrays``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from metamoe.models.moe import MoEMixin


def moe_trainable_state(moe: MoEMixin) -> dict[str, np.ndarray]:
    sd = moe.state_dict()  # type: ignore[attr-defined]
    return {k: np.atleast_1d(sd[k].detach().cpu().numpy().astype(np.float32))
            for k in moe.trainable_keys()}


def moe_trainable_shapes(moe: MoEMixin) -> dict[str, tuple[int, ...]]:
    sd = moe.state_dict()  # type: ignore[attr-defined]
    return {k: tuple(sd[k].shape) or (1,) for k in moe.trainable_keys()}


def load_moe_trainable(moe: MoEMixin, arrays: dict[str, np.ndarray]) -> None:
    """Load a (validated) trainable state into ``moe``; other weights stay M0's."""
    sd = moe.state_dict()  # type: ignore[attr-defined]
    moe.load_state_dict({k: torch.from_numpy(np.array(v)).reshape(sd[k].shape)  # type: ignore[attr-defined]
                         for k, v in arrays.items()}, strict=False)


def module_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    """Every tensor of a module's state as float32 numpy (e.g. DDOME's gate, for a message)."""
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}
