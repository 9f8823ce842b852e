"""--gpus-per-client / --cpus-per-client / --ray-address: the federation config and the Ray
environment the launcher builds, and its refusals, with 0, 1 and 4 visible GPUs (the GPU count
is monkeypatched; no Flower or Ray process is started)."""

from __future__ import annotations

import subprocess

import pytest

import metamoe.launch as L
import metamoe.resources as R
from metamoe.config import ConfigError, num_clients, resolve_config


def fed(k: int, gpus: float, cpus: int = 1) -> str:
    return f"num-supernodes={k} client-resources-num-cpus={cpus} client-resources-num-gpus={gpus}"


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): the launcher sees n GPUs; attaching to a cluster is an error unless asked."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_cluster(address):
        raise AssertionError(f"cluster_gpus({address!r}) called without --ray-address")

    monkeypatch.setattr(R, "cluster_gpus", no_cluster)

    def set_(n: int):
        monkeypatch.setattr(R, "visible_gpus", lambda: n)

    return set_


@pytest.fixture
def nothing_starts(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"a process was started: {a[:1]}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


# (visible GPUs, K clients, --gpus-per-client) -> client-resources-num-gpus
CASES = [
    (0, 4, "auto", 0.0), (0, 4, "0", 0.0), (0, 4, 0, 0.0),
    (1, 4, "auto", 0.25), (1, 1, "auto", 1.0), (1, 3, "auto", 0.33), (1, 8, "auto", 0.12),
    (1, 5, "auto", 0.19),  # 0.2 is 0.2000000030 in float32: Flower would fit 4, not 5
    (1, 4, "0.5", 0.5), (1, 4, "1", 1.0), (1, 4, 0.25, 0.25), (1, 4, "0", 0.0),
    (1, 400, "auto", 0.01),
    (4, 4, "auto", 1.0), (4, 2, "auto", 1.0), (4, 6, "auto", 0.5), (4, 9, "auto", 0.33),
    (4, 16, "auto", 0.25), (4, 4, "0.5", 0.5), (4, 4, "2", 2.0), (4, 4, "4", 4.0),
    (4, 4, "0", 0.0),
]


@pytest.mark.parametrize("n,k,spec,share", CASES)
def test_federation_config_for_each_gpu_count(gpus, nothing_starts, n, k, spec, share):
    gpus(n)
    cfg, env = R.simulation_resources(k, spec)
    assert cfg == fed(k, share)
    assert env["RAY_ADDRESS"] == "local"  # a Ray of its own, never a `ray start` cluster
    # share 0 on a GPU machine: Ray must empty CUDA_VISIBLE_DEVICES for the ClientApps
    assert env.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO") == ("1" if share == 0 and n else None)


def test_auto_without_gpu_is_todays_config(gpus):
    gpus(0)
    assert R.simulation_resources(6)[0] == \
        "num-supernodes=6 client-resources-num-cpus=1 client-resources-num-gpus=0.0"


def test_auto_shares_fit_every_client_on_the_gpus():
    for n in (1, 2, 4, 8):
        for k in range(1, 260):
            share = R.gpu_share("auto", k, [n])
            per_gpu = int(1 / R._f32(share))  # how Flower sizes its actor pool, per GPU
            assert 0.01 <= share <= 1.0 and round(share, 2) == share
            assert n * per_gpu >= min(k, 100 * n), (n, k, share)
            if k <= 100 * n:
                assert k * share <= n + 1e-9


@pytest.mark.parametrize("n,spec,needle", [
    (0, "0.5", "no GPU is visible"), (0, "1", "no GPU is visible"),
    (0, "0.01", "no GPU is visible"),
    (1, "2", "more GPUs per ClientApp than one node has (1 visible)"),
    (1, "1.5", "more GPUs per ClientApp"),
    (4, "5", "more GPUs per ClientApp than one node has (4 visible)"),
    (4, "1.5", "whole number of GPUs"),
    (1, "-0.5", "positive GPU share"), (1, "nan", "positive GPU share"),
    (1, "inf", "positive GPU share"), (1, "half", "must be 'auto' or a number"),
    (1, "0.00001", "0.0001"),
])
def test_unschedulable_shares_are_refused_naming_the_flag(gpus, nothing_starts, n, spec, needle):
    gpus(n)
    with pytest.raises(ConfigError) as e:
        R.simulation_resources(4, spec)
    assert "--gpus-per-client" in str(e.value) and needle in str(e.value)


def test_no_gpu_message_shows_cuda_visible_devices(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=''.*--gpus-per-client 0"):
        R.simulation_resources(4, "0.25")


@pytest.mark.parametrize("cpus,ok", [(1, True), (2, True), (0, False), (-1, False),
                                     (1.5, False), ("x", False), (10**6, False)])
def test_cpus_per_client(gpus, cpus, ok):
    gpus(1)
    if ok:
        assert R.simulation_resources(4, "auto", cpus)[0] == fed(4, 0.25, cpus)
    else:
        with pytest.raises(ConfigError, match="--cpus-per-client"):
            R.simulation_resources(4, "auto", cpus)


def test_ray_address_attaches_and_counts_the_clusters_gpus(gpus, monkeypatch):
    gpus(0)  # none here; the cluster has 2 on one node and 0 on another
    monkeypatch.setattr(R, "visible_gpus", lambda: pytest.fail("local GPUs counted"))
    seen = []
    monkeypatch.setattr(R, "cluster_gpus", lambda a: seen.append(a) or [2, 0])
    cfg, env = R.simulation_resources(4, "auto", ray_address="10.0.0.1:6379")
    assert cfg == fed(4, 0.5) and env == {"RAY_ADDRESS": "10.0.0.1:6379"} and seen == ["10.0.0.1:6379"]
    assert R.simulation_resources(4, "0", ray_address="auto")[1] == {"RAY_ADDRESS": "auto"}
    with pytest.raises(ConfigError, match=r"--gpus-per-client 3: .*\(2 in the Ray cluster at auto"):
        R.simulation_resources(4, "3", ray_address="auto")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # an exported RAY_ADDRESS attaches too
    assert R.simulation_resources(4, "auto")[1] == {"RAY_ADDRESS": "10.0.0.2:6379"}
    monkeypatch.setattr(R, "visible_gpus", lambda: 1)
    for own in ("", "local"):  # ... unless told to start a Ray of its own
        assert R.simulation_resources(4, "auto", ray_address=own)[1] == {"RAY_ADDRESS": "local"}


def test_cluster_gpus_unreachable_is_a_config_error(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(ConnectionError("no")))
    with pytest.raises(ConfigError, match="--ray-address 'auto': cannot attach"):
        R.cluster_gpus("auto")


class Started(Exception):
    pass


def test_launch_passes_the_config_and_the_ray_environment(gpus, monkeypatch, tmp_path):
    gpus(4)
    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "home"))
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw["env"]))
        raise Started

    monkeypatch.setattr(subprocess, "run", fake_run)
    k = num_clients(resolve_config({"benchmark": "tiny"}))
    for spec, share in (("auto", R.gpu_share("auto", k, [4])), ("0.5", 0.5), ("0", 0.0)):
        with pytest.raises(Started):
            L.launch(benchmark="tiny", output_dir=str(tmp_path / "out"), quiet=True,
                     gpus_per_client=spec)
        cmd, env = calls[-1]
        assert cmd[:2] == ["flwr", "run"]
        assert cmd[cmd.index("--federation-config") + 1] == fed(k, share)
        assert env["RAY_ADDRESS"] == "local"
        assert env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == ("1" if share == 0 else "0")


def test_gpu_share_without_gpu_fails_before_anything_starts(gpus, nothing_starts, monkeypatch,
                                                             tmp_path, capsys):
    gpus(0)
    home = tmp_path / "home"
    monkeypatch.setenv("METAMOE_FLWR_HOME", str(home))
    with pytest.raises(ConfigError, match="--gpus-per-client 0.5 asks for a GPU"):
        L.launch(benchmark="tiny", output_dir=str(tmp_path / "out"), gpus_per_client="0.5")
    assert not home.exists()  # not even the launch's FLWR_HOME was made
    monkeypatch.setattr(L, "exit_on_sigterm", lambda: None)
    assert L.main(["--benchmark", "tiny", "--gpus-per-client", "0.5",
                   "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: --gpus-per-client 0.5") and "no GPU" in err


def test_compare_passes_the_resource_flags_to_every_launch(monkeypatch, tmp_path):
    import metamoe.compare as C

    seen = {}

    def fake_launch(*a, **kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(L, "launch", fake_launch)
    monkeypatch.setattr(L, "exit_on_sigterm", lambda: None)
    assert C.main(["--benchmark", "tiny", "--methods", "zero_shot", "--output-dir",
                   str(tmp_path / "cmp"), "--gpus-per-client", "0.5", "--cpus-per-client", "2",
                   "--ray-address", "auto"]) == 2
    assert (seen["gpus_per_client"], seen["cpus_per_client"], seen["ray_address"]) == \
        ("0.5", 2, "auto")
    seen.clear()
    C.main(["--benchmark", "tiny", "--methods", "zero_shot", "--output-dir", str(tmp_path / "c2")])
    assert (seen["gpus_per_client"], seen["cpus_per_client"], seen["ray_address"]) == \
        ("auto", 1, None)
