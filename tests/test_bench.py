"""Smoke tests of the bench/ scripts on tiny sizes: they run, their last line is the JSON the
README and issue #3 specify, and the invariants their tables rely on hold. The figures of a
tiny run mean nothing; the real measurements are the commands in the README."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metamoe.proxy.select import METHODS as RULES  # the bench sweeps every rule

ROOT = Path(__file__).resolve().parents[1]


def _bench(args: list[str], env: dict | None = None) -> list[str]:
    """Run ``python -m bench.<...>`` from the repository root; its stdout lines."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_proxy_selection_tiny_prints_the_specified_json() -> None:
    lines = _bench(["bench.proxy_selection", "--tiny"])
    assert lines[0].split()[:3] == ["N", "n", "m"]  # the human-readable table comes first
    out = json.loads(lines[-1])
    assert list(out) == ["1500", "4000", "8000"]
    for key, row in out.items():
        assert {"seconds", "peak_gb", "speedup_vs_dense", "identical_picks"} <= row.keys(), key
        assert row["seconds"] > 0 and row["peak_gb"] >= 0
        assert 0 < row["mean_picks"] <= row["m"]
    first = out["1500"]
    assert first["n"] == 1500  # the no-pre-filter case: n = N, dense reference run
    assert first["identical_picks"] is True and first["identical_picks_float64"] is True
    assert first["speedup_vs_dense"] > 0
    for key in ("4000", "8000"):
        assert out[key]["speedup_vs_dense"] is None and out[key]["identical_picks"] is None
        assert out[key]["n"] == 300


def test_proxy_coverage_tiny_floor_bounds_every_rule(cache_dir: str) -> None:
    lines = _bench(["bench.proxy_coverage", "--benchmark", "tiny", "--n", "150,300", "--m", "40",
                    "--seeds", "0"], env={"METAMOE_CACHE_DIR": cache_dir})
    assert lines[0].startswith("seed 0: sketch held-out log-loss")
    seed = json.loads(lines[-1])["0"]
    assert set(seed["sketch_heldout_logloss"]) == {"mnist", "uci"}
    for n in ("150", "300"):
        rows = seed[n]
        assert set(rows) == {*RULES, "all n"}
        floor = rows["all n"]["coverage"]
        for method in RULES:
            cov, p90 = rows[method]["coverage"], rows[method]["coverage_p90"]
            for client in ("mnist", "uci"):
                # every rule picks a subset of the candidates, so its mean distance to the
                # nearest proxy can never be below that of all n candidates
                assert floor[client] <= cov[client] + 1e-9, (n, method, client)
                assert math.isfinite(cov[client]) and math.isfinite(p90[client])
                assert sum(rows[method]["sources"][client].values()) <= 40
    for client, v in seed["dpp_plain_vs_blocked"].items():
        assert v["same_set"], client


def test_pool_scale_tiny_prints_the_specified_json(cache_dir: str) -> None:
    lines = _bench(["bench.pool_scale", "--tiny", "--sizes", "2000,4000"],
                   env={"METAMOE_CACHE_DIR": cache_dir})
    assert lines[0].split()[:2] == ["N", "dim"]  # the human-readable table comes first
    out = json.loads(lines[-1])
    assert list(out) == ["2000", "4000"]
    for key, row in out.items():
        assert {"embed_images_per_s", "select_seconds", "peak_rss_gb"} <= row.keys(), key
        assert row["embed_images_per_s"] > 0 and row["select_seconds"] > 0 and row["peak_rss_gb"] > 0
        assert row["K"] == 10 and 0 < row["mean_picks"] <= row["m"]
        assert row["dtype"] == "float16" and row["cache_gb"] > 0
    # nothing in the process grows with N (the tiny sizes are far below one chunk, so this is
    # a smoke check of the measurement, not of the 1M claim)
    assert out["4000"]["peak_rss_ratio"] <= 1.25
    assert not list(Path(cache_dir).glob("pool_scale-*"))  # the scratch caches are deleted


def test_fl_rounds_collects_each_round_count_and_picks_the_best(tmp_path: Path) -> None:
    """bench.fl_rounds' tables from compare tables (built by compare's own aggregate): one
    entry per row and round count, upload bytes carried, best = highest mean (ties: fewer
    rounds), unavailable rows skipped, and the plot and markdown written."""
    from bench.fl_rounds import collect, write_markdown, write_plot
    from metamoe.compare_tables import aggregate

    def run(avg: float, up: int, rounds: int) -> dict:
        return {"accuracy": {"average": avg, "per_domain": {"a": avg}},
                "upload_bytes": {"0": up}, "rounds": rounds, "_run": f"r{rounds}"}

    tables = {}
    for r, (fa, fm) in {4: (0.70, 0.60), 8: (0.72, 0.60), 16: (0.71, 0.55)}.items():
        t = aggregate({"fedavg": [run(fa, 1000 * r, r), run(fa + 0.02, 1000 * r, r)],
                       "fedavg_moe": [run(fm, 3000 * r, r)]}, ["a"])
        t["ddome"] = {"status": "unavailable", "reason": "x"}
        tables[r] = t
    sweep = collect(tables)
    assert set(sweep["rows"]) == {"fedavg", "fedavg_moe"}
    assert sorted(sweep["rows"]["fedavg"]) == [4, 8, 16]
    assert math.isclose(sweep["rows"]["fedavg"][8]["average"], 0.73)
    assert sweep["rows"]["fedavg_moe"][16]["upload_bytes"] == 48000
    assert sweep["best_rounds"] == {"fedavg": 8, "fedavg_moe": 4}  # 4 and 8 tie: fewer rounds
    write_markdown(tmp_path / "sweep.md", sweep, "tiny", "val", 2)
    md = (tmp_path / "sweep.md").read_text()
    assert "| fedavg | 71.00 ± 1.00 / 3.9 KB | 73.00 ± 1.00 / 7.8 KB |" in md and md.rstrip().endswith("| 4 |")
    assert write_plot(tmp_path / "p.png", sweep, "val").stat().st_size > 1000


def test_fl_rounds_more_rounds_extends_the_grid_for_named_rows_only() -> None:
    """--more-rounds: further round counts for the listed rows; a count already swept, a
    non-positive one or a spec without rows is refused before anything runs."""
    from bench.fl_rounds import parse_more_rounds

    assert parse_more_rounds("", [4, 8]) == {}
    assert parse_more_rounds("32,64:fedavg, fedavg_moe", [4, 8]) == {
        32: ["fedavg", "fedavg_moe"], 64: ["fedavg", "fedavg_moe"]}
    assert parse_more_rounds("16:a,b,c; 32:a", [4, 8]) == {16: ["a", "b", "c"], 32: ["a"]}
    for bad in ("8:fedavg", "32", "32:", "0:fedavg", "x:fedavg", "16:a;16:b"):
        with pytest.raises(SystemExit, match="--more-rounds"):
            parse_more_rounds(bad, [4, 8])


def test_recipe_offers_each_method_the_same_trials_and_picks_on_val_averages() -> None:
    """bench.recipe: 8 trials per method (the unify-only ones share a suite run per router-
    stage length, DDOME's run once); the choice is the highest mean, ties to the default."""
    from bench.recipe import SERVER_STAGE, TRIALS, choose
    from metamoe.compare_plan import plan

    n = {f: len(rows) * (2 if f in SERVER_STAGE else 1) for f, rows in TRIALS.items()}
    assert n == {"metamoe": 8, "flexolmo": 8, "ddome": 8}
    jobs, missing = plan([r for rows in TRIALS.values() for r in rows], benchmark="text")
    assert not missing  # every trial's experiment file exists
    suites = {j.method: j.rows for j in jobs if j.method.endswith("_suite")}
    assert suites == {"oneshot_suite": list(TRIALS["flexolmo"]),
                      "metamoe_suite": list(TRIALS["metamoe"])}

    def t(avg: float) -> dict:
        return {"average": avg, "std": 0.0, "per_seed_average": [avg]}

    tables = {1: {"metamoe": t(0.70), "metamoe[lambda1]": t(0.72), "ddome[ddome_paper]": t(0.5),
                  "ddome[ddome_paper_k1]": t(0.5), "flexolmo": {"status": "unavailable"}},
              3: {"metamoe": t(0.72), "flexolmo[top2]": t(0.6)}}
    res = choose(tables, ["metamoe", "flexolmo", "ddome"])
    assert list(res["families"]["metamoe"]) == ["metamoe@E1", "metamoe[lambda1]@E1",
                                                "metamoe@E3"]
    # one router-stage length for both routed methods: flexolmo has trials at E3 only
    assert res["choice"] == {"metamoe": "metamoe@E3", "flexolmo": "flexolmo[top2]@E3",
                             "ddome": "ddome[ddome_paper]"}
    assert res["router_epochs_choice"] == 3
    assert res["best_alone"]["metamoe"] == "metamoe[lambda1]@E1"
    # both at both lengths: the length with the higher mean of the two families' best trials
    tables[1].update({"flexolmo": t(0.55)})
    tables[3].update({"metamoe": t(0.60)})
    res = choose(tables, ["metamoe", "flexolmo"])
    assert res["router_epochs_choice"] == 1  # (0.72 + 0.55) / 2 > (0.60 + 0.60) / 2
    assert res["choice"] == {"metamoe": "metamoe[lambda1]@E1", "flexolmo": "flexolmo@E1"}


def test_unify_probe_variants_parse_and_a_bad_one_is_named() -> None:
    from bench.unify_probe import main, parse_variant

    assert parse_variant("same_start:expert.epochs=3,lr=1e-4") == \
        ("same_start", {"expert.epochs": "3", "lr": "1e-4"})
    assert parse_variant("metamoe") == ("metamoe", {})
    with pytest.raises(SystemExit, match="'metamoe,same_start'.*separated by ';'"):
        main(["/nonexistent-run", "--variants", "metamoe,same_start"])  # before any loading


def test_ddome_gate_steps_counts_the_budgets_steps(cache_dir: str) -> None:
    """tiny (2 domains) under ddome_paper: the anchors are partitions 0 and 1; at the budget
    (fl.rounds x fl.epochs passes of expert.batch_size) each takes ceil(n / batch) steps per
    pass, and 4x the passes 4x the steps."""
    lines = _bench(["bench.ddome_gate_steps", "--benchmark", "tiny", "--passes-x", "1,4",
                    "--lr-x", "1"], env={"METAMOE_CACHE_DIR": cache_dir})
    out = json.loads(lines[-1])
    from metamoe.config import resolve_config

    cfg = resolve_config({"benchmark": "tiny", "method": "ddome", "experiment": "ddome_paper"})
    passes = cfg.fl.rounds * cfg.fl.epochs
    per_pass = sum(math.ceil(n / out["batch_size"]) for n in out["n_train"]) / 2
    one, four = out["rows"]
    assert len(out["n_train"]) == 2 and one["passes"] == passes and four["passes"] == 4 * passes
    if float(passes).is_integer():
        assert one["steps_per_anchor"] == passes * per_pass
    assert four["steps_per_anchor"] == 4 * one["steps_per_anchor"]
    assert all(0 <= r["val_domain_acc"] <= 1 and r["logit_std"] >= 0 for r in out["rows"])
