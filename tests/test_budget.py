"""The budget rule (``metamoe/budget.py``): every method's resolved config spends what
MetaMoE's spends, on both embedded benchmarks, and ``metamoe.compare`` refuses a comparison
that breaks it."""

import pytest

from metamoe.budget import EXEMPT, budget, departures
from metamoe.compare import DEFAULT_ROWS, check_budgets, parse_row
from metamoe.config import ConfigError, resolve_config
from metamoe.strategies import STRATEGIES


@pytest.mark.parametrize("benchmark", ["vision", "text"])
def test_every_method_keeps_the_budget_rule(benchmark):
    ref = resolve_config({"benchmark": benchmark, "method": "metamoe"})
    assert set(STRATEGIES) <= {parse_row(r)[0] for r in DEFAULT_ROWS} | {
        "oneshot_suite", "metamoe_suite"}
    for method in STRATEGIES:
        cfg = resolve_config({"benchmark": benchmark, "method": method})
        assert departures(cfg, ref) == [], method
        b = budget(cfg)
        if method not in EXEMPT:
            assert b["private_passes"] == ref.expert.epochs
    # the rows of a comparison, ablations and DP experiments included
    got = check_budgets(benchmark, list(DEFAULT_ROWS) + ["metamoe[dp_eps8]"], "")
    fl = got["fedalign_moe"]
    assert fl["router"] == got["metamoe"]["router"] and fl["lambda_lr"] == got["metamoe"]["lambda_lr"]
    assert got["ddome[ddome_paper]"]["router"] == got["metamoe"]["router"]
    assert got["fedavg"]["weighting"] == "samples"


def test_a_departure_is_named_and_refused():
    ref = resolve_config({"benchmark": "vision", "method": "metamoe"})
    fast = resolve_config({"benchmark": "vision", "method": "fedavg", "overrides": "fl.lr=0.01"})
    assert departures(fast, ref) == ["fedavg: experts ('adam', 0.01) != metamoe's ('adam', 0.003)"]
    more = resolve_config({"benchmark": "vision", "method": "ddome",
                           "overrides": "fl.rounds=8 fl.epochs=2"})
    assert any("private_passes 16 != metamoe's 8" in d for d in departures(more, ref))
    # an override for every row keeps the rule: the FL budget follows the expert's
    both = check_budgets("vision", ["metamoe", "fedavg", "ddome"], "expert.lr=0.01")
    assert both["fedavg"]["experts"] == both["metamoe"]["experts"] == ("adam", 0.01)
    with pytest.raises(ConfigError, match="budget rule.*fedavg: experts"):
        check_budgets("vision", ["metamoe", "fedavg"], "fl.lr=0.01")
    with pytest.raises(ConfigError, match="fl.rounds=3 does not divide expert.epochs=8"):
        resolve_config({"benchmark": "vision", "method": "fedavg", "overrides": "fl.rounds=3"})
