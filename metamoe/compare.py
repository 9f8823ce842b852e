"""Compare every method (+ the MetaMoE ablations) on a benchmark over N seeds.

    python -m metamoe.compare --benchmark vision --seeds 3 [--methods btm,metamoe,fedavg]
                              [--no-share] [--output-dir results/compare-vision]
                              [--split test|val] [--more-seeds 5:metamoe,flexolmo]
                              [--publish docs/results/vision]
                              [--reuse-published docs/results/vision]
                              [--gpus-per-client auto|G] [--cpus-per-client 1] [--ray-address A]

Writes ``results/compare-<bench>/``:

* ``table.json`` — stable interface: {row: {``average``, ``std`` (over seeds, population),
  ``per_seed_average`` (one average per seed, in seed order),
  ``per_domain`` {domain: mean}, ``per_domain_std``, ``private`` (false only for
  the ``unrestricted_moe_*`` upper bounds), ``upload_bytes`` (mean per client), ``rounds``,
  ``seeds``, ``runs``, and for rows with MetaMoE's seeds ``metamoe_minus_this`` (the paired
  per-seed differences of the averages: ``per_seed``, ``mean``, ``std``, ``wins``)}};
  rows whose strategy is not available have ``{"status": "unavailable", "reason": ...}``;
* ``table.md`` — rows = methods, columns = domains + average (mean ± std over seeds, %),
  upload bytes per client, rounds and the average of each seed;
* ``accuracy_per_domain.png`` and ``accuracy_vs_upload.png`` (matplotlib, Agg).

Rows are the method names (``zero_shot``, ``btx``, ``fedavg``, ...) and ``metamoe[<exp>]`` for
the ablations in ``conf/experiment/``. With ``--references`` a plain ``metamoe`` row also brings
its run's own seed model and single experts (``metamoe/zero_shot``, ``metamoe/expert[<name>]``),
e.g. ``python -m metamoe.compare --benchmark text --seeds 3 --methods metamoe --references``.

Design (the 45-minute budget for vision, 1 seed, on 2 cores): every ``flwr run`` pays ~15-20 s
of start-up and the client phases dominate, so rows that can share client phases are produced
by ONE run of a suite strategy (``metamoe/strategies/oneshot.py``):

* ``oneshot_suite`` — the private-only experts are trained once; rows zero_shot,
  separate_experts, btm, model_soup, btx, flexolmo and metamoe[no_pa] (MetaMoE without
  proxy-aligned training has exactly these experts);
* ``metamoe_suite`` — MetaMoE's sketch/select/expert phases once; rows metamoe,
  metamoe[no_ca_router] and metamoe[authors_code] (they differ only in the unify phase).

A suite is used when two or more of its rows are requested (``--no-share`` runs every row
alone); a row of a suite's method whose experiment changes only the server stage (the recipe
trials, e.g. ``metamoe[lambda1]``, ``flexolmo[top2]``, ``metamoe[groups3]``) joins it, and the
suite run computes exactly the rows requested. Sharing is honest: each suite member is built
with exactly the config it has alone, and the suite refuses to run if a member's config of a
shared phase differs (``suites.check_member``); upload bytes count only what each row's method
sends. Every other row (metamoe[no_rw_dpp], metamoe[random_proxies], the two
unrestricted_moe_* upper bounds and the iterative FL baselines) is its own run. Iterative
methods that are not registered are listed as unavailable in the table instead of failing the
comparison.

Seeds: ``--seeds N`` runs every row on seeds 0..N-1; ``--more-seeds M:rows`` runs the listed rows
on seeds N..M-1 as well (the issue's 3 seeds for every row, 5 for MetaMoE, the best baseline and
both upper bounds). The row ``best_private`` there stands for the privacy-preserving baseline
with the highest mean over seeds 0..N-1 (not MetaMoE or its ablations; recorded as
``best_private`` in ``compare.json``). Paired differences use the seeds both rows have (``metamoe_minus_this``
names them); ``compare.json`` records ``seeds_per_row``. ``--publish DIR`` copies ``table.json``,
``table.md``, ``compare.json``, the plots and every run's ``metrics.json`` (``DIR/runs/<run
id>.json``) to DIR (``make tables``); ``--reuse-published DIR`` takes those runs as finished, so a
published comparison is rebuilt or extended elsewhere without re-running them
(:mod:`metamoe.compare_publish`).

Resume: a run's id is ``<method>[-<experiment>]-s<seed>-<hash>`` (hash of the resolved config
and, for a suite, its members' configs) under ``<out>/runs/``; a run whose ``metrics.json``
exists is reused, so an interrupted compare picks up where it stopped.
Rows, jobs, seeds and run ids: :mod:`metamoe.compare_plan`; tables and plots:
:mod:`metamoe.compare_tables`; publishing: :mod:`metamoe.compare_publish`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from metamoe.budget import check_rows
from metamoe.compare_plan import BEST_PRIVATE, DEFAULT_ROWS, FL_METHODS, Job, best_private, plan, run_id, seed_plan
from metamoe.compare_publish import publish_runs, publish_tables, take_published_runs
from metamoe.compare_tables import aggregate, write_markdown, write_plots
from metamoe.config import ConfigError, resolve_config
from metamoe.logging_utils import setup_logging
from metamoe.progress import Progress
from metamoe.strategies.suites import parse_row

ROOT = Path(__file__).resolve().parent.parent


def reference_rows(metrics: dict, prefix: str) -> dict[str, dict]:
    """A run's own references as rows: its seed model M0 and each single expert, evaluated on
    every domain in the same run (``<prefix>/zero_shot``, ``<prefix>/expert[<name>]``)."""
    refs = metrics.get("references") or {}
    out = {}
    if "zero_shot" in refs:
        out[f"{prefix}/zero_shot"] = refs["zero_shot"]
    for name, acc in (refs.get("experts") or {}).items():
        out[f"{prefix}/expert[{name}]"] = acc
    return {r: {"accuracy": acc, "upload_bytes": {}, "private": True, "rounds": 1}
            for r, acc in out.items()}


def rows_of(metrics: dict, job: Job, references: bool = False) -> dict[str, dict]:
    """The rows a finished run reports (its own ``rows``, or its top-level accuracy); with
    ``references`` also the seed model and single experts of a plain ``metamoe`` run."""
    got = metrics.get("rows") or {}
    out = {}
    if references and job.rows == ["metamoe"] and job.method == "metamoe":
        out.update(reference_rows(metrics, "metamoe"))
    for r in job.rows:
        if r in got:
            row = got[r]
        elif len(job.rows) == 1:
            row = {"accuracy": metrics["accuracy"], "upload_bytes": metrics["upload_bytes"],
                   "private": metrics.get("private", True),
                   # one-shot methods (MetaMoE and its ablations) have one round;
                   # the iterative ones report theirs or run fl.rounds
                   "rounds": int(metrics.get("rounds")
                                 or (metrics.get("config", {}).get("fl", {}).get("rounds")
                                     if job.method in FL_METHODS else 1) or 1)}
        else:
            raise RuntimeError(f"run of {job.method} has no row {r!r}")
        if "ddome_own_share" in metrics and len(job.rows) == 1:  # where DDOME's gate routes
            row = {**row, "ddome_own_share": metrics["ddome_own_share"]}
        out[r] = row
    return dict(sorted(out.items(), key=lambda kv: "/" in kv[0]))  # the method's row first


def compare(benchmark: str = "vision", seeds: int = 1, methods: list[str] | None = None,
            output_dir: str | None = None, cache_dir: str | None = None, share: bool = True,
            overrides: str = "", timeout: float = 3600.0, quiet: bool = False,
            references: bool = False, gpus_per_client: str | float = "auto",
            cpus_per_client: int = 1, ray_address: str | None = None,
            split: str = "test", allow_budget_departure: bool = False,
            more_seeds: tuple[int, list[str]] | None = None,
            publish: str | None = None, reuse_published: str | None = None) -> Path:
    """Run (or reuse) every job of ``methods`` x ``seeds``; write the tables. ``gpus_per_client``,
    ``cpus_per_client`` and ``ray_address`` go to every :func:`metamoe.launch.launch` (they do
    not enter the run ids: a run is reused whatever device produced it). ``split="val"``
    evaluates every run on the clients' validation splits (``benchmark.eval_split=val``, part
    of each run's id): the split every choice is made on. Every row must keep the budget rule
    (:func:`metamoe.budget.check_rows`) unless ``allow_budget_departure``. ``more_seeds`` =
    (M, rows) also runs those rows on seeds ``seeds``..M-1 (:func:`seed_plan`); ``publish``
    copies the tables, plots and runs to that directory; ``reuse_published`` takes the runs
    published in that directory as finished (:mod:`metamoe.compare_publish`)."""
    from metamoe.launch import launch

    if split not in ("test", "val"):
        raise ConfigError(f"split must be 'test' or 'val', got {split!r}")
    rows = list(methods or DEFAULT_ROWS)
    schedule = seed_plan(seeds, rows, more_seeds)  # a bad plan fails before anything is made
    best = None
    if more_seeds and BEST_PRIVATE in more_seeds[1]:
        # the strongest privacy-preserving baseline over the first seeds (every row runs on
        # them first; reused below) takes the extra seeds with the rows named beside it
        first = compare(benchmark, seeds, rows, output_dir, cache_dir, share, overrides,
                        timeout, quiet, references, gpus_per_client, cpus_per_client,
                        ray_address, split, allow_budget_departure,
                        reuse_published=reuse_published)
        best = best_private(json.loads((first / "table.json").read_text()))
        more_seeds = (more_seeds[0], [best if r == BEST_PRIVATE else r for r in more_seeds[1]])
        if not quiet:
            print(f"[compare] best privacy-preserving baseline over seeds 0-{seeds - 1}: "
                  f"{best}", flush=True)
        schedule = seed_plan(seeds, rows, more_seeds)
    if split != "test":
        overrides = f"{overrides} benchmark.eval_split={split}".strip()

    suffix = "" if split == "test" else f"-{split}"
    out = Path(output_dir or ROOT / "results" / f"compare-{benchmark}{suffix}").resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if reuse_published:
        taken = take_published_runs(Path(reuse_published) / "runs", out / "runs")
        if not quiet and taken:
            print(f"[compare] {len(taken)} runs taken from {reuse_published}/runs", flush=True)
    domains = list(resolve_config({"benchmark": benchmark}).benchmark.domains)
    jobs, unavailable = plan(rows, share, benchmark, overrides)
    plans = {tuple(rows): jobs}  # one plan per distinct row set (the extra seeds share one)
    for _, rs in schedule:
        if tuple(rs) not in plans:
            plans[tuple(rs)] = plan(rs, share, benchmark, overrides)[0]
    seed_jobs = [(seed, plans[tuple(rs)]) for seed, rs in schedule]
    budgets = check_rows(benchmark, {r: parse_row(r) for job in jobs for r in job.rows},
                         overrides, allow_budget_departure)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    if not quiet:
        setup_logging()  # the per-run progress lines (run i of N, elapsed, ETA)
    for r, why in unavailable.items():
        say(f"[compare] skipping {r}: {why}")
    per_seed: dict[str, list[dict]] = {}
    timing: dict[str, float] = {}  # launch seconds per run; a reused run keeps its earlier one
    prev = out / "compare.json"
    earlier = json.loads(prev.read_text()).get("launch_seconds", {}) if prev.exists() else {}
    failed: dict[str, str] = {}
    used: dict[str, Path] = {}  # the runs this table is read from
    todo = [(seed, job) for seed, js in seed_jobs for job in js if not (
        out / "runs" / run_id(job, benchmark, seed, overrides) / "metrics.json").exists()]
    runs = Progress(len(todo), "[compare] runs", unit="run")
    for seed, js in seed_jobs:
        for job in js:
            rid = run_id(job, benchmark, seed, overrides)
            run_dir = out / "runs" / rid
            if (run_dir / "metrics.json").exists():
                say(f"[compare] reusing {rid}")
                if rid in earlier:
                    timing[rid] = earlier[rid]
            else:
                say(f"[compare] running {rid} (run {runs.done + 1} of {len(todo)}) -> rows "
                    f"{job.rows}")
                t0 = time.perf_counter()
                try:
                    launch(benchmark, job.method, job.experiment, overrides, seed, rid,
                           str(out / "runs"), cache_dir, timeout, quiet=quiet,
                           gpus_per_client=gpus_per_client, cpus_per_client=cpus_per_client,
                           ray_address=ray_address,
                           members=",".join(m[0] for m in job.members))
                except RuntimeError as e:
                    say(f"[compare] FAILED {rid}: {e}")
                    for r in job.rows:
                        failed[r] = f"run {rid} failed: {str(e).splitlines()[0][:200]}"
                    runs.step(info=f"{rid} failed")
                    continue
                timing[rid] = round(time.perf_counter() - t0, 1)
                runs.step(info=rid)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            used[rid] = run_dir
            for r, row in rows_of(metrics, job, references).items():
                per_seed.setdefault(r, []).append({**row, "_run": rid, "_seed": seed})
    runs.close()
    ordered = {r: per_seed[r] for r in rows if r in per_seed}
    ordered.update({r: v for r, v in per_seed.items() if r not in ordered})  # reference rows
    table = aggregate(ordered, domains)
    for r, why in failed.items():
        if r not in table:
            unavailable[r] = why
    blob = {**table, **{r: {"status": "unavailable", "reason": why}
                        for r, why in unavailable.items()}}
    (out / "table.json").write_text(json.dumps(blob, indent=2, allow_nan=True))
    write_markdown(out / "table.md", table, unavailable, domains, benchmark,
                   list(range(len(schedule))), split)
    write_plots(out, table, domains, split)
    (out / "compare.json").write_text(json.dumps(
        {"benchmark": benchmark, "seeds": seeds, "split": split, "rows": rows, "share": share,
         "budgets": budgets,
         "overrides": overrides, "jobs": [j.__dict__ | {"members": list(j.members)}
                                          for j in jobs],
         "more_seeds": list(more_seeds) if more_seeds else None, "best_private": best,
         "seeds_per_row": {r: t["seed_ids"] for r, t in table.items()},
         "launch_seconds": timing}, indent=2, default=str))
    say((out / "table.md").read_text())
    if publish:
        publish_tables(out, Path(publish))
        publish_runs(used, Path(publish) / "runs")
    return out


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The arguments a command passes through to :func:`compare` (this module's CLI and the
    bench/ commands that drive comparisons)."""
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--overrides", default="", help="OmegaConf dotlist applied to every run")
    ap.add_argument("--timeout", type=float, default=3600.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metamoe.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="vision")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1")
    ap.add_argument("--methods", default="", help="comma-separated rows, e.g. "
                    "'btm,metamoe,metamoe[no_pa]' (default: all)")
    add_run_args(ap)  # --output-dir, --cache-dir, --overrides, --timeout
    ap.add_argument("--no-share", action="store_true",
                    help="run every row alone (no suite runs sharing client phases)")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="evaluate on each client's test split, or on its validation split "
                         "(carved from train, never trained on): make every choice on val")
    ap.add_argument("--allow-budget-departure", action="store_true",
                    help="run rows that break the budget rule (metamoe/budget.py); recorded")
    ap.add_argument("--references", action="store_true",
                    help="also tabulate the metamoe run's own seed model and single experts "
                         "(rows metamoe/zero_shot, metamoe/expert[<name>])")
    ap.add_argument("--more-seeds", default="", metavar="M:ROWS",
                    help="also run these comma-separated rows on seeds --seeds..M-1, e.g. "
                         "'5:metamoe,flexolmo' (paired differences use common seeds)")
    ap.add_argument("--publish", default=None, metavar="DIR",
                    help="copy table.json, table.md, compare.json, the plots and every run's "
                         "metrics.json (DIR/runs/<run id>.json) to DIR")
    ap.add_argument("--reuse-published", default=None, metavar="DIR",
                    help="take the runs published in DIR/runs as finished: a published "
                         "comparison taken up again on another machine (same code only)")
    from metamoe.launch import add_resource_args

    add_resource_args(ap)  # --gpus-per-client, --cpus-per-client, --ray-address
    a = ap.parse_args(argv)
    if a.seeds < 1:
        print("--seeds must be >= 1", file=sys.stderr)
        return 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    more = None
    if a.more_seeds:
        m, _, rs = a.more_seeds.partition(":")
        if not m.strip().isdigit() or not rs.strip():
            print(f"--more-seeds must be M:row,row,..., got {a.more_seeds!r}", file=sys.stderr)
            return 2
        more = (int(m), [r.strip() for r in rs.split(",") if r.strip()])
    from metamoe.launch import exit_on_sigterm

    exit_on_sigterm()
    try:
        out = compare(a.benchmark, a.seeds, methods, a.output_dir,
                      a.cache_dir or os.environ.get("METAMOE_CACHE_DIR"), not a.no_share,
                      a.overrides, a.timeout, references=a.references,
                      gpus_per_client=a.gpus_per_client, cpus_per_client=a.cpus_per_client,
                      ray_address=a.ray_address, split=a.split,
                      allow_budget_departure=a.allow_budget_departure, more_seeds=more,
                      publish=a.publish, reuse_published=a.reuse_published)
    except (ConfigError, FileNotFoundError) as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
