"""Benchmark: a public pool that does not fit in memory, embedded into the on-disk cache and
selected from (issue #21).

Run from the repository root::

    python -m bench.pool_scale                          # N in {100k, 1M}
    python -m bench.pool_scale --sizes 100000,300000
    python -m bench.pool_scale --tiny --sizes 2000,4000 # smoke test (tests), figures meaningless

Pool.  N images made lazily from the vision benchmark's public pool D0 (51,347 images):
item ``i`` is D0 image ``i mod |D0|``, unchanged for ``i < |D0|`` and otherwise shifted by
(dy, dx) in [-2, 2]^2 (edge-padded) plus one of 256 seeded low-amplitude noise fields
(std 0.05), clipped to [-1, 1]; the shift and the noise field are a hash of ``i``. A batch is
made when it is asked for (``AugmentedPool.get_batch``); the N images are never held at once.

Per N, in a fresh subprocess: M0 (``metamoe.server.seed``; pre-trained once and cached under
``METAMOE_CACHE_DIR``, default ``.cache/``, before any measurement) embeds the pool with its
token embedding (``select.embedding``) into the cache (``metamoe.proxy.pool_cache.embed_pool``,
float16 by default) in a scratch directory under the cache directory, deleted afterwards
(``--keep`` keeps it). K = 10 logistic sketches are then fitted, as clients would: positives
are M0's embeddings of a subset of the domains' first 300 train images (the 7 non-empty
subsets of the 3 domains in turn, 300 rows drawn with the sketch's seed), negatives 300
random rows of the cache. Finally ``select_proxies`` picks proxies for the 10 sketches from
the cache memmap with the benchmark's settings (RW-DPP, n = 600, m = 500, faiss flat).

Measurements.  ``embed_images_per_s``: N over the wall time of ``embed_pool`` (making the
augmented batches included). ``select_seconds``: the wall time of the one ``select_proxies``
call for all K sketches (sketch fitting is not timed: it happens on the clients).
``peak_rss_gb``: the peak of ``RssAnon`` (/proc/self/status), sampled every 50 ms by a thread
over the whole subprocess (model, benchmark, embedding, sketches, selection): the process's
own memory, not the file-backed pages of the memmap (``RssFile``) or the page cache.
``peak_rss_gb_by_phase``: the same peak within each phase (``load``: imports, benchmark and
M0; ``embed``; ``sketch``; ``select``). ``peak_rss_ratio``: the peak over the first N's.

Output: a table, then a last line holding one JSON object keyed by N (a string).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

K = 10
SKETCH_ROWS = 300
AUG_VERSION = 1  # bump when AugmentedPool's images change (it is part of the pool fingerprint)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A stateless 64-bit hash (SplitMix64's finaliser), elementwise on uint64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class AugmentedPool:
    """N augmented copies of ``images`` [P, 1, H, W], made a batch at a time (see the module
    docstring); item i is a deterministic function of (i, seed)."""

    def __init__(self, images: np.ndarray, n: int, seed: int = 0, max_shift: int = 2,
                 noise: float = 0.05, bank: int = 256):
        self.images, self.n, self.seed, self.s = images, int(n), int(seed), int(max_shift)
        rng = np.random.default_rng(seed)
        self.noise = (noise * rng.standard_normal((bank, *images.shape[1:]))).astype(np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.get_batch(i, i + 1)[0]

    def get_batch(self, start: int, stop: int) -> np.ndarray:
        idx = np.arange(start, stop, dtype=np.int64)
        base = self.images[idx % len(self.images)]
        aug = idx >= len(self.images)
        if not aug.any():
            return base
        h = _splitmix64(idx.astype(np.uint64) ^ np.uint64(self.seed * 0x632BE59BD9B4E019 % 2**64))
        span = np.uint64(2 * self.s + 1)
        dy = (h % span).astype(np.int64) - self.s
        dx = ((h >> np.uint64(8)) % span).astype(np.int64) - self.s
        field = ((h >> np.uint64(16)) % np.uint64(len(self.noise))).astype(np.int64)
        dy[~aug], dx[~aug] = 0, 0
        s, (hh, ww) = self.s, base.shape[-2:]
        padded = np.pad(base, ((0, 0), (0, 0), (s, s), (s, s)), mode="edge")
        rows = np.arange(hh)[None, :] + s - dy[:, None]
        cols = np.arange(ww)[None, :] + s - dx[:, None]
        b = np.arange(len(idx))[:, None, None]
        out = padded[b, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        out = np.moveaxis(out, -1, 1)
        out[aug] += self.noise[field[aug]]
        np.clip(out, -1.0, 1.0, out=out)
        return np.ascontiguousarray(out, dtype=np.float32)


class AnonPeak:
    """The peak of RssAnon (/proc/self/status), sampled by a daemon thread every ``period`` s;
    ``phase(name)`` closes the previous phase, whose own peak goes to ``phases``."""

    def __init__(self, period: float = 0.05):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.phases: dict[str, int] = {}
        self._name, self._phase_peak = "load", 0

    def phase(self, name: str) -> None:
        now = self.read()
        self.phases[self._name] = max(self._phase_peak, now)
        self._name, self._phase_peak = name, now

    @staticmethod
    def read() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("RssAnon not in /proc/self/status")

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.read()
            self.peak, self._phase_peak = max(self.peak, now), max(self._phase_peak, now)
            self._stop.wait(self.period)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.phase("end")  # closes the last phase
        self.peak = max(self.peak, *self.phases.values())


def _config(tiny: bool, cache: str):
    from metamoe.config import resolve_config

    return resolve_config({"benchmark": "tiny" if tiny else "vision", "cache-dir": cache})


def _seed_model(cfg, bench):
    """M0 from its cache file (the parent made sure it is there), else built now."""
    from metamoe.models.io import load_seed
    from metamoe.server.seed import cache_dir, get_seed_model, seed_key

    path = cache_dir(cfg) / f"seed-{seed_key(cfg)}.safetensors"
    return load_seed(path) if path.exists() else get_seed_model(cfg, bench)[0]


def _sketches(model, bench, emb: np.ndarray, kind: str, l2: float) -> dict:
    """K logistic sketches: positives from subsets of the domains, negatives from the cache."""
    from metamoe.proxy import fit_logistic_sketch
    from metamoe.training import features

    doms = [features(model, d.x_train[:SKETCH_ROWS], kind) for d in bench.domains]
    subsets = [c for r in range(1, len(doms) + 1) for c in itertools.combinations(range(len(doms)), r)]
    out = {}
    for k in range(K):
        rng = np.random.default_rng(k)
        sub = subsets[k % len(subsets)]
        pos = np.concatenate([doms[j] for j in sub])
        pos = pos[np.sort(rng.choice(len(pos), size=min(SKETCH_ROWS, len(pos)), replace=False))]
        neg_idx = np.sort(rng.choice(emb.shape[0], size=min(SKETCH_ROWS, emb.shape[0]), replace=False))
        neg = np.asarray(emb[neg_idx], dtype=np.float32)
        name = f"s{k}-" + "+".join(bench.domains[j].name for j in sub)
        out[name] = fit_logistic_sketch(pos, neg, l2=l2, seed=k)
    return out


def worker(args: dict) -> dict:
    """One N in this process: embed the lazy pool into the cache, fit sketches, select."""
    with AnonPeak() as mem:
        from metamoe.config import config_hash
        from metamoe.data import load_benchmark
        from metamoe.proxy import select_proxies
        from metamoe.proxy.pool_cache import embed_pool, model_fingerprint, pool_cache_key, pool_cache_path
        from metamoe.training import features

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="[pool_scale] %(message)s")
        cfg = _config(args["tiny"], args["cache"])
        bench = load_benchmark(cfg)
        model = _seed_model(cfg, bench)
        n, kind, sc = int(args["N"]), cfg.select.embedding, cfg.select
        pool = AugmentedPool(bench.pool_x, n, seed=0)
        pool_fp = config_hash({"benchmark": config_hash(cfg.benchmark), "augment": AUG_VERSION,
                               "seed": 0, "n": n})
        key = pool_cache_key(model_fingerprint(model), pool_fp, kind)
        path = pool_cache_path(args["work_dir"], key, kind, args["dtype"])
        path.unlink(missing_ok=True)  # measure the embedding, not a cache hit
        mem.phase("embed")
        t0 = time.perf_counter()
        emb = embed_pool(model, pool, path, pool_fp=pool_fp, features=features, kind=kind,
                         batch_size=args["batch_size"], dtype=args["dtype"])
        embed_s = time.perf_counter() - t0
        mem.phase("sketch")
        sketches = _sketches(model, bench, emb, kind, float(cfg.sketch.l2))
        mem.phase("select")
        t1 = time.perf_counter()
        res = select_proxies(emb, sketches, n=sc.n, m=sc.m, method=sc.method, seed=0, eps=sc.eps,
                             index=sc.index)
        select_s = time.perf_counter() - t1
    cache_gb, dim = path.stat().st_size / 2**30, int(emb.shape[1])
    del emb
    if not args["keep"]:
        path.unlink()
        path.with_name(path.name + ".json").unlink()
    picks = [len(r.indices) for r in res.values()]
    from_d0 = float(np.mean([(r.indices < len(bench.pool_x)).mean() for r in res.values()]))
    return {
        "embed_images_per_s": round(n / embed_s, 1),
        "embed_seconds": round(embed_s, 2),
        "select_seconds": round(select_s, 3),
        "peak_rss_gb": round(mem.peak / 2**30, 4),
        "peak_rss_gb_by_phase": {k: round(v / 2**30, 4) for k, v in mem.phases.items()},
        "cache_gb": round(cache_gb, 4),
        "dim": dim,
        "dtype": args["dtype"],
        "K": len(sketches),
        "n": int(sc.n),
        "m": int(sc.m),
        "mean_picks": float(np.mean(picks)),
        "share_of_picks_from_unaugmented_d0": round(from_d0, 4),
    }


def run_one(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.pool_scale", "--worker", json.dumps(args)],
                          stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker N={args['N']} failed (exit {proc.returncode}); see stderr above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 100000,1000000; "
                    "--tiny: 2000,4000)")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny benchmark's M0 and pool (tests/test_bench.py); figures meaningless")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--work-dir", default=None,
                    help="where the caches are written (default: a scratch dir in the cache dir)")
    ap.add_argument("--keep", action="store_true", help="keep the cache files")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        out = worker(json.loads(a.worker))
        print(json.dumps(out))
        return out
    cache = os.environ.get("METAMOE_CACHE_DIR") or str(Path(__file__).resolve().parents[1] / ".cache")
    sizes = [int(v) for v in (a.sizes or ("2000,4000" if a.tiny else "100000,1000000")).split(",")]
    # M0 (and the benchmark) are built once here, before anything is measured.
    from metamoe.data import load_benchmark
    from metamoe.server.seed import get_seed_model

    cfg = _config(a.tiny, cache)
    get_seed_model(cfg, load_benchmark(cfg))
    Path(cache).mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="pool_scale-", dir=cache))
    work.mkdir(parents=True, exist_ok=True)
    header = (f"{'N':>9} {'dim':>5} {'dtype':>8} {'cache_GB':>9} {'embed_img/s':>12} {'embed_s':>8} "
              f"{'select_s':>9} {'peak_RssAnon_GB':>16} {'vs_first':>9} {'picks':>6}")
    print(header)
    print("-" * len(header))
    out: dict = {}
    try:
        for size in sizes:
            row = run_one({"N": size, "tiny": a.tiny, "cache": cache, "work_dir": str(work),
                           "dtype": a.dtype, "batch_size": a.batch_size, "keep": a.keep})
            first = out[str(sizes[0])]["peak_rss_gb"] if out else row["peak_rss_gb"]
            row["peak_rss_ratio"] = round(row["peak_rss_gb"] / first, 4)
            out[str(size)] = row
            print(f"{size:>9} {row['dim']:>5} {row['dtype']:>8} {row['cache_gb']:>9.3f} "
                  f"{row['embed_images_per_s']:>12.0f} {row['embed_seconds']:>8.1f} "
                  f"{row['select_seconds']:>9.2f} {row['peak_rss_gb']:>16.3f} "
                  f"{row['peak_rss_ratio']:>9.3f} {row['mean_picks']:>6.0f}", flush=True)
    finally:
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
