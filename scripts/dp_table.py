"""The "everything a client sends, at a total ε" table of docs/results.md from a finished
``metamoe.compare`` of the ``metamoe[dp_eps<E>]`` rows.

    python scripts/dp_table.py results/compare-text-dp docs/results/text/dp_table.json
    python scripts/dp_table.py docs/results/text/dp_runs docs/results/text/dp_table.json

The source is a comparison's output directory (its ``table.json`` and ``runs/``) or a folder
of run records ``<method>-<experiment>-s<seed>-<hash>/metrics.json`` (the committed
``docs/results/<bench>/dp_runs/``), whose rows are aggregated here as the comparison does.

Copies the comparison's rows to the JSON file (with each run's commit and, per client, the
noise multiplier z and the DP-SGD ε of its expert) and prints the markdown rows: total ε, z per
client, per-domain accuracy mean ± std over seeds, average, DP-SGD ε (add/remove) per client.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np


def from_records(folder: Path) -> dict:
    """Rows ``metamoe[dp_eps<E>]`` aggregated over the run records in ``folder`` (seed order),
    as :func:`metamoe.compare_tables.aggregate` aggregates a comparison's runs."""
    from metamoe.compare_tables import aggregate

    per_row: dict[str, list] = {}
    def seed(p: Path) -> int:  # run ids are <method>-<experiment>-s<seed>-<hash>
        return int(re.search(r"-s(\d+)-", p.name)[1])

    for d in sorted(folder.glob("*-s[0-9]*-*"), key=seed):
        m = json.loads((d / "metrics.json").read_text())
        row = f"{m['method']}[{m['config']['run']['run_id'].split('-')[1]}]"
        per_row.setdefault(row, []).append({"accuracy": m["accuracy"], "_run": d.name,
                                            "_seed": seed(d),
                                            "upload_bytes": m["upload_bytes"], "rounds": 1})
    if not per_row:
        raise SystemExit(f"{folder}: neither a table.json nor run records <id>/metrics.json")
    domains = list(next(iter(per_row.values()))[0]["accuracy"]["per_domain"])
    return aggregate(per_row, domains)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    if (src / "table.json").exists():
        table, runs = json.loads((src / "table.json").read_text()), src / "runs"
    else:
        table, runs = from_records(src), src
    out, lines = {}, []
    for row, t in sorted(table.items(), key=lambda kv: float(kv[0].split("eps")[-1][:-1])):
        if "runs" not in t:
            continue
        z, eps, commits, totals = {}, {}, set(), set()
        for rid in t["runs"]:
            m = json.loads((runs / rid / "metrics.json").read_text())
            commits.add(m["commit"][:7])
            for c, e in m["expert_train"].items():
                z.setdefault(c, set()).add(round(e["router_dp_noise_std"] / e["router_dp_sensitivity"], 2))
                eps.setdefault(c, set()).add(round(e["expert_dp_epsilon"], 2))
            totals |= {round(v["epsilon"], 6) for v in m["privacy_total"].values()}
        doms = list(t["per_domain"])
        out[row] = {**t, "commits": sorted(commits), "z": {c: sorted(v) for c, v in z.items()},
                    "expert_dp_epsilon": {c: sorted(v) for c, v in eps.items()},
                    "privacy_total_epsilon": sorted(totals)}
        cells = " | ".join(f"{100 * t['per_domain'][d]:.2f} ± {100 * t['per_domain_std'][d]:.2f}"
                           for d in doms)
        lines.append(f"| {'/'.join(f'{x:g}' for x in sorted(totals))} | "
                     + " / ".join(",".join(f"{x:g}" for x in v) for v in z.values())
                     + f" | {cells} | **{100 * t['average']:.2f} ± {100 * t['std']:.2f}** | "
                     + " / ".join(",".join(f"{x:g}" for x in v) for v in eps.values())
                     + f" | {' / '.join(f'{100 * a:.2f}' for a in t['per_seed_average'])} |")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=2) + "\n")
    print(f"| total ε | z ({' / '.join(z)}) | {' | '.join(doms)} | average | DP-SGD ε | per seed |")
    print("|---" * (len(doms) + 5) + "|")
    print("\n".join(lines))
    print("commits:", sorted({c for r in out.values() for c in r["commits"]}),
          "mean of seeds:", np.round([100 * r["average"] for r in out.values()], 2).tolist())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
