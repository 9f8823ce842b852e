"""Client-side stages: relevance sketch, proxy-aligned expert, evaluation.

Pure functions of (config, models, local data); the ClientApp handlers in ``handlers.py``
only decode messages, call these and encode the replies. The comment above each return says
exactly what of it is uploaded. Each stage first checks that every aggregate it uploads
covers at least ``privacy.min_count`` private samples and raises
:class:`~metamoe.clients.privacy.PrivacyError` otherwise (``clients/privacy.py``).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metamoe.clients.privacy import dp_sigmas, effective_count, expert_dp, require_min_count, sample_token_counts
from metamoe.data import Domain, VisionBenchmark
from metamoe.data.dataset import as_inputs, concat_inputs
from metamoe.dpsgd import dpsgd_epsilon
from metamoe.models.lora import ffn_input_means, inject_ffn_lora, load_lora_state_dict, lora_state_dict
from metamoe.models.moe import M0_FFN, MoEMixin
from metamoe.proxy import sketch as psk
from metamoe.training import accuracy, features, predict_logits, seeded, train

log = logging.getLogger("metamoe")


def sketch_stage(cfg: DictConfig, seed: nn.Module, dom: Domain, bench: VisionBenchmark,
                 rng_seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Relevance sketch of Dp on frozen M0 features (paper §3.2 / App. A).

    logistic: Dp (positives) vs a random public sample of the same size (negatives);
    centroids: k-means centroids with counts of Dp alone (no public sample needed), no cell
    below ``privacy.min_count`` (smaller ones are merged into their nearest cell).
    """
    min_count = int(cfg.privacy.min_count)
    require_min_count(f"the {cfg.sketch.kind} sketch (fit on the private train split)",
                      len(dom.x_train), min_count)
    emb = cfg.select.embedding
    pos = features(seed, dom.x_train, emb)
    sk = cfg.sketch
    rng = np.random.default_rng(rng_seed)
    z = dp_sigmas(cfg, len(dom.x_train))["sketch"]  # privacy.target_epsilon may set it
    noise = z if z > 0 else None
    # Public data only from here on: a seeded random sample of the pool.
    n_pub = len(pos) if sk.num_negatives < 0 else int(sk.num_negatives)
    pub_idx = np.sort(rng.choice(len(bench.pool_x), size=min(n_pub, len(bench.pool_x)),
                                 replace=False))
    public = features(seed, bench.pool_x[pub_idx], emb)
    if sk.kind == "logistic":
        sketch = psk.fit_logistic_sketch(pos, public, l2=sk.l2, clip_norm=sk.dp_clip,
                                         noise_multiplier=noise, delta=sk.dp_delta,
                                         seed=rng_seed)
    else:
        centers = None
        if noise is not None:  # DP needs data-independent cells: k-means of public data
            from sklearn.cluster import KMeans

            centers = KMeans(n_clusters=int(sk.centroids), n_init=3, random_state=rng_seed
                             ).fit(public).cluster_centers_.astype(np.float32)
        sketch = psk.fit_centroid_sketch(pos, int(sk.centroids), centers=centers,
                                         clip_norm=sk.dp_clip, noise_multiplier=noise,
                                         delta=sk.dp_delta, seed=rng_seed,
                                         min_count=min_count)
    info = {"n_private": len(pos)}
    if sketch.privacy is not None:
        info["dp_epsilon"] = float(sketch.privacy.epsilon)
        info["dp_delta"] = float(sketch.privacy.delta)
    # Uploaded: the sketch's arrays (a weight vector + bias, or k centroids + counts).
    return sketch.to_arrays(), info


def expert_stage(cfg: DictConfig, seed: nn.Module, dom: Domain, bench: VisionBenchmark,
                 proxy_idx: np.ndarray, rng_seed: int, init: dict | None = None,
                 epochs: float | None = None, final: bool = True,
                 round_of: tuple[int, int] | None = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict]:
    """Proxy-aligned expert: LoRA on M0's FFNs trained on Dp ∪ proxies (paper §3.3).

    Proxies keep their public-pool labels in the shared named-class head (as the paper keeps
    ImageNet labels next to the client classes); everything but the LoRA is frozen.
    Returns (LoRA A/B arrays, router vectors [L, d], local metrics). Refused
    (:class:`~metamoe.clients.privacy.PrivacyError`) when Dp, or its effective share of the
    router vectors' tokens, is below ``privacy.min_count``: the proxies do not count (the
    server chose them and can subtract their part of the mean).
    ``init`` / ``epochs``: one round of a group's shared expert (``unify.group_expert=fedavg``,
    ``strategies/group_fl.py``): training starts from the server's LoRA ``init`` and runs
    ``epochs`` passes (a share of ``expert.epochs``) instead of ``expert.epochs``; ``round_of``
    (r, R) makes the R rounds' steps add up to exactly those of ``expert.epochs`` passes
    (``training.round_steps``).
    ``final=False`` (a group's non-final round): the LoRA and its training scalars only, no
    router vectors (None) and no train accuracy; only the last round's are used.
    """
    ec = cfg.expert
    if epochs is not None:
        ec = OmegaConf.merge(OmegaConf.to_container(ec), {"epochs": float(epochs)})
    pc = cfg.privacy
    min_count = int(pc.min_count)
    require_min_count("the expert (LoRA trained on the private train split) and its train "
                      "metrics", len(dom.x_train), min_count)
    # Router vectors: a mean over all tokens (each sample weighs by its real tokens; with
    # router DP every sample weighs the same).
    z = dp_sigmas(cfg, len(dom.x_train))
    router_support = len(dom.x_train) if z["router"] > 0 else \
        effective_count(sample_token_counts(seed, dom.x_train))
    require_min_count("the router vectors (mean FFN input over the private train split's "
                      "tokens)", router_support, min_count, "private samples (effective)")
    # LoRA A is drawn from torch's global RNG: seed it, so an expert depends only on
    # (config, data, rng_seed) and not on what ran before in this process.
    with seeded(rng_seed):
        model = inject_ffn_lora(copy.deepcopy(seed), ec.rank, ec.alpha)
    if init is not None:
        load_lora_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in init.items()})
    # Inputs stay lazily decoded where the client's data is (CLIP-sized images); expert
    # training reads the augmented view of the train split when there is one.
    xp = as_inputs(dom.x_train)
    yp = torch.from_numpy(dom.y_train)
    xp_train = xp if dom.x_train_aug is None else dom.x_train_aug.restart()
    if ec.use_proxies and len(proxy_idx):
        xq = torch.from_numpy(bench.pool_x[proxy_idx])
        yq = torch.from_numpy(bench.pool_y[proxy_idx])
        x, y = concat_inputs(xp, xq), torch.cat([yp, yq])
        x_train = x if xp_train is xp else concat_inputs(xp_train, xq)
    else:
        xq, x, y, x_train = yp[:0], xp, yp, xp_train
    params = [p for p in model.parameters() if p.requires_grad]
    dp = expert_dp(cfg, z["expert"])
    hist = train(model, x_train, y, ec, params=params, seed=rng_seed,
                 desc=f"expert[{dom.name}]", log_every=1, dp=dp, round_of=round_of)
    router_x = x if ec.router_data == "union" else xp
    # Uploaded: the LoRA weight deltas and the per-layer means over all of router_x.
    vectors = ffn_input_means(model, router_x).numpy().astype(np.float32) if final else None
    dp_info: dict[str, float] = {}
    if final and z["router"] > 0:  # optional: Gaussian mechanism on the clipped mean instead
        from metamoe.clients.privacy import private_router_vectors

        vectors, dp_info = private_router_vectors(model, router_x, pc.router_dp_clip,
                                                  z["router"], pc.router_dp_delta,
                                                  seed=rng_seed + 7)
    lora = {k: v.numpy().astype(np.float32) for k, v in lora_state_dict(model).items()}
    metrics = {"n_train": int(len(x)), "n_private": int(len(xp)), "n_proxies": int(len(xq)),
               "train_loss": float(hist["loss"]), "train_seconds": float(hist["seconds"]),
               **dp_info}
    if final:
        metrics["train_acc_private"] = accuracy(model, xp, yp, dom.classes)
    if dp is not None:  # the expert is post-processing of DP-SGD; metrics over Dp are not
        metrics.pop("train_acc_private", None)
        metrics.pop("train_loss")
        metrics.update(expert_dp_epsilon=dpsgd_epsilon(dp.noise_multiplier,
                                                       hist["dp_sample_rate"],
                                                       hist["dp_steps"], dp.delta),
                       expert_dp_delta=dp.delta, expert_dp_steps=float(hist["dp_steps"]),
                       expert_dp_sample_rate=float(hist["dp_sample_rate"]))
    return lora, vectors, metrics


@torch.no_grad()
def ensemble_accuracy(moe: MoEMixin, x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> float:
    """BTM-style ensemble: the mean of the single experts' class probabilities (uniform)."""
    cls = torch.as_tensor(list(classes))
    probs = 0
    for p in range(moe.moe_cfg.num_experts):
        moe.set_forced(p)
        probs = probs + predict_logits(moe, x)[:, cls].softmax(-1)
    moe.set_forced(None)
    return float((cls[probs.argmax(1)] == y).float().mean())


def evaluate_stage(moe: MoEMixin, dom: Domain, expert_names: list[str],
                   mode: str = "routed", *, references: bool = True,
                   min_count: int = 1) -> dict[str, float]:
    """Accuracy of the unified model, of M0 (zero-shot) and of every single expert on this
    client's own test split, argmax over this domain's classes; plus the routing shares.

    ``mode``: "routed" evaluates the MoE with its router; "ensemble" (BTM) averages the
    experts' predicted probabilities instead of routing. ``references=False`` skips M0 and
    the single experts (the unified model's accuracy and routing shares only).
    ``min_count`` (``privacy.min_count``): refused when the test split is smaller, or its
    effective share of the routed tokens is."""
    if mode not in ("routed", "ensemble"):
        raise ValueError(f"evaluation mode {mode!r} is not 'routed' or 'ensemble'")
    require_min_count("accuracies on the private test split", len(dom.x_test), min_count)
    require_min_count("routing shares over the private test split's tokens",
                      effective_count(sample_token_counts(moe, dom.x_test)), min_count,
                      "private samples (effective)")
    x, y = as_inputs(dom.x_test), torch.from_numpy(dom.y_test)
    out: dict[str, float] = {"n_test": float(len(y))}
    for layer in moe.moe_layers():
        layer.record, layer.route_counts = True, torch.zeros_like(layer.route_counts)
    moe.set_forced(None)
    out["acc_unified"] = accuracy(moe, x, y, dom.classes)
    if mode == "ensemble":
        out["acc_unified"] = ensemble_accuracy(moe, x, y, dom.classes)
    counts = sum(layer.route_counts for layer in moe.moe_layers())
    for layer in moe.moe_layers():
        layer.record = False
    share = (counts / counts.sum().clamp(min=1)).tolist()
    for name, s in zip(expert_names, share):
        out[f"route_share/{name}"] = float(s)
    if not references:
        return out
    moe.set_forced(M0_FFN)
    out["acc_zero_shot"] = accuracy(moe, x, y, dom.classes)
    for p, name in enumerate(expert_names):
        moe.set_forced(p)
        out[f"acc_expert/{name}"] = accuracy(moe, x, y, dom.classes)
    moe.set_forced(None)
    # Uploaded: these scalars only.
    return out


def coverage(seed: nn.Module, dom: Domain, bench: VisionBenchmark,
             selections: dict[str, np.ndarray], emb: str = "tokens",
             min_count: int = 1) -> dict[str, float]:
    """Distance from each private *test* embedding to its nearest proxy, per selection method
    (computed here, on the client): the mean (``coverage/<method>``, the issue's metric) and the
    90th percentile (``coverage_p90/<method>``, how well the tail of Dp is covered). Refused
    when the test split has fewer than ``min_count`` (``privacy.min_count``) samples."""
    require_min_count("coverage metrics over the private test split", len(dom.x_test),
                      min_count)
    zt = torch.from_numpy(features(seed, dom.x_test, emb))
    zt = torch.nn.functional.normalize(zt, dim=1)
    out = {}
    for method, idx in selections.items():
        if len(idx) == 0:
            continue
        zp = torch.nn.functional.normalize(torch.from_numpy(features(seed, bench.pool_x[idx], emb)),
                                           dim=1)
        d = torch.cdist(zt, zp).min(dim=1).values.double()
        out[f"coverage/{method}"] = float(d.mean())
        out[f"coverage_p90/{method}"] = float(torch.quantile(d, 0.9))
    # Uploaded: these two aggregate scalars per method, never a per-sample distance.
    return out
