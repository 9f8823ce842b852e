"""Checks on a resolved config: every choice key against :data:`CHOICES`, ranges, and the
combinations that cannot run; each error names the key. Runs before any training."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

from metamoe.config.schema import CHOICES, ConfigError, num_clients


def local_domains(cfg: DictConfig) -> None:
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
    if cfg.benchmark.kind == "local" and cfg.run.eval_per_domain:
        raise ConfigError("run.eval_per_domain lets one client of a domain evaluate for the "
                          "others on their shared split; with benchmark.kind=local each node "
                          "evaluates on its own data")
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


