"""The one budget rule of every comparison: what each method may spend, in one place.

On a benchmark, every method that trains on private data gets what MetaMoE gets (its resolved
config is the reference):

* **the same passes over each client's private train split**: ``expert.epochs`` for the
  one-shot methods (MetaMoE trains on Dp ∪ proxies, the private-only experts on Dp), ``fl.rounds
  × fl.epochs`` for the iterative ones;
* **the same optimiser and learning rate per parameter family**: experts (LoRA), routing
  parameters (MetaMoE's and FlexOlmo's router rows, BTX's router, the FL-MoE router, DDOME's
  gate) and λ;
* **the same batch size and batch sampler** on private data (``group_by_length``);
* **routed methods' server stages equal in epochs and batch size** (MetaMoE's union of
  proxies has at most K·m samples, BTX's random public sample K·m).

``fl.weighting`` (samples | uniform) is reported with every FL budget. The FL section encodes
the rule as interpolations of the expert and unify sections (``metamoe/config/schema.py``
``FLConf``), so a benchmark file sets a budget once; :func:`departures` finds any method whose
resolved config breaks it (``tests/test_budget.py`` checks every method on ``vision`` and
``text``; ``metamoe.compare`` refuses a comparison that breaks it). Exempt: ``zero_shot``
(trains nothing) and the ``unrestricted_moe_*`` rows (NOT PRIVATE upper bounds, not competitors).
"""

from __future__ import annotations

from omegaconf import DictConfig

from metamoe.config import ConfigError, resolve_config

ONESHOT = ("separate_experts", "btm", "model_soup", "btx", "flexolmo", "metamoe",
           "oneshot_suite", "metamoe_suite")
ROUTED = ("btx", "flexolmo", "metamoe", "metamoe_suite")  # a router trained on the server
FL = ("fedavg", "fedavg_moe", "fedalign_moe", "ddome")
EXEMPT = {"zero_shot": "trains nothing",
          "unrestricted_moe_same_start": "NOT PRIVATE upper bound (MetaMoE + pooled private data)",
          "unrestricted_moe_scratch": "NOT PRIVATE upper bound (trained on the pooled private data)"}


def budget(cfg: DictConfig) -> dict:
    """What ``cfg``'s method spends, in the rule's terms (keys absent where they do not apply;
    an exempt method: only why)."""
    m = str(cfg.method)
    if m in EXEMPT:
        return {"method": m, "exempt": EXEMPT[m]}
    e, u, f = cfg.expert, cfg.unify, cfg.fl
    if m in ONESHOT:
        out = {"private_passes": int(e.epochs), "experts": (str(e.optimizer), float(e.lr)),
               "private_batch": (int(e.batch_size), bool(e.group_by_length))}
        if m in ROUTED:
            out.update(router=(str(u.optimizer), float(u.lr)), lambda_lr=float(u.lambda_lr),
                       server_stage=(int(u.epochs), int(u.batch_size)))
    elif m in FL:
        passes = round(int(f.rounds) * float(f.epochs), 6)
        out = {"private_passes": int(passes) if passes == int(passes) else passes,
               "experts": (str(f.optimizer), float(f.lr)),
               "private_batch": (int(f.batch_size), bool(f.group_by_length)),
               "weighting": str(f.weighting)}
        if m in ("fedavg_moe", "fedalign_moe"):
            out.update(router=(str(f.optimizer), float(f.router_lr)),
                       lambda_lr=float(f.lambda_lr))
        elif m == "ddome":
            out["router"] = (str(f.optimizer), float(f.ddome_gate_lr))
    else:
        raise KeyError(f"method {m!r} has no budget entry in metamoe/budget.py")
    return {"method": m, **out}


def departures(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """How ``cfg``'s budget departs from ``reference``'s (MetaMoE's on the same benchmark):
    one line per differing item; empty when the rule holds or the method is exempt."""
    mine, ref = budget(cfg), budget(reference)
    if "exempt" in mine:
        return []
    return [f"{mine['method']}: {key} {mine[key]} != {ref['method']}'s {ref[key]}"
            for key in ("private_passes", "experts", "private_batch", "router", "lambda_lr",
                        "server_stage")
            if key in mine and key in ref and mine[key] != ref[key]]


def check_rows(benchmark: str, rows: dict[str, tuple[str, str]], overrides: str = "",
               allow: bool = False) -> dict[str, dict]:
    """The budget of every row ({row: (method, experiment)}) under ``overrides``; raises
    :class:`ConfigError` listing every departure from MetaMoE's budget, unless ``allow`` (then
    the result says ``"departure_allowed": true``)."""
    ref = resolve_config({"benchmark": benchmark, "method": "metamoe", "overrides": overrides})
    out: dict = {}
    bad: list[str] = []
    for row, (method, exp) in rows.items():
        cfg = resolve_config({"benchmark": benchmark, "method": method, "experiment": exp,
                              "overrides": overrides})
        out[row] = budget(cfg)
        bad += departures(cfg, ref)
    if bad and not allow:
        raise ConfigError("the budget rule (metamoe/budget.py) does not hold: " + "; ".join(bad)
                          + " (--allow-budget-departure runs it anyway, recorded)")
    if bad:
        out["departure_allowed"] = True
    return out
