"""Fault tolerance through the real ServerApp and ClientApp in Flower's simulation engine.

Faults are injected by a Flower *mod* on the ClientApp (it sees every message of every
simulated node): a client raises (dropout: the server gets an error reply, or nothing), or its
reply is corrupted after the real handler produced it (each malformed-upload kind). Each
assertion below fails if the corresponding handling in ``Federation.exchange`` /
``MetaMoE.aggregate_*`` / ``Checkpoint`` is removed: the run would crash, keep a bad expert, or
redo client training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from metamoe.strategies import PhaseError
from metamoe.strategies.base import Checkpoint
from tests.flower_sim import simulate as simulate_apps
from tests.flower_sim import with_run_config

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _corrupt(reply: Message, kind: str) -> None:
    c = reply.content
    if kind == "wrong_phase":  # answer train.expert with a sketch-phase reply
        for key in list(c.keys()):
            del c[key]
        c["sketch"] = ArrayRecord({"weight": Array(np.zeros(4, np.float32))})
        c["info"] = ConfigRecord({"name": "x"})
        return
    if kind == "missing":
        del c["router"]
        return
    if kind == "oversized":
        c["padding"] = ArrayRecord({"x": Array(np.zeros(2**19, np.float32))})  # 2 MiB
        return
    expert = c["expert"]
    key = sorted(expert.keys())[0]
    a = expert[key].numpy()
    if kind == "shape":
        a = np.zeros((a.shape[0] + 1, *a.shape[1:]), np.float32)
    elif kind == "dtype":
        a = a.astype(np.float64)
    elif kind == "nan":
        a = a.copy()
        a.flat[0] = np.nan
    elif kind == "inf":
        a = a.copy()
        a.flat[-1] = np.inf
    expert[key] = Array(a)


def fault_mod(run_config: dict, faults: dict[tuple[str, int], str], calls_dir: Path):
    """A mod that logs every message a node handles and injects ``faults``."""

    def inject(msg: Message, ctx: Context, call_next) -> Message:
        pid = int(ctx.node_config["partition-id"])
        mtype = msg.metadata.message_type
        with open(calls_dir / f"calls-{os.getpid()}.log", "a") as f:
            f.write(f"{mtype} {pid}\n")
        kind = faults.get((mtype, pid))
        if kind == "drop":
            raise RuntimeError(f"injected dropout of partition {pid} in {mtype}")
        reply = call_next(msg, with_run_config(ctx, run_config))
        if kind:
            _corrupt(reply, kind)
        return reply

    return inject


def simulate(tmp: Path, run_id: str, nodes: int, faults: dict, overrides: str = "",
             cache: str = "") -> Path:
    calls = tmp / f"calls-{run_id}-{len(list(tmp.glob('calls-*')))}"
    calls.mkdir(parents=True)
    rc = {"benchmark": "tiny", "run-id": run_id, "output-dir": str(tmp / "results"),
          "cache-dir": cache or str(tmp / "cache"), "overrides": overrides}
    simulate_apps(rc, nodes, fault_mod(rc, faults, calls))
    return calls


def _calls(calls_dir: Path) -> list[str]:
    return [line for f in calls_dir.glob("*.log") for line in f.read_text().splitlines()]


def test_dropouts_and_every_malformed_upload_kind_are_survived(tmp_path, cache_dir):
    kinds = ["shape", "dtype", "nan", "inf", "oversized", "missing", "wrong_phase"]
    faults = {("query.sketch", 2): "drop", ("train.expert", 3): "drop",
              ("evaluate", 11): "drop"}
    faults.update({("train.expert", 4 + i): k for i, k in enumerate(kinds)})
    simulate(tmp_path, "faults", 12, faults,
             "benchmark.clients_per_domain=6 federation.max_upload_mb=1.0", cache_dir)
    m = json.loads((tmp_path / "results" / "faults" / "metrics.json").read_text())
    names = {c["partition_id"]: n for n, c in m["clients"].items()}
    assert m["missing"]["sketch"] == [names[2]]
    assert sorted(m["missing"]["expert"]) == sorted(names[p] for p in range(3, 11))
    assert m["missing"]["evaluate"] == [names[11]]
    reasons = {r["client"]: r["reason"] for r in m["rejected"] if r["phase"] == "expert"}
    expected = {4: "shape", 5: "dtype", 6: "NaN or Inf", 7: "NaN or Inf", 8: "exceeds",
                9: "no ArrayRecord 'router'", 10: "no ArrayRecord 'expert'"}
    for pid, word in expected.items():
        assert word in reasons[names[pid]], (pid, reasons[names[pid]])
    assert "injected dropout" in reasons[names[3]]
    # Only the valid experts were merged; the rest of the federation finished the run.
    assert sorted(m["references"]["experts"]) == sorted([names[0], names[1], names[11]])
    assert set(m["accuracy"]["per_domain"]) == {"mnist", "uci"}
    assert all(np.isfinite(v) for v in m["accuracy"]["per_domain"].values())
    assert "Missing or rejected clients" in \
        (tmp_path / "results" / "faults" / "report.md").read_text()


def test_below_minimum_stops_clearly_then_resume_skips_client_training(tmp_path, cache_dir):
    # Both clients fail in the evaluate phase: below federation.min_clients=2 -> stop.
    with pytest.raises(PhaseError, match="phase evaluate: only 0 valid client replies, "
                                         "federation.min_clients=2"):
        simulate(tmp_path, "resume", 2, {("evaluate", 0): "drop", ("evaluate", 1): "drop"},
                 cache=cache_dir)
    calls1 = sorted(tmp_path.glob("calls-resume-*"))[0]
    run_dir = tmp_path / "results" / "resume"
    assert not (run_dir / "metrics.json").exists()
    assert {p.stem for p in (run_dir / "checkpoints").glob("*.npz")} == \
        {"sketch", "select", "expert", "unify"}
    assert sum(c.startswith("train.expert") for c in _calls(calls1)) == 2

    # Same run id again, no faults: resumes after the unify phase, no client training redone.
    calls2 = simulate(tmp_path, "resume", 2, {}, cache=cache_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["resumed_phases"] == ["sketch", "select", "expert", "unify"]
    done = _calls(calls2)
    assert not any(c.startswith(("train.expert", "query.sketch")) for c in done), done
    assert sum(c.startswith("evaluate") for c in done) == 2
    assert set(m["accuracy"]["per_domain"]) == {"mnist", "uci"}


def test_checkpoints_of_another_config_are_refused(tmp_path):
    ck = Checkpoint(tmp_path / "ck", "hash-a")
    ck.save("sketch", {"a|w": np.ones(3, np.float32)}, {"dp": {}})
    arrays, meta = Checkpoint(tmp_path / "ck", "hash-a").load("sketch")
    assert np.array_equal(arrays["a|w"], np.ones(3)) and meta == {"dp": {}}
    assert Checkpoint(tmp_path / "ck", "hash-a").load("expert") is None
    with pytest.raises(RuntimeError, match="holds checkpoints of a run with another config"):
        Checkpoint(tmp_path / "ck", "hash-b")
