"""Screening of the clients' expert uploads before unify: a well-formed but harmful upload.

The server's upload checks (``protocol.check_arrays``: keys, shapes, dtype, finiteness, size)
stop accidents, not an authenticated client that sends a poisoned expert. This module judges
each expert from what the server legitimately holds — M0, the public pool and each client's
proxies with their public labels — and nothing a client did not upload:

* **function on its own proxies**: the expert (M0 + its LoRA) against M0 on the proxies the
  server chose for that client. Honest experts were trained on those proxies (or at least on
  data they resemble); one trained on permuted labels, or a scaled delta, loses on them:
  ``proxy_loss_ratio`` (expert / M0 cross-entropy) and ``proxy_acc_drop`` (M0 - expert).
* **size of the delta**: ``delta_ratio`` = max over layers and fc1/fc2 of ‖ΔW‖_F / ‖W0‖_F;
  ``delta_vs_median``, it over the clients' median (three or more clients), and ``delta_z``,
  its robust z-score (log scale, median / MAD) among ``screen.min_clients_z`` or more.
* **router vectors against the proxies**: the FFN-input means of the client's proxies under
  its expert, μ_p, are what its router vectors v_p partly average (``expert.router_data``
  union). ``router_norm_ratio_{min,max}`` = ‖v_l‖ / ‖μ_l‖ over layers (a scaled vector is
  out of range); ``router_fit`` = mean over layers of the cosine of v_p and μ_p, both centred
  on M0's FFN-input mean over all proxies, and ``router_gap`` = how much better another
  client's proxies fit v_p than its own (vectors copied from another client, or a sketch
  steered to proxies that do not resemble the client's data).
* **replays**: two uploads whose LoRA tensors have cosine >= ``max_duplicate_cos`` are one
  upload sent twice; the member whose router vectors fit its own proxies worse is rejected.

Robust by construction: an accepted client's router rows longer than ``screen.router_clip`` x
‖μ_l‖ are shortened to it before the router is built, so no vector's length alone captures the
routing. Thresholds are ``screen.*`` (``config.ScreenConf``), chosen on clean runs.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metamoe.models.lora import (
    FFN_TARGETS,
    ffn_input_means,
    inject_ffn_lora,
    load_lora_state_dict,
    lora_key,
)
from metamoe.training import predict_logits

STATS = ("proxy_loss_ratio", "proxy_acc_drop", "delta_ratio", "delta_vs_median", "delta_z", "router_norm_ratio_min",
         "router_norm_ratio_max", "router_fit", "router_gap")


def _loss_acc(logits: torch.Tensor, y: np.ndarray, classes: np.ndarray) -> tuple[float, float]:
    cls = torch.as_tensor(classes)
    target = torch.searchsorted(cls, torch.as_tensor(y))
    sub = logits[:, cls]
    return (float(F.cross_entropy(sub, target)),
            float((sub.argmax(1) == target).float().mean()))


def delta_ratio(seed: nn.Module, lora: dict[str, np.ndarray], scale: float) -> float:
    """max over layers and fc1/fc2 of ‖scale · B A‖_F / ‖W0‖_F."""
    worst = 0.0
    for l, ffn in enumerate(seed.ffn_layers()):
        for t in FFN_TARGETS:
            w0 = getattr(ffn, t).weight.detach().float().cpu()
            a = torch.as_tensor(lora[lora_key(l, t, "lora_A")]).float()
            b = torch.as_tensor(lora[lora_key(l, t, "lora_B")]).float()
            worst = max(worst, float((b @ a).norm() * scale / w0.norm().clamp(min=1e-12)))
    return worst


def _flat(lora: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(lora[k], np.float64).ravel() for k in sorted(lora)])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _fit(v: np.ndarray, mu: np.ndarray, centre: np.ndarray) -> float:
    """Mean over layers of the cosine of (v - centre) and (mu - centre)."""
    return float(np.mean([_cos(v[l] - centre[l], mu[l] - centre[l]) for l in range(len(v))]))


def screen_experts(seed: nn.Module, pool_x, pool_y: np.ndarray, experts: dict[str, tuple],
                   proxies: dict[str, np.ndarray], sc, rank: int, alpha: float
                   ) -> tuple[dict[str, dict[str, float]], dict[str, str], dict[str, np.ndarray]]:
    """Screen every client's (LoRA, router vectors, metrics) upload.

    ``proxies[c]``: pool indices the server chose for client c. Returns (statistics per client,
    {rejected client: reason}, router vectors of the accepted clients after the clip)."""
    names = list(experts)
    scale = alpha / rank
    labelled = pool_y >= 0
    classes = np.unique(pool_y[labelled])
    stats: dict[str, dict[str, float]] = {n: {} for n in names}
    mus: dict[str, np.ndarray] = {}
    union = np.unique(np.concatenate([np.asarray(proxies.get(n, []), np.int64) for n in names]
                                     + [np.zeros(0, np.int64)]))
    centre = ffn_input_means(seed, pool_x[union]).numpy() if len(union) else None
    for n in names:
        lora, vec = experts[n][0], np.asarray(experts[n][1], np.float64)
        st = stats[n]
        st["delta_ratio"] = delta_ratio(seed, lora, scale)
        idx = np.asarray(proxies.get(n, []), np.int64)
        idx = idx[labelled[idx]] if len(idx) else idx
        if not len(idx):
            continue
        model = inject_ffn_lora(copy.deepcopy(seed), rank, alpha)
        load_lora_state_dict(model, {k: torch.from_numpy(np.asarray(v)) for k, v in lora.items()})
        x, y = pool_x[idx], pool_y[idx]
        l0, a0 = _loss_acc(predict_logits(seed, x), y, classes)
        le, ae = _loss_acc(predict_logits(model, x), y, classes)
        st["proxy_loss_ratio"] = le / max(l0, 1e-12)
        st["proxy_acc_drop"] = a0 - ae
        mu = ffn_input_means(model, x).numpy().astype(np.float64)
        mus[n] = mu
        ratio = np.linalg.norm(vec, axis=1) / np.maximum(np.linalg.norm(mu, axis=1), 1e-12)
        st["router_norm_ratio_min"], st["router_norm_ratio_max"] = float(ratio.min()), \
            float(ratio.max())
    logs = {n: math.log(max(stats[n]["delta_ratio"], 1e-30)) for n in names}
    if len(names) >= 3:  # the median of three or more is not moved by one client
        med = float(np.median([stats[n]["delta_ratio"] for n in names]))
        for n in names:
            stats[n]["delta_vs_median"] = stats[n]["delta_ratio"] / max(med, 1e-30)
    if len(names) >= int(sc.min_clients_z):
        med = float(np.median(list(logs.values())))
        mad = 1.4826 * float(np.median([abs(v - med) for v in logs.values()]))
        for n in names:
            stats[n]["delta_z"] = (logs[n] - med) / max(mad, 1e-6)
    if centre is not None:
        for n in mus:
            vec = np.asarray(experts[n][1], np.float64)
            fits = {j: _fit(vec, mus[j], centre) for j in mus}
            stats[n]["router_fit"] = fits[n]
            others = [f for j, f in fits.items() if j != n]
            stats[n]["router_gap"] = max(others) - fits[n] if others else 0.0

    rejected: dict[str, str] = {}
    for n in names:
        st, why = stats[n], []
        if st.get("proxy_loss_ratio", 0.0) > sc.max_proxy_loss_ratio:
            why.append(f"loss on its own proxies {st['proxy_loss_ratio']:.2f}x M0's "
                       f"(screen.max_proxy_loss_ratio={sc.max_proxy_loss_ratio})")
        if st.get("proxy_acc_drop", 0.0) > sc.max_proxy_acc_drop:
            why.append(f"accuracy on its own proxies {100 * st['proxy_acc_drop']:.1f} points "
                       f"below M0's (screen.max_proxy_acc_drop={sc.max_proxy_acc_drop})")
        if st["delta_ratio"] > sc.max_delta_ratio:
            why.append(f"LoRA delta {st['delta_ratio']:.3g}x M0's weight norm "
                       f"(screen.max_delta_ratio={sc.max_delta_ratio})")
        if st.get("delta_vs_median", 0.0) > sc.max_delta_vs_median:
            why.append(f"LoRA delta {st['delta_vs_median']:.2f}x the clients' median "
                       f"(screen.max_delta_vs_median={sc.max_delta_vs_median})")
        if st.get("delta_z", 0.0) > sc.max_delta_z:
            why.append(f"LoRA delta norm robust z-score {st['delta_z']:.1f} against the other "
                       f"clients (screen.max_delta_z={sc.max_delta_z})")
        r = float(sc.router_norm_range)
        if "router_norm_ratio_max" in st and not (
                1 / r <= st["router_norm_ratio_min"] and st["router_norm_ratio_max"] <= r):
            why.append(f"router vector norms {st['router_norm_ratio_min']:.2f}-"
                       f"{st['router_norm_ratio_max']:.2f}x its proxies' FFN-input means "
                       f"(screen.router_norm_range={r})")
        if st.get("router_gap", 0.0) > sc.max_router_gap:
            why.append(f"router vectors fit another client's proxies better than its own by "
                       f"{st['router_gap']:.2f} (screen.max_router_gap={sc.max_router_gap})")
        if why:
            rejected[n] = "; ".join(why)
    flats = {n: _flat(experts[n][0]) for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if _cos(flats[a], flats[b]) < sc.max_duplicate_cos:
                continue
            worse = max((a, b), key=lambda n: (stats[n].get("router_gap", 0.0),
                                               names.index(n)))
            other = b if worse == a else a
            stats[worse]["duplicate_of"] = other
            rejected[worse] = "; ".join(filter(None, [
                rejected.get(worse), f"its expert duplicates client {other}'s upload "
                                     f"(cosine >= screen.max_duplicate_cos={sc.max_duplicate_cos})"]))
    vectors = {}
    for n in names:
        if n in rejected:
            continue
        vec = np.asarray(experts[n][1], np.float32).copy()
        if sc.router_clip and n in mus:
            cap = float(sc.router_clip) * np.linalg.norm(mus[n], axis=1)
            norm = np.linalg.norm(vec, axis=1)
            shrink = np.minimum(1.0, cap / np.maximum(norm, 1e-12))
            vec = (vec * shrink[:, None]).astype(np.float32)
            stats[n]["router_clipped_layers"] = float((shrink < 1.0).sum())
        vectors[n] = vec
    return stats, rejected, vectors
