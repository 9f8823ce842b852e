"""Strategies: MetaMoE and the baselines, selected by ``method=`` in the run config.

Each module registers its strategies with :func:`metamoe.strategies.base.register`; importing
this package imports them all.
"""

from __future__ import annotations

from metamoe.strategies import fl, metamoe, oneshot  # noqa: F401  (register strategies)
from metamoe.strategies.base import STRATEGIES, Federation, Outcome, PhaseError, Strategy, get_strategy, register

__all__ = ["STRATEGIES", "Federation", "Outcome", "PhaseError", "Strategy", "get_strategy",
           "register"]
