"""What the iterative federated baselines share (FedAvg, FedAvg-MoE, FedAlign-MoE, DDOME).

All start from the server's seed model M0 (frozen), train FFN-LoRA with ``expert.rank`` /
``expert.alpha`` (the same family as MetaMoE's experts) through the shared loop
``metamoe.training.train``, and report each client's ``acc_unified`` on its own test split.
Client handlers: ``metamoe/clients/fl_handlers.py``. Knobs: the ``fl`` config section.

Fair budget (``conf/method/*.yaml``): ``fl.rounds`` R x ``fl.epochs`` E local epochs on Dp,
R=4 x E=2 = 8 passes over Dp per client, as MetaMoE's one expert training (expert.epochs=8 over
Dp ∪ 500 proxies); same optimizer (Adam, lr 3e-3). The iterative methods use no public data.

Upload bytes per client are counted by ``Federation.exchange``; for Flower's strategies (FedAvg
or the robust rule of ``fl.aggregation``) the reply bytes are counted in
:meth:`fedavg.Counting.aggregate_train`.

One module per method here: ``fedavg.py``,
``fedalign.py`` (FedAvg-MoE and FedAlign-MoE), ``ddome.py``; ``robust.py`` holds the robust
aggregation rules (``fl.aggregation``) that FedAvg-MoE and DDOME apply to their states.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from metamoe.config import ConfigError
from metamoe.models.io import seed_payload, shipped_state
from metamoe.models.moe import MoEMixin
from metamoe.protocol import (
    CONFIG,
    EVALUATE,
    FL_SEED,
    MOE_SPEC,
    UploadError,
    check_metrics,
    encode_settings,
    get_record,
    torch_state_to_record,
)
from metamoe.strategies.base import Federation, Strategy


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if len(arrays) == 0 or w.sum() <= 0:
        raise ValueError("weighted_mean needs at least one array with positive weight")
    w = w / w.sum()
    total = sum(wi * np.asarray(a, np.float64) for wi, a in zip(w, arrays, strict=True))
    return total.astype(np.float32)


def fedavg_states(states: Sequence[dict[str, np.ndarray]], n: Sequence[float]
                  ) -> dict[str, np.ndarray]:
    """Element-wise, n-weighted average of same-keyed states (FedAvg)."""
    return {k: weighted_mean([s[k] for s in states], n) for k in states[0]}


class FLStrategy(Strategy):
    """Shared by the iterative baselines: config checks, sending M0, evaluating a MoE."""

    def __init__(self, cfg, seed_model, bench, pool_features):
        super().__init__(cfg, seed_model, bench, pool_features)
        f = cfg.fl
        if f.rounds < 1 or f.epochs <= 0 or f.lr <= 0 or f.batch_size <= 0:
            raise ConfigError(f"fl.rounds={f.rounds} must be >= 1 and fl.epochs={f.epochs}, "
                              f"fl.lr={f.lr}, fl.batch_size={f.batch_size} positive")
        if f.top_k < 1 or f.ddome_top_k < 1 or f.ddome_gate_hidden < 1:
            raise ConfigError("fl.top_k, fl.ddome_top_k and fl.ddome_gate_hidden must be >= 1")

    def start(self, fed: Federation, node_ids: list[int]) -> None:
        """Register the clients (query.identify) and send M0 once (query.fl_seed)."""
        fed.identify(node_ids)
        seed_rec, seed_cfg = seed_payload(self.seed_model)

        def ack(nid, content):
            info = get_record(content, "info", ConfigRecord, fed.client_name(nid))
            if str(info.get("name", "")) != fed.client_name(nid):
                raise UploadError(f"client {fed.client_name(nid)}: seed ack claims to be "
                                  f"{info.get('name')!r}")
            return True

        with fed.phase("seed-send"):
            got = fed.exchange("seed-send", FL_SEED,
                               {nid: RecordDict({"seed": seed_rec, "seed-config": seed_cfg})
                                for nid in fed.clients}, ack)
        fed.drop_missing(got)

    def model_extra(self) -> dict:
        return {"class_names": list(self.bench.class_names),
                "domains": {d.name: list(map(int, d.classes)) for d in self.bench.domains}}

    def evaluate_moe(self, fed: Federation, moe: MoEMixin) -> dict[str, dict]:
        """The common ``evaluate`` handler (routed MoE; acc_unified, acc_zero_shot, ...)."""
        state = torch_state_to_record(shipped_state(moe))
        conf = encode_settings(MOE_SPEC, {"model": moe.cfg.to_dict(),
                                          "moe": moe.moe_cfg.to_dict(), **self.model_extra()})

        def val(nid, content):
            name = fed.client_name(nid)
            return check_metrics(get_record(content, "metrics", MetricRecord, name),
                                 ["acc_unified", "acc_zero_shot"], name)

        with fed.phase("evaluate"):
            got = fed.evaluate("evaluate", EVALUATE,
                               {nid: RecordDict({"moe": state, CONFIG: conf})
                                for nid in fed.clients}, val)
        return {fed.client_name(n): m for n, m in got.items()}


def n_examples(content: RecordDict, name: str, weighting: str = "samples"
               ) -> tuple[dict, float]:
    """(the reply's metrics, this client's weight in the averages over clients): its
    ``num-examples`` (``fl.weighting=samples``) or 1 (``uniform``)."""
    m = check_metrics(get_record(content, "metrics", MetricRecord, name), ["num-examples"], name)
    n = int(m["num-examples"])
    if n <= 0:
        raise UploadError(f"client {name}: num-examples={n} must be positive")
    return m, (float(n) if weighting == "samples" else 1.0)
