"""Many clients, few experts: accuracy, upload and wall time as K grows at a fixed set of
domains.

    python -m bench.many_clients [--benchmark vision] [--seeds 3] [--ks 3,12,30,60]
                                 [--rows per_client_moe,grouped_moe,fedavg,flexolmo]
                                 [--grouped groups3_cyclic|groups3|groups3_fedavg]
                                 [--overrides "k=v ..."]
                                 [--split test|val] [--output-dir results/many-clients-<bench>]
    python -m bench.many_clients --combine A/many_clients.json B/many_clients.json ...

K = 3 is ``<benchmark>`` itself (one client per domain; with ``<benchmark>_k60``'s train, val and
test sizes, so that every K divides the same private data: text_k60 holds 3,600 train texts
per domain, text 600). Every larger K is
``<benchmark>_k60`` (20 clients per domain, Dirichlet(0.5) label skew inside a domain) with
``benchmark.num_clients=K`` and ``select.m`` = clip(4000 / K, 100, the benchmark's m) rounded
to tens, the rule ``conf/benchmark/vision_k60.yaml`` documents (K = 20 gives vision_k20's 200);
K = 3 also takes ``<benchmark>_k60``'s local batch (vision_k60: 16, chosen on its val), FL
rounds and FL weighting, so every K trains alike (the benchmark's own FL recipe, chosen for
the 3-client comparison, does not reach K = 3 alone).
Rows, each one ``metamoe.compare`` row run over the same seeds:

* ``per_client_moe`` — ``metamoe``: one expert per client, K experts;
* ``grouped_moe`` — ``metamoe[groups3_cyclic]`` (the variant chosen on vision_k60's val
  split): the server groups the K clients into E = 3 by the proxy sets it selected, and each
  group's expert is passed from member to member for 8 rounds (``unify.group_expert=cyclic``),
  E experts; ``--grouped groups3`` merges the members' uploaded LoRA deltas instead (grouped
  by router vectors; it shares the ``per_client_moe`` run), ``groups3_fedavg`` trains each
  group's expert by FedAvg rounds;
* ``fedavg`` and ``flexolmo`` — as in the comparison.

Writes ``<out>/K<k>/`` (each K's compare output, runs reused when present) and
``<out>/many_clients.json`` / ``.md``. ``--overrides`` (an OmegaConf dotlist) applies to every
K and every row. Printed: one table (rows x K: average accuracy,
upload bytes per client, rounds, wall seconds per run); the last line is one JSON object
keyed by K as a string, each {``per_client_moe``, ``grouped_moe``, ``fedavg``, ``flexolmo``:
mean average accuracy in [0, 1], ``purity``: the grouped MoE's mean grouping purity}.
``--combine`` runs nothing: it merges the ``many_clients.json`` of separate invocations (same
benchmark, split and seeds; per K and row the last file wins) into one table that names each
cell's source file, commit and row.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = {"per_client_moe": "metamoe", "grouped_moe": "metamoe[groups3_cyclic]",
        "fedavg": "fedavg", "flexolmo": "flexolmo"}


def proxies_per_client(k: int, base_m: int) -> int:
    """select.m at K clients: clip(4000 / K, 100, base_m), rounded to tens."""
    return int(min(base_m, max(100, 10 * round(400 / k))))


SAME_DATA = ("max_train", "max_test", "val_fraction")  # what every K holds of each domain
# How every K trains: K = 3 takes these from <benchmark>_k60 (overrides win over the benchmark
# file's per-method recipes, so e.g. vision's FL recipe does not reach K = 3 alone).
SAME_TRAINING = ("expert.batch_size", "fl.rounds", "fl.weighting")


def _recipe_keys(benchmark: str) -> set[str]:
    """Dotted keys the benchmark file's ``recipes:`` set for some method."""
    from metamoe.config.resolve import benchmark_recipes

    return {f"{sec}.{k}" for sections in benchmark_recipes(benchmark).values()
            for sec, keys in sections.items() for k in keys}


def setting(benchmark: str, k: int) -> tuple[str, str]:
    """(benchmark config, overrides) of the K-client run. K = 3 is ``benchmark`` itself, with
    ``<benchmark>_k60``'s train / val / test sizes where they differ (text_k60 holds 3,600 train
    texts per domain, text 600), so that every K divides the same private data, and with its
    local batch, FL rounds and weighting (``SAME_TRAINING``) where they differ or a recipe of
    ``benchmark`` sets them, so that every K trains alike."""
    from omegaconf import OmegaConf

    from metamoe.config import resolve_config

    base = resolve_config({"benchmark": benchmark})
    many = f"{benchmark}_k60"
    if k == len(base.benchmark.domains):
        mc = resolve_config({"benchmark": many})
        ov = [f"benchmark.{key}={mc.benchmark[key]}" for key in SAME_DATA
              if mc.benchmark[key] != base.benchmark[key]]
        recipe = _recipe_keys(benchmark)
        ov += [f"{key}={OmegaConf.select(mc, key)}" for key in SAME_TRAINING
               if OmegaConf.select(mc, key) != OmegaConf.select(base, key) or key in recipe]
        return benchmark, " ".join(ov)
    return many, f"benchmark.num_clients={k} select.m={proxies_per_client(k, base.select.m)}"


def row_wall(metrics: dict, row: str) -> float:
    """Wall seconds of one row's run: a suite row counts the shared phases and its own
    server phases (``merge[row]``, ``evaluate[row]``)."""
    wall = metrics.get("wall_seconds") or {}
    if "rows" not in metrics or len(metrics.get("rows") or {}) <= 1:
        return float(wall.get("total", math.nan))
    return float(sum(v for p, v in wall.items() if p != "total"
                     and ("[" not in p or p.endswith(f"[{row}]"))))


def summarise(out: Path, k: int, rows: dict[str, str] = ROWS) -> dict:
    """{row key: {average, std, per_seed_average, upload_bytes, rounds, wall}, purity, k}
    from one K's compare output (each row's wall time and the grouping purity read from the
    metrics.json of the runs that row came from)."""
    table = json.loads((out / "table.json").read_text())
    res: dict = {}
    purity: list[float] = []
    for key, row in rows.items():
        t = table.get(row)
        if not t or "average" not in t:
            res[key] = {"status": (t or {}).get("reason", "not run")}
            continue
        walls = []
        for rid in t["runs"]:
            m = json.loads((out / "runs" / rid / "metrics.json").read_text())
            walls.append(row_wall(m, row))
            g = (m.get("rows") or {}).get(row, m).get("groups") or {}
            if key == "grouped_moe" and "purity" in g:
                purity.append(float(g["purity"]))
        res[key] = {"average": t["average"], "std": t["std"],
                    "per_seed_average": t["per_seed_average"],
                    "upload_bytes": t["upload_bytes"], "rounds": t.get("rounds", 1),
                    "wall": sum(walls) / len(walls)}
    res["purity"] = sum(purity) / len(purity) if purity else None
    res["k"] = k
    return res


def combine(paths: list[str]) -> dict:
    """One result from several ``many_clients.json`` files of the same benchmark, split and
    seeds (runs made by separate invocations, e.g. one row added later): for every K and row
    the last file that has it wins; ``sources`` says, per K and row, which file, commit, row
    (experiment) and overrides it came from, and the grouping purity follows the
    ``grouped_moe`` row's file."""
    if not paths:
        raise SystemExit("--combine needs at least one many_clients.json")
    files = [(p, json.loads(Path(p).read_text())) for p in paths]
    first = files[0][1]
    for p, f in files:
        got = (f["benchmark"], f["split"], f["seeds"])
        if got != (first["benchmark"], first["split"], first["seeds"]):
            raise SystemExit(f"{p}: benchmark / split / seeds {got} differ from "
                             f"{paths[0]}'s {(first['benchmark'], first['split'], first['seeds'])}")
    result: dict = {"benchmark": first["benchmark"], "seeds": first["seeds"],
                    "split": first["split"], "commit": [], "settings": {}, "k": {},
                    "sources": {}, "combined": [str(p) for p in paths]}
    for p, f in files:
        for k, entry in f["k"].items():
            merged = result["k"].setdefault(k, {"purity": None, "k": int(k)})
            src = result["sources"].setdefault(k, {})
            for key in ROWS:
                if "average" not in entry.get(key, {}):
                    continue
                merged[key] = entry[key]
                src[key] = {"file": Path(p).name, "commit": f["commit"],
                            "row": f["rows"][key], "overrides": f["settings"][k]["overrides"]}
                if key == "grouped_moe":
                    merged["purity"] = entry.get("purity")
                if f["commit"] not in result["commit"]:
                    result["commit"].append(f["commit"])
            result["settings"][k] = f["settings"][k]
    result["k"] = dict(sorted(result["k"].items(), key=lambda kv: int(kv[0])))
    return result


def render(result: dict) -> str:
    ks = list(result["k"])
    commits = result["commit"] if isinstance(result["commit"], list) else [result["commit"]]
    lines = [f"# Many clients on `{result['benchmark']}` ({result['split']} split, seeds 0-"
             f"{result['seeds'] - 1}, commit {', '.join(c[:7] for c in commits)})", "",
             "Average accuracy in % (mean ± std over seeds) / upload per client / rounds / "
             "wall seconds per run.", "",
             "| row | " + " | ".join(f"K = {k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for key in ROWS:
        cells = []
        for k in ks:
            r = result["k"][k].get(key, {})
            cells.append(r.get("status", "") if "average" not in r else
                         f"{100 * r['average']:.2f} ± {100 * r['std']:.2f} / "
                         f"{r['upload_bytes'] / 1024:.1f} KB / {r['rounds']} / {r['wall']:.0f} s")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| grouping purity | " + " | ".join(
        "-" if result["k"][k]["purity"] is None else f"{result['k'][k]['purity']:.3f}"
        for k in ks) + " |")
    if result.get("sources"):  # a combined table: where each cell came from
        lines += ["", "Sources (K: row <- file, commit, row run):", ""]
        lines += [f"- K = {k}: " + "; ".join(
            f"{key} <- {s['file']} {s['commit'][:7]} `{s['row']}`"
            for key, s in result["sources"][k].items()) for k in ks]
    return "\n".join(lines) + "\n"


def run(benchmark: str, seeds: int, ks: list[int], rows: list[str], split: str,
        output_dir: str | None, cache_dir: str | None, timeout: float,
        grouped: str = "groups3_cyclic", overrides: str = "") -> dict:
    from metamoe.compare import compare
    from metamoe.server.report import code_commit

    bad = [r for r in rows if r not in ROWS]
    if bad or not ks or any(k < 1 for k in ks):
        raise SystemExit(f"unknown rows {bad} (known: {list(ROWS)}) or bad --ks {ks}")
    names = {**ROWS, "grouped_moe": f"metamoe[{grouped}]"}
    out = Path(output_dir or ROOT / "results" / f"many-clients-{benchmark}").resolve()
    result: dict = {"benchmark": benchmark, "seeds": seeds, "split": split,
                    "commit": code_commit(), "rows": {r: names[r] for r in rows},
                    "overrides": overrides, "settings": {}, "k": {}}
    for k in ks:
        bench, ov = setting(benchmark, k)
        ov = f"{ov} {overrides}".strip()
        result["settings"][str(k)] = {"benchmark": bench, "overrides": ov}
        d = compare(bench, seeds, [names[r] for r in rows], str(out / f"K{k}"), cache_dir,
                    overrides=ov, timeout=timeout, split=split)
        result["k"][str(k)] = summarise(d, k, {r: names[r] for r in rows})
    out.mkdir(parents=True, exist_ok=True)
    (out / "many_clients.json").write_text(json.dumps(result, indent=2, allow_nan=True))
    (out / "many_clients.md").write_text(render(result))
    return result


def last_line(result: dict) -> dict:
    return {k: {**{key: r[key]["average"] if "average" in r.get(key, {}) else None
                   for key in ROWS}, "purity": r["purity"]}
            for k, r in result["k"].items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.many_clients", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="vision")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ks", default="3,12,30,60")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--grouped", default="groups3_cyclic",
                    help="experiment of the grouped_moe row")
    ap.add_argument("--overrides", default="", help="OmegaConf dotlist for every run")
    ap.add_argument("--split", default="test", choices=("test", "val"))
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    ap.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                    help="run nothing: merge these many_clients.json files (later wins per K "
                         "and row) and write <output-dir>/many_clients.json / .md")
    a = ap.parse_args(argv)
    if a.combine:
        result = combine(a.combine)
        out = Path(a.output_dir or ROOT / "results" / f"many-clients-{result['benchmark']}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "many_clients.json").write_text(json.dumps(result, indent=2, allow_nan=True))
        (out / "many_clients.md").write_text(render(result))
        print(render(result))
        print(json.dumps(last_line(result)))
        return 0
    result = run(a.benchmark, a.seeds, [int(k) for k in a.ks.split(",") if k.strip()],
                 [r for r in a.rows.split(",") if r.strip()], a.split, a.output_dir,
                 a.cache_dir, a.timeout, a.grouped, a.overrides)
    print(render(result))
    print(json.dumps(last_line(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
