"""Resolution: schema defaults, then ``conf/`` YAML, then run_config overrides (the order is in
:mod:`metamoe.config`'s docstring); the result is validated and read-only."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metamoe.config.schema import RUN_CONFIG_KEYS, Config, ConfigError
from metamoe.config.validate import local_domains, validate


def conf_dir() -> Path:
    """``conf/`` next to the package (source tree / FAB) or inside it (wheel)."""
    here = Path(__file__).resolve().parents[1]  # metamoe/
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


# Whose recipe a method takes (``recipes:`` of a benchmark file): the suite and the upper bound
# that start from MetaMoE take MetaMoE's.
RECIPE_OF = {"metamoe_suite": "metamoe", "unrestricted_moe_same_start": "metamoe"}


def _recipes(bconf: DictConfig, bench: str) -> dict[str, DictConfig]:
    """Pop a benchmark file's ``recipes:`` ({method: sections}): each method's own settings
    on this benchmark, chosen on its validation split, merged over the method's file (so an
    experiment and the overrides still win). Unknown method names are refused."""
    recipes = bconf.pop("recipes", None) or {}
    known = {p.stem for p in (conf_dir() / "method").glob("*.yaml")}
    bad = sorted(set(recipes) - known)
    if bad:
        raise ConfigError(f"conf/benchmark/{bench}.yaml: recipes for unknown method(s) {bad}; "
                          f"known: {sorted(known)}")
    return dict(recipes)


def benchmark_recipes(bench: str) -> dict[str, dict]:
    """A benchmark file's ``recipes:`` ({method: {section: {key: value}}}), its ``extends``
    chain included, as plain containers."""
    return {m: OmegaConf.to_container(r) for m, r in _recipes(_yaml("benchmark", bench),
                                                              bench).items()}


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
    bconf = _yaml("benchmark", bench)
    recipes = _recipes(bconf, bench)
    cfg = _merge(cfg, bconf, f"conf/benchmark/{bench}.yaml")
    cfg = _merge(cfg, _yaml("method", method), f"conf/method/{method}.yaml")
    family = RECIPE_OF.get(method, method)
    if family in recipes:
        cfg = _merge(cfg, recipes[family], f"conf/benchmark/{bench}.yaml recipes.{family}")
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
        local_domains(cfg)
    try:
        OmegaConf.resolve(cfg)  # the budget rule's interpolations become plain values
    except Exception as e:  # noqa: BLE001 - OmegaConf wraps the resolver's error
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else e
        raise ConfigError(str(cause).splitlines()[0]) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(section: Any) -> str:
    """Stable short hash of a config (section) for cache keys."""
    data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) \
        else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
