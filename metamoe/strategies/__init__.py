"""Strategies: MetaMoE and the baselines, selected by ``method=`` in the run config.

Each module registers its strategies with :func:`metamoe.strategies.base.register`; importing
this package imports them all. MetaMoE and the one-shot baselines are siblings over the
shared phase code of ``phases.py``; the iterative baselines share ``fl_common.py``.
"""

from __future__ import annotations

from metamoe.strategies import (  # noqa: F401  (register strategies)
    ddome,
    fedalign,
    fedavg,
    metamoe,
    oneshot,
    suites,
    unrestricted,
)
from metamoe.strategies.base import STRATEGIES, Federation, Outcome, PhaseError, Strategy, get_strategy, register

__all__ = ["STRATEGIES", "Federation", "Outcome", "PhaseError", "Strategy", "get_strategy",
           "register"]
