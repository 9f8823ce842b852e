"""Benchmark: MetaMoE proxy selection vs a dense-kernel reference.

Run from the repository root::

    python -m bench.proxy_selection          # full: N in {20k, 200k, 1M}
    python -m bench.proxy_selection --quick  # small sizes, ~1 minute
    python -m bench.proxy_selection --tiny   # smoke-test sizes (tests), figures meaningless

Data.  The pool is a seeded Gaussian mixture in d = 384 (256 components with
unit-normal means, within-component std 0.7), so it has cluster structure
that the DPP can diversify over.  Each of the K clients owns 3 mixture
components; its private data (1000 rows drawn from those components, not from
the pool) and a 20k-row public sample fit a real logistic sketch with
:func:`metamoe.proxy.fit_logistic_sketch` (no DP noise).  Sketch fitting is
not timed: it happens on the clients.

Measurements.  Every configuration runs in a fresh subprocess that builds the
pool and sketches, resets the RSS high-water mark (``echo 5 >
/proc/self/clear_refs``), records ``VmRSS`` (which includes the pool), runs
the selection and reads ``VmHWM``.  ``peak_gb`` is ``VmHWM - VmRSS_before``:
peak memory beyond the pool (and interpreter).  ``seconds`` is the wall time
of one :func:`metamoe.proxy.select_proxies` call for all K clients (scoring,
top-n retrieval, DPP), default float32.

Dense reference (N = 20k only, where n = N: no pre-filter).  The algorithm
of Chen et al. exactly as in the authors' code, written plainly in float64:
relevance ``r = sigmoid(u.w + b)`` for every row, one dense ``S = U U^T``
(20k x 20k, shared by all clients, which favours the reference), then per
client ``L = Diag(r) S Diag(r)`` and the incremental-Cholesky greedy with
selected items masked and the same ``eps`` stop.  ``identical_picks``
compares our float32 picks (and, in an extra column, float64 picks) with it
for every client.  ``S = U @ U.T`` is written with a contiguous copy of
``U.T``: OpenBLAS' SYRK path for this size segfaults on this machine.

Output: a human-readable table, then a last line holding one JSON object
keyed by N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

D = 384
N_COMPONENTS = 256
SEED = 0


def make_pool(n_rows: int, dim: int = D, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-mixture pool [n_rows, dim] float32 and the component means."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((N_COMPONENTS, dim), dtype=np.float32)
    pool = np.empty((n_rows, dim), dtype=np.float32)
    for start in range(0, n_rows, 65536):
        stop = min(start + 65536, n_rows)
        comp = rng.integers(N_COMPONENTS, size=stop - start)
        pool[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
        pool[start:stop] *= 0.7
        pool[start:stop] += means[comp]
    return pool, means


def make_sketches(pool: np.ndarray, means: np.ndarray, n_clients: int, seed: int = SEED) -> dict:
    """K logistic sketches fitted on synthetic private data (see module docstring)."""
    from metamoe.proxy import fit_logistic_sketch

    rng = np.random.default_rng(seed + 1)
    public = pool[np.sort(rng.choice(len(pool), size=min(len(pool), 20000), replace=False))]
    sketches = {}
    for k in range(n_clients):
        comps = rng.choice(len(means), size=3, replace=False)
        private = means[rng.choice(comps, size=1000)] + 0.7 * rng.standard_normal((1000, means.shape[1]))
        sketches[f"client{k}"] = fit_logistic_sketch(private.astype(np.float32), public, seed=seed + k)
    return sketches


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def dense_reference(pool: np.ndarray, sketches: dict, m: int, eps: float) -> dict[str, np.ndarray]:
    """Plain float64 dense-kernel greedy MAP (Chen et al. 2018) over the whole pool."""
    x = pool.astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    u = x / np.where(norms > 0, norms, 1.0)[:, None]
    s = u @ np.ascontiguousarray(u.T)
    picks = {}
    for name, sk in sketches.items():
        r = 1.0 / (1.0 + np.exp(-(u @ sk.weight.astype(np.float64) + sk.bias)))
        kernel = s * r[:, None]
        kernel *= r[None, :]
        d2 = np.diag(kernel).copy()
        c = np.zeros((m, len(r)))
        sel: list[int] = []
        j = int(np.argmax(d2))
        while len(sel) < m and d2[j] >= eps:
            sel.append(j)
            k = len(sel) - 1
            e = (kernel[j, :] - c[:k, j] @ c[:k, :]) / np.sqrt(d2[j])
            c[k, :] = e
            d2 -= e**2
            d2[sel] = -np.inf
            j = int(np.argmax(d2))
        picks[name] = np.asarray(sel, dtype=np.int64)
        del kernel
    return picks


def worker(cfg: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    from metamoe.proxy import select_proxies

    pool, means = make_pool(cfg["N"])
    sketches = make_sketches(pool, means, cfg["K"])
    del means
    exact_hwm = _reset_hwm()
    base = _proc_status("VmRSS")
    t0 = time.perf_counter()
    if cfg["mode"] == "dense":
        picks = dense_reference(pool, sketches, cfg["m"], cfg["eps"])
    else:
        dtype = np.float64 if cfg["mode"] == "ours64" else np.float32
        res = select_proxies(pool, sketches, cfg["n"], cfg["m"], eps=cfg["eps"], dtype=dtype)
        picks = {k: v.indices for k, v in res.items()}
    seconds = time.perf_counter() - t0
    peak = _proc_status("VmHWM") - base
    np.savez(cfg["out"], **picks)
    return {
        "seconds": seconds,
        "peak_gb": peak / 2**30,
        "exact_hwm": exact_hwm,
        "n_picks": float(np.mean([len(p) for p in picks.values()])),
    }


def run_config(cfg: dict) -> dict:
    """Run ``worker(cfg)`` in a fresh subprocess; return its result and picks."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(cfg, out=os.path.join(tmp, "picks.npz"))
        proc = subprocess.run(
            [sys.executable, "-m", "bench.proxy_selection", "--worker", json.dumps(cfg)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"worker {cfg['mode']} N={cfg['N']} failed:\n{proc.stderr[-4000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(cfg["out"]) as z:
            result["picks"] = {k: z[k] for k in z.files}
    return result


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast run")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke-test sizes (tests/test_bench.py); the figures mean nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.tiny:
        k, m, n, sizes = 2, 40, 300, [1500, 4000, 8000]
    elif args.quick:
        k, m, n, sizes = 4, 200, 1000, [5000, 50000, 200000]
    else:
        k, m, n, sizes = 10, 500, 3000, [20000, 200000, 1000000]
    eps = 1e-6
    header = (
        f"{'N':>8} {'n':>6} {'m':>4} {'K':>3} {'picks':>6} {'ours_s':>8} {'ours_GB':>8} "
        f"{'f64_s':>7} {'dense_s':>8} {'dense_GB':>8} {'speedup':>8} {'same_f32':>8} {'same_f64':>8}"
    )
    print(header)
    print("-" * len(header))
    summary = {}
    for i, size in enumerate(sizes):
        first = i == 0
        cfg = {"N": size, "K": k, "m": m, "n": size if first else n, "eps": eps}
        ours = run_config(dict(cfg, mode="ours"))
        row = {
            "seconds": round(ours["seconds"], 3),
            "peak_gb": round(ours["peak_gb"], 3),
            "speedup_vs_dense": None,
            "identical_picks": None,
            "n": cfg["n"],
            "m": m,
            "K": k,
            "mean_picks": ours["n_picks"],
        }
        f64_s = dense_s = dense_gb = same64 = None
        if first:
            ours64 = run_config(dict(cfg, mode="ours64"))
            dense = run_config(dict(cfg, mode="dense"))
            f64_s, dense_s, dense_gb = ours64["seconds"], dense["seconds"], dense["peak_gb"]
            same64 = _same(ours64["picks"], dense["picks"])
            row.update(
                speedup_vs_dense=round(dense_s / ours["seconds"], 1),
                identical_picks=_same(ours["picks"], dense["picks"]),
                identical_picks_float64=same64,
                seconds_float64=round(f64_s, 3),
                dense_seconds=round(dense_s, 3),
                dense_peak_gb=round(dense_gb, 3),
            )
        summary[str(size)] = row

        def fmt(v: object, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        print(
            f"{size:>8} {cfg['n']:>6} {m:>4} {k:>3} {ours['n_picks']:>6.0f} {ours['seconds']:>8.2f} "
            f"{ours['peak_gb']:>8.3f} {fmt(f64_s, '7.2f'):>7} {fmt(dense_s, '8.2f'):>8} "
            f"{fmt(dense_gb, '8.3f'):>8} {fmt(row['speedup_vs_dense'], '8.1f'):>8} "
            f"{fmt(row['identical_picks'], ''):>8} {fmt(same64, ''):>8}",
            flush=True,
        )
    print(
        "picks < m: the kernel has rank <= d, so a DPP picks at most d rows (early stop, eps="
        f"{eps:g}). GB = peak RSS beyond the pool. speedup = dense_s / ours_s (float32)."
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
