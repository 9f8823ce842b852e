"""Many clients, few experts: group K clients' uploads into E ≪ K experts on the server.

``unify.groups``: ``none`` (one expert per client), an integer E, or ``auto``. Grouping reads
only what each client uploaded in the expert phase (``clients/stages.py expert_stage``
produces it): its router vectors (per-layer mean FFN input over its whole training set), its
LoRA expert and its sample count ``n_train``. Nothing else about a client enters, and nothing
here can reach a client's data (tests/test_grouping.py checks both).

* **Features**: per layer, the router vectors centred on their mean over clients and scaled to
  unit norm, concatenated (every layer weighs the same; the centring removes what all clients
  share, e.g. M0's own activation profile).
* **Groups**: k-means (k-means++ with 10 seeded restarts) with E clusters; ``auto`` picks E in
  2..min(K - 1, 16) with the best cosine silhouette, and keeps one expert per client when K < 4
  or no E reaches a silhouette of 0.5 (no clear group structure: k-means on
  structureless router vectors scores 0.16-0.29, three domains' clients 0.91-0.94).
* **One expert per group**: the members' LoRA deltas averaged with weights n_train / Σ n_train,
  ΔW_g = Σ_i w_i B_i A_i, computed exactly in factored form and cut back to the clients' rank
  r by a truncated SVD (so the MoE of E groups has the shape of a MoE of E clients); the share
  of ΔW_g's energy kept is reported. Router vectors: the members' n_train-weighted mean.
* ``unify.group_expert=fedavg`` trains one shared expert per group instead
  (``strategies/group_fl.py``); its groups come from the proxy selections
  (:func:`proxy_features`), since no expert exists yet.
"""

from __future__ import annotations

import logging

import numpy as np

from metamoe.config import ConfigError
from metamoe.models.lora import is_lora_key
from metamoe.strategies.fl_common import weighted_mean

log = logging.getLogger("metamoe")
AUTO_MAX_GROUPS = 16
AUTO_MIN_SILHOUETTE = 0.5


def parse_groups(value) -> int | str:
    """``unify.groups`` -> "none", "auto" or a positive int (ConfigError otherwise)."""
    v = str(value).strip().lower()
    if v in ("none", "auto"):
        return v
    try:
        e = int(v)
    except ValueError:
        e = 0
    if e < 1:
        raise ConfigError(f"unify.groups must be 'none', 'auto' or a positive integer, got "
                          f"{value!r}")
    return e


def features(vectors: list[np.ndarray]) -> np.ndarray:
    """[K, L·d] grouping features from K clients' router vectors [L, d] (see module doc)."""
    v = np.stack([np.asarray(x, np.float64) for x in vectors])  # [K, L, d]
    v = v - v.mean(axis=0, keepdims=True)
    v = v / np.maximum(np.linalg.norm(v, axis=2, keepdims=True), 1e-12)
    return v.reshape(len(vectors), -1)


def proxy_features(pool_features: np.ndarray, selections: list[np.ndarray]) -> np.ndarray:
    """[K, d] grouping features from the server's own data, for ``unify.group_expert=fedavg``
    (groups are formed before any expert exists): per client, the mean unit-norm public-pool
    embedding of the proxies the server selected for it from its sketch, centred over clients
    and scaled to unit norm (proxy sets of one domain's clients overlap, so their means agree)."""
    z = np.asarray(pool_features, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    means = np.stack([z[np.asarray(idx, np.int64)].mean(axis=0) for idx in selections])
    return features([m[None] for m in means])


def assign(feats: np.ndarray, groups: int | str, seed: int) -> tuple[np.ndarray, dict]:
    """Group label per client (0..E-1, numbered by first member) and how it was chosen."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    k = len(feats)

    def kmeans(e: int) -> np.ndarray:
        return KMeans(n_clusters=e, n_init=10, random_state=seed).fit_predict(feats)

    info: dict = {"requested": groups}
    if groups == "none":
        labels = np.arange(k)
    elif groups == "auto":
        scores = {}
        if k >= 4:
            for e in range(2, min(k - 1, AUTO_MAX_GROUPS) + 1):
                lab = kmeans(e)
                if len(set(lab)) > 1:
                    scores[e] = float(silhouette_score(feats, lab, metric="cosine"))
        info["silhouette"] = {str(e): round(s, 4) for e, s in scores.items()}
        best = max(scores, key=lambda e: (scores[e], -e)) if scores else None
        labels = kmeans(best) if best and scores[best] >= AUTO_MIN_SILHOUETTE else np.arange(k)
    else:
        if groups > k:  # clients dropped out or were rejected: one expert each, run goes on
            log.warning("unify.groups=%d but only %d experts reached unify: one group each",
                        groups, k)
            info["clamped_to"] = k
        labels = kmeans(min(groups, k))
    order = {g: i for i, g in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[g] for g in labels.tolist()]), info


def merge_loras(loras: list[dict[str, np.ndarray]], weights: np.ndarray,
                rank: int) -> tuple[dict[str, np.ndarray], float]:
    """Σ_i w_i B_i A_i per LoRA module as one LoRA of ``rank`` (truncated SVD of the exact
    weighted sum, via QR of the stacked factors); returns it and the smallest share of a
    module's ΔW energy (squared singular values) the truncation keeps."""
    w = np.asarray(weights, np.float64)
    out: dict[str, np.ndarray] = {}
    kept = 1.0
    for key_a in [k for k in loras[0] if is_lora_key(k, "lora_A")]:
        key_b = key_a.replace("lora_A", "lora_B")
        a = np.concatenate([np.asarray(lo[key_a], np.float64) for lo in loras], axis=0)
        b = np.concatenate([wi * np.asarray(lo[key_b], np.float64)
                            for wi, lo in zip(w, loras, strict=True)], axis=1)
        qb, rb = np.linalg.qr(b)  # ΔW = B A = Qb (Rb Ra^T) Qa^T
        qa, ra = np.linalg.qr(a.T)
        u, s, vh = np.linalg.svd(rb @ ra.T)
        r = min(rank, len(s))
        energy = float((s ** 2).sum())
        if energy > 0:
            kept = min(kept, float((s[:r] ** 2).sum()) / energy)
        root = np.sqrt(s[:r])
        new_b = np.zeros((b.shape[0], rank))
        new_a = np.zeros((rank, a.shape[1]))
        new_b[:, :r] = (qb @ u[:, :r]) * root
        new_a[:r] = root[:, None] * (vh[:r] @ qa.T)
        out[key_a], out[key_b] = new_a.astype(np.float32), new_b.astype(np.float32)
    return out, kept


def members_of(names: list[str], labels: np.ndarray) -> dict[str, list[str]]:
    """{"group-<g>": [client names]} of the group labels from :func:`assign`."""
    return {f"group-{g}": [n for n, lab in zip(names, labels.tolist(), strict=True) if lab == g]
            for g in range(int(labels.max()) + 1)}


def group_experts(experts: dict[str, tuple], groups, seed: int,
                  rank: int) -> tuple[dict[str, tuple], dict]:
    """The uploaded experts {client: (LoRA, router vectors, metrics)} as one expert per group
    {"group-<g>": (merged LoRA, weighted router vectors, {"n_train", "members"})} and the
    report {groups: {group: [clients]}, requested, E, kept_energy, ...}. ``groups`` "none"
    returns ``experts`` unchanged."""
    g = parse_groups(groups)
    if g == "none" or not experts:
        return experts, {}
    names = list(experts)
    labels, info = assign(features([experts[c][1] for c in names]), g, seed)
    n = np.array([float(experts[c][2].get("n_train", 1.0)) for c in names])
    out: dict[str, tuple] = {}
    members = members_of(names, labels)
    kept: dict[str, float] = {}
    for gname, ms in members.items():
        idx = [names.index(c) for c in ms]
        if len(idx) == 1:  # a group of one is that client's expert, unchanged
            lora, kept[gname] = experts[ms[0]][0], 1.0
        else:
            lora, kept[gname] = merge_loras([experts[c][0] for c in ms],
                                            n[idx] / n[idx].sum(), rank)
        out[gname] = (lora, weighted_mean([experts[c][1] for c in ms], n[idx]),
                      {"n_train": float(n[idx].sum()), "members": len(idx)})
    report = {**info, "E": len(out), "groups": members,
              "kept_energy": {k: round(v, 6) for k, v in kept.items()}}
    log.info("unify.groups=%s: %d clients -> %d experts %s", groups, len(names), len(out),
             {k: len(v) for k, v in members.items()})
    return out, report


def purity(members: dict[str, list[str]], domain_of: dict[str, str]) -> float:
    """Σ_g (members of g's most common domain) / K: 1.0 when every group holds one domain."""
    total = sum(len(v) for v in members.values())
    if not total:
        return float("nan")
    hits = 0
    for ms in members.values():
        doms = [domain_of[c] for c in ms]
        hits += max(doms.count(d) for d in set(doms))
    return hits / total
