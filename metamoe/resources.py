"""Ray resources of a simulation: the GPU share per ClientApp (``--gpus-per-client``), CPUs
per ClientApp (``--cpus-per-client``) and an existing Ray cluster (``--ray-address``).

:func:`simulation_resources` turns the flags into Flower's ``--federation-config`` string and
the Ray variables of the child processes; a share that could never be scheduled fails here,
naming the flag, before any Flower process starts. Used by ``metamoe/launch.py``.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import struct
from collections.abc import Sequence

from metamoe.config import ConfigError

GPU_FLAG = "--gpus-per-client"
CPU_FLAG = "--cpus-per-client"


def visible_gpus() -> int:
    """GPUs this process sees, as torch counts them (it honours ``CUDA_VISIBLE_DEVICES``).

    ``torch.cuda.device_count()`` asks NVML first and does not initialise CUDA then ("will NOT
    poison fork if NVML discovery succeeds", its docstring); the launcher starts its children
    with fork + exec only, so even its fallback (``cudaGetDeviceCount``) cannot break Ray's
    workers. A CPU build of torch (or no torch) counts 0."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def cluster_gpus(address: str) -> list[int]:
    """GPUs of each live node of the Ray cluster at ``address`` (``auto`` = the last
    ``ray start`` on this machine). Connects as a driver and disconnects: ``ray.shutdown()``
    after attaching never stops the cluster. ``ray.init`` installs a SIGTERM handler of its
    own; the launcher's (:func:`exit_on_sigterm`) is put back."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "://" not in address:  # GCS host:port: Ray would retry ~1 min
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            raise ConfigError(f"--ray-address {address!r}: nothing answers there ({e}); start "
                              "the cluster with `ray start --head` first") from None
    import warnings

    import ray

    on_term = signal.getsignal(signal.SIGTERM)
    env_address = os.environ.pop("RAY_ADDRESS", None)  # it would override address="auto"
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # RAY_ACCEL_ENV_VAR_OVERRIDE...
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except Exception as e:  # ConnectionError, ValueError (bad address), ...
            raise ConfigError(f"--ray-address {address!r}: cannot attach to that Ray cluster "
                              f"({type(e).__name__}: {e})") from None
        try:
            return [int(n["Resources"].get("GPU", 0)) for n in ray.nodes()
                    if n.get("Alive") and n.get("Resources")]
        finally:
            ray.shutdown()
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address


def _f32(x: float) -> float:
    """``x`` as Flower carries it (``client_resources_num_gpus`` is a protobuf float32)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _packed_share(per_gpu: int) -> float:
    """The largest share (2 decimals, >= 0.01) with which ``per_gpu`` ClientApps fit on one GPU,
    as Flower sizes its actor pool: ``int(gpus / float32(share))`` (so 0.2 -> 0.19: float32(0.2)
    is 0.2000000030 and 1 / it rounds down to 4)."""
    share = max(1, math.floor(100 / per_gpu)) / 100
    while share > 0.01 and int(1 / _f32(share)) < min(per_gpu, 100):
        share = round(share - 0.01, 2)
    return share


def gpu_share(spec: str | float, k: int, node_gpus: Sequence[int],
              where: str = "visible") -> float:
    """``--gpus-per-client`` -> ``client-resources-num-gpus`` for ``k`` ClientApps on Ray nodes
    with ``node_gpus`` GPUs each (here: one node, :func:`visible_gpus`).

    ``auto``: 0 without a GPU; otherwise ``p = ceil(k / total GPUs)`` ClientApps per GPU and the
    share :func:`_packed_share` ``(p)`` ~ ``1/p`` floored to 2 decimals (1.0 when there are at
    least as many GPUs as clients, 0.25 for 4 clients on 1 GPU, 0.33 for 3, 0.5 for 8 on 4
    GPUs, at least 0.01), so that k x share <= GPUs and all k ClientApps are resident at once.
    It packs per GPU, not ``total / k``, because Ray takes a fractional share from one GPU
    (0.66 of 4 GPUs fits 4 ClientApps, not 6). Shares are soft: nothing caps a ClientApp's VRAM.

    A number G: 0 (the ClientApps see no GPU), a share 0.0001 <= G <= 1, or a whole number of
    GPUs per ClientApp up to the GPUs of one node. G > 0 without any GPU, or more than a node
    has, can never be scheduled (Ray would say "ActorPool is empty"): :class:`ConfigError`
    naming the flag."""
    total, largest = sum(node_gpus), max(node_gpus, default=0)
    if str(spec).strip().lower() == "auto":
        return 0.0 if total == 0 else _packed_share(math.ceil(k / total))
    try:
        g = float(spec)
    except (TypeError, ValueError):
        raise ConfigError(f"{GPU_FLAG} must be 'auto' or a number of GPUs per ClientApp "
                          f"(e.g. 0.25), got {spec!r}") from None
    if not math.isfinite(g) or g < 0:
        raise ConfigError(f"{GPU_FLAG} {spec}: must be 'auto', 0 or a positive GPU share")
    if g == 0:
        return 0.0
    if total == 0:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"{GPU_FLAG} {spec} asks for a GPU per ClientApp but no GPU is {where} "
            f"(torch.cuda.device_count() is 0"
            f"{'' if cvd is None else f', CUDA_VISIBLE_DEVICES={cvd!r}'}); Ray could start no "
            f"ClientApp. Use {GPU_FLAG} 0 (or auto) to run them on the CPU.")
    if g < 1e-4:
        raise ConfigError(f"{GPU_FLAG} {spec}: Ray's resolution is 0.0001 GPU")
    if g > largest:
        raise ConfigError(f"{GPU_FLAG} {spec}: more GPUs per ClientApp than one node has "
                          f"({largest} {where}); no ClientApp could ever be scheduled")
    if g > 1 and g != int(g):
        raise ConfigError(f"{GPU_FLAG} {spec}: above 1 it must be a whole number of GPUs (Ray "
                          "does not split one ClientApp's share across GPUs)")
    return g


def federation_config(k: int, gpus_per_client: float = 0.0, cpus_per_client: int = 1) -> str:
    """The ``--federation-config`` string for ``flwr run`` (pure)."""
    return (f"num-supernodes={k} client-resources-num-cpus={cpus_per_client} "
            f"client-resources-num-gpus={float(gpus_per_client)!r}")


def simulation_resources(k: int, gpus_per_client: str | float = "auto",
                         cpus_per_client: int = 1, ray_address: str | None = None
                         ) -> tuple[str, dict[str, str]]:
    """(``--federation-config`` string, Ray variables for the children's environment); raises
    :class:`ConfigError` (naming the flag) before anything is started.

    ``ray_address`` None reads ``RAY_ADDRESS``; empty = the simulation starts a Ray of its own
    (``RAY_ADDRESS=local``: without it Ray would attach to a ``ray start`` cluster of this
    machine unasked). Otherwise Flower's ``ray.init()`` attaches to that cluster through
    ``RAY_ADDRESS`` (Flower 1.41's federation config has no address key), and its GPUs
    are counted there (:func:`cluster_gpus`). With share 0 on a machine that has GPUs,
    ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1`` makes Ray hide them from the ClientApps (with the
    ``0`` set elsewhere to silence Ray's FutureWarning, a 0-GPU actor would see every GPU)."""
    try:
        cpus = int(cpus_per_client)
    except (TypeError, ValueError):
        raise ConfigError(f"{CPU_FLAG} must be a whole number >= 1, got {cpus_per_client!r}") \
            from None
    if cpus < 1 or cpus != float(cpus_per_client):
        raise ConfigError(f"{CPU_FLAG} must be a whole number >= 1, got {cpus_per_client!r}")
    if ray_address is None:
        ray_address = os.environ.get("RAY_ADDRESS", "")
    ray_address = ray_address.strip()
    attach = bool(ray_address) and ray_address != "local"
    if attach:
        node_gpus = cluster_gpus(ray_address)
        where = f"in the Ray cluster at {ray_address}"
    else:
        if cpus > (os.cpu_count() or 1):
            raise ConfigError(f"{CPU_FLAG} {cpus}: this machine has {os.cpu_count()} CPUs; "
                              "no ClientApp could ever be scheduled")
        node_gpus, where = [visible_gpus()], "visible"
    share = gpu_share(gpus_per_client, k, node_gpus, where)
    env = {"RAY_ADDRESS": ray_address if attach else "local"}
    if share == 0 and sum(node_gpus) > 0 and not attach:
        env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
    return federation_config(k, share, cpus), env
