"""Result files of a run: ``metrics.json`` (stable interface), ``report.md``, the MoE artifact.

``metrics.json`` top-level keys: ``method``, ``benchmark``, ``config`` (resolved),
``accuracy`` {``per_domain``: {domain: float}, ``average``}, ``references`` {``zero_shot``,
``experts`` → {client: {per_domain, average}}}, ``upload_bytes`` {client: int},
``wall_seconds`` {phase: float, ``total``}, ``commit`` and ``environment`` (package versions,
CPU, threads); plus informational keys (``clients``, ``missing``,
``rejected``, ``proxy_coverage``, ...).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from metamoe.config import to_container
from metamoe.strategies.base import Federation, Outcome

log = logging.getLogger("metamoe")


def _acc_block(per_domain: dict[str, float]) -> dict:
    vals = [v for v in per_domain.values() if v == v]
    return {"per_domain": per_domain, "average": float(np.mean(vals)) if vals else float("nan")}


def code_commit(root: Path | None = None) -> str:
    """The commit of the code that ran: ``$METAMOE_COMMIT`` (set by the launcher), else the
    HEAD commit of the git checkout this package lives in (read from ``.git``, no subprocess;
    uncommitted changes are not marked), else "unknown"."""
    if os.environ.get("METAMOE_COMMIT"):
        return os.environ["METAMOE_COMMIT"]
    git = (root or Path(__file__).resolve().parents[2]) / ".git"
    try:
        if git.is_file():  # a worktree: ".git" names its git dir, refs live in the common dir
            git = (git.parent / git.read_text().strip().removeprefix("gitdir: ")).resolve()
        common = (git / (git / "commondir").read_text().strip()).resolve() \
            if (git / "commondir").exists() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        for d in (git, common):
            if (d / ref).exists():
                return (d / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def environment() -> dict:
    """What else a result depends on (recorded in ``metrics.json``): the same seed and config
    reproduce bit for bit on one machine and environment, not across CPU models or package
    versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            **{pkg: ver(pkg) for pkg in ("torch", "flwr", "ray", "numpy", "faiss-cpu",
                                         "faiss-gpu", "scikit-learn", "transformers")}}


def build_metrics(cfg, fed: Federation, outcome: Outcome, wall_total: float,
                  seed_info: dict) -> dict:
    doms = list(cfg.benchmark.domains)
    by_domain: dict[str, list[dict]] = {d: [] for d in doms}
    for name, m in outcome.evaluations.items():
        info = next((c for c in fed.clients.values() if c.name == name), None)
        by_domain[info.domain if info else name].append(m)

    def per_domain(key: str) -> dict[str, float]:
        return {d: float(np.mean([m[key] for m in ms if key in m])) if any(key in m for m in ms)
                else float("nan") for d, ms in by_domain.items()}

    expert_names = list(outcome.model.moe_cfg.expert_names) if outcome.model is not None else []
    metrics = {
        "method": cfg.method,
        "benchmark": cfg.benchmark.name,
        "config": to_container(cfg),
        "commit": code_commit(),
        "environment": environment(),
        "accuracy": _acc_block(per_domain("acc_unified")),
        "references": {
            "zero_shot": _acc_block(per_domain("acc_zero_shot")),
            "experts": {n: _acc_block(per_domain(f"acc_expert/{n}")) for n in expert_names},
        },
        "upload_bytes": {c.name: int(fed.upload_bytes.get(c.name, 0))
                         for c in sorted(fed.clients.values(), key=lambda c: c.partition_id)},
        "download_bytes": {c.name: int(fed.download_bytes.get(c.name, 0))
                           for c in sorted(fed.clients.values(), key=lambda c: c.partition_id)},
        "wall_seconds": {**{k: round(v, 3) for k, v in fed.wall.items()},
                         "total": round(wall_total, 3)},
        "clients": {c.name: {"domain": c.domain, "partition_id": c.partition_id,
                             "n_private": c.n_private} for c in fed.clients.values()},
        "route_share": {d: {n: float(np.mean([m.get(f"route_share/{n}", np.nan) for m in ms]))
                            for n in expert_names} for d, ms in by_domain.items()
                        if ms and expert_names},
        "missing": fed.missing,
        "eval_shared": fed.eval_shared,
        "resumed_phases": fed.resumed,
        "rejected": fed.rejected,
        "seed_model": seed_info,
    }
    metrics.update(outcome.extra)
    totals = privacy_totals(metrics)
    if totals:
        metrics["privacy_total"] = totals
    return metrics


def privacy_totals(metrics: dict) -> dict[str, dict[str, float]]:
    """Per client, the (ε, δ) of everything it uploaded from its train split (sketch, router
    vectors, expert), replace-one adjacency, basic composition (``metamoe/dpsgd.py``); ∞ when
    one of those uploads had no DP. Empty when no client used any DP."""
    from metamoe.dpsgd import compose, replace_one

    out = {}
    rounds = metrics.get("fl_rounds") or []
    last = next((r["dp_epsilon"] for r in reversed(rounds) if "dp_epsilon" in r), None)
    if last is not None:  # FL: every round's update (DP-SGD); FedAlign's p and h have no DP
        delta = float(metrics["config"]["privacy"]["expert_dp_delta"])
        stats = metrics.get("method") == "fedalign_moe"
        for c, eps in last.items():
            e, d = compose([replace_one(eps, delta)] + ([(float("inf"), 0.0)] if stats else []))
            out[c] = {"epsilon": e, "delta": d, "dpsgd_epsilon": float(eps)}
        return out
    for c, rt in metrics.get("expert_train", {}).items():
        sk = metrics.get("sketch_dp", {}).get(c)
        if sk is None and "router_dp_epsilon" not in rt and "expert_dp_epsilon" not in rt:
            continue
        parts = [(sk["dp_epsilon"], sk["dp_delta"]) if sk else (float("inf"), 0.0),
                 (rt["router_dp_epsilon"], rt["router_dp_delta"]) if "router_dp_epsilon" in rt
                 else (float("inf"), 0.0),
                 replace_one(rt["expert_dp_epsilon"], rt["expert_dp_delta"])
                 if "expert_dp_epsilon" in rt else (float("inf"), 0.0)]
        eps, delta = compose(parts)
        out[c] = {"epsilon": eps, "delta": delta,
                  "dpsgd_epsilon": float(rt.get("expert_dp_epsilon", float("inf")))}
    return out


def accuracy_table(metrics: dict) -> str:
    doms = list(metrics["accuracy"]["per_domain"])
    if metrics.get("rows"):  # a suite run: one row per method it evaluated
        rows = [(name, r["accuracy"]) for name, r in metrics["rows"].items()]
    else:
        rows = [("unified MoE (" + metrics["method"] + ")", metrics["accuracy"])]
    rows.append(("zero-shot M0", metrics["references"]["zero_shot"]))
    rows += [(f"expert {n}", b) for n, b in metrics["references"]["experts"].items()]
    w = max(len(r[0]) for r in rows) + 2
    head = "model".ljust(w) + "".join(f"{d:>10}" for d in doms) + f"{'average':>10}"
    lines = [head, "-" * len(head)]
    for label, b in rows:
        lines.append(label.ljust(w) + "".join(f"{100 * b['per_domain'][d]:>10.2f}" for d in doms)
                     + f"{100 * b['average']:>10.2f}")
    return "\n".join(lines)


def write_report(run_dir: Path, metrics: dict) -> None:
    cov = metrics.get("proxy_coverage")
    split = metrics["config"]["benchmark"].get("eval_split", "test")
    split = "validation split (carved from train, never trained on)" if split == "val" \
        else "test split"
    lines = [
        f"# MetaMoE run `{run_dir.name}`",
        "",
        f"Method **{metrics['method']}** on benchmark **{metrics['benchmark']}**; "
        f"seed {metrics['config']['run']['seed']}. Accuracy in % on each client's own {split} "
        "(argmax over that domain's classes).",
        "",
        "```",
        accuracy_table(metrics),
        "```",
        "",
        "## Communication (client → server)",
        "",
        "| client | uploaded bytes |",
        "|---|---|",
        *[f"| {c} | {b:,} |" for c, b in metrics["upload_bytes"].items()],
        "",
        "## Wall time per phase (s)",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {p} | {s:.1f} |" for p, s in metrics["wall_seconds"].items()],
    ]
    # A single run's routing, or (a suite run) each routed row's.
    routing = {"": metrics["route_share"]} if metrics.get("route_share") else \
        {r: row["route_share"] for r, row in metrics.get("rows", {}).items()
         if row.get("route_share")}
    for row_name, shares in routing.items():
        names = list(next(iter(shares.values())))
        title = " of " + row_name if row_name else ""
        lines += ["", f"## Routing share{title} (fraction of tokens per expert, all layers)",
                  "", "| domain | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for d, sh in shares.items():
            lines.append(f"| {d} | " + " | ".join(f"{sh[n]:.2f}" for n in names) + " |")
    if cov:
        p90 = metrics.get("proxy_coverage_p90", {})
        methods = sorted({m for c in cov.values() for m in c})
        lines += ["", "## Proxy coverage of the private test distribution",
                  "", "Distance from each private test embedding to its nearest proxy "
                  "(cosine geometry, M0 features; lower is better; computed on the clients): "
                  "mean, and 90th percentile in brackets.",
                  "", "| client | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for c, v in cov.items():
            q = p90.get(c, {})
            lines.append(f"| {c} | " + " | ".join(
                f"{v.get(m, float('nan')):.4f}" + (f" ({q[m]:.4f})" if m in q else "")
                for m in methods) + " |")
    dp_rows = []
    for c, tot in metrics.get("privacy_total", {}).items():
        sk = metrics.get("sketch_dp", {}).get(c, {})
        rt = metrics.get("expert_train", {}).get(c, {})
        dp_rows.append(f"| {c} | {sk.get('dp_epsilon', float('inf')):.3g} | "
                       f"{rt.get('router_dp_epsilon', float('inf')):.3g} | "
                       f"{tot['dpsgd_epsilon']:.3g} | "
                       f"{tot['epsilon']:.3g} | {tot['delta']:.1e} |")
    if dp_rows:
        lines += ["", "## Differential privacy", "",
                  "Sketch and router vectors: Gaussian mechanisms (analytic accounting, "
                  "replace-one); expert: DP-SGD (Opacus' RDP accountant, add/remove); total: "
                  "everything a client uploads from its train split, replace-one, basic "
                  "composition (metamoe/dpsgd.py). ∞: that upload has no DP.", "",
                  "| client | sketch ε | router vectors ε | DP-SGD ε (expert or FL rounds, "
                  "add/remove) | total ε | "
                  "total δ |", "|---|---|---|---|---|---|", *dp_rows]
    scr = metrics.get("screening")
    if scr:
        def f(st, k, fmt=".2f"):
            return format(st[k], fmt) if k in st else "–"
        rows = [f"| {c} | {f(st, 'proxy_loss_ratio')} | {f(st, 'proxy_acc_drop', '+.3f')} | "
                f"{f(st, 'delta_ratio', '.3g')} | {f(st, 'router_norm_ratio_min')}–"
                f"{f(st, 'router_norm_ratio_max')} | {f(st, 'router_gap', '+.2f')} | "
                f"{'accepted' if scr['decision'][c] == 'accepted' else 'REJECTED'} |"
                for c, st in scr["stats"].items()]
        lines += ["", "## Screening of the expert uploads", "",
                  "From M0, the public pool and each client's proxies only "
                  "(metamoe/strategies/screen.py); reasons under \"Missing or rejected\".", "",
                  "| client | proxy loss ÷ M0's | proxy acc drop | ‖ΔW‖/‖W0‖ | router norm ÷ "
                  "proxies' | router gap | decision |", "|---|---|---|---|---|---|---|", *rows]
    if metrics.get("missing") or metrics.get("rejected"):
        lines += ["", "## Missing or rejected clients", ""]
        for phase, who in metrics.get("missing", {}).items():
            lines.append(f"- phase {phase}: no valid reply from {', '.join(who)}")
        for r in metrics.get("rejected", []):
            lines.append(f"- phase {r['phase']}: rejected {r['client']}: {r['reason']}")
    if "lambdas" in metrics:
        lines += ["", f"Learned context weight λ per layer: "
                      f"{', '.join(f'{v:.3f}' for v in metrics['lambdas'])}"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


def write_metrics(run_dir: Path, metrics: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, allow_nan=True))
    tmp.replace(path)
    return path
