"""Run the Flower app with ``flwr run`` in simulation and check that it really completed.

    python -m metamoe.launch --benchmark vision --method metamoe [--experiment no_rw_dpp]
                             [--overrides "expert.epochs=3 select.m=200"] [--seed 0]
                             [--gpus-per-client auto|G] [--cpus-per-client 1]
                             [--ray-address ADDR]

What it takes care of (each is a Flower 1.41 pitfall, see README "Running"):

* the config is resolved and validated here first, so a bad key fails before anything starts;
* the simulation size comes from the benchmark (``num-supernodes`` = its client count, one CPU
  per ClientApp) via ``--federation-config`` — Flower's default of 2 nodes would hang;
* GPUs: ``--gpus-per-client`` sets ``client-resources-num-gpus`` (see :func:`metamoe.resources.gpu_share`;
  ``auto`` = 0 without a visible GPU, else enough of a share that all K ClientApps run at
  once), and a share that Ray could never schedule fails here, naming the flag;
* Ray: the simulation starts a fresh Ray of its own (``RAY_ADDRESS=local``, even when a
  ``ray start`` cluster runs on this machine) unless ``--ray-address`` (or an exported
  ``RAY_ADDRESS``) names a cluster to attach to; an attached cluster is never stopped;
* ``FLWR_HOME`` is private to the checkout, runtime dependency installation is off (it would
  ``uv sync`` CUDA torch), the local SuperLink gets a free port of its own;
* ``flwr run --stream`` exits 0 on failure, so the run's status is read with ``flwr ls`` and the
  command fails unless it is ``finished:completed`` and ``metrics.json`` exists;
* every process it started (SuperLink, SuperExec, simulation, Ray) is stopped at the end.

Prints the per-domain accuracy table, and the run directory on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from metamoe.config import ConfigError, num_clients, resolve_config
from metamoe.resources import CPU_FLAG, GPU_FLAG, simulation_resources
from metamoe.server.report import code_commit

ROOT = Path(__file__).resolve().parent.parent
MARK = "METAMOE_LAUNCH_ID"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(flwr_home: Path, port: int, launch_id: str, ray_env: dict[str, str] | None = None
         ) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env.update({
        "PATH": bindir + os.pathsep + env.get("PATH", ""),
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "RAY_ADDRESS": "local",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONUNBUFFERED": "1",
        # The ServerApp runs from Flower's unpacked copy of the app (no git there): tell it
        # which commit of this checkout it is, for metrics.json.
        "METAMOE_COMMIT": env.get("METAMOE_COMMIT") or code_commit(ROOT),
        **(ray_env or {}),
        MARK: launch_id,
    })
    return env


def _marked_pids(launch_id: str) -> list[int]:
    """Processes (other than us) that inherited this launch's marker variable."""
    needle = f"{MARK}={launch_id}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except (OSError, PermissionError):
            continue
    return pids


def stop_processes(launch_id: str, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process this launch started. Returns how many."""
    pids = _marked_pids(launch_id)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _marked_pids(launch_id):
            time.sleep(0.2)
        pids = _marked_pids(launch_id)
        if not pids:
            break
    return len(pids)


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a scheduler's time limit, ``kill``) into ``SystemExit``, so the ``finally``
    of :func:`launch` still stops the SuperLink and simulation processes it started."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _toml_value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def launch(benchmark: str = "vision", method: str = "metamoe", experiment: str = "",
           overrides: str = "", seed: int = 0, run_id: str = "", output_dir: str | None = None,
           cache_dir: str | None = None, timeout: float = 3600.0, app_dir: Path = ROOT,
           quiet: bool = False, gpus_per_client: str | float = "auto", cpus_per_client: int = 1,
           ray_address: str | None = None, members: str = "") -> Path:
    """Run one ``flwr run`` simulation; return the run directory (raises on failure).
    ``members``: a suite run's rows, comma-separated (``run.members``).

    ``gpus_per_client``, ``cpus_per_client``, ``ray_address``: see :func:`simulation_resources`
    (``ray_address`` None = ``$RAY_ADDRESS``, empty = a Ray of the simulation's own)."""
    run_config = {"benchmark": benchmark, "method": method, "experiment": experiment,
                  "overrides": overrides, "seed": seed, **({"members": members} if members else {})}
    cfg = resolve_config(run_config)  # fail fast on a bad config, naming the key
    k = num_clients(cfg)
    fed_cfg, ray_env = simulation_resources(k, gpus_per_client, cpus_per_client, ray_address)
    run_id = run_id or f"{cfg.benchmark.name}-{method}{'-' + experiment if experiment else ''}" \
                       f"-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(output_dir or ROOT / "results").resolve()
    cache = Path(cache_dir or os.environ.get("METAMOE_CACHE_DIR") or ROOT / ".cache").resolve()
    run_config.update({"run-id": run_id, "output-dir": str(out), "cache-dir": str(cache)})
    launch_id = uuid.uuid4().hex
    # One FLWR_HOME per launch: concurrent launches must not share a SuperLink state.db.
    flwr_home = (Path(os.environ.get("METAMOE_FLWR_HOME", ROOT / ".flwr-home"))
                 / f"launch-{launch_id[:12]}").resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    rc_file = flwr_home / "run-configs" / f"{run_id}.toml"
    rc_file.parent.mkdir(parents=True, exist_ok=True)
    rc_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
    env = _env(flwr_home, _free_port(), launch_id, ray_env)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    ray_where = "" if ray_env["RAY_ADDRESS"] == "local" else \
        f", Ray cluster {ray_env['RAY_ADDRESS']}"
    say(f"[launch] flwr run {app_dir} ({k} simulated clients, {fed_cfg.split(' ', 1)[1]}"
        f"{ray_where}) run-id {run_id}")
    log_tail = ""
    log_file = flwr_home / "run.log"
    try:
        res = subprocess.run(["flwr", "run", str(app_dir), "--format", "json",
                              "--federation-config", fed_cfg, "--run-config", str(rc_file)],
                             env=env, capture_output=True, text=True, timeout=300)
        try:
            flwr_run_id = json.loads(res.stdout)["run-id"]
        except (ValueError, KeyError):
            raise RuntimeError(f"flwr run failed (exit {res.returncode}):\n{res.stdout}\n"
                               f"{res.stderr}") from None
        with open(log_file, "w") as sink:  # quiet: the log is kept for the error message
            log_proc = subprocess.Popen(["flwr", "log", str(flwr_run_id)], env=env,
                                        stdout=None if not quiet else sink,
                                        stderr=subprocess.STDOUT)
            try:
                log_proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log_proc.kill()
                raise RuntimeError(f"run {flwr_run_id} did not finish within {timeout:.0f}s") \
                    from None
        status = _status(flwr_run_id, env)
        if quiet and status != "finished:completed":
            log_tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
    finally:
        left = stop_processes(launch_id)
        if left:
            print(f"[launch] WARNING: {left} processes could not be stopped", file=sys.stderr)
        if not os.environ.get("METAMOE_KEEP_FLWR_HOME"):
            shutil.rmtree(flwr_home, ignore_errors=True)
    run_dir = out / run_id
    if status != "finished:completed":
        where = f"last lines of its log:\n{log_tail}" if quiet else "see the log above"
        raise RuntimeError(f"run {flwr_run_id} ended as {status!r}, not finished:completed "
                           f"({where})")
    if not (run_dir / "metrics.json").exists():
        raise RuntimeError(f"run {flwr_run_id} completed but wrote no {run_dir}/metrics.json")
    return run_dir


def _status(flwr_run_id, env) -> str:
    for _ in range(30):
        res = subprocess.run(["flwr", "ls", "--run-id", str(flwr_run_id), "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=60)
        try:
            status = json.loads(res.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            status = f"unknown ({res.stdout.strip()[:200]} {res.stderr.strip()[:200]})"
        if status.startswith("finished"):
            return status
        time.sleep(1.0)
    return status


def add_resource_args(ap: argparse.ArgumentParser) -> None:
    """``--gpus-per-client``, ``--cpus-per-client``, ``--ray-address`` (launch and compare)."""
    ap.add_argument(GPU_FLAG, default="auto", metavar="G",
                    help="GPUs per ClientApp (Ray's client-resources-num-gpus): 'auto' (default: "
                         "0 without a visible GPU, else a share that fits every client on the "
                         "visible GPUs), 0 (CPU), a share <= 1 (0.25 = 4 per GPU) or a whole "
                         "number of GPUs")
    ap.add_argument(CPU_FLAG, type=int, default=1, metavar="C",
                    help="CPUs per ClientApp (client-resources-num-cpus, default 1)")
    ap.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="attach the simulation to this running Ray cluster (e.g. 'auto' for "
                         "the last 'ray start' here, or HEAD_IP:6379) instead of starting one; "
                         "default $RAY_ADDRESS, else a fresh Ray per run. Never stopped.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metamoe.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="vision")
    ap.add_argument("--method", default="metamoe")
    ap.add_argument("--experiment", default="")
    ap.add_argument("--overrides", default="", help="OmegaConf dotlist, e.g. 'select.m=200'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-id", default="")
    ap.add_argument("--output-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--timeout", type=float, default=3600.0)
    add_resource_args(ap)
    a = ap.parse_args(argv)
    exit_on_sigterm()
    try:
        run_dir = launch(a.benchmark, a.method, a.experiment, a.overrides, a.seed, a.run_id,
                         a.output_dir, a.cache_dir, a.timeout, gpus_per_client=a.gpus_per_client,
                         cpus_per_client=a.cpus_per_client, ray_address=a.ray_address)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    from metamoe.server.report import accuracy_table

    metrics = json.loads((run_dir / "metrics.json").read_text())
    print("\nPer-domain test accuracy (%):")
    print(accuracy_table(metrics))
    print(f"\nreport: {run_dir / 'report.md'}")
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
