"""bench/many_clients.py: its K settings are the committed configs, and its table and last
line follow the interface the issue names (keyed by K, averages in [0, 1], purity)."""

import json

import numpy as np
import pytest

from bench.many_clients import ROWS, last_line, proxies_per_client, render, setting, summarise
from metamoe.compare_tables import aggregate
from metamoe.config import config_hash, resolve_config, to_container


def test_the_proxy_rule_reproduces_the_committed_configs():
    assert proxies_per_client(20, 500) == resolve_config({"benchmark": "vision_k20"}).select.m
    assert proxies_per_client(60, 500) == resolve_config({"benchmark": "vision_k60"}).select.m
    assert proxies_per_client(60, 200) == resolve_config({"benchmark": "text_k60"}).select.m
    assert [proxies_per_client(k, 500) for k in (3, 12, 30)] == [500, 330, 130]


@pytest.mark.parametrize("bench", ["vision", "text"])
def test_k60_is_the_committed_many_clients_benchmark(bench):
    name, ov = setting(bench, 60)
    assert name == f"{bench}_k60"
    plain = resolve_config({"benchmark": name})
    assert config_hash(to_container(resolve_config({"benchmark": name, "overrides": ov}))) \
        == config_hash(to_container(plain))
    assert plain.benchmark.partition == "dirichlet" and plain.benchmark.dirichlet_alpha == 0.5
    # K = 3 holds the same private data as every larger K
    three = resolve_config({"benchmark": bench, "overrides": setting(bench, 3)[1]})
    assert setting(bench, 3)[0] == bench
    assert {k: three.benchmark[k] for k in ("max_train", "max_test", "val_fraction")} == \
        {k: plain.benchmark[k] for k in ("max_train", "max_test", "val_fraction")}
    # ... and trains like it: the local batch, FL rounds and weighting of <bench>_k60 for every
    # method, whatever the benchmark's own per-method recipes say
    for method in ("metamoe", "fedavg", "fedalign_moe", "ddome"):
        three_m = resolve_config({"benchmark": bench, "method": method,
                                  "overrides": setting(bench, 3)[1]})
        many_m = resolve_config({"benchmark": name, "method": method})
        assert [three_m.expert.batch_size, three_m.fl.rounds, three_m.fl.weighting] == \
            [many_m.expert.batch_size, many_m.fl.rounds, many_m.fl.weighting], method
    k12 = resolve_config({"benchmark": name, "overrides": setting(bench, 12)[1]})
    assert k12.benchmark.num_clients == 12 and k12.benchmark.partition == "dirichlet"


@pytest.mark.parametrize("bench", ["vision_k60", "text_k60"])
def test_every_k60_client_holds_enough_samples_to_upload(bench):
    """Each of the 60 clients holds at least privacy.min_count train samples, and as many
    effective samples under its router vectors' token-weighted mean, so none refuses its
    uploads (a client below it refuses them: clients/stages.py's expert_stage)."""
    from types import SimpleNamespace

    from metamoe.clients.privacy import effective_count, sample_token_counts
    from metamoe.data import client_names, client_partition, load_benchmark

    cfg = resolve_config({"benchmark": bench})
    data = load_benchmark(cfg)
    # the token count reads only the seed model's pad id (text: 0, as models/text.py pads)
    pad = SimpleNamespace(cfg=SimpleNamespace(pad_id=0))
    doms = [client_partition(cfg, data, p)[1] for p in range(len(client_names(cfg)))]
    sizes = [len(d.y_train) for d in doms]
    eff = [effective_count(sample_token_counts(pad, d.x_train)) for d in doms]
    assert len(sizes) == 60 and min(sizes) >= cfg.privacy.min_count, min(sizes)
    assert min(eff) >= cfg.privacy.min_count, (min(eff), int(np.argmin(eff)))


def _fake_compare_dir(tmp_path, k):
    """A compare output dir in compare's own schema: per-seed rows through compare_tables."""
    out = tmp_path / f"K{k}"
    per_seed = {}
    for seed in range(2):
        suite = {"rows": {}, "wall_seconds": {"expert": 10.0, "merge[metamoe]": 2.0,
                                              "evaluate[metamoe]": 3.0,
                                              "merge[metamoe[groups3]]": 1.0,
                                              "evaluate[metamoe[groups3]]": 1.0, "total": 17.0}}
        for row, acc in (("metamoe", 0.70 + seed / 100), ("metamoe[groups3]", 0.80)):
            r = {"accuracy": {"per_domain": {"a": acc}, "average": acc},
                 "upload_bytes": {"c0": 100, "c1": 102}, "rounds": 1}
            if row != "metamoe":
                r["groups"] = {"E": 3, "purity": 1.0 - seed / 10}
            suite["rows"][row] = r
            per_seed.setdefault(row, []).append({**r, "_run": f"suite-s{seed}"})
        fed = {"accuracy": {"per_domain": {"a": 0.6}, "average": 0.6},
               "upload_bytes": {"c0": 5000}, "rounds": 4, "wall_seconds": {"total": 30.0}}
        per_seed.setdefault("fedavg", []).append({**fed, "_run": f"fedavg-s{seed}"})
        for rid, m in ((f"suite-s{seed}", suite), (f"fedavg-s{seed}", fed)):
            (out / "runs" / rid).mkdir(parents=True)
            (out / "runs" / rid / "metrics.json").write_text(json.dumps(m))
    table = aggregate(per_seed, ["a"])
    table["flexolmo"] = {"status": "unavailable", "reason": "run failed"}
    (out / "table.json").write_text(json.dumps(table))
    return out


def test_summary_table_and_last_line(tmp_path):
    res = {"benchmark": "vision", "seeds": 2, "split": "val", "commit": "abcdef0123",
           "k": {str(k): summarise(_fake_compare_dir(tmp_path, k), k,
                                   {**ROWS, "grouped_moe": "metamoe[groups3]"})
                 for k in (3, 60)}}
    s = res["k"]["60"]
    assert s["per_client_moe"]["average"] == pytest.approx(0.705)
    assert s["per_client_moe"]["wall"] == pytest.approx(15.0)  # shared phases + its own
    assert s["grouped_moe"]["wall"] == pytest.approx(12.0)
    assert s["fedavg"]["wall"] == 30.0 and s["fedavg"]["rounds"] == 4
    assert s["purity"] == pytest.approx(0.95)
    assert s["flexolmo"] == {"status": "run failed"}
    line = json.loads(json.dumps(last_line(res)))
    assert set(line) == {"3", "60"}
    assert set(line["60"]) == {*ROWS, "purity"}
    assert line["60"]["grouped_moe"] == pytest.approx(0.80) and line["60"]["flexolmo"] is None
    md = render(res)
    assert "K = 60" in md and "80.00 ± 0.00" in md and "0.950" in md


def test_combine_merges_separate_invocations_and_names_each_source(tmp_path):
    """--combine: per K and row the last file wins, purity follows grouped_moe's file, every
    cell names where it came from, and files of another split are refused."""
    from bench.many_clients import combine, main

    def result(commit, rows, ks, acc, split="test"):
        k = {str(x): {**{r: {"average": acc, "std": 0.0, "per_seed_average": [acc],
                             "upload_bytes": 1000, "rounds": 1, "wall": 1.0} for r in rows},
                      "purity": 0.9 if "grouped_moe" in rows else None, "k": x} for x in ks}
        return {"benchmark": "vision", "seeds": 1, "split": split, "commit": commit,
                "rows": {r: ROWS[r] for r in rows}, "overrides": "",
                "settings": {str(x): {"benchmark": "b", "overrides": f"k={x}"} for x in ks},
                "k": k}

    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(result("aaaaaaa1", ["per_client_moe", "grouped_moe"], [3, 60], 0.5)))
    b.write_text(json.dumps(result("bbbbbbb2", ["grouped_moe", "fedavg"], [60], 0.8)))
    res = combine([str(a), str(b)])
    assert list(res["k"]) == ["3", "60"]
    assert res["k"]["60"]["per_client_moe"]["average"] == 0.5
    assert res["k"]["60"]["grouped_moe"]["average"] == 0.8 == res["k"]["60"]["fedavg"]["average"]
    assert "flexolmo" not in res["k"]["60"] and res["k"]["3"]["grouped_moe"]["average"] == 0.5
    assert res["sources"]["60"]["grouped_moe"]["file"] == "b.json"
    assert res["sources"]["60"]["per_client_moe"]["commit"] == "aaaaaaa1"
    assert res["commit"] == ["aaaaaaa1", "bbbbbbb2"]
    md = render(res)
    assert "aaaaaaa, bbbbbbb" in md and "grouped_moe <- b.json bbbbbbb" in md
    assert last_line(res)["60"]["flexolmo"] is None
    out = tmp_path / "out"
    assert main(["--combine", str(a), str(b), "--output-dir", str(out)]) == 0
    assert json.loads((out / "many_clients.json").read_text())["k"]["60"]["fedavg"]["average"] == 0.8
    c = tmp_path / "c.json"
    c.write_text(json.dumps(result("c", ["fedavg"], [60], 0.1, split="val")))
    with pytest.raises(SystemExit, match="c.json"):
        combine([str(a), str(c)])
