"""The seed model M0 and the pool embeddings, built once on public data and cached.

Vision: no pretrained vision weights for 28x28 images install offline, so the server pre-trains
M0 on the public pool D0 (public data only) with the shared training loop; the checkpoint and
the pool's M0 features are cached under ``run.cache_dir`` keyed by a hash of everything they
depend on (benchmark, model, pre-training config, seed). Text: M0 is the public pretrained
encoder (frozen) with a linear head the server trains on D0's own labels over the pool's
sentence embeddings, which depend on the encoder and the pool only and are cached once.
Clients receive M0 through Flower messages, never through this cache.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from metamoe.config import config_hash
from metamoe.data import VisionBenchmark
from metamoe.data.dataset import ArrayDataset, LazyDataset
from metamoe.models.io import load_seed, save_seed
from metamoe.models.text import TextClassifier, TextConfig, encoder_fingerprint
from metamoe.models.vit import ViT, ViTConfig
from metamoe.proxy.pool_cache import embed_pool, pool_cache_path
from metamoe.training import accuracy, features, seeded, train

log = logging.getLogger("metamoe")


def cache_dir(cfg: DictConfig) -> Path:
    d = cfg.run.cache_dir or os.environ.get("METAMOE_CACHE_DIR") or \
        str(Path.home() / ".cache" / "metamoe")
    return Path(d)


def vit_config(cfg: DictConfig, num_classes: int) -> ViTConfig:
    m = cfg.model
    return ViTConfig(stem_channels=m.stem_channels, patch_size=m.patch_size, dim=m.dim,
                     depth=m.depth, heads=m.heads, mlp_hidden=m.mlp_hidden,
                     num_classes=num_classes)


def seed_key(cfg: DictConfig) -> str:
    return config_hash({"benchmark": config_hash(cfg.benchmark), "model": config_hash(cfg.model),
                        "pretrain": config_hash(cfg.pretrain), "seed": int(cfg.run.seed)})


def pool_dataset(bench: VisionBenchmark):
    """The pool's (input, label) items as the training loop's Dataset: in-memory arrays, or
    a lazily decoded pool (``kind: local``) read batch by batch."""
    if isinstance(bench.pool_x, np.ndarray):
        return ArrayDataset(bench.pool_x, bench.pool_y)
    return LazyDataset(bench.pool_x, bench.pool_y)


def get_seed_model(cfg: DictConfig, bench: VisionBenchmark) -> tuple[ViT, np.ndarray, dict]:
    """(M0, L2-unnormalised pool features [N0, d], info) — from cache or built now. The
    vision pool's features are an on-disk memmap (``proxy/pool_cache.py``, float32, so the
    picks are those of the same features in memory), never held whole."""
    if cfg.model.arch in ("bert", "causal"):
        return _text_seed(cfg, bench)
    if cfg.model.arch == "clip":
        return _clip_seed(cfg, bench)
    key = seed_key(cfg)
    path = cache_dir(cfg) / f"seed-{key}.safetensors"
    info: dict = {"cache_key": key, "checkpoint": str(path)}
    if path.exists():
        model = load_seed(path)
        log.info("seed model M0 loaded from cache %s", path)
        info["cached"] = True
        return model, _vision_pool_features(cfg, model, bench, key), info
    with seeded(int(cfg.run.seed)):
        model = ViT(vit_config(cfg, bench.num_classes))
    log.info("pre-training seed model M0 on the public pool (%d images, %d epochs)",
             len(bench.pool_x), cfg.pretrain.epochs)
    pool = pool_dataset(bench)
    hist = train(model, pool, None, cfg.pretrain, seed=int(cfg.run.seed),
                 desc="pre-training M0", log_every=1)
    info.update(cached=False, pretrain_loss=hist["loss"], pretrain_seconds=hist["seconds"])
    _atomic_save(path, lambda p: save_seed(model, p))
    feats = _vision_pool_features(cfg, model, bench, key)
    head = np.arange(min(5000, len(bench.pool_y)))
    info["zero_shot_public"] = accuracy(model, bench.pool_x[head], bench.pool_y[head])
    log.info("M0 cached at %s", path)
    return model, feats, info


def _pool_features(cfg: DictConfig, model: nn.Module, bench: VisionBenchmark, key: str,
                   pool_fp: str, model_fp: str, batch_size: int = 1024) -> np.ndarray:
    """M0's ``select.embedding`` features of the pool, through the on-disk cache (float32)."""
    kind = cfg.select.embedding
    path = pool_cache_path(cache_dir(cfg), key, kind, "float32")
    return embed_pool(model, bench.pool_x, path, pool_fp=pool_fp, features=features, kind=kind,
                      dtype="float32", model_fp=model_fp, batch_size=batch_size,
                      overwrite=True)


def _vision_pool_features(cfg: DictConfig, model: ViT, bench: VisionBenchmark, key: str
                          ) -> np.ndarray:
    return _pool_features(cfg, model, bench, key, f"{key}-{len(bench.pool_x)}", key)


def _clip_seed(cfg: DictConfig, bench: VisionBenchmark) -> tuple[nn.Module, np.ndarray, dict]:
    """CLIP M0: the public checkpoint as it is, with the zero-shot head over the pool's class
    names (nothing is trained); the pool's CLS features go to the on-disk cache."""
    from metamoe.models.clip import CLIPClassifier, CLIPSeedConfig

    m = cfg.model
    model = CLIPClassifier(CLIPSeedConfig(encoder=str(m.encoder), num_classes=bench.num_classes,
                                          template=str(m.template)))
    model.set_class_head(list(bench.class_names))
    model.eval()
    key = config_hash({"encoder": model.cfg.fingerprint, "benchmark": config_hash(cfg.benchmark),
                       "n": len(bench.pool_y)})
    t0 = time.perf_counter()
    feats = _pool_features(cfg, model, bench, key, key, model.cfg.fingerprint, batch_size=256)
    info = {"cache_key": key, "encoder": m.encoder, "encoder_fingerprint": model.cfg.fingerprint,
            "pool_embed_seconds": time.perf_counter() - t0}
    head = np.arange(min(2000, len(bench.pool_y)))
    info["zero_shot_public"] = accuracy(model, bench.pool_x[head], bench.pool_y[head])
    return model, feats, info


def _text_seed(cfg: DictConfig, bench: VisionBenchmark) -> tuple[TextClassifier, np.ndarray, dict]:
    """Text M0: the public encoder + a head trained on the pool's sentence embeddings; or a
    public causal LM as it is (no part of it is trained: its output is the next token)."""
    m = cfg.model
    if m.arch == "causal":
        from metamoe.models.causal import CausalConfig, CausalLMChoice

        model = CausalLMChoice(CausalConfig(encoder=m.encoder, layers=int(m.layers),
                                            max_len=int(m.max_len)))
    else:
        model = TextClassifier(TextConfig(encoder=m.encoder, layers=int(m.layers),
                                          max_len=int(m.max_len), num_classes=bench.num_classes))
    # Pool embeddings depend on the encoder and the pool only (not on the seed or the head).
    feat_key = config_hash({"encoder": encoder_fingerprint(m.encoder), "layers": int(m.layers),
                            "benchmark": config_hash(cfg.benchmark), "max_len": int(m.max_len),
                            "n": len(bench.pool_x)})
    feat_path = cache_dir(cfg) / f"pool-{m.arch}-{feat_key}.npy"
    info: dict = {"cache_key": feat_key, "encoder": m.encoder,
                  "encoder_fingerprint": model.cfg.fingerprint}
    if feat_path.exists():
        feats = np.load(feat_path)
        info["pool_features_cached"] = True
    else:
        import time

        t0 = time.perf_counter()
        log.info("embedding the public pool (%d texts) with %s", len(bench.pool_x), m.encoder)
        feats = features(model, bench.pool_x, "cls", batch_size=256)
        _atomic_save(feat_path, lambda p: np.save(p, feats))
        info.update(pool_features_cached=False, pool_embed_seconds=time.perf_counter() - t0)
    if m.arch == "causal":
        model.eval()
        return model, feats, info
    # The head was initialised when the model was built, from whatever state the global RNG
    # was in: draw it again under the run's seed, so M0 is the same in every process.
    with seeded(int(cfg.run.seed)):
        model.head.reset_parameters()
    torch.nn.init.zeros_(model.head.bias)
    hist = train(model.head, torch.from_numpy(feats), torch.from_numpy(bench.pool_y),
                 cfg.pretrain, seed=int(cfg.run.seed), desc="M0 head")
    info.update(pretrain_loss=hist["loss"], pretrain_seconds=hist["seconds"],
                zero_shot_public=accuracy(model.head, feats, bench.pool_y))
    model.eval()
    return model, feats, info


def _atomic_save(path: Path, write) -> None:
    """Write via a temporary name then rename, so concurrent runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{os.getpid()}.{path.name}")
    write(tmp)
    if tmp.suffix == ".safetensors":
        tmp.with_suffix(".json").replace(path.with_suffix(".json"))
    tmp.replace(path)
