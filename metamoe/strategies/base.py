"""Server-side federation runtime shared by every strategy.

:class:`Federation` wraps Flower's ``Grid``: it waits for nodes (with a deadline), sends one
phase's messages with ``grid.send_and_receive``, and for every reply either accepts it (after
the phase's validator) or rejects and logs it with the client's id — an error reply, a
malformed or non-finite or oversized upload never crashes the server. Missing clients are
recorded per phase; below ``federation.min_clients`` valid replies the run stops with a clear
:class:`PhaseError`. It also accounts upload bytes per client and wall time per phase.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from omegaconf import DictConfig

from metamoe.protocol import IDENTIFY, UploadError, content_digest, get_record, record_nbytes

log = logging.getLogger("metamoe")
T = TypeVar("T")


class PhaseError(RuntimeError):
    """Too few clients answered a phase validly for the run to go on."""


@dataclass
class ClientInfo:
    node_id: int
    name: str
    domain: str
    partition_id: int
    n_private: int = 0


class Checkpoint:
    """Phase outputs under ``<run_dir>/checkpoints/``: ``<phase>.npz`` + ``<phase>.json``.

    Re-running with the same run id resumes after the last finished phase; a run directory
    written under a different resolved config is refused rather than mixed.
    """

    def __init__(self, directory: Path, config_hash: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text()).get("config_hash")
            if old != config_hash:
                raise RuntimeError(f"{self.dir} holds checkpoints of a run with another config "
                                   f"(hash {old} != {config_hash}); use another run-id")
        else:
            manifest.write_text(json.dumps({"config_hash": config_hash}))

    def save(self, phase: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        tmp = self.dir / f".{phase}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(self.dir / f"{phase}.npz")
        (self.dir / f".{phase}.json").write_text(json.dumps(meta))
        (self.dir / f".{phase}.json").replace(self.dir / f"{phase}.json")

    def load(self, phase: str) -> tuple[dict[str, np.ndarray], dict] | None:
        a, m = self.dir / f"{phase}.npz", self.dir / f"{phase}.json"
        if not (a.exists() and m.exists()):
            return None
        with np.load(a) as z:
            arrays = {k: z[k] for k in z.files}
        log.info("phase %s: resumed from checkpoint %s", phase, a)
        return arrays, json.loads(m.read_text())


def pack(nested: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{client: {key: array}} -> flat {"client|key": array} (for checkpoints)."""
    return {f"{c}|{k}": v for c, arrs in nested.items() for k, v in arrs.items()}


def unpack(flat: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in flat.items():
        c, k = key.split("|", 1)
        out.setdefault(c, {})[k] = v
    return out


@dataclass
class Federation:
    grid: Any
    cfg: DictConfig
    clients: dict[int, ClientInfo] = field(default_factory=dict)
    upload_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    download_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wall: dict[str, float] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    # run.eval_per_domain: per evaluation phase, {client: the client whose evaluation it shares}
    eval_shared: dict[str, dict[str, str]] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    resumed: list[str] = field(default_factory=list)

    def client_name(self, node_id: int) -> str:
        info = self.clients.get(node_id)
        return info.name if info else f"node-{node_id}"

    # --- nodes ------------------------------------------------------------------------
    def wait_for_nodes(self, n: int) -> list[int]:
        """Wait for ``n`` nodes; past the deadline go on with what is there if that is at
        least ``federation.min_clients``, else stop with a clear error."""
        deadline = time.monotonic() + float(self.cfg.federation.wait_for_nodes_s)
        need = int(self.cfg.federation.min_clients)
        last = -1
        while True:
            ids = sorted(self.grid.get_node_ids())
            if len(ids) >= n:
                log.info("%d nodes connected", len(ids))
                return ids[:n] if len(ids) > n else ids
            if time.monotonic() > deadline:
                if len(ids) >= need:
                    log.warning("only %d of %d nodes connected; going on with them", len(ids), n)
                    return ids
                raise PhaseError(f"only {len(ids)} of {n} nodes connected within "
                                 f"{self.cfg.federation.wait_for_nodes_s:.0f}s "
                                 f"(federation.min_clients={need}); check num-supernodes / "
                                 "the SuperNodes")
            if len(ids) != last:
                log.info("waiting for nodes: %d of %d connected", len(ids), n)
                last = len(ids)
            time.sleep(1.0)

    def identify(self, node_ids: list[int]) -> None:
        """Ask every node who it is (name, domain, partition): registers ``self.clients``."""
        def validate(nid: int, content: RecordDict) -> ClientInfo:
            info = get_record(content, "info", ConfigRecord, f"node-{nid}")
            for key in ("name", "domain", "partition-id", "n_private"):
                if key not in info:
                    raise UploadError(f"node-{nid}: identity is missing {key!r}")
            name = str(info["name"])
            if any(c.name == name for c in self.clients.values()):
                raise UploadError(f"node-{nid}: client name {name!r} is already taken by "
                                  "another node (two SuperNodes with the same partition-id?)")
            ci = ClientInfo(nid, name, str(info["domain"]), int(info["partition-id"]),
                            int(info["n_private"]))
            self.clients[nid] = ci
            return ci

        with self.phase("identify"):
            self.exchange("identify", IDENTIFY, {n: RecordDict() for n in node_ids},
                          validate)
        self.order_clients()

    def order_clients(self) -> None:
        """``self.clients`` in (partition-id, name) order. Replies arrive in whatever order the
        nodes finish, and every phase iterates the clients: an order-sensitive step (the
        k-means rows of grouping, cyclic transfer's member order) would otherwise change
        from run to run with the same seed."""
        self.clients = dict(sorted(self.clients.items(),
                                   key=lambda kv: (kv[1].partition_id, kv[1].name)))

    def drop_missing(self, answered) -> None:
        """Forget clients that gave no valid reply in a phase (they skip later phases)."""
        for nid in list(self.clients):
            if nid not in answered:
                del self.clients[nid]

    # --- phases -----------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log.info("── phase %s ──", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
            log.info("phase %s done in %.1fs", name, self.wall[name])

    def exchange(self, phase: str, message_type: str, payloads: dict[int, RecordDict],
                 validate: Callable[[int, RecordDict], T],
                 min_replies: int | None = None) -> dict[int, T]:
        """Send each node its payload; return {node_id: validate(node_id, content)} for the
        valid replies. Rejections and missing nodes are logged and recorded. ``min_replies``
        (default ``federation.min_clients``): fewer valid replies raise :class:`PhaseError`."""
        msgs = []
        for nid, content in payloads.items():
            self.download_bytes[self.client_name(nid)] += record_nbytes(content)
            msgs.append(Message(content, dst_node_id=nid, message_type=message_type,
                                group_id=phase))
        replies = self.grid.send_and_receive(
            msgs, timeout=float(self.cfg.federation.phase_timeout_s))
        return self.collect(phase, payloads, replies, validate, min_replies)

    def evaluate(self, phase: str, message_type: str, payloads: dict[int, RecordDict],
                 validate: Callable[[int, RecordDict], T]) -> dict[int, T]:
        """:meth:`exchange` for an evaluation phase. With ``run.eval_per_domain`` (a simulation
        shortcut for benchmarks whose clients of a domain share one evaluation split; refused
        for local data) the clients of a domain sent the same payload
        (:func:`~metamoe.protocol.content_digest`) are asked once: the first of them in payload
        order evaluates, and its validated reply stands for the others, whose bytes count as if
        each had evaluated (``metrics.json["eval_shared"]`` names who stood for whom). If it
        fails, the others are asked themselves. The accuracies are the ones each would report:
        the same model on the same split."""
        if not bool(self.cfg.run.eval_per_domain):
            return self.exchange(phase, message_type, payloads, validate)
        groups: dict[tuple[str, str], list[int]] = {}
        for nid, content in payloads.items():
            info = self.clients.get(nid)
            key = (info.domain if info else f"node-{nid}", content_digest(content))
            groups.setdefault(key, []).append(nid)
        reps = {ms[0]: ms[1:] for ms in groups.values()}
        before = {n: self.upload_bytes[self.client_name(n)] for n in reps}
        got = self.exchange(phase, message_type, {n: payloads[n] for n in reps}, validate,
                            min_replies=0)
        missing = list(self.missing.pop(phase, []))
        retry: dict[int, RecordDict] = {}
        for rep, others in reps.items():
            if rep not in got:
                retry.update({n: payloads[n] for n in others})
                continue
            up = self.upload_bytes[self.client_name(rep)] - before[rep]
            for n in others:
                got[n] = copy.copy(got[rep])
                self.download_bytes[self.client_name(n)] += record_nbytes(payloads[n])
                self.upload_bytes[self.client_name(n)] += up
                self.eval_shared.setdefault(phase, {})[self.client_name(n)] = \
                    self.client_name(rep)
        if retry:
            got.update(self.exchange(phase, message_type, retry, validate, min_replies=0))
            missing += self.missing.pop(phase, [])
        if missing:
            self.missing[phase] = missing
        if self.eval_shared.get(phase):
            log.info("phase %s: %d of %d clients evaluated; the others share their domain's "
                     "split and model (run.eval_per_domain)", phase,
                     len(payloads) - len(self.eval_shared[phase]), len(payloads))
        need = int(self.cfg.federation.min_clients)
        if len(got) < need:
            raise PhaseError(f"phase {phase}: only {len(got)} valid client replies, "
                             f"federation.min_clients={need}; missing/rejected: {missing}")
        return {nid: got[nid] for nid in payloads if nid in got}

    def collect(self, phase: str, expected: Iterable[int], replies: Iterable[Message],
                validate: Callable[[int, RecordDict], T],
                min_replies: int | None = None) -> dict[int, T]:
        """Screen one phase's replies from the nodes in ``expected``: error replies, strays,
        duplicates, oversized and invalid uploads are rejected and logged; the rest count
        towards upload bytes. Raises :class:`PhaseError` below ``federation.min_clients``.
        The result is in the order of ``expected`` (the payloads'), not of the replies'
        arrival, so that the same seed gives the same run."""
        expected = list(expected)
        limit = float(self.cfg.federation.max_upload_mb) * 2**20
        out: dict[int, T] = {}
        for rep in replies:
            nid = rep.metadata.src_node_id
            who = self.client_name(nid)
            if rep.has_error():
                self.reject(phase, who, f"client error: {rep.error.reason}")
                continue
            if nid not in expected or nid in out:
                self.reject(phase, who, "unexpected or duplicate reply")
                continue
            nbytes = record_nbytes(rep.content)
            if nbytes > limit:
                self.reject(phase, who, f"upload of {nbytes} bytes exceeds "
                                         f"federation.max_upload_mb={self.cfg.federation.max_upload_mb}")
                continue
            try:
                out[nid] = validate(nid, rep.content)
            except UploadError as e:
                self.reject(phase, who, str(e))
                continue
            except Exception as e:  # a validator must never take the server down
                self.reject(phase, who, f"invalid upload: {type(e).__name__}: {e}")
                continue
            self.upload_bytes[self.client_name(nid)] += nbytes
        gone = [self.client_name(n) for n in expected if n not in out]
        if gone:
            self.missing[phase] = gone
            log.warning("phase %s: no valid reply from %s", phase, ", ".join(gone))
        need = int(self.cfg.federation.min_clients if min_replies is None else min_replies)
        if len(out) < need:
            raise PhaseError(f"phase {phase}: only {len(out)} valid client replies, "
                             f"federation.min_clients={need}; missing/rejected: {gone}")
        return {nid: out[nid] for nid in expected if nid in out}

    def reject(self, phase: str, who: str, reason: str) -> None:
        """Log and record a rejected upload (``metrics.json["rejected"]``)."""
        log.warning("phase %s: REJECTED upload from %s: %s", phase, who, reason)
        self.rejected.append({"phase": phase, "client": who, "reason": reason})


@dataclass
class Outcome:
    """What a strategy hands back to the ServerApp for reporting."""

    evaluations: dict[str, dict[str, float]]  # client name -> its evaluate metrics
    model: Any = None  # the unified model (MoEViT) if the method emits one
    model_extra: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # method-specific results for metrics.json


class Strategy(ABC):
    """A method: drives its phases over a :class:`Federation` and returns an Outcome."""

    name: str = ""

    def __init__(self, cfg: DictConfig, seed_model: Any, bench: Any, pool_features: Any):
        self.cfg = cfg
        self.seed_model = seed_model
        self.bench = bench
        self.pool_features = pool_features

    @abstractmethod
    def run(self, fed: Federation, node_ids: list[int]) -> Outcome: ...


STRATEGIES: dict[str, type[Strategy]] = {}


def register(name: str):
    """Class decorator: make a strategy selectable as ``method=<name>``."""
    def deco(cls: type[Strategy]) -> type[Strategy]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} registered twice")
        STRATEGIES[name] = cls
        return cls
    return deco


def get_strategy(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(STRATEGIES)}") from None
