"""The one training / evaluation loop every method calls.

Seed pre-training, the relevance-free expert training on clients, the server's MoE fine-tuning
and every baseline go through :func:`train` and :func:`accuracy`, so methods differ only in
*what* they train on and *which* parameters are trainable, never in the loop itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("metamoe")


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    epochs: int = 1
    batch_size: int = 128
    shuffle: bool = True


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(groups: Iterable[dict] | Iterable[nn.Parameter],
                   cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = list(groups)
    if not groups:
        raise ValueError("no trainable parameters were given to the optimizer")
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd | adam | adamw)")


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    cfg: OptimConfig,
    params: Sequence[dict] | Sequence[nn.Parameter] | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    seed: int = 0,
    desc: str = "train",
    log_every: int = 0,
) -> dict:
    """Mini-batch training of ``model`` on (x, y); returns {"loss": last-epoch mean, ...}.

    ``params`` are the trainable parameters (or param groups with their own ``lr``); the
    default is every parameter with ``requires_grad``. Shuffling is seeded by ``seed``.
    """
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if len(x) != len(y):
        raise ValueError(f"{desc}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{desc}: empty training set")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    n = len(x)
    steps = math.ceil(n / cfg.batch_size)
    t0 = time.perf_counter()
    epoch_loss = float("nan")
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
        total, seen = 0.0, 0
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss = loss_fn(model, x[idx], y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss at epoch {epoch} step {s}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        epoch_loss = total / seen
        if log_every and (epoch + 1) % log_every == 0:
            log.info("%s epoch %d/%d loss %.4f (%.1fs)", desc, epoch + 1, cfg.epochs,
                     epoch_loss, time.perf_counter() - t0)
    model.eval()
    return {"loss": epoch_loss, "seconds": time.perf_counter() - t0, "examples": n}


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor,
                   batch_size: int = 512) -> torch.Tensor:
    model.eval()
    x = torch.as_tensor(x)
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
             classes: Sequence[int] | None = None, batch_size: int = 512) -> float:
    """Top-1 accuracy; with ``classes`` the argmax runs over that label subset only."""
    logits = predict_logits(model, x, batch_size)
    y = torch.as_tensor(y)
    if classes is not None:
        cls = torch.as_tensor(list(classes))
        pred = cls[logits[:, cls].argmax(1)]
    else:
        pred = logits.argmax(1)
    return float((pred == y).float().mean()) if len(y) else float("nan")


@torch.no_grad()
def features(model: nn.Module, x: np.ndarray | torch.Tensor, kind: str = "tokens",
             batch_size: int = 1024) -> np.ndarray:
    """Frozen-model embeddings of x in batches, float32 numpy: ``tokens`` (all last-layer
    tokens, ``forward_embedding``) or ``cls`` (the pooled feature, ``forward_features``)."""
    model.eval()
    fn = model.forward_embedding if kind == "tokens" else model.forward_features
    x = torch.as_tensor(x)
    return torch.cat([fn(x[i:i + batch_size])
                      for i in range(0, len(x), batch_size)]).numpy().astype(np.float32)
