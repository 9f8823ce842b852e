"""Suites: one ``flwr run`` that emits several rows sharing their client phases.

Sharing (``oneshot_suite`` / ``metamoe_suite``): one ``flwr run`` can emit several rows that
share their client phases. Each member is built with exactly the config it has when run alone
(``method=<name>`` [+ experiment] + the suite run's overrides), and the suite refuses to run
unless every member's expert/sketch/model/seed config equals the suite's, so the shared experts
are exactly what each method would train alone (client seeds are config-derived; see
``stages.expert_stage``). Upload bytes per row count only what that method sends.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from metamoe.config import ConfigError, resolve_config, to_container, validate
from metamoe.strategies.base import STRATEGIES, Federation, Outcome, register
from metamoe.strategies.oneshot import MetaMoEMember, OneShot
from metamoe.strategies.oneshot_run import run_members

ONESHOT_SUITE = (("zero_shot", "zero_shot", ""), ("separate_experts", "separate_experts", ""),
                 ("btm", "btm", ""), ("model_soup", "model_soup", ""), ("btx", "btx", ""),
                 ("flexolmo", "flexolmo", ""), ("metamoe[no_pa]", "metamoe", "no_pa"))
METAMOE_SUITE = (("metamoe", "metamoe", ""), ("metamoe[no_ca_router]", "metamoe", "no_ca_router"),
                 ("metamoe[authors_code]", "metamoe", "authors_code"))
# Sections a member must share with the suite for the shared phases to be exactly its own.
SHARED_SECTIONS = ("benchmark", "model", "pretrain", "expert", "federation")


def _diff(a, b) -> dict:
    """Leaves of ``a`` that differ from ``b`` (nested dicts)."""
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            d = _diff(v, b[k])
            if d:
                out[k] = d
        elif b.get(k, object()) != v:
            out[k] = v
    return out


def member_config(suite_cfg: DictConfig, method: str, experiment: str = "") -> DictConfig:
    """The config ``method`` [+ ``experiment``] has when run alone with the suite's overrides:
    its own resolved config + whatever the suite run changed relative to the suite's files."""
    bench = suite_cfg.benchmark.name
    plain = resolve_config({"benchmark": bench, "method": suite_cfg.method,
                            "seed": int(suite_cfg.run.seed)})
    changed = _diff(to_container(suite_cfg), to_container(plain))
    changed.pop("run", None)
    cfg = resolve_config({"benchmark": bench, "method": method, "experiment": experiment,
                          "seed": int(suite_cfg.run.seed)})
    cfg = OmegaConf.merge(cfg, changed, {"run": to_container(suite_cfg.run)})
    OmegaConf.set_readonly(cfg, False)
    cfg.method = method
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


class Suite(OneShot):
    members: tuple = ()

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        members = make_members(self.cfg, self.members, self.seed_model, self.bench,
                               self.pool_features)
        return run_members(self, fed, node_ids, members)


def make_members(cfg: DictConfig, spec, seed_model, bench, pool_features) -> dict[str, OneShot]:
    members: dict[str, OneShot] = {}
    for rname, method, exp in spec:
        mcfg = member_config(cfg, method, exp)
        for sect in SHARED_SECTIONS:
            if to_container(mcfg[sect]) != to_container(cfg[sect]):
                raise ConfigError(
                    f"suite {cfg.method}: member {rname} has another {sect} config than the "
                    f"suite ({_diff(to_container(mcfg[sect]), to_container(cfg[sect]))}); its "
                    "shared phases would not be its own — run it alone")
        cls = MetaMoEMember if method == "metamoe" else STRATEGIES[method]
        m = cls(mcfg, seed_model, bench, pool_features)
        shared = ["sketch"] if m.needs_sketch else []
        if m.needs_experts and cfg.expert.use_proxies:
            shared.append("select")  # the experts are trained on the suite's selection
        for sect in shared:
            if to_container(mcfg[sect]) != to_container(cfg[sect]):
                raise ConfigError(f"suite {cfg.method}: member {rname} has another {sect} "
                                  "config than the suite; run it alone")
        members[rname] = m
    return members


@register("oneshot_suite")
class OneShotSuite(Suite):
    """Private-only experts trained once; rows zero_shot, separate_experts, btm, model_soup,
    btx, flexolmo and metamoe[no_pa] (each exactly as when run alone)."""

    name = "oneshot_suite"
    members = ONESHOT_SUITE


@register("metamoe_suite")
class MetaMoESuite(Suite):
    """MetaMoE's experts trained once; rows metamoe and its unify-only ablations
    (metamoe[no_ca_router], metamoe[authors_code])."""

    name = "metamoe_suite"
    members = METAMOE_SUITE


SUITES = {"oneshot_suite": ONESHOT_SUITE, "metamoe_suite": METAMOE_SUITE}
