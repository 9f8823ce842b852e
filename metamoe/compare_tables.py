"""The tables of a comparison (``metamoe.compare``): rows aggregated over seeds, paired
per-seed differences against MetaMoE, ``table.md`` and the two plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def aggregate(per_seed: dict[str, list[dict]], domains: list[str]) -> dict[str, dict]:
    table = {}
    for r, rs in per_seed.items():
        avgs = [x["accuracy"]["average"] for x in rs]
        per = {d: [x["accuracy"]["per_domain"].get(d, float("nan")) for x in rs] for d in domains}
        ups = [float(np.mean(list(x["upload_bytes"].values()))) for x in rs if x["upload_bytes"]]
        rounds = [x.get("rounds", 1) for x in rs]
        table[r] = {
            "average": float(np.mean(avgs)), "std": float(np.std(avgs)),
            "per_seed_average": [float(a) for a in avgs],
            "per_domain": {d: float(np.mean(v)) for d, v in per.items()},
            "per_domain_std": {d: float(np.std(v)) for d, v in per.items()},
            "private": bool(all(x.get("private", True) for x in rs)),
            "upload_bytes": int(round(np.mean(ups))) if ups else 0,
            "rounds": int(max(rounds)) if rounds else 1,
            "seeds": len(rs),
            "seed_ids": [int(x.get("_seed", i)) for i, x in enumerate(rs)],
            "runs": [x["_run"] for x in rs],
        }
        if rs and all("ddome_own_share" in x for x in rs):
            # DDOME: share of a domain's test samples its gate sent to that domain's experts
            own = {d: [x["ddome_own_share"].get(d, float("nan")) for x in rs] for d in domains}
            table[r]["ddome_own_share"] = {d: float(np.mean(v)) for d, v in own.items()}
            table[r]["ddome_own_share_per_seed"] = {d: [float(a) for a in v]
                                                    for d, v in own.items()}
    ref = table.get("metamoe")
    for r, t in table.items():  # paired by seed id: MetaMoE's average minus this row's
        if ref is None or r == "metamoe":
            continue
        common = [s for s in t["seed_ids"] if s in ref["seed_ids"]]
        if not common:
            continue
        a = [ref["per_seed_average"][ref["seed_ids"].index(s)] for s in common]
        b = [t["per_seed_average"][t["seed_ids"].index(s)] for s in common]
        d = np.subtract(a, b)
        t["metamoe_minus_this"] = {"per_seed": [float(v) for v in d], "seeds": common,
                                   "mean": float(np.mean(d)), "std": float(np.std(d)),
                                   "wins": int((d > 0).sum())}
    return table


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def write_markdown(path: Path, table: dict, unavailable: dict, domains: list[str],
                   benchmark: str, seeds: list[int], split: str = "test") -> None:
    what = {"test": "Test", "val": "Validation"}[split]
    lines = [f"# Comparison on `{benchmark}` (seeds {seeds}, {split} split)", "",
             f"{what} accuracy in % (mean ± std over seeds) on each client's own {split} "
             "split; upload = mean bytes sent per client over the whole run.", "",
             "| method | " + " | ".join(domains)
             + " | average | upload / client | rounds | average per seed |",
             "|---" * (len(domains) + 5) + "|"]
    for r, t in table.items():
        name = r if t["private"] else f"{r} (NOT PRIVATE)"
        cells = [f"{100 * t['per_domain'][d]:.2f} ± {100 * t['per_domain_std'][d]:.2f}"
                 for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | **{100 * t['average']:.2f} ± {100 * t['std']:.2f}** | "
                     f"{_fmt_bytes(t['upload_bytes'])} | {t['rounds']} | "
                     + " / ".join(f"{100 * a:.2f}" for a in t["per_seed_average"]) + " |")
    for r, why in unavailable.items():
        lines.append(f"| {r} | " + " | ".join("—" for _ in domains) +
                     f" | not run: {why} | — | — | — |")
    paired = {r: t["metamoe_minus_this"] for r, t in table.items() if "metamoe_minus_this" in t}
    if paired:
        lines += ["", "Paired by seed, MetaMoE's average minus each row's (points; wins = seeds "
                      "where MetaMoE is above):", "",
                  "| row | mean ± std | per seed | seeds | MetaMoE wins |", "|---|---|---|---|---|"]
        lines += [f"| {r} | {100 * p['mean']:+.2f} ± {100 * p['std']:.2f} | "
                  + " / ".join(f"{100 * v:+.2f}" for v in p["per_seed"])
                  + " | " + ",".join(str(s) for s in p["seeds"])
                  + f" | {p['wins']} of {len(p['per_seed'])} |" for r, p in paired.items()]
    shares = {r: t for r, t in table.items() if "ddome_own_share" in t}
    if shares:
        lines += ["", "DDOME's gate: share of each domain's test samples sent to the experts "
                      "anchored by that domain's clients (%, mean over seeds; per seed in "
                      "brackets):", "", "| row | " + " | ".join(domains) + " |",
                  "|---" * (len(domains) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(
            f"{100 * t['ddome_own_share'][d]:.1f} ("
            + " / ".join(f"{100 * a:.0f}" for a in t["ddome_own_share_per_seed"][d]) + ")"
            for d in domains) + " |" for r, t in shares.items()]
    if any(not t["private"] for t in table.values()):
        lines += ["", "NOT PRIVATE rows read the clients' private data on the server "
                      "(an upper bound, not a federated method)."]
    path.write_text("\n".join(lines) + "\n")


def measured_rows(blob: dict) -> dict[str, dict]:
    """The rows of a ``table.json`` that have results: without its ``_``-keys (provenance) and
    the rows listed as ``{"status": "unavailable"}``."""
    return {k: v for k, v in blob.items() if not k.startswith("_") and "average" in v}


def write_plots(out: Path, table: dict, domains: list[str], split: str = "test") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(table)
    if not names:
        return paths
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) * (len(domains) + 1) / 2), 4))
    width = 0.8 / (len(domains) + 1)
    xs = np.arange(len(names))
    for i, d in enumerate([*domains, "average"]):
        vals = [100 * (table[n]["per_domain"][d] if d != "average" else table[n]["average"])
                for n in names]
        errs = [100 * (table[n]["per_domain_std"][d] if d != "average" else table[n]["std"])
                for n in names]
        ax.bar(xs + i * width, vals, width, yerr=errs, label=d)
    ax.set_xticks(xs + width * len(domains) / 2)
    ax.set_xticklabels([n if table[n]["private"] else f"{n}\n(NOT PRIVATE)" for n in names],
                       rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_title("Accuracy per domain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "accuracy_per_domain.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(6.5, 5))
    plot_accuracy_vs_upload(ax, table, split)
    ax.set_title(f"average {split} accuracy vs upload")
    fig.tight_layout()
    p = out / "accuracy_vs_upload.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def row_kind(name: str, row: dict) -> tuple[str, str]:
    """A row's colour and legend entry in the comparison plots."""
    if not row.get("private", True):
        return "tab:red", "not private"
    if row.get("rounds", 1) > 1:
        return "tab:orange", "iterative FL"
    if name.startswith("metamoe["):  # ddome[ddome_paper] is DDOME's row, not an ablation
        return "tab:green", "MetaMoE ablations"
    if name.startswith("metamoe"):
        return "tab:green", "MetaMoE"
    return "tab:blue", "one-shot baseline"


def plot_accuracy_vs_upload(ax, table: dict, split: str = "test", fontsize: float = 6.5
                            ) -> None:
    """Average accuracy (± std over seeds) against the bytes each client uploads (log x), one
    marker per row of ``table`` (:func:`aggregate`'s rows): squares for iterative rows, hollow
    markers for MetaMoE's ablations (they sit on MetaMoE's point; the bar plots name them),
    every other point named where :func:`label_columns` puts it; drawn by ``metamoe.compare``
    (accuracy_vs_upload.png) and ``scripts/figures.py`` (docs/figures/*_comparison.png)."""
    ys = [100 * r["average"] for r in table.values()]
    step = 0.045 * (max(ys) - min(ys) + 2)  # the smallest gap between two labels
    handles, points = {}, []
    for n, r in table.items():
        c, label = row_kind(n, r)
        ablation = label == "MetaMoE ablations"
        x, y = max(r["upload_bytes"], 1), 100 * r["average"]
        h = ax.errorbar(x, y, yerr=100 * r["std"], fmt="s" if r.get("rounds", 1) > 1 else "o",
                        color=c, mfc="none" if ablation else c, capsize=2,
                        alpha=0.6 if ablation else 1)
        handles.setdefault(label, h)
        if not ablation:
            points.append((x, y, n))
    label_points(ax, points, step, fontsize=fontsize)
    order = ["MetaMoE", "MetaMoE ablations", "one-shot baseline", "iterative FL", "not private"]
    ax.legend([handles[k] for k in order if k in handles], [k for k in order if k in handles],
              fontsize=7, loc="best")  # "best" also avoids the point labels (Text)
    ax.set_xscale("log")
    xs = [p[0] for p in points] or [max(r["upload_bytes"], 1) for r in table.values()]
    ax.set_xlim(min(xs) / 3, max(xs) * 8)
    ax.set_xlabel("bytes uploaded per client over the whole run (log)")
    ax.set_ylabel(f"average {split} accuracy (%)")
    ax.grid(alpha=0.3)


def label_points(ax, points: list[tuple[float, float, str]], step: float,
                 fontsize: float) -> None:
    """Name each (x, y, name) point of ``ax`` where :func:`label_columns` puts its label, with a
    leader line where the label is away from its point."""
    for x, y, lx, ly, side, n in label_columns(points, step):
        ax.annotate(n, (x, y), xytext=(lx, ly), fontsize=fontsize, va="center",
                    ha="right" if side == "left" else "left",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5}
                    if abs(ly - y) > step / 2 or not 0.6 < lx / x < 1.6 else None)


def label_columns(points: list[tuple[float, float, str]], step: float
                  ) -> list[tuple[float, float, float, float, str, str]]:
    """Where the labels of an accuracy-vs-upload plot (log x) go: [(x, y, name)] ->
    [(x, y, label x, label y, "left" | "right", name)]. Points within 0.35 decades of upload
    form a column whose labels stack downwards at least ``step`` apart, centred on the points'
    mean height (three or more points); they go left of the points when the next column is
    within a decade and at about the same heights, else right."""
    points = sorted(points, key=lambda p: p[0])
    clusters: list[list[tuple[float, float, str]]] = []
    for p in points:
        if clusters and np.log10(p[0]) - np.log10(clusters[-1][-1][0]) < 0.35:
            clusters[-1].append(p)
        else:
            clusters.append([p])
    out = []
    for k, cl in enumerate(clusters):
        nxt = clusters[k + 1] if k + 1 < len(clusters) else []
        left = bool(nxt) and np.log10(nxt[0][0] / cl[-1][0]) < 1.0 and any(
            abs(p[1] - q[1]) < 3 * step for p in cl for q in nxt)
        cl.sort(key=lambda p: -p[1])
        ly = [cl[0][1]]
        for p in cl[1:]:
            ly.append(min(p[1], ly[-1] - step))
        shift = np.mean([p[1] for p in cl]) - np.mean(ly) if len(cl) > 2 else 0.0
        lx = min(p[0] for p in cl) / 1.4 if left else 1.4 * max(p[0] for p in cl)
        out += [(x, y, lx, yy + shift, "left" if left else "right", n)
                for (x, y, n), yy in zip(cl, ly)]
    return out
