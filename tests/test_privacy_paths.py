"""Privacy audit over every upload path: every sketch kind (the logistic sketch at normal size
in ``tests/test_privacy.py``; centroids at exactly ``privacy.min_count`` samples, and noisy, with
DP on everything a client sends), and the upload path of every baseline that trains on
private data on the clients — private-only experts (FlexOlmo and the
one-shot suite), FedAvg, the FL-MoE family (FedAlign-MoE: router, λ, experts, routing
statistics) and DDOME (selection, gate, experts, evaluation).

Each case is one real run of the tiny vision benchmark in Flower's simulation behind a recording
Grid; every reply is checked as ``tests/upload_audit.py`` describes (whitelist, nothing indexed
by sample, no uploaded vector or round change close to a raw sample, an M0 embedding, a sample's
FFN input or a sample's gradient at the uploaded weights, and aggregates far from every single
sample). Below the floor (n ∈ {1, 5, min_count − 1}) a client uploads nothing but its refusal:
``tests/test_privacy_min_count.py``. UnrestrictedMoE reads the private sets on the server by
design (a non-private upper bound, marked so in every result) and is not a client upload path.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from tests.upload_audit import (
    AGGREGATES,
    Candidates,
    aggregate_far,
    lora_gradients,
    lora_model,
    moe_gradients,
    record_run,
    vectors,
    whitelist,
)

# Private sets of 60 samples (3 x privacy.min_count), or exactly min_count: the audit compares
# every upload with every sample's candidates (its gradient at every uploaded state too).
N_PRIVATE = 60
PATHS = {  # case: (method, overrides, message types every client must have sent)
    # centroid cells at the floor: a 20-sample set is one cell of 20
    "centroids-at-min-count": ("metamoe", "sketch.kind=centroids benchmark.max_train=20",
                               ("query.sketch", "train.expert", "evaluate")),
    # DP on everything a client sends: noisy centroids, noisy router vectors, DP-SGD expert
    "centroids-dp-everything": ("metamoe", "sketch.kind=centroids sketch.dp_sigma=1 "
                                "privacy.router_dp_sigma=1 privacy.expert_dp_sigma=1",
                                ("query.sketch", "train.expert", "evaluate")),
    "private-only-experts": ("flexolmo", "", ("query.sketch", "train.expert", "evaluate")),
    "fedavg": ("fedavg", "", ("query.fl_seed", "train", "evaluate")),
    "fedalign_moe": ("fedalign_moe", "", ("train.fl_moe",)),
    # one expert: client 0 is its anchor, client 1 a normal client (selection by gate scores;
    # the only selection reply of a round, hence min_clients=1)
    "ddome": ("ddome", "fl.ddome_experts=1 fl.ddome_top_k=1 federation.min_clients=1",
              ("train.ddome", "evaluate.ddome")),
}


def _names(cfg) -> dict[str, int]:
    from metamoe.data import client_names

    return {n: i for i, n in enumerate(client_names(cfg))}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PATHS))
def test_upload_path_holds_no_sample_embedding_or_gradient(tmp_path, cache_dir, case):
    from metamoe.clients.fl_local import moe_local_stats
    from metamoe.clients.privacy import per_sample_ffn_means
    from metamoe.config import resolve_config
    from metamoe.data import client_partition, load_benchmark
    from metamoe.models.moe import MoEConfig, moe_from_seed
    from metamoe.models.moe_state import load_moe_trainable
    from metamoe.protocol import FL_ROUND
    from metamoe.server.seed import get_seed_model

    method, overrides, required = PATHS[case]
    rc = {"benchmark": "tiny", "method": method, "run-id": f"audit-{case}",
          "output-dir": str(tmp_path / "out"), "cache-dir": str(cache_dir),
          "overrides": f"benchmark.max_train={N_PRIVATE} {overrides}"}
    uploads, sent = record_run(rc)
    assert (tmp_path / "out" / f"audit-{case}" / "metrics.json").exists(), "run did not finish"
    cfg = resolve_config(rc)
    bench = load_benchmark(cfg)
    seed, _, _ = get_seed_model(cfg, bench)
    seed.eval()

    # ---- 1. no errors, every upload on the whitelist, every client sent every phase
    assert not [u for u in uploads if "__error__" in u[2]], "client errors"
    allowed = whitelist()
    off_list = sorted({f"{t}/{k}" for t, _n, c in uploads for k in c if (t, k) not in allowed})
    assert not off_list, f"uploads not on the whitelist in metamoe/protocol.py: {off_list}"
    names = _names(cfg)
    part = {nid: names[rec["name"]] for _t, nid, c in uploads for kind, rec in c.values()
            if kind == "ConfigRecord" and rec.get("name") in names}
    assert len(part) == 2, part
    for mtype in required:
        assert {n for t, n, _ in uploads if t == mtype} == set(part), mtype
    if method == "ddome":
        assert len({n for t, n, _ in uploads if t == "query.ddome_select"}) == 1

    worst: dict[str, float] = {}
    checked = aggregates = 0
    for nid, pid in part.items():
        _name, dom = client_partition(cfg, bench, pid)
        n_priv = len(dom.x_train)
        assert n_priv == (cfg.privacy.min_count if "at-min-count" in case else N_PRIVATE)
        bad_sizes = {n_priv, len(dom.x_test)}
        cands = Candidates(seed, dom)
        count: dict[str, int] = {}
        for mtype, n, content in uploads:
            if n != nid:
                continue
            k = count[mtype] = count.get(mtype, -1) + 1
            requests = sent.get((mtype, nid), [])
            request = requests[k] if k < len(requests) else {}
            arrays = {f"{mtype}/{key}/{a}": v for key, (kind, rec) in content.items()
                      if kind == "ArrayRecord" for a, v in rec.items()}
            # ---- 2. nothing indexed by sample
            for key, a in arrays.items():
                assert not set(np.shape(a)) & (bad_sizes | {n_priv + int(cfg.select.m)}), \
                    f"client {pid}: {key} has shape {np.shape(a)}"
            for key, (kind, rec) in content.items():
                if kind != "ArrayRecord":
                    for mk, mv in rec.items():
                        assert not (isinstance(mv, list) and len(mv) in bad_sizes), \
                            (mtype, key, mk)
            # ---- 3. per-sample gradients at the uploaded weights
            rec = {key: r for key, (kind, r) in content.items() if kind == "ArrayRecord"}
            if mtype == "train.expert":
                expert = lora_model(cfg, seed, rec["expert"])
                cands.add_gradients("at the expert", *lora_gradients(expert, cands.x, cands.y))
            elif mtype == "train":
                cands.add_gradients(f"at round {k}", *lora_gradients(
                    lora_model(cfg, seed, rec["arrays"]), cands.x, cands.y))
            elif mtype == "train.ddome":
                experts: dict[str, dict] = {}
                for a, v in rec["experts"].items():
                    e, key = a.split("/", 1)
                    experts.setdefault(e, {})[key] = v
                for e, state in experts.items():
                    cands.add_gradients(f"at round {k} {e}", *lora_gradients(
                        lora_model(cfg, seed, state), cands.x, cands.y))
            elif mtype == "train.fl_moe":
                spec = json.loads(str(request["config"][1][FL_ROUND]))
                cands.add_gradients(f"at round {k}",
                                    *moe_gradients(seed, spec, rec["moe"], cands.x, cands.y))
            # ---- 3. content: every vector and its change from what the server sent
            vecs = vectors(arrays)
            for key, (kind, r) in content.items():
                old = request.get(key)
                if kind == "ArrayRecord" and old and old[0] == "ArrayRecord":
                    vecs += [(f"{mtype}/{key}/{a} - sent", np.asarray(v, np.float64).ravel()
                              - np.asarray(old[1][a], np.float64).ravel())
                             for a, v in r.items() if a in old[1]
                             and np.shape(old[1][a]) == np.shape(v)]
            for key, vec in vecs:
                # (a single number, e.g. λ, is no vector: any two are collinear)
                if vec.size < 2 or not np.linalg.norm(vec) > 0:
                    continue
                if key.startswith(AGGREGATES):  # a mean: far from each sample's candidate
                    aggregates += cands.check_aggregate(f"client {pid}: {key}", vec)
                else:
                    checked += cands.check(f"client {pid}: {key}", vec, worst)
            # ---- 4. aggregates: far from every single sample
            if mtype == "train.expert":
                single = per_sample_ffn_means(expert, cands.x).numpy()  # under the expert
                d, spread = aggregate_far(rec["router"]["vectors"], single)
                assert d > 0.2 * spread, f"client {pid}: router vectors within {d:.4f} of a " \
                                         f"single sample (spread {spread:.4f})"
                aggregates += 1
            if "stats" in rec:
                spec = json.loads(str(request["config"][1][FL_ROUND]))
                moe = moe_from_seed(copy.deepcopy(seed), MoEConfig(**spec["moe"]))
                load_moe_trainable(moe, rec["moe"])
                descriptor = str(spec.get("descriptor", "output"))
                p, h, _ = moe_local_stats(moe, cands.x, descriptor,
                                          min_count=int(cfg.privacy.min_count))
                assert np.allclose(p, rec["stats"]["p"], atol=1e-5), "p is not over all of Dp"
                kept = np.abs(rec["stats"]["h"]).sum(-1) > 0
                assert np.allclose(h[kept], rec["stats"]["h"][kept], atol=1e-4)
                singles = np.stack([moe_local_stats(moe, cands.x[i:i + 1], descriptor)[1]
                                    for i in range(n_priv)])  # [n, L, E, d]
                for li, ei in zip(*np.nonzero(kept), strict=True):
                    d, spread = aggregate_far(rec["stats"]["h"][li, ei], singles[:, li, ei])
                    assert d > 0.2 * spread, f"client {pid}: h[{li}, {ei}] near one sample"
                    aggregates += 1
    print(f"{case}: {checked} comparisons, {aggregates} aggregates; largest |cos|:",
          {k: round(v, 3) for k, v in sorted(worst.items())})
    assert checked > 50, f"only {checked} comparisons were made"
    if method in ("metamoe", "flexolmo", "fedalign_moe"):
        assert aggregates >= 2
