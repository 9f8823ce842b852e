"""The budget rule (``metamoe/budget.py``): every method's resolved config spends what
MetaMoE's spends, on both embedded benchmarks, and ``metamoe.compare`` refuses a comparison
that breaks it."""

import pytest

from metamoe.budget import EXEMPT, check_rows, departures
from metamoe.compare_plan import DEFAULT_ROWS
from metamoe.config import ConfigError, resolve_config
from metamoe.strategies import STRATEGIES
from metamoe.strategies.suites import parse_row


@pytest.mark.parametrize("benchmark", ["vision", "text"])
def test_every_method_keeps_the_budget_rule(benchmark):
    ref = resolve_config({"benchmark": benchmark, "method": "metamoe"})
    # every method (the two suites run these rows' configs) and the rows of a comparison,
    # ablations and a DP experiment included
    rows = {r: parse_row(r) for r in [*DEFAULT_ROWS, "metamoe[dp_eps8]"]}
    assert set(STRATEGIES) - {m for m, _ in rows.values()} == {"oneshot_suite", "metamoe_suite"}
    got = check_rows(benchmark, rows)  # raises on any departure
    for r, (method, _) in rows.items():
        if method not in EXEMPT:
            assert got[r]["private_passes"] == ref.expert.epochs, r
    fl = got["fedalign_moe"]
    assert fl["router"] == got["metamoe"]["router"] and fl["lambda_lr"] == got["metamoe"]["lambda_lr"]
    assert got["ddome[ddome_paper]"]["router"] == got["metamoe"]["router"]
    # the FL rows' client weighting is reported, one benchmark-wide choice (vision: uniform,
    # chosen on val; text: FedAvg's sample counts)
    weighting = {"vision": "uniform", "text": "samples"}[benchmark]
    assert {got[r]["weighting"] for r in ("fedavg", "fedavg_moe", "fedalign_moe",
                                          "ddome[ddome_paper]")} == {weighting}


def test_a_departure_is_named_and_refused():
    ref = resolve_config({"benchmark": "vision", "method": "metamoe"})
    fast = resolve_config({"benchmark": "vision", "method": "fedavg", "overrides": "fl.lr=0.01"})
    assert departures(fast, ref) == ["fedavg: experts ('adam', 0.01) != metamoe's ('adam', 0.003)"]
    more = resolve_config({"benchmark": "vision", "method": "ddome",
                           "overrides": "fl.rounds=8 fl.epochs=2"})
    assert any("private_passes 16 != metamoe's 8" in d for d in departures(more, ref))
    # an override for every row keeps the rule: the FL budget follows the expert's
    rows = {r: (r, "") for r in ("metamoe", "fedavg", "ddome")}
    both = check_rows("vision", rows, "expert.lr=0.01")
    assert both["fedavg"]["experts"] == both["metamoe"]["experts"] == ("adam", 0.01)
    with pytest.raises(ConfigError, match="budget rule.*fedavg: experts"):
        check_rows("vision", rows, "fl.lr=0.01")
    assert check_rows("vision", rows, "fl.lr=0.01", allow=True)["departure_allowed"] is True
    # more rounds than passes: a fraction of an epoch per round, the same 8 passes
    for rounds, epochs in ((8, 1), (16, 0.5), (3, 8 / 3)):
        cfg = resolve_config({"benchmark": "vision", "method": "fedavg",
                              "overrides": f"fl.rounds={rounds}"})
        assert cfg.fl.epochs == pytest.approx(epochs) and departures(cfg, ref) == []


def test_rounds_take_exactly_the_budgets_steps_however_many_there_are():
    """R rounds of expert.epochs / R passes train the batches of expert.epochs passes, not
    R x ceil(a round's share): text FedAvg, 600 texts in 19 batches of 32, 2 passes = 38 steps
    at 2, 4, 8 or 16 rounds (per-round rounding up gave 40 / 40 / 48); a budget with fewer steps
    than rounds is refused, naming both."""
    import torch
    from omegaconf import OmegaConf

    from metamoe.training import budget_steps, round_steps, train

    for rounds in (1, 2, 3, 4, 8, 16, 38):
        plans = [round_steps(2 / rounds, 19, r, rounds) for r in range(1, rounds + 1)]
        per_round = [sum(p) for p in plans]
        assert sum(per_round) == 38 == budget_steps(2 / rounds, rounds, 600, 32)
        assert max(per_round) - min(per_round) <= 1 and all(max(p) <= 19 for p in plans)
    assert round_steps(2, 19, 1, 4) == [19, 19]  # whole passes per round: as before
    assert round_steps(0.5, 8, 3, 16) == [4]  # vision uci: 990 images, 8 batches of 128
    with pytest.raises(ValueError, match="16 rounds of 0.125 passes over 4 batches give 8"):
        round_steps(2 / 16, 4, 1, 16)  # a DDOME text client: 120 texts, 4 batches
    with pytest.raises(ValueError, match="round 0 is not in 1..4"):
        round_steps(0.5, 8, 0, 4)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(1))
    calls = []

    def loss_fn(m, xb, yb):
        calls.append(len(xb))
        return (m.w ** 2).sum()

    cfg = OmegaConf.create({"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False,
                            "weight_decay": 0.0, "epochs": 2 / 16, "batch_size": 32,
                            "shuffle": True, "group_by_length": False})
    so_far = [train(model, torch.arange(600), torch.zeros(600, dtype=torch.long), cfg,
                    params=[model.w], loss_fn=loss_fn, seed=r, round_of=(r, 16))["steps_so_far"]
              for r in range(1, 17)]
    assert len(calls) == 38 and set(calls) <= {32, 600 % 32}  # full batches or the short one
    assert so_far[0] == 2 and so_far[-1] == 38 and so_far == sorted(so_far)


def test_fractional_epochs_train_a_fraction_of_the_batches():
    import torch
    from omegaconf import OmegaConf

    from metamoe.training import epoch_steps, train

    assert epoch_steps(2, 10) == [10, 10] and epoch_steps(0.5, 10) == [5]
    assert epoch_steps(8 / 3, 9) == [9, 9, 6] and epoch_steps(1e-3, 10) == [1]
    w = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.w = w
    calls = []

    def loss_fn(m, xb, yb):
        calls.append(len(xb))
        return (m.w ** 2).sum()

    cfg = OmegaConf.create({"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False,
                            "weight_decay": 0.0, "epochs": 0.5, "batch_size": 10,
                            "shuffle": True, "group_by_length": False})
    train(model, torch.arange(100), torch.zeros(100, dtype=torch.long), cfg, params=[w],
          loss_fn=loss_fn)
    assert calls == [10] * 5  # half of the 10 batches: half a pass over the data
