"""Recipe trials on the validation split: the same number of trials for MetaMoE, FlexOlmo and
DDOME, each method's best trial chosen on val.

    python -m bench.recipe --benchmark text [--seeds 3] [--router-epochs E0,3E0]
                           [--families metamoe,flexolmo,ddome] [--output-dir results/recipe-text]

Eight trials per method, three binary knobs each:

* MetaMoE: λ0 ∈ {0.3, 1.0} (``lambda1``), ``unify.router_score`` ∈ {dot, euclidean}
  (``euclid``), the router stage's length ``unify.epochs`` ∈ ``--router-epochs`` (default:
  the benchmark's own E0 and 3·E0; text: 1 and 3);
* FlexOlmo: top-1 / top-2 (``top2``), router only / router + experts on the server
  (``train_experts``), the same router-stage lengths (the budget rule keeps every routed
  method's server stage equal, so a length is an override of the whole comparison, and the
  choice takes one length for both: the one whose best MetaMoE and best FlexOlmo trials have
  the highest mean; each family's own best at any length is kept as ``best_alone``);
* DDOME as its paper runs it (``ddome_paper``: 5 clients per domain): each client's top-K
  ∈ {2, 1} (``k1``), gate width ∈ {64, 256} (``h256``), experts M ∈ {3, 6} (``m6``).

The variants of MetaMoE and FlexOlmo change only their server stage, so each router-stage
length costs one ``metamoe_suite`` and one ``oneshot_suite`` run per seed (``metamoe.compare``
puts unify-only rows in their suite); DDOME's trials are one run each and do not depend on the
router-stage length. Every run is evaluated on each client's validation split (``--split val``
of :func:`metamoe.compare.compare`) and reused when present. Writes ``<out>/recipe.json``
({family: {trial: {average, std, per_seed_average}}, "choice": {family: trial},
``router_epochs_choice``, ``best_alone``}, the resolved
trial rows, commit) and ``<out>/recipe.md``. A trial is named ``<row>@E<router epochs>``. The
last stdout line is one JSON object: {"choice": {family: trial}, "router_epochs": E,
family: {trial: average}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRIALS = {
    "metamoe": ("metamoe", "metamoe[lambda1]", "metamoe[euclid]", "metamoe[lambda1_euclid]"),
    "flexolmo": ("flexolmo", "flexolmo[top2]", "flexolmo[train_experts]",
                 "flexolmo[top2_train_experts]"),
    "ddome": ("ddome[ddome_paper]", "ddome[ddome_paper_k1]", "ddome[ddome_paper_h256]",
              "ddome[ddome_paper_k1_h256]", "ddome[ddome_paper_m6]", "ddome[ddome_paper_k1_m6]",
              "ddome[ddome_paper_h256_m6]", "ddome[ddome_paper_k1_h256_m6]"),
}
SERVER_STAGE = ("metamoe", "flexolmo")  # trials that also vary the router stage's length


def choose(tables: dict[int, dict], families: list[str]) -> dict:
    """{router epochs: a compare table.json} -> per family its trials and the best one (highest
    mean val average; ties go to the earlier trial, i.e. the default recipe)."""
    out: dict = {}
    for fam in families:
        trials: dict = {}
        for e, table in sorted(tables.items()):
            for row in TRIALS[fam]:
                t = table.get(row)
                if t is None or "average" not in t:
                    continue
                name = f"{row}@E{e}" if fam in SERVER_STAGE else row
                if name not in trials:
                    trials[name] = {k: t[k] for k in ("average", "std", "per_seed_average")}
        out[fam] = trials
    def best(trials: dict) -> str | None:
        names = list(trials)
        return max(names, key=lambda n: (trials[n]["average"], -names.index(n))) \
            if names else None

    alone = {fam: best(tr) for fam, tr in out.items() if tr}
    choice = dict(alone)
    # The budget rule gives every routed method the same server stage: one router-stage length
    # E for all of them, the one whose families' best trials have the highest mean (ties to the
    # shorter stage); an E some family lacks a trial at cannot be chosen.
    staged = [f for f in families if f in SERVER_STAGE and out.get(f)]
    stage = None
    if staged:
        at = {e: {f: best({n: t for n, t in out[f].items() if n.endswith(f"@E{e}")})
                  for f in staged} for e in sorted(tables)}
        ok = {e: b for e, b in at.items() if all(b.values())}
        if ok:
            stage = max(ok, key=lambda e: (sum(out[f][n]["average"] for f, n in ok[e].items())
                                           / len(staged), -e))
            choice.update(ok[stage])
    return {"families": out, "choice": choice, "router_epochs_choice": stage,
            "best_alone": alone}


def write_markdown(path: Path, result: dict) -> None:
    lines = [f"# Recipe trials on `{result['benchmark']}` (val split, seeds 0-"
             f"{result['seeds'] - 1})", "",
             "Average validation accuracy in % (mean ± std over seeds); the chosen trial of "
             "each method in bold.", ""]
    if result.get("router_epochs_choice") is not None:
        lines += [f"Router-stage length (one for every routed method, the budget rule): "
                  f"E = {result['router_epochs_choice']}. Each family's best at any length: "
                  + ", ".join(f"`{n}`" for n in result.get("best_alone", {}).values()) + ".", ""]
    for fam, trials in result["families"].items():
        lines += [f"## {fam}", "", "| trial | average | per seed |", "|---|---|---|"]
        for name, t in trials.items():
            cell = f"{100 * t['average']:.2f} ± {100 * t['std']:.2f}"
            if result["choice"].get(fam) == name:
                cell = f"**{cell}**"
            lines.append(f"| `{name}` | {cell} | "
                         + " / ".join(f"{100 * a:.2f}" for a in t["per_seed_average"]) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def run(benchmark: str, seeds: int, router_epochs: list[int], families: list[str],
        output_dir: str | None, overrides: str = "", cache_dir: str | None = None,
        timeout: float = 3600.0) -> tuple[dict, Path]:
    from metamoe.compare import compare
    from metamoe.server.report import code_commit

    bad = [f for f in families if f not in TRIALS]
    if bad or not router_epochs or any(e < 1 for e in router_epochs):
        raise SystemExit(f"unknown families {bad} (known: {sorted(TRIALS)}) or bad "
                         f"--router-epochs {router_epochs}")
    out = Path(output_dir or ROOT / "results" / f"recipe-{benchmark}").resolve()
    tables = {}
    for i, e in enumerate(router_epochs):
        rows = [r for f in families if f in SERVER_STAGE or i == 0 for r in TRIALS[f]]
        if not rows:
            continue
        ov = f"{overrides} unify.epochs={e}".strip()
        d = compare(benchmark, seeds, rows, str(out / f"E{e}"), cache_dir, overrides=ov,
                    timeout=timeout, split="val")
        tables[e] = json.loads((d / "table.json").read_text())
    result = {"benchmark": benchmark, "seeds": seeds, "router_epochs": router_epochs,
              "overrides": overrides, "commit": code_commit(), **choose(tables, families)}
    (out / "recipe.json").write_text(json.dumps(result, indent=2))
    write_markdown(out / "recipe.md", result)
    return result, out


def main(argv: list[str] | None = None) -> int:
    from metamoe.compare import add_run_args

    ap = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="text")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--router-epochs", default="",
                    help="comma-separated unify.epochs (default: the benchmark's E0 and 3*E0)")
    ap.add_argument("--families", default=",".join(TRIALS))
    add_run_args(ap)  # --output-dir, --cache-dir, --overrides, --timeout
    a = ap.parse_args(argv)
    try:
        epochs = [int(x) for x in a.router_epochs.split(",") if x.strip()]
        if not epochs:
            from metamoe.config import resolve_config

            e0 = int(resolve_config({"benchmark": a.benchmark, "overrides": a.overrides})
                     .unify.epochs)
            epochs = [e0, 3 * e0]
    except ValueError:
        print(f"--router-epochs must be comma-separated integers, got {a.router_epochs!r}",
              file=sys.stderr)
        return 2
    fams = [f.strip() for f in a.families.split(",") if f.strip()]
    res, out = run(a.benchmark, a.seeds, epochs, fams, a.output_dir, a.overrides, a.cache_dir,
                   a.timeout)
    print((out / "recipe.md").read_text())
    print(json.dumps({"choice": res["choice"], "router_epochs": res["router_epochs_choice"],
                      **{f: {n: t["average"] for n, t in tr.items()}
                         for f, tr in res["families"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
