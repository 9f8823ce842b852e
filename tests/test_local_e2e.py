"""Clients that bring their own data (benchmark.kind=local), through the real `flwr run`
simulation: three clients with different classes, layouts and formats, plus one whose data is
bad. The bad one is refused on its node (the node's log names the file; the server hears the
kind of problem only), the run completes with the others, the unified MoE learns, and no
client's class or file name reaches the server's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metamoe import load_moe
from metamoe.clients.node import NodeData, localize
from metamoe.config import resolve_config
from metamoe.data import load_benchmark
from metamoe.data.export import to_uint8
from metamoe.launch import launch
from metamoe.server.seed import get_seed_model
from metamoe.training import accuracy
from tests.local_data import truncate_file, write_hf, write_imagefolder

WORDS = [f"numeral_{w}" for w in ("zero", "one", "two", "three", "four", "five", "six",
                                   "seven", "eight", "nine")]
ITEMS = [f"garment_{c}" for c in "abcdefghij"]
GLYPHS = [f"glyph_{i}" for i in range(10)]


def make_federation(root: Path) -> dict[str, Path]:
    """The embedded tiny_learn data (mnist, uci, fashion) written as clients' own folders, each
    in another format and with its own class names, and the public pool as an image folder."""
    cfg = resolve_config({"benchmark": "tiny_learn",
                          "overrides": "benchmark.domains=[mnist,uci,fashion]"})
    b = load_benchmark(cfg)
    pool = write_imagefolder(root / "pool", to_uint8(b.pool_x), b.pool_y,
                             [n.replace("/", "-") for n in b.class_names])
    m, u, f = b.domain("mnist"), b.domain("uci"), b.domain("fashion")
    # client 0: train/ and test/ folders of PNGs named by digit words
    c0 = write_imagefolder(root / "hospital-a", to_uint8(m.x_train), m.y_train - 10, WORDS,
                           layout="split", test=(to_uint8(m.x_test), m.y_test - 10))
    # client 1: a datasets.save_to_disk dataset with a ClassLabel and a test split
    c1 = write_hf(root / "hospital-b", to_uint8(u.x_train), u.y_train - 10,
                  GLYPHS, test=(to_uint8(u.x_test), u.y_test - 10))
    # client 2: one folder, RGB JPEGs with upper-case extensions, mixed sizes, nested folders;
    # its test split is a seeded fraction
    c2 = write_imagefolder(root / "shop-c", to_uint8(np.concatenate([f.x_train, f.x_test])),
                           np.concatenate([f.y_train, f.y_test]), ITEMS, layout="nested",
                           ext="JPG", mode="RGB", sizes=[(28, 28), (40, 32), (20, 20)])
    # client 3: like client 0, but one image is truncated
    c3 = write_imagefolder(root / "clinic-d", to_uint8(m.x_train[:100]), m.y_train[:100] - 10,
                           WORDS, layout="flat")
    bad = sorted((c3 / WORDS[7]).iterdir())[0]
    truncate_file(bad)
    return {"pool": pool, "clients": [c0, c1, c2, c3], "bad": bad}


@pytest.mark.slow
def test_own_data_simulation_learns_and_refuses_bad_data(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("METAMOE_FLWR_HOME", str(tmp_path / "flwr-home"))
    fed = make_federation(tmp_path / "data")
    clients = ",".join(str(c) for c in fed["clients"])
    overrides = f"benchmark.client_data=[{clients}] benchmark.pool_data={fed['pool']}"
    run_dir = launch(benchmark="tiny_local", overrides=overrides, cache_dir=cache_dir,
                     output_dir=str(tmp_path / "results"), run_id="local-e2e", timeout=900)
    m = json.loads((run_dir / "metrics.json").read_text())
    names = ["client-0", "client-1", "client-2"]
    assert set(m["accuracy"]["per_domain"]) == {*names, "client-3"}
    assert np.isnan(m["accuracy"]["per_domain"]["client-3"])  # took no part

    # The bad client is reported missing with the kind of problem, not its file.
    gone = json.dumps(m["missing"]) + json.dumps(m["rejected"])
    assert "client-3" in gone, gone
    assert "unreadable or truncated image" in gone
    assert fed["bad"].name not in gone and "clinic-d" not in gone

    # Training visibly works on every client's own classes (chance is 10 %): M0 with the
    # client's linear-probe head is far above chance (a broken head or label offset fails),
    # each expert beats it on its own test split on average (a broken LoRA step fails;
    # measured +9 points), and the unified MoE is far above chance on every client. (It does
    # not beat M0 here: at this size its router sends most uci tokens to the fashion expert,
    # as on the embedded 3-domain tiny_learn; docs/results.md "Clients on their own data".)
    zs = m["references"]["zero_shot"]["per_domain"]
    own = {c: m["references"]["experts"][c]["per_domain"][c] for c in names}
    assert min(zs[c] for c in names) >= 0.3, zs
    assert np.mean([own[c] - zs[c] for c in names]) >= 0.04, (own, zs)
    assert min(m["accuracy"]["per_domain"][c] for c in names) >= 0.35, m["accuracy"]

    # No client's class names or file names reach anything the server wrote. (The folders
    # themselves are in the run config in simulation, which names them; a deployed node's
    # folder stays on it: tests/test_deployment.py.)
    text = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*")
                   if p.is_file() and p.suffix in (".json", ".md", ".log", ".txt"))
    text += json.dumps(load_moe(run_dir).cfg.__dict__, default=str)
    for secret in [*WORDS, *ITEMS, *GLYPHS, ".JPG", fed["bad"].name]:
        assert secret not in text, secret

    # The emitted MoE, with a client's own head rows made from M0 (as its node makes them),
    # gives exactly the accuracy that client reported.
    cfg = resolve_config({"benchmark": "tiny_local", "overrides": overrides,
                          "cache-dir": cache_dir})
    bench = load_benchmark(cfg)
    seed, _, _ = get_seed_model(cfg, bench)
    from metamoe.clients.node import _local_node

    node: NodeData = _local_node(cfg, 0, bench, {})
    moe = localize(node, load_moe(run_dir), seed)
    acc = accuracy(moe, torch.from_numpy(node.domain.x_test), torch.from_numpy(node.domain.y_test),
                   node.domain.classes)
    assert np.isclose(acc, m["accuracy"]["per_domain"]["client-0"], atol=1e-9)
