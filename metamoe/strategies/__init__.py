"""Strategies: MetaMoE and the baselines, selected by ``method=`` in the run config."""

from __future__ import annotations

from metamoe.strategies.base import Federation, Outcome, PhaseError, Strategy
from metamoe.strategies.metamoe import MetaMoE

STRATEGIES: dict[str, type[Strategy]] = {"metamoe": MetaMoE}


def get_strategy(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "Federation", "MetaMoE", "Outcome", "PhaseError", "Strategy",
           "get_strategy"]
