"""What travels between ServerApp and ClientApps: message types, record keys, checks.

Every array a client uploads is listed here with the function that produces it:

==================  ===============================  =========================================
message type        client uploads (record key)      produced by
==================  ===============================  =========================================
query.sketch        ``sketch`` relevance sketch      clients.stages.sketch_stage (proxy.sketch)
                    ``info``  name/domain/sizes      clients.client_app.sketch
train.expert        ``expert`` FFN-LoRA A/B          clients.stages.expert_stage
                    ``router`` [L, d] mean vectors   models.lora.ffn_input_means (noisy clipped
                                                     mean when privacy.router_dp_sigma > 0:
                                                     clients.privacy)
                    ``metrics`` scalars (n_train,    clients.stages.expert_stage,
                    loss, coverage, router_dp_*)     clients.stages.coverage
evaluate            ``metrics`` accuracies, coverage clients.stages.evaluate_stage
query.identify      ``info`` name/domain/sizes       clients.client_app.identify
query.fl_seed       ``metrics`` acknowledgement      clients.fl_handlers (iterative baselines)
train               ``arrays`` FFN-LoRA weights      clients.fl_handlers (FedAvg round)
train.fl_moe        router rows, λ, experts' LoRA,   clients.fl_handlers (FedAvg-MoE,
                    mean routing distribution and    FedAlign-MoE; means over the whole
                    per-expert mean outputs          local set)
query.ddome_select  summed gate scores over Dp       clients.fl_handlers (DDOME)
train.ddome         gate MLP + selected experts      clients.fl_handlers (DDOME)
evaluate.ddome      accuracies (scalars)             clients.fl_handlers (DDOME)
==================  ===============================  =========================================

None of these is a sample, a per-sample embedding or a per-sample gradient: the sketch is a
classifier (or k centroids of >= 1 sample each), the expert is a weight delta, the router
vectors are means over the whole local set, the metrics are scalars.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

SKETCH = "query.sketch"
EXPERT = "train.expert"
EVALUATE = "evaluate"


class UploadError(ValueError):
    """A client's reply is malformed; the server rejects it and goes on without it."""


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def torch_state_to_record(state: Mapping) -> ArrayRecord:
    return to_record({k: v.detach().cpu().numpy() for k, v in state.items()})


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
