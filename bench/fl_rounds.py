"""The iterative FL rows at several round counts, with the private-data budget fixed.

    python -m bench.fl_rounds --benchmark vision --split val [--seeds 1] [--rounds 4,8,16]
                              [--methods fedavg,fedavg_moe,fedalign_moe,ddome[ddome_paper]]
                              [--more-rounds 32:fedavg,fedavg_moe]
                              [--output-dir results/fl-rounds-vision-val]
                              [--publish DIR] [--reuse-published DIR]

The budget rule (``metamoe/budget.py``) fixes ``fl.rounds × fl.epochs`` at ``expert.epochs``
(``fl.epochs`` is interpolated from ``fl.rounds``, a fraction of an epoch per round when rounds
exceed the passes), so more rounds means more communication for the same passes over each
client's private data. Each round count is one :func:`metamoe.compare.compare` with override
``fl.rounds=R`` (its runs, ids and tables under ``<out>/R<R>/``, reused when present);
``--more-rounds R[,R2]:rows[;R3:rows]`` runs only the listed rows at those further round counts
(a grid extended past its edge for the rows that peak there, without the expensive ones). Writes
``<out>/sweep.json`` ({row: {R: {average, std, per_seed_average, upload_bytes, rounds}}} plus
``best_rounds`` per row, the round count with the highest mean average), ``<out>/sweep.md`` and
``<out>/accuracy_vs_upload.png`` (one line per row, a point per round count). Choose a row's
rounds with ``--split val``, never on test. ``--publish DIR`` copies the three files and every
run's ``metrics.json`` (``DIR/runs/R<R>-<run id>.json``) to DIR; ``--reuse-published DIR`` takes
the runs published there as finished (same code only: :mod:`metamoe.compare_publish`). The last
stdout line is one JSON object: {row: {"<R>": average in [0, 1]}, "best_rounds": {row: R}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUNDS = (4, 8, 16)


def collect(tables: dict[int, dict]) -> dict:
    """{R: a compare table.json} -> {row: {R: summary}}, ``best_rounds`` {row: R}."""
    out: dict = {}
    for r, table in sorted(tables.items()):
        for row, t in table.items():
            if "average" not in t:  # an unavailable row
                continue
            out.setdefault(row, {})[r] = {k: t[k] for k in (
                "average", "std", "per_seed_average", "upload_bytes", "rounds")}
    best = {row: max(by_r, key=lambda r: (by_r[r]["average"], -r)) for row, by_r in out.items()}
    return {"rows": out, "best_rounds": best}


def write_markdown(path: Path, sweep: dict, benchmark: str, split: str, seeds: int) -> None:
    from metamoe.compare_tables import _fmt_bytes

    rs = sorted({r for by_r in sweep["rows"].values() for r in by_r})
    lines = [f"# FL rounds on `{benchmark}` ({split} split, seeds 0-{seeds - 1})", "",
             "Average accuracy in % (mean ± std over seeds) / bytes uploaded per client; "
             "rounds × local epochs fixed by the budget rule.", "",
             "| row | " + " | ".join(f"{r} rounds" for r in rs) + " | best |",
             "|---" * (len(rs) + 2) + "|"]
    for row, by_r in sweep["rows"].items():
        cells = [f"{100 * by_r[r]['average']:.2f} ± {100 * by_r[r]['std']:.2f} / "
                 f"{_fmt_bytes(by_r[r]['upload_bytes'])}" if r in by_r else "—" for r in rs]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {sweep['best_rounds'][row]} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, sweep: dict, split: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row, by_r in sweep["rows"].items():
        rs = sorted(by_r)
        xs = [max(by_r[r]["upload_bytes"], 1) for r in rs]
        ys = [100 * by_r[r]["average"] for r in rs]
        ax.errorbar(xs, ys, yerr=[100 * by_r[r]["std"] for r in rs], marker="s", label=row,
                    capsize=2)
        for x, y, r in zip(xs, ys, rs):
            ax.annotate(f"{r}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes uploaded per client (log; labels = rounds)")
    ax.set_ylabel(f"average {split} accuracy (%)")
    ax.set_title("FL rows: accuracy vs upload at a fixed private-data budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_more_rounds(spec: str, rounds: list[int]) -> dict[int, list[str]]:
    """``"16:a,b,c;32:a,b"`` -> {16: [a, b, c], 32: [a, b]} (``"32,64:a"`` gives both counts
    the same rows); a count already in ``rounds``, named twice or not positive, or an empty
    row list, is refused."""
    out: dict[int, list[str]] = {}
    for part in filter(str.strip, spec.split(";")):
        counts, sep, rows = part.partition(":")
        try:
            rs = [int(x) for x in counts.split(",") if x.strip()]
        except ValueError:
            rs = []
        names = [m.strip() for m in rows.split(",") if m.strip()]
        if not sep or not rs or not names or any(r < 1 or r in rounds or r in out for r in rs):
            raise SystemExit(f"--more-rounds must be 'R[,R2]:row[,row2][;R3:rows]' with round "
                             f"counts that are positive, named once and not in --rounds "
                             f"{rounds}, got {spec!r}")
        out.update({r: names for r in rs})
    return out


def sweep(benchmark: str, rounds: list[int], methods: list[str], seeds: int, split: str,
          output_dir: str | None, overrides: str = "", cache_dir: str | None = None,
          timeout: float = 3600.0, quiet: bool = False,
          more_rounds: dict[int, list[str]] | None = None, publish: str | None = None,
          reuse_published: str | None = None) -> dict:
    from metamoe.compare import compare
    from metamoe.compare_publish import publish_runs, publish_tables, take_published_runs

    if not rounds or any(r < 1 for r in rounds):
        raise SystemExit(f"--rounds must be positive integers, got {rounds}")
    plan = {r: methods for r in rounds} | (more_rounds or {})
    suffix = "" if split == "test" else f"-{split}"
    out = Path(output_dir or ROOT / "results" / f"fl-rounds-{benchmark}{suffix}").resolve()
    tables, used = {}, {}
    for r, rows in sorted(plan.items()):
        if reuse_published:
            take_published_runs(Path(reuse_published) / "runs", out / f"R{r}" / "runs", f"R{r}-")
        d = compare(benchmark, seeds, rows, str(out / f"R{r}"), cache_dir,
                    overrides=f"{overrides} fl.rounds={r}".strip(), timeout=timeout,
                    quiet=quiet, split=split)
        tables[r] = json.loads((d / "table.json").read_text())
        used.update({f"R{r}-{rid}": d / "runs" / rid
                     for t in tables[r].values() for rid in t.get("runs", [])})
    result = collect(tables)
    from metamoe.server.report import code_commit

    result.update(benchmark=benchmark, split=split, seeds=seeds, overrides=overrides,
                  commit=code_commit(), runs={r: str(out / f"R{r}" / "runs") for r in plan},
                  more_rounds=more_rounds or {})
    (out / "sweep.json").write_text(json.dumps(result, indent=2))
    write_markdown(out / "sweep.md", result, benchmark, split, seeds)
    write_plot(out / "accuracy_vs_upload.png", result, split)
    if publish:
        publish_tables(out, Path(publish), ("sweep.json", "sweep.md", "accuracy_vs_upload.png"))
        publish_runs(used, Path(publish) / "runs")
    return result


def main(argv: list[str] | None = None) -> int:
    from metamoe.compare import add_run_args
    from metamoe.compare_plan import FL

    ap = argparse.ArgumentParser(prog="python -m bench.fl_rounds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="vision")
    ap.add_argument("--rounds", default=",".join(map(str, DEFAULT_ROUNDS)))
    ap.add_argument("--methods", default=",".join(FL))
    ap.add_argument("--more-rounds", default="", metavar="R[,R2]:ROWS[;R3:ROWS]",
                    help="run only these rows at these further round counts")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--split", choices=("test", "val"), default="val")
    add_run_args(ap)  # --output-dir, --cache-dir, --overrides, --timeout
    ap.add_argument("--publish", default=None, metavar="DIR",
                    help="copy sweep.json, sweep.md, the plot and every run's metrics.json "
                         "(DIR/runs/R<R>-<run id>.json) to DIR")
    ap.add_argument("--reuse-published", default=None, metavar="DIR",
                    help="take the runs published in DIR/runs as finished (same code only)")
    a = ap.parse_args(argv)
    try:
        rounds = [int(x) for x in a.rounds.split(",") if x.strip()]
    except ValueError:
        print(f"--rounds must be comma-separated integers, got {a.rounds!r}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    res = sweep(a.benchmark, rounds, methods, a.seeds, a.split, a.output_dir, a.overrides,
                a.cache_dir, a.timeout, more_rounds=parse_more_rounds(a.more_rounds, rounds),
                publish=a.publish, reuse_published=a.reuse_published)
    print(json.dumps({**{row: {str(r): v["average"] for r, v in by_r.items()}
                         for row, by_r in res["rows"].items()},
                      "best_rounds": res["best_rounds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
