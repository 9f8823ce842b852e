"""Regenerate every image under docs/figures/ from the result files under docs/results/.

    python scripts/figures.py [--out docs/figures] [--results docs/results]    (= make figures)

Inputs (JSON, committed) and the images they give:

* ``<bench>/table.json`` (the schema ``metamoe.compare`` writes, plus ``_provenance``) ->
  ``<bench>_comparison.png``: average accuracy per method with its std over seeds, and
  average accuracy against the bytes each client uploads;
* ``vision/coverage.json`` (the last line of ``python -m bench.proxy_coverage``, plus
  ``_provenance``) -> ``vision_coverage.png``: per client, the mean distance from its private
  test embeddings to the nearest proxy, for each selection rule;
* ``<bench>/demo_metrics.json`` (a run's ``metrics.json``) -> ``<bench>_routing.png``: the share
  of each domain's tokens routed to each expert (``route_share``). Skipped, with a note, while
  the file is absent.

The images are deterministic: fixed sizes and dpi, and no timestamp or software metadata.
Nothing is computed beyond reading the files; no run is started.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from metamoe.compare_tables import measured_rows, plot_accuracy_vs_upload, row_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DPI = 120
BENCHMARKS = ("vision", "text")
RULES = {"rw_dpp": "RW-DPP", "relevance": "relevance-only", "random": "random",
         "dpp": "plain DPP", "kcenter": "k-center", "all n": "floor (all n)"}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _source_line(fig, path: Path, prov: dict | None) -> None:
    """A footer naming the data file and, when known, the command and commit behind it."""
    text = f"data: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    if prov:
        text += f" — {prov.get('command', '?')} at {prov.get('commit', '?')}"
    fig.text(0.01, 0.01, text, fontsize=6.5, color="0.35", ha="left", va="bottom")


def comparison(table_path: Path, out: Path, bench: str) -> Path:
    blob = json.loads(table_path.read_text())
    prov = blob.get("_provenance")
    rows = measured_rows(blob)
    names = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5.2), gridspec_kw={"width_ratios": [1, 1.1]})
    ys = np.arange(len(names))[::-1]
    colours = [row_kind(n, rows[n])[0] for n in names]
    ax1.barh(ys, [100 * rows[n]["average"] for n in names],
             xerr=[100 * rows[n]["std"] for n in names], color=colours, capsize=2)
    ax1.set_yticks(ys)
    ax1.set_yticklabels([n if rows[n].get("private", True) else f"{n} (NOT PRIVATE)"
                         for n in names], fontsize=8)
    lo = min(100 * (rows[n]["average"] - rows[n]["std"]) for n in names)
    hi = max(100 * (rows[n]["average"] + rows[n]["std"]) for n in names)
    ax1.set_xlim(max(0.0, 5 * np.floor(lo / 5) - 5), min(100.0, 5 * np.ceil(hi / 5) + 5))
    ax1.set_xlabel("average test accuracy (%), mean ± std over seeds")
    ax1.set_title(f"{bench}: average accuracy per method")
    ax1.grid(axis="x", alpha=0.3)

    plot_accuracy_vs_upload(ax2, rows)
    ax2.set_title(f"{bench}: accuracy vs upload")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _source_line(fig, table_path, prov)
    return _save(fig, out / f"{bench}_comparison.png")


def coverage(cov_path: Path, out: Path) -> Path:
    blob = json.loads(cov_path.read_text())
    prov = blob.get("_provenance")
    seed = sorted(k for k in blob if not k.startswith("_"))[0]
    res = blob[seed]
    n = sorted((k for k in res if k.isdigit()), key=int)[0]
    by_rule = res[n]
    rules = [r for r in RULES if r in by_rule]
    clients = list(by_rule[rules[0]]["coverage"])
    m = (prov or {}).get("m", 500)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.2, 1]})
    width = 0.8 / len(rules)
    xs = np.arange(len(clients))
    colours = {r: f"C{i}" for i, r in enumerate(rules)}
    for i, rule in enumerate(rules):
        vals = [by_rule[rule]["coverage"][c] for c in clients]
        p90 = [by_rule[rule]["coverage_p90"][c] for c in clients]
        floor = rule == "all n"
        ax.bar(xs + i * width, vals, width, label=RULES[rule],
               color="0.8" if floor else colours[rule], hatch="//" if floor else None,
               edgecolor="0.4" if floor else None)
        ax.scatter(xs + i * width, p90, marker="_", s=60, color="k", zorder=3,
                   label="90th percentile" if i == 0 else None)
    ax.set_xticks(xs + width * (len(rules) - 1) / 2)
    ax.set_xticklabels(clients)
    top = max(max(by_rule[r]["coverage_p90"].values()) for r in rules)
    bottom = min(min(by_rule[r]["coverage"].values()) for r in rules)
    ax.set_ylim(max(0.0, bottom - 0.1), top + 0.06)
    ax.set_ylabel("distance from a private test embedding\nto its nearest proxy (lower = better)")
    ax.set_title(f"Mean and 90th percentile (seed {seed}, n = {n}, m = {m})", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    # the same means minus the floor: how far each rule is from the best any m-subset can do
    picks = [r for r in rules if r != "all n"]
    width2 = 0.8 / len(picks)
    top2 = 1e-9
    for i, rule in enumerate(picks):
        gap = [1000 * (by_rule[rule]["coverage"][c] - by_rule["all n"]["coverage"][c])
               if "all n" in by_rule else 0.0 for c in clients]
        ax2.bar(xs + i * width2, gap, width2, label=RULES[rule], color=colours[rule])
        top2 = max(top2, *gap)
    ax2.set_xticks(xs + width2 * (len(picks) - 1) / 2)
    ax2.set_xticklabels(clients)
    ax2.set_ylabel("mean distance above the floor (× 1e-3)")
    ax2.set_title("Mean above the floor (all n candidates)", fontsize=10)
    ax2.set_ylim(0, 1.35 * top2)
    ax2.legend(fontsize=7, ncol=3, loc="upper center")
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle("Proxy coverage per client and selection rule", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _source_line(fig, cov_path, prov)
    return _save(fig, out / "vision_coverage.png")


def routing(metrics_path: Path, out: Path, bench: str) -> Path | None:
    metrics = json.loads(metrics_path.read_text())
    share = metrics.get("route_share") or {}
    if not share:
        print(f"note: {metrics_path} has no route_share; {bench}_routing.png not written")
        return None
    domains = list(share)
    experts = sorted({e for d in share.values() for e in d},
                     key=lambda e: (domains.index(e) if e in domains else len(domains), e))
    grid = np.array([[share[d].get(e, 0.0) for e in experts] for d in domains])
    fig, ax = plt.subplots(figsize=(1.3 * len(experts) + 2.5, 0.9 * len(domains) + 1.8))
    im = ax.imshow(100 * grid, cmap="viridis", vmin=0, vmax=100)
    for i in range(len(domains)):
        for j in range(len(experts)):
            v = 100 * grid[i, j]
            ax.text(j, i, f"{v:.0f}%", ha="center", va="center", fontsize=8,
                    color="k" if v > 60 else "w")
    ax.set_xticks(range(len(experts)), experts, rotation=30, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xlabel("expert")
    ax.set_ylabel("test domain")
    ax.set_title(f"{bench}: share of a domain's tokens per expert (top-1, all layers)", fontsize=9)
    fig.colorbar(im, ax=ax, label="% of tokens")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    prov = metrics.get("_provenance") or {
        "command": f"method {metrics.get('method', '?')}, benchmark "
                   f"{metrics.get('benchmark', '?')}, seed "
                   f"{(metrics.get('config') or {}).get('run', {}).get('seed', '?')}",
        "commit": "the commit named in docs/results.md"}
    _source_line(fig, metrics_path, prov)
    return _save(fig, out / f"{bench}_routing.png")


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures"),
                    help="directory the images are written to")
    ap.add_argument("--results", default=str(ROOT / "docs" / "results"),
                    help="directory holding the committed result files")
    a = ap.parse_args(argv)
    out, res = Path(a.out).resolve(), Path(a.results).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI})
    written = []
    for bench in BENCHMARKS:
        table = res / bench / "table.json"
        if table.exists():
            written.append(comparison(table, out, bench))
        else:
            print(f"note: {table} is absent; {bench}_comparison.png not written")
    cov = res / "vision" / "coverage.json"
    if cov.exists():
        written.append(coverage(cov, out))
    else:
        print(f"note: {cov} is absent; vision_coverage.png not written")
    for bench in BENCHMARKS:
        demo = res / bench / "demo_metrics.json"
        if demo.exists():
            p = routing(demo, out, bench)
            if p:
                written.append(p)
        else:
            demo_cmd = "make demo-text" if bench == "text" else "make demo"
            print(f"note: {demo} is absent (the metrics.json of a `{demo_cmd}` run goes "
                  f"there); {bench}_routing.png not written")
    return written


if __name__ == "__main__":
    main()
