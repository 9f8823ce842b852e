"""FedAvg (dense), the iterative baseline run by Flower's own strategy.

* ``fedavg`` — dense M0 + FFN-LoRA (rank ``expert.rank``) fine-tuned with Flower's own
  ``flwr.serverapp.strategy.FedAvg`` (weighted by ``num-examples``). Only the LoRA is trained
  (the fair comparison with LoRA experts; full fine-tuning is not offered, ``fl.train=lora``).
  The result is emitted as a 1-expert MoE (exactly M0 + the LoRA) so that the common
  ``evaluate`` handler and the artifact format apply.

``fl.aggregation`` swaps the Flower strategy the rounds run on (robust aggregation against a
poisoned upload): ``mean`` → ``FedAvg``, ``median`` → ``FedMedian``, ``trimmed`` →
``FedTrimmedAvg(beta=fl.trim_beta)``, ``krum`` → ``Krum(num_malicious_nodes=fl.krum_malicious)``.
Every choice keeps this project's reply screening and byte counting (:class:`Counting`, mixed
in front of the Flower class by :func:`counting_strategy`); the rule is recorded in the
Outcome's ``extra`` as ``fl_aggregation``. ``fedavg_moe`` and ``ddome`` apply the same rules
through ``strategies/robust.py``.

Upload bytes of Flower's replies are counted in :meth:`Counting.aggregate_train`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from metamoe.models.lora import fresh_loras, lora_shapes
from metamoe.models.moe import MoEConfig, build_moe
from metamoe.protocol import UploadError, check_arrays, from_record, get_record, record_nbytes, to_record
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.fl_common import FLStrategy, n_examples
from metamoe.training import derive_seed


class Counting:
    """Mixed in front of a Flower strategy (FedAvg or a subclass): this project's upload rules.
    Each reply is validated (exact LoRA shapes, finite values, size limit; bad ones rejected
    and logged on the Federation) and its bytes are added to ``fed.upload_bytes`` under the
    client's name; the Flower class then aggregates the valid replies by its own rule."""

    def __init__(self, fed: Federation, shapes: dict[str, tuple[int, ...]],
                 weighting: str = "samples", **kw):
        super().__init__(weighted_by_key=WEIGHT_KEY, **kw)
        self.fed, self.shapes, self.weighting = fed, shapes, weighting
        self.history: list[dict] = []

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        for m in msgs:
            self.fed.download_bytes[self.fed.client_name(m.metadata.dst_node_id)] += \
                record_nbytes(m.content)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        fed = self.fed
        replies = list(replies)

        def validate(nid: int, content: RecordDict) -> tuple[float, RecordDict]:
            who = fed.client_name(nid)
            check_arrays(from_record(get_record(content, "arrays", ArrayRecord, who)),
                         self.shapes, who, "LoRA")
            m, w = n_examples(content, who, self.weighting)
            if set(content) != {"arrays", "metrics"}:
                raise UploadError(f"client {who}: unexpected records "
                                  f"{sorted(set(content) - {'arrays', 'metrics'})}")
            self._eps[who] = m.get("dp_epsilon")
            content["metrics"][WEIGHT_KEY] = w  # the server's own weight (fl.weighting)
            return float(m.get("train_loss", float("nan"))), content

        # The same screening as every other phase (errors, strays, size, validation, bytes).
        self._eps: dict = {}
        ok = fed.collect(f"train-r{server_round}", fed.clients, replies, validate)
        accepted = {id(content) for _, content in ok.values()}
        valid = [rep for rep in replies if id(rep.content) in accepted]
        losses = {fed.client_name(nid): loss for nid, (loss, _) in ok.items()}
        rec = {"round": server_round, "train_loss": losses}
        eps = {fed.client_name(nid): self._eps.get(fed.client_name(nid)) for nid in ok}
        if any(v is not None for v in eps.values()):  # DP-SGD: ε of each client's rounds so far
            rec["dp_epsilon"] = {c: float(v) for c, v in eps.items() if v is not None}
        self.history.append(rec)
        return super().aggregate_train(server_round, valid)


class CountingFedAvg(Counting, FedAvg):
    """Flower's FedAvg (n-weighted mean) with the project's upload rules."""


class CountingFedMedian(Counting, FedMedian):
    """Flower's FedMedian (coordinate-wise median) with the project's upload rules."""


class CountingFedTrimmedAvg(Counting, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean) with the project's upload rules."""


class CountingKrum(Counting, Krum):
    """Flower's Krum (one client's update, the most central) with the project's upload rules."""


# The key Flower's strategies weight by: set by the server on each validated reply to the
# client's num-examples (fl.weighting=samples) or 1 (uniform).
WEIGHT_KEY = "aggregation-weight"

COUNTING = {"mean": CountingFedAvg, "median": CountingFedMedian,
            "trimmed": CountingFedTrimmedAvg, "krum": CountingKrum}


def counting_strategy(fed: Federation, shapes: dict[str, tuple[int, ...]], fl, **kw) -> FedAvg:
    """The Flower strategy of ``fl.aggregation`` (with its knob), with the upload rules."""
    rule = str(fl.aggregation)
    if rule not in COUNTING:
        raise ValueError(f"fl.aggregation={rule!r}: one of {', '.join(COUNTING)}")
    if rule == "trimmed":
        kw["beta"] = float(fl.trim_beta)
    elif rule == "krum":
        kw["num_malicious_nodes"] = int(fl.krum_malicious)
    return COUNTING[rule](fed, shapes, weighting=str(fl.weighting), **kw)


@register("fedavg")
class FedAvgDense(FLStrategy):
    name = "fedavg"

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self.start(fed, node_ids)
        mc, ec, f = self.seed_model.cfg, self.cfg.expert, self.cfg.fl
        init = fresh_loras(self.seed_model, int(ec.rank), float(ec.alpha),
                           [derive_seed(self.cfg.run.seed, 0)])[0]
        strat = counting_strategy(fed, lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, int(ec.rank)),
                                  f, fraction_train=1.0, fraction_evaluate=0.0,
                                  min_train_nodes=int(fed.cfg.federation.min_clients),
                                  min_available_nodes=len(fed.clients))
        with fed.phase("train"):
            result = strat.start(grid=fed.grid, initial_arrays=to_record(
                {k: v.numpy() for k, v in init.items()}), num_rounds=int(f.rounds),
                timeout=float(fed.cfg.federation.phase_timeout_s),
                train_config=ConfigRecord({"method": "fedavg"}))
        lora = {k: torch.from_numpy(v) for k, v in from_record(result.arrays).items()}
        moe = build_moe(self.seed_model, MoEConfig(num_experts=1, rank=int(ec.rank),
                                                   alpha=float(ec.alpha), top_k=1,
                                                   context="none", expert_names=["fedavg"]),
                        [lora], None)
        evals = self.evaluate_moe(fed, moe)
        return Outcome(evaluations=evals, model=moe, model_extra=self.model_extra(),
                       extra={"fl_rounds": strat.history,
                              "fl_aggregation": str(f.aggregation)})
