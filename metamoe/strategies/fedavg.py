"""FedAvg (dense), the iterative baseline run by Flower's own strategy.

* ``fedavg`` — dense M0 + FFN-LoRA (rank ``expert.rank``) fine-tuned with Flower's own
  ``flwr.serverapp.strategy.FedAvg`` (weighted by ``num-examples``). Only the LoRA is trained
  (the fair comparison with LoRA experts; full fine-tuning is not offered, ``fl.train=lora``).
  The result is emitted as a 1-expert MoE (exactly M0 + the LoRA) so that the common
  ``evaluate`` handler and the artifact format apply.

Upload bytes of Flower's FedAvg replies are counted in :meth:`CountingFedAvg.aggregate_train`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from metamoe.models.lora import fresh_loras, lora_shapes
from metamoe.models.moe import MoEConfig, build_moe
from metamoe.protocol import UploadError, check_arrays, from_record, get_record, record_nbytes, to_record
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.fl_common import FLStrategy, n_examples
from metamoe.training import derive_seed


class CountingFedAvg(FedAvg):
    """Flower's FedAvg plus this project's upload rules: each reply is validated (exact LoRA
    shapes, finite values, size limit; bad ones rejected and logged on the Federation) and its
    bytes are added to ``fed.upload_bytes`` under the client's name."""

    def __init__(self, fed: Federation, shapes: dict[str, tuple[int, ...]], **kw):
        super().__init__(**kw)
        self.fed, self.shapes = fed, shapes
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
            m, _ = n_examples(content, who)
            if set(content) != {"arrays", "metrics"}:
                raise UploadError(f"client {who}: unexpected records "
                                  f"{sorted(set(content) - {'arrays', 'metrics'})}")
            self._eps[who] = m.get("dp_epsilon")
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


@register("fedavg")
class FedAvgDense(FLStrategy):
    name = "fedavg"

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        self.start(fed, node_ids)
        mc, ec, f = self.seed_model.cfg, self.cfg.expert, self.cfg.fl
        init = fresh_loras(self.seed_model, int(ec.rank), float(ec.alpha),
                           [derive_seed(self.cfg.run.seed, 0)])[0]
        strat = CountingFedAvg(fed, lora_shapes(mc.depth, mc.dim, mc.mlp_hidden, int(ec.rank)),
                               fraction_train=1.0, fraction_evaluate=0.0,
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
                       extra={"fl_rounds": strat.history})
