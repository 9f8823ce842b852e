"""The comparison command: planning (suite sharing), table schema, resume."""

import json

import pytest

from metamoe.compare import aggregate, compare, rows_of
from metamoe.compare_plan import DEFAULT_ROWS, Job, plan, run_id
from metamoe.strategies.suites import parse_row


def test_parse_row():
    assert parse_row("metamoe[no_pa]") == ("metamoe", "no_pa")
    assert parse_row("btx") == ("btx", "")


def test_reference_rows_come_only_with_a_plain_metamoe_run():
    acc = {"average": 0.5, "per_domain": {"a": 0.4, "b": 0.6}}
    metrics = {"accuracy": acc, "upload_bytes": {"a": 10, "b": 20},
               "references": {"zero_shot": {"average": 0.3, "per_domain": {"a": 0.2, "b": 0.4}},
                              "experts": {"a": {"average": 0.45,
                                                "per_domain": {"a": 0.5, "b": 0.4}}}}}
    rows = rows_of(metrics, Job("metamoe", "", ["metamoe"]), references=True)
    assert list(rows) == ["metamoe", "metamoe/zero_shot", "metamoe/expert[a]"]
    assert rows["metamoe/expert[a]"]["accuracy"]["per_domain"] == {"a": 0.5, "b": 0.4}
    assert list(rows_of(metrics, Job("metamoe", "", ["metamoe"]))) == ["metamoe"]
    assert list(rows_of(metrics, Job("metamoe", "no_pa", ["metamoe[no_pa]"]),
                        references=True)) == ["metamoe[no_pa]"]
    table = aggregate({r: [{**v, "_run": "x"}] for r, v in rows.items()}, ["a", "b"])
    assert table["metamoe/zero_shot"]["average"] == 0.3
    assert table["metamoe/zero_shot"]["upload_bytes"] == 0 and table["metamoe"]["upload_bytes"] == 15


def test_plan_shares_client_phases_only_when_asked():
    jobs, missing = plan(["btm", "btx", "metamoe", "metamoe[no_ca_router]", "metamoe[no_rw_dpp]",
                          "unrestricted_moe_scratch", "nosuch", "metamoe[nosuch]"])
    assert set(missing) == {"nosuch", "metamoe[nosuch]"}
    by = {j.method: j for j in jobs}
    assert by["oneshot_suite"].rows == ["btm", "btx"]
    assert by["metamoe_suite"].rows == ["metamoe", "metamoe[no_ca_router]"]
    assert ("metamoe", "no_rw_dpp") in {(j.method, j.experiment) for j in jobs}
    jobs, _ = plan(["btm", "btx"], share=False)
    assert [(j.method, j.rows) for j in jobs] == [("btm", ["btm"]), ("btx", ["btx"])]
    jobs, _ = plan(["btm"])  # a single row runs alone
    assert [j.method for j in jobs] == ["btm"]
    assert {"unrestricted_moe_scratch", "unrestricted_moe_same_start",
            "metamoe[authors_code]", "ddome[ddome_paper]"} <= set(DEFAULT_ROWS)


def test_a_suite_takes_the_variants_that_only_change_its_server_stage():
    """With the benchmark known, unify-only variants join a suite (one run trains the client
    phases for all: recipe trials on val); a variant that changes a shared phase (DP changes
    privacy, no_rw_dpp the selection) runs alone; a suite run builds exactly its members."""
    from metamoe.config import ConfigError, resolve_config
    from metamoe.strategies.suites import METAMOE_SUITE, check_member, suite_spec

    rows = ["metamoe[lambda1]", "btm", "flexolmo[top2_train_experts]", "flexolmo", "metamoe",
            "metamoe[euclid]", "metamoe[dp_eps1]", "metamoe[no_rw_dpp]", "metamoe[no_pa]"]
    jobs, missing = plan(rows, benchmark="tiny")
    assert not missing
    by = {(j.method, j.experiment): j for j in jobs}
    assert by["oneshot_suite", ""].rows == ["btm", "flexolmo", "metamoe[no_pa]",
                                            "flexolmo[top2_train_experts]"]
    assert by["metamoe_suite", ""].rows == ["metamoe", "metamoe[lambda1]", "metamoe[euclid]"]
    assert by["metamoe_suite", ""].members[1] == ("metamoe[lambda1]", "metamoe", "lambda1")
    assert {("metamoe", "dp_eps1"), ("metamoe", "no_rw_dpp")} <= set(by)
    # without the benchmark only the default rows share: here metamoe alone, so no suite
    assert "metamoe_suite" not in {j.method for j in plan(rows)[0]}

    cfg = resolve_config({"benchmark": "tiny", "method": "metamoe_suite",
                          "members": "metamoe,metamoe[lambda1]"})
    assert suite_spec(cfg, METAMOE_SUITE) == (("metamoe", "metamoe", ""),
                                              ("metamoe[lambda1]", "metamoe", "lambda1"))
    assert float(check_member(cfg, "metamoe[lambda1]", "metamoe", "lambda1").unify.lambda_init) \
        == 1.0
    assert suite_spec(resolve_config({"benchmark": "tiny", "method": "metamoe_suite"}),
                      METAMOE_SUITE) == METAMOE_SUITE
    with pytest.raises(ConfigError, match="another privacy config"):
        check_member(cfg, "metamoe[dp_eps1]", "metamoe", "dp_eps1")
    for bad, why in (("metamoe,btm", "method 'btm', not one of"),
                     ("metamoe,metamoe", "names a row twice")):
        c = resolve_config({"benchmark": "tiny", "method": "metamoe_suite", "members": bad})
        with pytest.raises(ConfigError, match=why):
            suite_spec(c, METAMOE_SUITE)


def test_run_ids_are_keyed_by_config_and_seed():
    job = plan(["btm", "btx"])[0][0]
    a = run_id(job, "tiny", 0, "")
    assert a == run_id(job, "tiny", 0, "") and a.startswith("oneshot_suite-s0-")
    assert a != run_id(job, "tiny", 1, "")
    assert a != run_id(job, "tiny", 0, "unify.epochs=2")


@pytest.mark.slow
def test_compare_tiny_table_and_resume(tmp_path, monkeypatch, capsys, cache_dir):
    """One real row end to end (the from-scratch bound: it also carries the clients' private
    data, the path the same-start bound shares; same-start's own unify is tested in
    test_unrestricted.py), an unavailable row, the tables, the plots and a resume."""
    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "flwr-home"))
    kw = dict(benchmark="tiny", seeds=1, methods=["unrestricted_moe_scratch", "nosuch"],
              output_dir=str(tmp_path / "cmp"), cache_dir=cache_dir, timeout=900)
    out = compare(**kw)
    table = json.loads((out / "table.json").read_text())
    assert table["nosuch"]["status"] == "unavailable"
    t = table["unrestricted_moe_scratch"]
    assert {"average", "std", "per_domain", "private", "upload_bytes"} <= set(t)
    assert set(t["per_domain"]) == {"mnist", "uci"}
    assert 0.0 <= t["average"] <= 1.0 and t["std"] == 0.0
    assert t["per_seed_average"] == [t["average"]]
    assert t["private"] is False
    # the non-private bound "uploads" its private data (300 tiny images: 943 KB a client)
    assert t["upload_bytes"] > 943_200
    md = (out / "table.md").read_text()
    assert "unrestricted_moe_scratch (NOT PRIVATE)" in md and "not run" in md
    avg = 100 * table["unrestricted_moe_scratch"]["average"]
    assert f"**{avg:.2f} ± 0.00**" in next(line for line in md.splitlines()
                                            if "| unrestricted_moe_scratch (NOT PRIVATE) |" in line)
    assert (out / "accuracy_per_domain.png").stat().st_size > 0
    assert (out / "accuracy_vs_upload.png").stat().st_size > 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    mtimes = {p: (out / "runs" / p / "metrics.json").stat().st_mtime for p in runs}
    launch = json.loads((out / "compare.json").read_text())["launch_seconds"]
    assert set(launch) == set(runs) and all(v > 0 for v in launch.values())
    capsys.readouterr()
    docs = tmp_path / "docs"
    # second invocation: everything is reused, nothing is launched; published with its run
    compare(**kw, publish=str(docs))
    log = capsys.readouterr().out
    assert log.count("[compare] reusing") == 1 and "[compare] running" not in log
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs
    assert {p: (out / "runs" / p / "metrics.json").stat().st_mtime for p in runs} == mtimes
    assert json.loads((out / "table.json").read_text()) == table
    # a resume keeps the reused runs' launch times (they are not re-measured)
    assert json.loads((out / "compare.json").read_text())["launch_seconds"] == launch
    assert sorted(p.name for p in (docs / "runs").iterdir()) == [f"{r}.json" for r in runs]
    # the published comparison taken up elsewhere: its run is taken, nothing is launched
    again = compare(**{**kw, "output_dir": str(tmp_path / "elsewhere")},
                    reuse_published=str(docs))
    log = capsys.readouterr().out
    assert "[compare] running" not in log and "1 runs taken from" in log
    assert json.loads((again / "table.json").read_text()) == table


def test_paired_differences_against_metamoe(tmp_path):
    from metamoe.compare import write_markdown

    def run(avg, seed):
        return {"accuracy": {"average": avg, "per_domain": {"a": avg}}, "upload_bytes": {"c": 1},
                "_run": f"r{seed}", "_seed": seed}

    per_seed = {"metamoe": [run(a, s) for s, a in enumerate((0.80, 0.82, 0.78, 0.90))],
                "btm": [run(a, s) for s, a in enumerate((0.75, 0.83, 0.70))],
                "late": [run(0.5, 2), run(0.95, 3)],
                "other": [run(0.5, 7)]}
    table = aggregate(per_seed, ["a"])
    p = table["btm"]["metamoe_minus_this"]  # paired on the seeds both rows have: 0, 1, 2
    assert p["per_seed"] == pytest.approx([0.05, -0.01, 0.08]) and p["wins"] == 2
    assert p["mean"] == pytest.approx(0.04) and p["seeds"] == [0, 1, 2]
    assert table["metamoe"]["seeds"] == 4 and table["metamoe"]["seed_ids"] == [0, 1, 2, 3]
    late = table["late"]["metamoe_minus_this"]  # seed 2 of metamoe against late's first run
    assert late["seeds"] == [2, 3] and late["per_seed"] == pytest.approx([0.28, -0.05])
    assert "metamoe_minus_this" not in table["metamoe"]
    assert "metamoe_minus_this" not in table["other"]  # no common seed: no pairing
    write_markdown(tmp_path / "t.md", table, {}, ["a"], "x", [0, 1, 2, 3])
    md = (tmp_path / "t.md").read_text()
    assert "| btm | +4.00 ± 3.74 | +5.00 / -1.00 / +8.00 | 0,1,2 | 2 of 3 |" in md
    assert "| late | +11.50 ± 16.50 | +28.00 / -5.00 | 2,3 | 1 of 2 |" in md


def test_more_seeds_plan_and_publish(tmp_path):
    """``--more-seeds M:rows``: every row on seeds 0..N-1, the named rows on N..M-1 (planned
    on their own, so MetaMoE runs alone there instead of in the suite); bad plans fail before
    anything runs; ``--publish`` copies the tables."""
    from metamoe.compare import main
    from metamoe.compare_plan import seed_plan
    from metamoe.compare_publish import publish_tables
    from metamoe.config import ConfigError

    rows = ["btm", "btx", "metamoe", "metamoe[no_ca_router]"]
    sp = seed_plan(3, rows, (5, ["metamoe", "btx"]))
    assert sp == [(0, rows), (1, rows), (2, rows), (3, ["btx", "metamoe"]),
                  (4, ["btx", "metamoe"])]
    assert seed_plan(2, rows) == [(0, rows), (1, rows)]
    assert sorted(j.method for j in plan(sp[3][1])[0]) == ["btx", "metamoe"]
    for bad in ((3, ["metamoe"]), (5, ["fedavg"])):
        with pytest.raises(ConfigError, match="--more-seeds"):
            seed_plan(3, rows, bad)
    assert seed_plan(3, rows, (5, ["metamoe", "best_private"]))[3] == (3, ["metamoe"])
    # best_private: the strongest private baseline, never MetaMoE, an ablation, an upper bound
    # or a reference row
    from metamoe.compare_plan import best_private

    t = {"btm": {"average": 0.8}, "btx": {"average": 0.82}, "metamoe": {"average": 0.9},
         "metamoe[no_pa]": {"average": 0.85}, "zero_shot": {"average": 0.5},
         "unrestricted_moe_scratch": {"average": 0.95, "private": False},
         "metamoe/expert[a]": {"average": 0.99}, "fedavg": {"status": "unavailable"}}
    assert best_private(t) == "btx"
    with pytest.raises(ConfigError, match="best_private"):
        best_private({"metamoe": {"average": 0.9}})
    assert main(["--benchmark", "tiny", "--more-seeds", "five:metamoe"]) == 2
    assert main(["--benchmark", "tiny", "--methods", "btm", "--more-seeds", "3:btx"]) == 2
    src = tmp_path / "cmp"
    src.mkdir()
    for f in ("table.json", "table.md", "compare.json"):
        (src / f).write_text(f)
    (src / "runs").mkdir()
    got = publish_tables(src, tmp_path / "docs" / "vision")
    assert sorted(p.name for p in got) == ["compare.json", "table.json", "table.md"]
    assert (tmp_path / "docs" / "vision" / "table.md").read_text() == "table.md"
    assert not (tmp_path / "docs" / "vision" / "runs").exists()


def test_published_runs_go_back_as_finished_runs(tmp_path):
    """``publish_runs`` leaves exactly the table's runs in the folder; ``take_published_runs``
    puts them back as ``<run id>/metrics.json`` (stripping the sweep's ``R<R>-`` prefix),
    never over a finished run, and refuses a folder that does not exist."""
    from metamoe.compare_publish import publish_runs, take_published_runs

    runs = tmp_path / "runs"
    for rid in ("a-s0-1", "b-s0-2", "killed-s0-3"):
        (runs / rid / "checkpoints").mkdir(parents=True)
    for rid in ("a-s0-1", "b-s0-2"):
        (runs / rid / "metrics.json").write_text(rid)
    dest = tmp_path / "docs" / "runs"
    dest.mkdir(parents=True)
    (dest / "R4-stale-s0-9.json").write_text("old")
    got = publish_runs({f"R4-{r}": runs / r for r in ("a-s0-1", "b-s0-2", "killed-s0-3")}, dest)
    assert sorted(p.name for p in got) == ["R4-a-s0-1.json", "R4-b-s0-2.json"]
    assert sorted(p.name for p in dest.iterdir()) == ["R4-a-s0-1.json", "R4-b-s0-2.json"]
    (dest / "R8-c-s0-4.json").write_text("c")
    fresh = tmp_path / "fresh"
    (fresh / "a-s0-1").mkdir(parents=True)
    (fresh / "a-s0-1" / "metrics.json").write_text("kept")
    assert take_published_runs(dest, fresh, "R4-") == ["b-s0-2"]
    assert (fresh / "b-s0-2" / "metrics.json").read_text() == "b-s0-2"
    assert (fresh / "a-s0-1" / "metrics.json").read_text() == "kept"
    assert not (fresh / "c-s0-4").exists()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        take_published_runs(tmp_path / "nowhere", fresh)


def test_publishing_finished_runs_adds_them_and_leaves_unfinished_ones_out(tmp_path, capsys):
    """``python -m metamoe.compare_publish RUNS DEST`` adds each finished run and keeps the
    files already published; a killed run (no metrics.json) is named, not published."""
    from metamoe.compare_publish import main

    runs = tmp_path / "runs"
    (runs / "a-s1-1").mkdir(parents=True)
    (runs / "a-s1-1" / "metrics.json").write_text("a")
    (runs / "killed-s1-2" / "checkpoints").mkdir(parents=True)
    dest = tmp_path / "docs" / "runs"
    dest.mkdir(parents=True)
    (dest / "a-s0-0.json").write_text("seed 0")
    main([str(runs), str(dest)])
    assert sorted(p.name for p in dest.iterdir()) == ["a-s0-0.json", "a-s1-1.json"]
    assert (dest / "a-s1-1.json").read_text() == "a"
    assert "1 unfinished left out: killed-s1-2" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main([str(tmp_path / "nowhere"), str(dest)])


def test_replot_redraws_a_published_tables_plots_from_its_table_json(tmp_path, capsys,
                                                                     monkeypatch):
    """``python -m metamoe.compare_publish --replot DIR`` draws both plots from DIR/table.json
    alone (the split from compare.json), leaving out rows listed as unavailable; the plots mark
    MetaMoE's ablations without naming them and name every other row. A folder without
    table.json is refused, naming it."""
    from matplotlib.axes import Axes

    from metamoe.compare_publish import main
    from metamoe.compare_tables import aggregate

    def run(avg, seed, ups=1000):
        return {"accuracy": {"average": avg, "per_domain": {"a": avg, "b": avg - 0.1}},
                "upload_bytes": {"c": ups}, "_run": f"r{seed}"}

    per_seed = {"metamoe": [run(0.80, s) for s in range(2)],
                "metamoe[no_pa]": [run(0.79, s) for s in range(2)],
                "btm": [run(0.70, s) for s in range(2)],
                "fedavg": [{**run(0.75, s, 10**6), "rounds": 8} for s in range(2)]}
    table = aggregate(per_seed, ["a", "b"])
    dest = tmp_path / "docs" / "results" / "x"
    dest.mkdir(parents=True)
    (dest / "table.json").write_text(json.dumps(  # as compare writes it, unavailable rows too
        {**table, "fedprox": {"status": "unavailable", "reason": "not registered"}}))
    (dest / "compare.json").write_text(json.dumps({"split": "val"}))
    named = []
    real = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: (
        named.append(text), real(self, text, *a, **k))[1])
    main(["--replot", str(dest)])
    assert (dest / "accuracy_vs_upload.png").stat().st_size > 0
    assert (dest / "accuracy_per_domain.png").stat().st_size > 0
    assert sorted(named) == ["btm", "fedavg", "metamoe"]
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["--replot", str(tmp_path / "nowhere")])


def test_ddome_rows_tabulate_where_the_gate_sends_each_domain(tmp_path):
    """A DDOME run's ``ddome_own_share`` reaches its row in table.json (mean and per seed) and
    table.md; rows without it get no such key."""
    from metamoe.compare import write_markdown

    def run(avg, seed, share=None):
        r = {"accuracy": {"average": avg, "per_domain": {"a": avg, "b": avg}},
             "upload_bytes": {"c": 1}, "_run": f"r{seed}"}
        return r if share is None else {**r, "ddome_own_share": share}

    per_seed = {"metamoe": [run(0.8, s) for s in range(2)],
                "ddome[ddome_paper]": [run(0.6, 0, {"a": 0.9, "b": 0.2}),
                                       run(0.6, 1, {"a": 0.7, "b": 0.4})]}
    table = aggregate(per_seed, ["a", "b"])
    t = table["ddome[ddome_paper]"]
    assert t["ddome_own_share"] == {"a": pytest.approx(0.8), "b": pytest.approx(0.3)}
    assert t["ddome_own_share_per_seed"] == {"a": [0.9, 0.7], "b": [0.2, 0.4]}
    assert "ddome_own_share" not in table["metamoe"]
    write_markdown(tmp_path / "t.md", table, {}, ["a", "b"], "x", [0, 1])
    assert "| ddome[ddome_paper] | 80.0 (90 / 70) | 30.0 (20 / 40) |" in (tmp_path / "t.md").read_text()


def test_upload_plot_labels_of_close_points_do_not_overlap():
    """Accuracy-vs-upload plots (accuracy_vs_upload.png, docs/figures/*_comparison.png): labels
    of points with about the same upload stack at least ``step`` apart (MetaMoE's ablations sit
    within 1 point of each other) and go left when the next column is close at the same
    heights; a lone far point keeps its own height, labelled to its right."""
    from metamoe.compare_tables import label_columns

    pts = [(1.0e5, 86.9, "metamoe"), (1.02e5, 86.9, "metamoe[no_pa]"),
           (1.01e5, 86.8, "metamoe[no_rw_dpp]"), (4.0e5, 86.5, "flexolmo"),
           (1.0e8, 86.9, "fedavg"), (250, 60.0, "zero")]
    step = 0.8
    out = {n: (y, lx, ly, side) for _, y, lx, ly, side, n in label_columns(pts, step)}
    close = sorted(out[n][2] for n in ("metamoe", "metamoe[no_pa]", "metamoe[no_rw_dpp]"))
    assert all(b - a >= step - 1e-9 for a, b in zip(close, close[1:]))
    assert {out[n][3] for n in ("metamoe", "metamoe[no_pa]", "metamoe[no_rw_dpp]")} == {"left"}
    assert out["fedavg"] == (86.9, 1.4e8, 86.9, "right")
    assert out["zero"] == (60.0, 1.4 * 250, 60.0, "right")
