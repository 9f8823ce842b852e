"""Real deployment on loopback: SuperLink + 2 SuperNodes over TLS with SuperNode authentication
(scripts/deploy_local.sh), the tiny config; the emitted MoE reproduces the reported accuracy."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from metamoe import load_moe
from metamoe.config import resolve_config
from metamoe.data import load_benchmark
from metamoe.training import accuracy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "deploy_local.sh"


def _marked(deploy_workdir: Path) -> list[int]:
    """Processes still running whose FLWR_HOME is the deployment's."""
    needle = f"FLWR_HOME={deploy_workdir / 'flwr-home'}".encode()
    left = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    left.append(int(p.name))
            except OSError:
                pass
    return left


@pytest.mark.deployment
@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="needs openssl and ssh-keygen")
def test_tls_auth_deployment_on_loopback(tmp_path):
    work = tmp_path / "deploy"
    cache = os.environ.get("METAMOE_CACHE_DIR") or str(tmp_path / "cache")
    res = subprocess.run(
        ["bash", str(SCRIPT), "--clients", "2", "--benchmark", "tiny", "--workdir", str(work),
         "--output-dir", str(tmp_path / "results"), "--cache-dir", cache,
         "--run-id", "tiny-deploy", "--timeout", "900"],
        capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"deploy_local.sh failed:\n{res.stdout}\n{res.stderr[-6000:]}"
    run_dir = Path(res.stdout.strip().splitlines()[-1])  # the run dir is the last line
    assert run_dir == tmp_path / "results" / "tiny-deploy"
    assert "TLS + SuperNode auth" in res.stderr and "finished:completed" in res.stderr

    # TLS and node authentication really were on.
    link_log = (work / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in link_log
    assert (work / "certs" / "ca.crt").exists()
    for i in range(2):
        reg = (work / "logs" / f"register-{i}.log").read_text()
        assert "registered successfully" in reg, reg
    conn = (work / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in conn and "insecure" not in conn

    # Both SuperNodes served their own partition.
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["benchmark"] == "tiny" and not m["rejected"] and not m["missing"]
    assert {c["partition_id"] for c in m["clients"].values()} == {0, 1}
    assert set(m["accuracy"]["per_domain"]) == {"mnist", "uci"}

    # The emitted MoE reproduces the reported accuracy.
    moe = load_moe(run_dir)
    bench = load_benchmark(resolve_config({"benchmark": "tiny"}))
    for d in bench.domains:
        acc = accuracy(moe, torch.from_numpy(d.x_test), torch.from_numpy(d.y_test), d.classes)
        assert np.isclose(acc, m["accuracy"]["per_domain"][d.name], atol=1e-9)

    # Every process the script started is gone (SuperLink, SuperNodes, SuperExec, apps).
    assert _marked(work) == []
