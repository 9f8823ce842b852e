"""Head rows for a client's own classes, made and kept on the client (``benchmark.kind=local``).

M0's head scores the public pool's P classes. A client that brings its own data has classes
the server never hears of (not even their names), so the node appends C rows of its own to
every model it uses — M0 for its sketch and expert, the unified MoE at evaluation — with
:func:`localize`. The rows are a nearest-class-mean classifier on M0's pooled features, the
analogue of CLIP's frozen class-name text embeddings: row c points from the mean of the class
means to class c's mean, scaled to the mean norm of M0's own rows, with a bias that makes the
centre score M0's mean bias. They are a fixed function of (M0, the private train split), frozen
like the rest of the head, and never uploaded: the expert upload is its FFN LoRA only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metamoe.data import Domain
from metamoe.models.head import extend_head
from metamoe.training import features


@torch.no_grad()
def private_head_rows(seed: nn.Module, dom: Domain, l2: float | None = 1e-2
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [C, d], bias [C]) for ``dom.classes`` (ids P..P+C-1) from M0 ``seed``: the
    class-mean rows, then (``l2`` not None) a linear probe from them, L2 penalty ``l2``."""
    num_pool = int(seed.head.out_features)
    z = torch.from_numpy(features(seed, dom.x_train, "cls")).double()
    y = torch.as_tensor(dom.y_train) - num_pool
    c = len(dom.classes)
    means = torch.stack([z[y == k].mean(0) if (y == k).any() else torch.zeros(z.shape[1],
                         dtype=z.dtype) for k in range(c)])
    centre = means.mean(0)
    w0, b0 = seed.head.weight.detach().double().cpu(), seed.head.bias.detach().double().cpu()
    w = F.normalize(means - centre, dim=1) * w0.norm(dim=1).mean()
    b = b0.mean() - w @ centre
    if l2 is not None:
        w, b = _probe(z, y + num_pool, w0, b0, w, b, float(l2))
    return w.float(), b.float()


@torch.enable_grad()
def _probe(z, y, w0, b0, w, b, l2):
    """Logistic regression of the private rows (pool rows fixed) on M0's features of Dp,
    from the class-mean init: full-batch L-BFGS, deterministic."""
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.cat([z @ w0.T + b0, z @ w.T + b], 1)
        loss = F.cross_entropy(logits, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def localize(model: nn.Module, rows: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    """``model`` with this client's head rows appended (in place, returned)."""
    return extend_head(model, *rows)
