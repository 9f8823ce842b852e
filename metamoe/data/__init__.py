"""Benchmarks, client partitions and the public pool.

``load_benchmark(cfg)`` builds (and caches per process) the benchmark named by the resolved
config; ``client_partition(cfg, bench, partition_id)`` gives one client its private domain
data. Client ``i`` owns domain ``domains[i % D]``; with ``clients_per_domain > 1`` the domain's
train split is divided among its clients (IID, or skewed by label and size: ``partition.py``),
and they share its validation and test splits (``eval_split``: which of the two a run
evaluates on).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from metamoe.data.partition import split_indices
from metamoe.data.vision import Domain, VisionBenchmark, build_vision_benchmark

__all__ = ["Domain", "VisionBenchmark", "load_benchmark", "client_partition", "client_names",
           "eval_split", "seed_encoder"]


@lru_cache(maxsize=4)
def _load(bench_json: str, cache_dir: str) -> VisionBenchmark:
    """Build the benchmark, or open it from ``<cache_dir>/bench-<hash>/`` (a node-local copy
    of what this node would build from its installed packages: deployed ClientApps are fresh
    processes per message, and rebuilding costs seconds each time). The cached arrays are
    memory-mapped (copy-on-write), so a process reads only the rows it indexes: a ClientApp
    touches its own domain, the proxies it was sent and its sketch's negatives, never the
    whole public pool."""
    path = None
    if cache_dir:
        key = hashlib.sha256(bench_json.encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"bench-{key}"
        if (path / "done").exists():
            try:
                return _from_dir(path, json.loads(bench_json))
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache is rebuilt below
    bench = _build(json.loads(bench_json))
    if path is not None:
        tmp = path.with_name(f".{os.getpid()}.{path.name}")
        tmp.mkdir(parents=True, exist_ok=True)
        arrays = _to_arrays(bench)
        for i, arr in enumerate(arrays.values()):
            np.save(tmp / f"{i:03d}.npy", arr)
        (tmp / "names.json").write_text(json.dumps(list(arrays)))
        (tmp / "done").write_text("")
        try:
            tmp.replace(path)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)
    return bench


def _to_arrays(bench: VisionBenchmark) -> dict[str, np.ndarray]:
    out = {"pool_x": bench.pool_x, "pool_y": bench.pool_y, "pool_source": bench.pool_source,
           "class_names": np.asarray(bench.class_names)}
    for d in bench.domains:
        for f in ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val"):
            if getattr(d, f) is not None:
                out[f"{d.name}/{f}"] = getattr(d, f)
        out[f"{d.name}/classes"] = np.asarray(d.classes)
        out[f"{d.name}/description"] = np.asarray(d.description)
    return out


def _from_dir(path: Path, b: dict) -> VisionBenchmark:
    names = json.loads((path / "names.json").read_text())
    z = {n: np.load(path / f"{i:03d}.npy", mmap_mode="c") for i, n in enumerate(names)}
    doms = [Domain(n, z[f"{n}/x_train"], z[f"{n}/y_train"], z[f"{n}/x_test"],
                   z[f"{n}/y_test"], [int(c) for c in z[f"{n}/classes"]],
                   str(z[f"{n}/description"]), x_val=z.get(f"{n}/x_val"),
                   y_val=z.get(f"{n}/y_val")) for n in b["domains"]]
    return VisionBenchmark(b["name"], doms, z["pool_x"], z["pool_y"], z["pool_source"],
                           class_names=[str(c) for c in z["class_names"]])


def _build(b: dict) -> VisionBenchmark:
    if b["kind"] == "text":
        from metamoe.data.text import build_text_benchmark
        from metamoe.models.text import load_tokenizer

        bench = build_text_benchmark(load_tokenizer(b["tokenizer"]), int(b["max_len"]),
                                     seed=b["data_seed"], max_train=b["max_train"],
                                     max_test=b["max_test"], domains=tuple(b["domains"]),
                                     val_fraction=b["val_fraction"])
    elif b["kind"] == "hf_qa":
        from metamoe.data.hf_text import build_hf_qa_benchmark
        from metamoe.models.text import load_tokenizer

        bench = build_hf_qa_benchmark(load_tokenizer(b["tokenizer"]), int(b["max_len"]),
                                      domains=tuple(b["domains"]), max_train=b["max_train"],
                                      max_test=b["max_test"], max_pool=b["max_pool"],
                                      data_dir=b["data_dir"], val_fraction=b["val_fraction"],
                                      seed=b["data_seed"])
        return bench  # max_pool is Alpaca's row limit (its first rows, as the paper's order)
    elif b["kind"] == "vision":
        bench = build_vision_benchmark(seed=b["data_seed"], max_train=b["max_train"],
                                       max_test=b["max_test"], domains=tuple(b["domains"]),
                                       val_fraction=b["val_fraction"])
    else:
        raise ValueError(f"benchmark kind {b['kind']!r} is not available in this build")
    bench.name = b["name"]
    if b["max_pool"] >= 0 and b["max_pool"] < len(bench.pool_x):
        keep = np.sort(np.random.default_rng(b["data_seed"]).permutation(
            len(bench.pool_x))[:b["max_pool"]])
        bench.pool_x, bench.pool_y = bench.pool_x[keep], bench.pool_y[keep]
        bench.pool_source = bench.pool_source[keep]
    return bench


def seed_encoder(arch: str, encoder: str, max_len: int) -> dict:
    """How raw items become the inputs of the seed ``model.arch`` / ``model.encoder`` /
    ``model.max_len`` (``kind: local``): the ViT's image transform, CLIP's, or the text
    encoder's tokenizer and length."""
    if arch == "vit":
        from metamoe.data.local import image_transform

        return {"modality": "image", "transform": image_transform()}
    if arch == "clip":  # the paper's CLIP transform at the checkpoint's input size
        from metamoe.models.clip import clip_image_size, clip_transform

        size = clip_image_size(encoder)
        return {"modality": "image", "transform": clip_transform(size), "lazy": True,
                "train_transform": clip_transform(size, train=True)}
    from metamoe.models.text import load_tokenizer

    return {"modality": "text", "tokenizer": load_tokenizer(encoder), "max_len": int(max_len)}


@lru_cache(maxsize=4)
def _load_local(bench_json: str, arch: str, encoder: str, max_len: int) -> VisionBenchmark:
    from metamoe.data.local import local_benchmark

    return local_benchmark(json.loads(bench_json), seed_encoder(arch, encoder, max_len))


def load_benchmark(cfg: DictConfig) -> VisionBenchmark:
    cache = cfg.run.cache_dir or os.environ.get("METAMOE_CACHE_DIR", "")
    b = OmegaConf.to_container(cfg.benchmark, resolve=True)
    if b["kind"] == "local":  # the pool is read lazily from its own files: no array cache
        return _load_local(json.dumps(b, sort_keys=True), str(cfg.model.arch),
                           str(cfg.model.encoder), int(cfg.model.max_len))
    if b["kind"] in ("text", "hf_qa"):  # texts are tokenised when the benchmark is built
        b.update(tokenizer=cfg.model.encoder, max_len=int(cfg.model.max_len))
    return _load(json.dumps(b, sort_keys=True), cache)


def _clients_of(cfg: DictConfig) -> list[tuple[str, int, int]]:
    """(domain, index within the domain, clients of that domain) for every client: client i
    belongs to domain i % D (round-robin, so K need not be a multiple of D)."""
    from metamoe.config import num_clients

    doms = list(cfg.benchmark.domains)
    k = num_clients(cfg)
    return [(doms[i % len(doms)], i // len(doms), len(range(i % len(doms), k, len(doms))))
            for i in range(k)]


def client_names(cfg: DictConfig) -> list[str]:
    return [d if n == 1 else f"{d}-{j}" for d, j, n in _clients_of(cfg)]


def eval_split(cfg: DictConfig, name: str, dom: Domain) -> Domain:
    """``dom`` as its client evaluates it: with ``benchmark.eval_split=val`` its validation
    split takes the test split's place (every evaluation reads ``x_test``), so choices made on
    val never see a test sample."""
    if cfg.benchmark.eval_split == "test":
        return dom
    if dom.x_val is None or len(dom.x_val) == 0:
        raise ValueError(f"client {name}: benchmark.eval_split=val, but domain {dom.name!r} "
                         "has no validation split (set benchmark.val_fraction > 0)")
    return replace(dom, x_test=dom.x_val, y_test=dom.y_val)


def client_partition(cfg: DictConfig, bench: VisionBenchmark, partition_id: int
                     ) -> tuple[str, Domain]:
    names = client_names(cfg)
    if not 0 <= partition_id < len(names):
        raise ValueError(f"partition-id {partition_id} out of range: the benchmark "
                         f"{cfg.benchmark.name!r} has {len(names)} clients")
    dname, sub, k = _clients_of(cfg)[partition_id]
    name, dom = names[partition_id], eval_split(cfg, names[partition_id], bench.domain(dname))
    if k == 1:
        return name, dom
    b = cfg.benchmark
    # iid keeps its historical seed (data_seed + 1); the skewed splits differ per domain
    seed = b.data_seed + 1 + (0 if b.partition == "iid" and b.size_skew == "none"
                              else list(b.domains).index(dname))
    part = split_indices(dom.y_train, k, partition=b.partition, alpha=b.dirichlet_alpha,
                         size_skew=b.size_skew, min_size=b.min_partition_size, seed=seed,
                         where=f"domain {dname!r}")[sub]
    return name, replace(dom, x_train=dom.x_train[part], y_train=dom.y_train[part])
