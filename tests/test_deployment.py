"""Real deployment on loopback: SuperLink + 3 SuperNodes over TLS with SuperNode authentication
(scripts/deploy_local.sh), each SuperNode reading its own data folder (--node-data: an image
folder, a saved HF dataset, a nested RGB JPEG folder; benchmark.kind=local); the emitted MoE,
with a client's own head rows, reproduces the accuracy that client reported."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from metamoe import load_moe
from metamoe.clients.node import _local_node, localize
from metamoe.config import resolve_config
from metamoe.data import load_benchmark
from metamoe.server.seed import get_seed_model
from metamoe.training import accuracy
from tests.test_local_e2e import make_federation

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
    fed = make_federation(tmp_path / "data")
    clients = fed["clients"][:3]
    pool = f"benchmark.pool_data={fed['pool']}"
    res = subprocess.run(
        ["bash", str(SCRIPT), "--benchmark", "tiny_local", "--overrides", pool,
         *[a for c in clients for a in ("--node-data", str(c))], "--workdir", str(work),
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
    for i in range(3):
        reg = (work / "logs" / f"register-{i}.log").read_text()
        assert "registered successfully" in reg, reg
    conn = (work / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in conn and "insecure" not in conn

    # Every SuperNode served its own partition from its own folder.
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["benchmark"] == "tiny_local" and not m["rejected"] and not m["missing"]
    assert {c["partition_id"] for c in m["clients"].values()} == {0, 1, 2}
    assert set(m["accuracy"]["per_domain"]) == {"client-0", "client-1", "client-2"}
    assert min(m["accuracy"]["per_domain"].values()) >= 0.35  # chance is 0.1
    for i, c in enumerate(clients):  # node i was started with data=<its folder>
        assert f"SuperNode {i} reads its own data from {c}" in res.stderr

    # No node's folder, file or class name reaches anything the server wrote.
    text = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*")
                   if p.is_file() and p.suffix in (".json", ".md", ".txt"))
    for secret in ("hospital-a", "hospital-b", "shop-c", "numeral_", "garment_", "glyph_"):
        assert secret not in text, secret

    # The emitted MoE, with client i's own head rows (as its node makes them from M0),
    # reproduces the accuracy client i reported.
    cfg = resolve_config({"benchmark": "tiny_local", "cache-dir": cache, "overrides":
                          f"{pool} benchmark.num_clients=3"})
    bench = load_benchmark(cfg)
    seed, _, _ = get_seed_model(cfg, bench)
    for i, c in enumerate(clients):
        node = _local_node(cfg, i, bench, {"data": str(c)})
        moe = localize(node, load_moe(run_dir), seed)
        d = node.domain
        acc = accuracy(moe, torch.from_numpy(d.x_test), torch.from_numpy(d.y_test), d.classes)
        assert np.isclose(acc, m["accuracy"]["per_domain"][f"client-{i}"], atol=1e-9)

    # Every process the script started is gone (SuperLink, SuperNodes, SuperExec, apps).
    assert _marked(work) == []
