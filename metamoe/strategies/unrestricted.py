"""The NON-PRIVATE upper bound: a MoE the server trains on the union of the clients' private
training sets (it reads them directly). Its ``upload_bytes`` are the private sets' bytes (what
would have to be sent) + the evaluation replies; every row and metrics file carries
``"private": false``."""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import OmegaConf

from metamoe.config import to_container
from metamoe.data import client_partition
from metamoe.models.lora import fresh_loras
from metamoe.models.moe import build_moe
from metamoe.protocol import EVALUATE
from metamoe.strategies.base import Federation, Outcome, register
from metamoe.strategies.oneshot import OneShot
from metamoe.training import derive_seed, finetune

log = logging.getLogger("metamoe")


@register("unrestricted_moe")
class UnrestrictedMoE(OneShot):
    """NON-PRIVATE upper bound: the server reads the clients' private training data."""

    name = "unrestricted_moe"
    needs_experts = False
    private = False
    notes = "NOT PRIVATE: MoE trained by the server on the union of all private training sets"

    def run(self, fed: Federation, node_ids: list[int]) -> Outcome:
        fed.identify(node_ids)
        clients = sorted(fed.clients.values(), key=lambda c: c.partition_id)
        data_bytes: dict[str, int] = {}
        xs, ys = [], []
        # NON-PRIVATE: the private training sets are loaded here, on the server.
        for c in clients:
            _, dom = client_partition(self.cfg, self.bench, c.partition_id)
            xs.append(dom.x_train)
            ys.append(dom.y_train)
            data_bytes[c.name] = int(dom.x_train.nbytes + dom.y_train.nbytes)
        names = [c.name for c in clients]
        uc, ec = self.cfg.unify, self.cfg.expert
        # Fresh LoRA experts (A seeded, B = 0), each as client p's expert starts.
        loras = fresh_loras(self.seed_model, ec.rank, ec.alpha,
                            [derive_seed(self.cfg.run.seed, p) for p in range(len(names))])
        moe = build_moe(self.seed_model, self.unify_moe_config(names), loras, None)
        section = OmegaConf.create({**to_container(ec), "lambda_lr": uc.lambda_lr})
        with fed.phase("train_unrestricted"):
            hist = finetune(moe, np.concatenate(xs), np.concatenate(ys), section,
                            self.cfg.run.seed, True, True, desc="unrestricted")
        log.info("NON-PRIVATE unrestricted MoE trained on %d private samples, loss %.4f",
                 sum(len(x) for x in xs), hist["loss"])
        dom_classes = {d.name: list(map(int, d.classes)) for d in self.bench.domains}
        model_extra = {"class_names": list(self.bench.class_names), "domains": dom_classes,
                       "private": False}
        with fed.phase("evaluate"):
            evals = fed.exchange("evaluate", EVALUATE,
                                 self.configure_evaluate(fed, moe, model_extra),
                                 lambda nid, c: self.aggregate_evaluate(fed, nid, c))
        evals = {fed.client_name(n): v for n, v in evals.items()}
        for c in clients:  # counted as if the private data had been uploaded
            fed.upload_bytes[c.name] = fed.upload_bytes.get(c.name, 0) + data_bytes[c.name]
        row = self.row(evals, fed)
        row.update({"upload_bytes": {c.name: int(fed.upload_bytes.get(c.name, 0))
                                     for c in clients},
                    "private": False, "rounds": 1, "notes": self.notes,
                    "method": self.name})
        return Outcome(evaluations=evals, model=moe, model_extra=model_extra,
                       extra={"rows": {self.name: row}, "private": False,
                              "private_data_bytes": data_bytes,
                              "upload_accounting": {"note": "upload_bytes include each "
                                                    "client's private training set (NOT "
                                                    "PRIVATE) + identify/evaluation replies"}})
