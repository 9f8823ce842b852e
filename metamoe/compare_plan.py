"""Which runs a comparison (:mod:`metamoe.compare`) makes: its rows, the jobs (``flwr run``\s,
suites included) that produce them, the seeds each row runs on and each run's id (the hash of
its resolved config, by which finished runs are reused)."""

from __future__ import annotations

from dataclasses import dataclass, field

from metamoe.config import ConfigError, conf_dir, config_hash, resolve_config, to_container
from metamoe.strategies.suites import parse_row

ONESHOT = ("zero_shot", "separate_experts", "btm", "model_soup", "btx", "flexolmo")
# DDOME as its paper runs it: 5 clients per domain, anchors and normal clients
# (conf/experiment/ddome_paper.yaml); plain `ddome` (one client per domain) is all-anchor.
FL = ("fedavg", "fedavg_moe", "fedalign_moe", "ddome[ddome_paper]")
FL_METHODS = ("fedavg", "fedavg_moe", "fedalign_moe", "ddome")
ABLATIONS = ("no_rw_dpp", "random_proxies", "no_pa", "no_ca_router", "authors_code")
DEFAULT_ROWS = ("zero_shot", "separate_experts", "btm", "model_soup", "btx", "flexolmo",
                "metamoe", *[f"metamoe[{a}]" for a in ABLATIONS], *FL,
                "unrestricted_moe_same_start", "unrestricted_moe_scratch")


@dataclass
class Job:
    """One ``flwr run`` (per seed) producing one or more rows."""

    method: str
    experiment: str = ""
    rows: list[str] = field(default_factory=list)  # row names read from this run
    members: tuple = ()  # suite members (row, method, experiment)


def plan(rows: list[str], share: bool = True, benchmark: str = "",
         overrides: str = "") -> tuple[list[Job], dict[str, str]]:
    """Jobs that produce ``rows``; rows that cannot run -> {row: reason}. With ``benchmark``,
    a suite also takes rows beyond its defaults that can share its client phases
    (:func:`metamoe.strategies.suites.joins`, e.g. unify-only MetaMoE variants)."""
    from metamoe.strategies import STRATEGIES
    from metamoe.strategies.suites import SUITES, joins

    unavailable: dict[str, str] = {}
    jobs: list[Job] = []
    left = []
    for r in rows:
        method, exp = parse_row(r)
        if method not in STRATEGIES:
            unavailable[r] = f"strategy {method!r} is not registered (not implemented yet?)"
        elif not (conf_dir() / "method" / f"{method}.yaml").exists():
            unavailable[r] = f"conf/method/{method}.yaml is missing"
        elif exp and not (conf_dir() / "experiment" / f"{exp}.yaml").exists():
            unavailable[r] = f"conf/experiment/{exp}.yaml is missing"
        else:
            left.append(r)
    if share:
        for suite, spec in SUITES.items():
            names = [s[0] for s in spec]
            want = [r for r in left if r in names
                    or (benchmark and joins(suite, r, benchmark, overrides))]
            if len(want) >= 2:  # the default members in the suite's order, then the others
                members = [s for s in spec if s[0] in want] + \
                          [(r, *parse_row(r)) for r in want if r not in names]
                jobs.append(Job(suite, "", [m[0] for m in members], tuple(members)))
                left = [r for r in left if r not in want]
    for r in left:
        method, exp = parse_row(r)
        jobs.append(Job(method, exp, [r]))
    return jobs, unavailable


BEST_PRIVATE = "best_private"  # in --more-seeds: the strongest privacy-preserving baseline


def best_private(table: dict) -> str:
    """The privacy-preserving baseline with the highest mean average in a comparison's table:
    a private row that is neither MetaMoE nor one of its ablations (nor a reference row)."""
    cands = {r: t["average"] for r, t in table.items()
             if "average" in t and t.get("private", True) and "/" not in r
             and r != "zero_shot" and not r.startswith("metamoe")}
    if not cands:
        raise ConfigError("--more-seeds best_private: the comparison has no privacy-preserving "
                          "baseline row")
    return max(cands, key=lambda r: (cands[r], -list(cands).index(r)))


def seed_plan(seeds: int, rows: list[str], more: tuple[int, list[str]] | None = None
              ) -> list[tuple[int, list[str]]]:
    """[(seed, rows run on that seed)]: every row on seeds 0..seeds-1, and with ``more`` =
    (M, rows') the rows' on seeds seeds..M-1 (each must be one of ``rows``)."""
    out = [(s, list(rows)) for s in range(seeds)]
    if more:
        m, extra = more
        bad = [r for r in extra if r not in rows and r != BEST_PRIVATE]
        if bad or m <= seeds:
            raise ConfigError(f"--more-seeds {m}:{','.join(extra)}: needs more than --seeds "
                              f"({seeds}) seeds and rows among the compared ones "
                              f"(not compared: {bad})")
        out += [(s, [r for r in rows if r in extra]) for s in range(seeds, m)]
    return out


def run_id(job: Job, benchmark: str, seed: int, overrides: str) -> str:
    cfg = resolve_config({"benchmark": benchmark, "method": job.method,
                          "experiment": job.experiment, "overrides": overrides, "seed": seed})
    key: dict = {"config": {k: v for k, v in to_container(cfg).items() if k != "run"},
                 "seed": seed}
    if job.members:
        from metamoe.strategies.suites import member_config

        key["members"] = {r: to_container(member_config(cfg, m, e))
                          for r, m, e in job.members}
        for v in key["members"].values():
            v.pop("run", None)
    tag = job.method + (f"-{job.experiment}" if job.experiment else "")
    return f"{tag}-s{seed}-{config_hash(key)}"
