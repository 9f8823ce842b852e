"""DDOME's expert-ranking gate: a 2-layer MLP over frozen common-expert (M0) features.

Server and clients both build it (the server initialises and averages it, the clients train
it), so it lives with the models; its use is in ``clients/ddome.py`` and ``strategies/ddome.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class GateMLP(nn.Module):
    """A 2-layer MLP over M0's pooled features with a softmax over the M experts."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, num_experts)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # logits [B, M]
        return self.fc2(F.relu(self.fc1(feats)))


def gate_from_arrays(arrays: dict[str, np.ndarray]) -> GateMLP:
    w1, w2 = arrays["fc1.weight"], arrays["fc2.weight"]
    gate = GateMLP(w1.shape[1], w1.shape[0], w2.shape[0])
    gate.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    return gate
