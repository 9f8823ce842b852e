"""Robust aggregation rules for the iterative baselines that aggregate on the server themselves.

``fl.aggregation`` picks how the server combines the clients' states each round:

* ``mean`` — the n-weighted element-wise average (FedAvg; :func:`fl_common.fedavg_states`);
* ``median`` — coordinate-wise median, unweighted (as Flower's ``FedMedian``);
* ``trimmed`` — coordinate-wise trimmed mean, floor(``fl.trim_beta`` K) values cut from each
  end, unweighted (as Flower's ``FedTrimmedAvg``); with K = 3 and β = 0.2 nothing is cut;
* ``krum`` — the single client state with the smallest sum of squared distances to its
  K − f − 2 nearest others (at least 1), all keys flattened together, f = ``fl.krum_malicious``
  (Blanchard et al. 2017, as Flower's ``Krum``).

Dense ``fedavg`` runs Flower's own strategy classes instead (``strategies/fedavg.py``);
``fedavg_moe`` and ``ddome`` call :func:`aggregate_states` over their own state dicts, so all
three apply the same rule. The robust rules come from Flower's numpy helpers in
``flwr.server.strategy.aggregate`` (lists of arrays in, lists of arrays out); this module only
maps the project's ``{name: array}`` states onto them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from metamoe.strategies.fl_common import fedavg_states

RULES = ("mean", "median", "trimmed", "krum")
State = dict[str, np.ndarray]


def aggregate_states(states: Sequence[State], n: Sequence[float], rule: str, trim_beta: float,
                     krum_malicious: int) -> State:
    """Combine same-keyed client states by ``rule`` (see the module docstring). ``n`` (the
    clients' example counts) weights only ``mean``; the robust rules are unweighted, as in
    Flower. Returns new float32 arrays (Krum: a copy of the chosen client's state)."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; one of {', '.join(RULES)}")
    if len(states) == 0 or len(states) != len(n):
        raise ValueError(f"{len(states)} states and {len(n)} weights: need as many, at least one")
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"state {i} has keys {sorted(s)}, state 0 {sorted(keys)}")
    if rule == "mean":
        return fedavg_states(states, n)
    # Flower's helpers take [(arrays in key order, num_examples)] and ignore the counts here.
    results = [([np.asarray(s[k]) for k in keys], int(w)) for s, w in zip(states, n, strict=True)]
    if rule == "median":
        out = aggregate_median(results)
    elif rule == "trimmed":
        out = aggregate_trimmed_avg(results, float(trim_beta))
    else:
        out = aggregate_krum(results, int(krum_malicious), to_keep=0)
    return {k: np.array(a, dtype=np.float32) for k, a in zip(keys, out, strict=True)}


def aggregator(fl) -> Callable[[Sequence[State], Sequence[float]], State]:
    """:func:`aggregate_states` bound to the ``fl`` config section's rule and knobs."""
    return partial(aggregate_states, rule=str(fl.aggregation), trim_beta=float(fl.trim_beta),
                   krum_malicious=int(fl.krum_malicious))
