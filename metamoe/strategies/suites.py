"""Suites: one ``flwr run`` that emits several rows sharing their client phases.

Sharing (``oneshot_suite`` / ``metamoe_suite``): one ``flwr run`` can emit several rows that
share their client phases. Each member is built with exactly the config it has when run alone
(``method=<name>`` [+ experiment] + the suite run's overrides), and the suite refuses to run
unless every member's expert/sketch/model/seed config equals the suite's, so the shared experts
are exactly what each method would train alone (client seeds are config-derived; see
``stages.expert_stage``). Upload bytes per row count only what that method sends.
"""

from __future__ import annotations

from functools import lru_cache

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
# Sections a member must share with the suite for the shared phases to be exactly its own
# (and sketch / select when it uses them): a member differs only in its server-side stage.
SHARED_SECTIONS = ("benchmark", "model", "pretrain", "expert", "federation", "privacy", "screen")


def parse_row(row: str) -> tuple[str, str]:
    """'metamoe[no_pa]' -> ('metamoe', 'no_pa'); 'btx' -> ('btx', '')."""
    if row.endswith("]") and "[" in row:
        m, e = row[:-1].split("[", 1)
        return m, e
    return row, ""


def suite_spec(cfg: DictConfig, default: tuple) -> tuple:
    """The (row, method, experiment) members of a suite run: ``run.members`` (comma-separated
    rows, set by ``metamoe.compare``), else the suite's ``default``. A member's method must be
    one of the default members' methods (the suite knows how to share their phases)."""
    rows = [r.strip() for r in str(cfg.run.members or "").split(",") if r.strip()]
    if not rows:
        return default
    if len(set(rows)) != len(rows):
        raise ConfigError(f"suite {cfg.method}: run.members names a row twice: {rows}")
    allowed = sorted({m for _, m, _ in default})
    spec = []
    for r in rows:
        m, e = parse_row(r)
        if m not in allowed:
            raise ConfigError(f"suite {cfg.method}: member {r!r} has method {m!r}, not one of "
                              f"this suite's {allowed}")
        spec.append((r, m, e))
    return tuple(spec)


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
        members = make_members(self.cfg, suite_spec(self.cfg, self.members), self.seed_model,
                               self.bench, self.pool_features)
        return run_members(self, fed, node_ids, members)


def _member_class(method: str) -> type[OneShot]:
    return MetaMoEMember if method == "metamoe" else STRATEGIES[method]


def check_member(cfg: DictConfig, rname: str, method: str, exp: str) -> DictConfig:
    """``method`` [+ ``exp``]'s own config, after checking that the suite's shared phases are
    exactly its own (raises :class:`ConfigError` naming the section that differs)."""
    mcfg = member_config(cfg, method, exp)
    if mcfg.unify.group_expert != "merge":
        raise ConfigError(f"suite {cfg.method}: member {rname} trains its experts per group "
                          f"(unify.group_expert={mcfg.unify.group_expert}), not in the suite's expert phase — run "
                          "it alone")
    cls = _member_class(method)
    sections = list(SHARED_SECTIONS) + (["sketch"] if cls.needs_sketch else [])
    if cls.needs_experts and cfg.expert.use_proxies:
        sections.append("select")  # the experts are trained on the suite's selection
    for sect in sections:
        if to_container(mcfg[sect]) != to_container(cfg[sect]):
            raise ConfigError(
                f"suite {cfg.method}: member {rname} has another {sect} config than the "
                f"suite ({_diff(to_container(mcfg[sect]), to_container(cfg[sect]))}); its "
                "shared phases would not be its own — run it alone")
    return mcfg


def make_members(cfg: DictConfig, spec, seed_model, bench, pool_features) -> dict[str, OneShot]:
    return {rname: _member_class(method)(check_member(cfg, rname, method, exp), seed_model,
                                         bench, pool_features)
            for rname, method, exp in spec}


@lru_cache(maxsize=8)
def _suite_config(suite: str, benchmark: str, overrides: str) -> DictConfig:
    """The suite's resolved config (read-only), once per comparison plan, not once per row."""
    return resolve_config({"benchmark": benchmark, "method": suite, "overrides": overrides})


def joins(suite: str, row: str, benchmark: str, overrides: str = "") -> bool:
    """Whether ``row`` can be a member of ``suite`` on ``benchmark`` (under ``overrides``):
    one of its default rows, or a row of one of its methods whose experiment changes only
    what that method does on the server (e.g. ``metamoe[<unify-only experiment>]``)."""
    spec = SUITES[suite]
    if any(row == r for r, _, _ in spec):
        return True
    method, exp = parse_row(row)
    if method not in {m for _, m, _ in spec}:
        return False
    try:
        check_member(_suite_config(suite, benchmark, overrides), row, method, exp)
    except ConfigError:
        return False
    return True


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
