"""What travels between ServerApp and ClientApps: message types, record keys, checks.

Every array a client uploads is listed here with the function that produces it:

==================  ===============================  =========================================
message type        client uploads (record key)      produced by
==================  ===============================  =========================================
query.identify      ``info`` name/domain/sizes       clients.handlers.identify
query.sketch        ``sketch`` relevance sketch      clients.stages.sketch_stage (proxy.sketch)
                    ``info``  name/domain/sizes      clients.handlers.sketch
train.expert        ``expert`` FFN-LoRA A/B          clients.stages.expert_stage
                    ``router`` [L, d] mean vectors   models.lora.ffn_input_means (noisy clipped
                                                     mean when privacy.router_dp_sigma > 0:
                                                     clients.privacy)
                    ``metrics`` scalars (n_train,    clients.stages.expert_stage,
                    loss, coverage, router_dp_*)     clients.stages.coverage
                    (the same, once per round, with  (strategies.group_fl sends the group's
                    unify.group_expert=fedavg or     LoRA in ``init``: the FedAvg mean, or
                    cyclic; ``router`` and the train with cyclic the previous member's, and
                    accuracy in the last round only) ``final`` in ``group-round``)
evaluate            ``metrics`` accuracies, coverage clients.stages.evaluate_stage
query.fl_seed       ``info`` acknowledgement         clients.fl_handlers.fl_seed
train               ``arrays`` FFN-LoRA weights      clients.fl_handlers.fedavg_train
                    ``metrics`` |Dp|, loss or ε
train.fl_moe        ``moe`` router rows, λ, the      clients.fl_handlers.fl_moe_train
                    experts' LoRA
                    ``stats`` (FedAlign) mean        clients.fl_local.moe_local_stats (means
                    routing distribution and         over the whole local set)
                    per-expert mean outputs
                    ``metrics`` |Dp|, loss or ε
query.ddome_select  ``select`` K expert indices      clients.fl_handlers.ddome_select
                    from gate scores summed over Dp
                    ``metrics`` |Dp|
train.ddome         ``gate`` gate MLP                clients.fl_handlers.ddome_train
                    ``experts`` the K experts' LoRA
                    ``metrics`` |Dp|, loss
evaluate.ddome      ``metrics`` accuracies           clients.fl_handlers.ddome_evaluate
==================  ===============================  =========================================

Every message type is a constant below (``MESSAGE_TYPES``); the ClientApp registers one
handler per entry (``clients/client_app.py``). Nested settings a message carries travel as
one JSON object in its ``config`` record (:func:`encode_settings` / :func:`decode_settings`).

None of these is a sample, a per-sample embedding or a per-sample gradient: the sketch is a
classifier (or k centroids of >= privacy.min_count samples each), the expert is a weight
delta, the router vectors are means over the whole local set, the metrics are scalars; no
aggregate covers fewer than ``privacy.min_count`` private samples (clients/privacy.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# Every message type of the protocol; the ClientApp registers one handler per entry
# (clients/client_app.py) and the strategies send nothing else.
IDENTIFY = "query.identify"
SKETCH = "query.sketch"
EXPERT = "train.expert"
EVALUATE = "evaluate"
FL_SEED = "query.fl_seed"
FEDAVG_TRAIN = "train"  # Flower's FedAvg strategy sends plain "train" messages
FL_MOE_TRAIN = "train.fl_moe"
DDOME_SELECT = "query.ddome_select"
DDOME_TRAIN = "train.ddome"
DDOME_EVALUATE = "evaluate.ddome"
MESSAGE_TYPES = (IDENTIFY, SKETCH, EXPERT, EVALUATE, FL_SEED, FEDAVG_TRAIN, FL_MOE_TRAIN,
                 DDOME_SELECT, DDOME_TRAIN, DDOME_EVALUATE)

# Nested settings travel as one JSON string in the message's ``config`` ConfigRecord, under
# the name of the payload: the evaluated MoE's architecture (EVALUATE), an FL-MoE round's
# settings (FL_MOE_TRAIN), DDOME's settings (DDOME_*).
CONFIG = "config"
MOE_SPEC = "moe"
FL_ROUND = "fl"
DDOME_SPEC = "ddome"


class UploadError(ValueError):
    """A client's reply is malformed; the server rejects it and goes on without it."""


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def torch_state_to_record(state: Mapping) -> ArrayRecord:
    return to_record({k: v.detach().cpu().numpy() for k, v in state.items()})


def encode_settings(payload: str, settings: Mapping) -> ConfigRecord:
    """The ``config`` record of a message carrying the nested ``settings`` as ``payload``."""
    return ConfigRecord({payload: json.dumps(settings)})


def decode_settings(content: RecordDict, payload: str, sender: str = "server") -> dict:
    """The nested settings ``payload`` of a message (see :func:`encode_settings`)."""
    rec = get_record(content, CONFIG, ConfigRecord, sender)
    if payload not in rec:
        raise UploadError(f"{sender}: the {CONFIG!r} record has no {payload!r} settings")
    try:
        out = json.loads(str(rec[payload]))
    except json.JSONDecodeError as e:
        raise UploadError(f"{sender}: {payload!r} settings are not JSON: {e}") from None
    if not isinstance(out, dict):
        raise UploadError(f"{sender}: {payload!r} settings are not a JSON object")
    return out


def record_nbytes(content: RecordDict) -> int:
    """Bytes of a message's content as serialised arrays + scalar records."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
        elif isinstance(rec, (ConfigRecord, MetricRecord)):
            for k, v in rec.items():
                total += len(k) + (len(v) if isinstance(v, (str, bytes, list)) else 8)
    return total


def content_digest(content: RecordDict) -> str:
    """A digest of a message's content (record names, kinds, array bytes, shapes and dtypes,
    scalar items): two payloads with the same digest ask the same of a node."""
    h = hashlib.sha256()
    for name in sorted(content):
        rec = content[name]
        h.update(f"{name}|{type(rec).__name__}|".encode())
        if isinstance(rec, ArrayRecord):
            for k in sorted(rec):
                a = rec[k]
                h.update(f"{k}|{a.dtype}|{tuple(a.shape)}|".encode())
                h.update(a.data)
        else:
            h.update(repr(sorted(rec.items())).encode())
    return h.hexdigest()


def get_record(content: RecordDict, key: str, kind: type, client: str):
    if key not in content:
        raise UploadError(f"client {client}: reply has no {kind.__name__} {key!r}")
    rec = content[key]
    if not isinstance(rec, kind):
        raise UploadError(f"client {client}: {key!r} is a {type(rec).__name__}, "
                          f"expected {kind.__name__}")
    return rec


def check_arrays(arrays: Mapping[str, np.ndarray], spec: Mapping[str, tuple[int, ...]],
                 client: str, what: str, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Exact key set, shapes, dtype and finiteness, or :class:`UploadError`."""
    missing = sorted(set(spec) - set(arrays))
    extra = sorted(set(arrays) - set(spec))
    if missing:
        raise UploadError(f"client {client}: {what} is missing {missing[:3]}")
    if extra:
        raise UploadError(f"client {client}: {what} has unexpected keys {extra[:3]}")
    out = {}
    for k, shape in spec.items():
        a = arrays[k]
        if tuple(a.shape) != tuple(shape):
            raise UploadError(f"client {client}: {what}[{k!r}] has shape {tuple(a.shape)}, "
                              f"expected {tuple(shape)}")
        if a.dtype != np.dtype(dtype):
            raise UploadError(f"client {client}: {what}[{k!r}] has dtype {a.dtype}, "
                              f"expected {dtype}")
        if not np.all(np.isfinite(a)):
            raise UploadError(f"client {client}: {what}[{k!r}] contains NaN or Inf")
        out[k] = a
    return out


def check_metrics(rec: MetricRecord, required: list[str], client: str) -> dict[str, float]:
    out = {}
    for k in required:
        if k not in rec:
            raise UploadError(f"client {client}: metrics are missing {k!r}")
    for k, v in rec.items():
        vals = v if isinstance(v, list) else [v]
        if not all(np.isfinite(float(x)) for x in vals):
            raise UploadError(f"client {client}: metric {k!r} is not finite")
        out[k] = v
    return out
