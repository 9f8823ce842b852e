"""The one training / evaluation loop every method calls.

Seed pre-training, the relevance-free expert training on clients, the server's MoE fine-tuning
and every baseline go through :func:`train` and :func:`accuracy`, so methods differ only in
*what* they train on and *which* parameters are trainable, never in the loop itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from metamoe import device
from metamoe.config import OptimConf
from metamoe.data.dataset import as_dataset, batches, dataset_labels, dataset_lengths
from metamoe.dpsgd import DPSGD, noisy_gradients
from metamoe.progress import Progress

log = logging.getLogger("metamoe")
PROGRESS_MIN_BATCHES = 50  # inference loops at least this long report their progress


def derive_seed(run_seed: int, *parts: int) -> int:
    """The seed of one random stream of a run, the one formula every site uses.

    ``run_seed * 1000`` plus ``parts`` folded in base 31 (Horner): client ``p``'s one-shot
    stages use ``derive_seed(s, p) = 1000 s + p``; client ``p`` in FL round ``r`` uses
    ``derive_seed(s, p, r) = 1000 s + 31 p + r``; the server's own draws use ``run_seed``
    itself. Use the result with :func:`seeded` or a ``torch.Generator`` /
    ``np.random.default_rng``, never to reseed a global RNG.
    """
    acc = 0
    for part in parts:
        acc = acc * 31 + int(part)
    return int(run_seed) * 1000 + acc


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global (CPU) RNG seeded with ``seed`` inside the block and restored after it:
    module initialisation and dropout draw from it, so a result depends only on (config,
    data, seed), not on what ran before in this process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def make_optimizer(groups: Iterable[dict] | Iterable[nn.Parameter],
                   cfg: OptimConf) -> torch.optim.Optimizer:
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
    x: np.ndarray | torch.Tensor | Dataset,
    y: np.ndarray | torch.Tensor | None,
    cfg: OptimConf | DictConfig,
    params: Sequence[dict] | Sequence[nn.Parameter] | None = None,
    loss_fn: LossFn = cross_entropy_loss,
    seed: int = 0,
    desc: str = "train",
    log_every: int = 0,
    dp: DPSGD | None = None,
    sample_weights: torch.Tensor | None = None,
    round_of: tuple[int, int] | None = None,
) -> dict:
    """Mini-batch training of ``model``; returns {"loss": last-epoch mean, ...}.

    The data are (x, y) arrays, or a map-style Dataset of (input, label) items as ``x`` with
    ``y=None`` (``metamoe/data/dataset.py``). ``cfg`` is an :class:`~metamoe.config.OptimConf`
    or any config section of its schema (``pretrain``, ``expert``, ``unify``, ``fl``).
    ``params`` are the trainable parameters (or param groups with their own ``lr``); the
    default is every parameter with ``requires_grad``. Shuffling is seeded by ``seed``.
    ``log_every`` > 0 reports every epoch (a bar on a terminal, a log line otherwise:
    ``metamoe/progress.py``). The model and each batch go to the current runtime's device (``metamoe/device.py``); the
    forward pass runs under its autocast. ``dp``: DP-SGD (``metamoe/dpsgd.py``): Poisson-sampled
    batches, per-sample clipping and Gaussian noise; the result then also holds ``dp_steps``
    and ``dp_sample_rate`` for the accountant; ``steps_so_far`` counts this call's steps and,
    with ``round_of``, the earlier rounds'. ``sample_weights`` (one per item, e.g.
    :func:`balanced_weights`): each epoch's ``ceil(N / batch_size)`` batches are drawn with
    replacement in proportion to them (PyTorch's ``WeightedRandomSampler``), then
    length-grouped like any order. ``round_of`` = (r, R): this call is round r (1-based) of R
    rounds whose ``cfg.epochs`` each add up to ``cfg.epochs × R`` passes; it takes its exact
    share of those passes' steps (:func:`round_steps`), so R rounds train the same number of
    batches as one run of ``cfg.epochs × R`` epochs (FL rounds; a group's expert rounds).
    """
    data = as_dataset(x, y)
    n = len(data)
    if n == 0:
        raise ValueError(f"{desc}: empty training set")
    rt = device.current()
    rt.place(model)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    scaler = rt.grad_scaler()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    steps = math.ceil(n / cfg.batch_size)
    t0 = time.perf_counter()
    epoch_loss = float("nan")
    lengths = None
    if cfg.group_by_length and cfg.shuffle:
        lengths = dataset_lengths(data, _pad_id(model))
    checked = rt.device.type != "meta"  # meta tensors carry no values to check
    # Dropout (text encoders) draws from torch's global RNG: seed it too, inside a fork.
    plan = epoch_steps(cfg.epochs, steps) if round_of is None else \
        round_steps(cfg.epochs, steps, *round_of, desc=desc)
    # steps of this call and the rounds before it (the DP accountant's count after a round)
    so_far = sum(plan) if round_of is None else \
        round_of[0] * _all_rounds_steps(cfg.epochs, round_of[1], steps) // round_of[1]
    report = Progress(len(plan), desc, unit="epoch") if log_every else None
    if sample_weights is not None:
        sample_weights = torch.as_tensor(sample_weights, dtype=torch.float64)
        if sample_weights.shape != (n,) or not (sample_weights >= 0).all() \
                or not sample_weights.sum() > 0:
            raise ValueError(f"{desc}: sample_weights must be {n} non-negative weights, "
                             "not all zero")
        if dp is not None:
            raise ValueError(f"{desc}: DP-SGD samples its own batches (Poisson); no weights")
    if dp is not None:
        return {**_train_dp(model, data, cfg, opt, loss_fn, dp, gen, seed, desc, report, t0,
                            plan), "steps_so_far": so_far}
    with seeded(seed):
        for epoch, k in enumerate(plan):
            if sample_weights is not None:
                order = torch.multinomial(sample_weights, n, replacement=True, generator=gen)
            else:
                order = torch.randperm(n, generator=gen) if cfg.shuffle else torch.arange(n)
            index = [order[s * cfg.batch_size:(s + 1) * cfg.batch_size] for s in range(steps)]
            if lengths is not None:
                index = _length_grouped(order, lengths, cfg.batch_size, gen)
            index = index[:k]  # a fractional last epoch: its first k batches
            total, seen = 0.0, 0
            for s, (xb, yb) in enumerate(batches(data, index, rt.workers, rt.is_cuda)):
                xb, yb = rt.batch(xb), rt.batch(yb)
                with rt.autocast():
                    loss = loss_fn(model, xb, yb)
                if checked and not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: non-finite loss at epoch {epoch} step {s}")
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                if checked:
                    total += float(loss.detach()) * len(yb)
                seen += len(yb)
            epoch_loss = total / seen if checked else float("nan")
            if report is not None:
                report.step(info=f"loss {epoch_loss:.4f}")
    if report is not None:
        report.close()
    model.eval()
    return {"loss": epoch_loss, "seconds": time.perf_counter() - t0, "examples": n,
            "steps_so_far": so_far}


def _train_dp(model: nn.Module, data: Dataset, cfg, opt, loss_fn, dp: DPSGD,
              gen: torch.Generator, seed: int, desc: str, report, t0: float,
              plan: list[int]) -> dict:
    """The DP-SGD epochs of :func:`train`: ``ceil(N / batch_size)`` Poisson-sampled steps per
    epoch at rate q = batch_size / N (``metamoe/dpsgd.py``)."""
    rt = device.current()
    if rt.grad_scaler() is not None:
        raise ValueError(f"{desc}: DP-SGD does not support fp16 loss scaling; use bf16 or fp32")
    n = len(data)
    q = min(1.0, cfg.batch_size / n)
    wanted = {id(p) for g in opt.param_groups for p in g["params"]}
    params = {k: p for k, p in model.named_parameters() if id(p) in wanted}
    vectorised = loss_fn is cross_entropy_loss
    noise_gen = torch.Generator().manual_seed(derive_seed(seed, 7919))
    epoch_loss = float("nan")
    with seeded(seed):
        for k in plan:
            total, seen = 0.0, 0
            for _ in range(k):
                idx = torch.nonzero(torch.rand(n, generator=gen) < q).flatten()
                xb = yb = torch.zeros(0, dtype=torch.long)
                if len(idx):
                    xb, yb = next(batches(data, [idx], 0, rt.is_cuda))
                    xb, yb = rt.batch(xb), rt.batch(yb)
                with rt.autocast():
                    summed = noisy_gradients(model, params, loss_fn, xb, yb, dp, q * n,
                                             noise_gen, vectorised)
                    if len(idx) and summed is None:  # the per-sample pass gave no loss
                        with torch.no_grad():
                            summed = float(loss_fn(model, xb, yb)) * len(yb)
                    total += summed or 0.0
                opt.step()
                opt.zero_grad(set_to_none=True)
                seen += len(idx)
            epoch_loss = total / max(seen, 1)
            if report is not None:
                report.step(info=f"loss {epoch_loss:.4f} (DP-SGD)")
    if report is not None:
        report.close()
    model.eval()
    return {"loss": epoch_loss, "seconds": time.perf_counter() - t0, "examples": n,
            "dp_steps": sum(plan), "dp_sample_rate": q}


def epoch_steps(epochs: float, steps: int) -> list[int]:
    """Steps in each epoch of ``epochs`` (may be fractional: 16 FL rounds of half an epoch
    keep 8 passes over Dp) of ``steps`` batches: whole epochs, then ``ceil(frac · steps)``."""
    whole = int(math.floor(epochs + 1e-9))
    frac = float(epochs) - whole
    return [steps] * whole + ([max(1, math.ceil(frac * steps - 1e-9))] if frac > 1e-9 else [])


def round_steps(epochs: float, steps: int, r: int, rounds: int, desc: str = "train"
                ) -> list[int]:
    """Round ``r`` (1-based) of ``rounds`` rounds of ``epochs`` passes each over ``steps``
    batches: its share of the T = round(epochs · rounds · steps) steps of all rounds, the
    cumulative floor ⌊r·T/R⌋ − ⌊(r−1)·T/R⌋ (rounds differ by at most one step and add up to T
    exactly; per-round :func:`epoch_steps` would round every fractional round up, e.g. 16
    rounds of 19 · 0.125 batches = 48 steps instead of 38). Returned per pass, like
    :func:`epoch_steps`. Refused (ValueError naming both counts) when T < R: a round with
    no step would return the model it got."""
    if not 1 <= r <= rounds:
        raise ValueError(f"{desc}: round {r} is not in 1..{rounds}")
    total = _all_rounds_steps(epochs, rounds, steps)
    if total < rounds:
        raise ValueError(f"{desc}: {rounds} rounds of {float(epochs):g} passes over {steps} "
                         f"batches give {total} optimiser steps in all, fewer than one per "
                         f"round; use at most {total} rounds (fl.rounds / unify.group_rounds) "
                         "or smaller batches")
    k = r * total // rounds - (r - 1) * total // rounds
    return [steps] * (k // steps) + ([k % steps] if k % steps else [])


def budget_steps(epochs: float, rounds: int, n: int, batch_size: int) -> int:
    """The optimiser steps ``rounds`` rounds of ``epochs`` passes over ``n`` items in batches of
    ``batch_size`` take in all (:func:`round_steps` summed; one round: :func:`epoch_steps`)."""
    steps = math.ceil(n / batch_size)
    if rounds == 1:
        return sum(epoch_steps(epochs, steps))
    return _all_rounds_steps(epochs, rounds, steps)


def _all_rounds_steps(epochs: float, rounds: int, steps: int) -> int:
    """T, the steps of ``rounds`` rounds of ``epochs`` passes over ``steps`` batches, that
    :func:`round_steps` divides among the rounds."""
    return round(float(epochs) * rounds * steps)


def balanced_weights(groups) -> torch.Tensor:
    """Per-item sampling weights under which every group (a domain) is drawn equally often:
    1 / (G · size of the item's group)."""
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    return torch.from_numpy(1.0 / (len(counts) * counts[inverse].astype(np.float64)))


def finetune(moe: nn.Module, x: np.ndarray, y: np.ndarray, section: DictConfig, seed: int,
             train_router: bool, train_experts: bool, loss_fn: Callable | None = None,
             desc: str = "finetune", sample_weights: torch.Tensor | None = None) -> dict:
    """Fine-tune router (+ λ, at ``section.lambda_lr``) and/or experts of a MoE model
    (``metamoe.models.moe.MoEMixin``) with :func:`train`; everything of M0 stays frozen."""
    moe.freeze_base()
    groups = []
    for flag, params, lr in ((train_router, moe.router_parameters(), section.lr),
                             (train_router, moe.lambda_parameters(), section.lambda_lr),
                             (train_experts, moe.expert_parameters(), section.lr)):
        if flag and params:
            groups.append({"params": params, "lr": lr})
        else:
            for p in params:
                p.requires_grad_(False)
    if not groups or section.epochs == 0 or len(x) == 0:
        return {"loss": float("nan"), "examples": 0}
    kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
    return train(moe, torch.as_tensor(x), torch.as_tensor(y), section, params=groups,
                 seed=seed, desc=desc, log_every=1, sample_weights=sample_weights, **kw)


def _pad_id(model: nn.Module) -> int:
    return int(getattr(getattr(model, "cfg", None), "pad_id", 0) or 0)


@torch.no_grad()
def batched_apply(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                  x: np.ndarray | torch.Tensor | Dataset, batch_size: int) -> torch.Tensor:
    """``fn`` over the inputs in batches (texts grouped by length), on the current runtime's
    device; float32 outputs on the CPU, in the order of the inputs. ``x``: an array, or a
    Dataset of inputs (or of (input, label) items)."""
    data = as_dataset(x)
    n = len(data)
    if n == 0:
        raise ValueError("no inputs to evaluate")
    rt = device.current()
    rt.place(model)
    model.eval()
    lengths = dataset_lengths(data, _pad_id(model))
    order = torch.arange(n) if lengths is None else torch.argsort(lengths, stable=True)
    index = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    outs = []
    # Long loops (e.g. the public pool's embedding) report about ten times.
    report = Progress(len(index), f"inference over {n} inputs", unit="batch", lines=10) \
        if len(index) >= PROGRESS_MIN_BATCHES else None
    for xb in batches(data, index, rt.workers, rt.is_cuda):
        if isinstance(xb, (tuple, list)):
            xb = xb[0]
        with rt.autocast():
            outs.append(device.host(fn(rt.batch(xb)).float()))
        if report is not None:
            report.step()
    if report is not None:
        report.close()
    out = torch.cat(outs)
    if lengths is None:
        return out
    res = torch.empty_like(out)
    res[order.to(out.device)] = out
    return res


def _length_grouped(order: torch.Tensor, lengths: torch.Tensor, batch_size: int,
                    gen: torch.Generator) -> list[torch.Tensor]:
    """HF's LengthGroupedSampler: mega-batches of 50 batches from the random ``order``, each
    sorted by length (longest first), cut into batches; the batches then shuffled (seeded)."""
    mega = 50 * batch_size
    batches = []
    for i in range(0, len(order), mega):
        chunk = order[i:i + mega]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[p] for p in perm]


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor | Dataset,
                   batch_size: int = 512) -> torch.Tensor:
    return batched_apply(model, model, x, batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor | Dataset,
             y: np.ndarray | torch.Tensor | None = None, classes: Sequence[int] | None = None,
             batch_size: int = 512) -> float:
    """Top-1 accuracy; with ``classes`` the argmax runs over that label subset only. ``x``:
    inputs with labels ``y``, or a Dataset of (input, label) items (``y=None``)."""
    data = as_dataset(x, y)
    logits = predict_logits(model, data, batch_size)
    labels = dataset_labels(data)
    if classes is not None:
        cls = torch.as_tensor(list(classes))
        pred = cls[logits[:, cls].argmax(1)]
    else:
        pred = logits.argmax(1)
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


@torch.no_grad()
def features(model: nn.Module, x: np.ndarray | torch.Tensor | Dataset, kind: str = "tokens",
             batch_size: int = 1024) -> np.ndarray:
    """Frozen-model embeddings of x in batches, float32 numpy: ``tokens`` (all last-layer
    tokens, ``forward_embedding``) or ``cls`` (the pooled feature, ``forward_features``)."""
    fn = model.forward_embedding if kind == "tokens" else model.forward_features
    return batched_apply(model, fn, x, batch_size).numpy().astype(np.float32)
