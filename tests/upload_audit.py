"""The privacy audit's machinery: record every upload of a real run, and check each one.

:func:`record_run` runs the project's ServerApp and ClientApp in Flower's simulation
(``tests/flower_sim.py``) behind a recording ``Grid``: every reply any client sends reaches the
server through it, and every message the server sends is kept too (to rebuild what a client
trained from). :func:`audit` then checks, for every upload of every client:

1. whitelist: (message type, record key) is listed in metamoe/protocol.py's table;
2. shapes: no array has a dimension equal to the client's private-set size (or its train/test
   sizes), and no scalar record holds a list of that length: nothing is indexed by sample;
3. content: no uploaded vector (an array flattened, each row of it, and its change from what
   the server sent under the same name) equals or closely matches (|cosine| >= ``COS_MAX``) a
   per-sample candidate of the same length: raw private samples (train and test), M0's token
   and cls embeddings of each private sample, each sample's mean FFN input under M0, and each
   sample's gradient of the cross-entropy at the uploaded weights — for every upload that is an
   FFN-LoRA state (MetaMoE's expert, FedAvg's update, DDOME's experts) and for FL-MoE states
   (the whole trainable state and each tensor);
4. aggregates (the centroid sketch's cells, MetaMoE's router vectors, FedAlign-MoE's routing
   statistics) are means by construction, so (3) does not apply to them: each, and each row of
   it, must be farther from every sample's same-length candidate than a fifth of those
   candidates' spread (:func:`aggregate_far`); the tests also recompute them over the whole set
   or under the uploaded weights.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import torch

from tests.flower_sim import simulate

COS_MAX = 0.95
# Means over many samples: close in direction to single samples by nature (every embedding
# shares a common component), so they are checked by distance (:meth:`Candidates.check_aggregate`)
AGGREGATES = ("query.sketch/sketch/centroids", "train.expert/router/", "train.fl_moe/stats/")


def whitelist() -> set[tuple[str, str]]:
    """(message type, record key) pairs of the table in metamoe/protocol.py's docstring."""
    import metamoe.protocol as protocol

    pairs, mtype = set(), None
    for line in protocol.__doc__.splitlines():
        m = re.match(r"^(\S+)?\s+``(\w[\w-]*)``", line)
        if not m or line.startswith("="):
            continue
        mtype = m.group(1) or mtype
        pairs.add((mtype, m.group(2)))
    return pairs


def _content(rec) -> tuple[str, dict]:
    from flwr.app import ArrayRecord

    if isinstance(rec, ArrayRecord):
        return "ArrayRecord", {k: a.numpy() for k, a in rec.items()}
    return type(rec).__name__, dict(rec)


def record_run(run_config: dict, nodes: int = 2):
    """Run once; returns (uploads, sent): uploads = [(message type, node id, {key: (kind,
    record)})] in arrival order, sent = {(message type, node id): [content, ...]}."""
    uploads: list[tuple[str, int, dict]] = []
    sent: dict[tuple[str, int], list] = {}

    def record(replies):
        for rep in replies:
            if rep.has_error():
                uploads.append((rep.metadata.message_type, rep.metadata.src_node_id,
                                {"__error__": rep.error.reason}))
                continue
            uploads.append((rep.metadata.message_type, rep.metadata.src_node_id,
                            {k: _content(r) for k, r in rep.content.items()}))
        return replies

    class RecordingGrid:
        """The real Grid; every message it carries either way is recorded."""

        def __init__(self, grid):
            self._grid = grid

        def __getattr__(self, name):
            return getattr(self._grid, name)

        def _sent(self, messages):
            for m in messages:
                sent.setdefault((m.metadata.message_type, m.metadata.dst_node_id), []).append(
                    {k: _content(r) for k, r in m.content.items()})

        def send_and_receive(self, messages, *a, **kw):
            messages = list(messages)
            self._sent(messages)
            return record(list(self._grid.send_and_receive(messages, *a, **kw)))

        def push_messages(self, messages, *a, **kw):
            messages = list(messages)
            self._sent(messages)
            return self._grid.push_messages(messages, *a, **kw)

        def pull_messages(self, *a, **kw):
            return record(list(self._grid.pull_messages(*a, **kw)))

    simulate(run_config, nodes, grid=RecordingGrid)
    return uploads, sent


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64).reshape(len(v), -1)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def vectors(arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Every array flattened, plus every row of every >= 2-D array."""
    out = []
    for k, a in arrays.items():
        a = np.asarray(a, dtype=np.float64)
        if a.size > 1:
            out.append((k, a.ravel()))
        if a.ndim >= 2:
            out += [(f"{k}[{i}]", r.ravel()) for i, r in enumerate(a.reshape(a.shape[0], -1))]
    return out


def partitions(uploads) -> dict[int, int]:
    """node id -> partition id, from the clients' info records."""
    part = {}
    for _mtype, nid, content in uploads:
        for kind, rec in content.values():
            if kind == "ConfigRecord" and "partition-id" in rec:
                part[nid] = int(rec["partition-id"])
    return part


def _grads(model, named: list[tuple[str, torch.nn.Parameter]], x, y) -> np.ndarray:
    """[n, P]: each sample's gradient of the cross-entropy w.r.t. the ``named`` parameters,
    concatenated (``metamoe.dpsgd.per_sample_grads``: vmap, checked against the per-sample
    loop in tests/test_dpsgd.py; the loop where the model cannot be vmapped)."""
    from metamoe.dpsgd import per_sample_grads
    from metamoe.training import cross_entropy_loss

    params = dict(named)
    rows = []
    for i in range(0, len(y), 100):
        try:
            g = per_sample_grads(model, params, cross_entropy_loss, x[i:i + 100], y[i:i + 100])
        except (RuntimeError, NotImplementedError):  # not vmappable: one pass per sample
            g = per_sample_grads(model, params, cross_entropy_loss, x[i:i + 100], y[i:i + 100],
                                 vectorised=False)
        rows.append(torch.cat([g[k].reshape(len(g[k]), -1) for k in params], 1).double().numpy())
    return np.concatenate(rows)


def lora_model(cfg, seed, state: dict[str, np.ndarray]):
    """M0 with an uploaded FFN-LoRA state loaded (eval mode)."""
    from metamoe.models.lora import inject_ffn_lora, load_lora_state_dict

    model = inject_ffn_lora(copy.deepcopy(seed), cfg.expert.rank, cfg.expert.alpha)
    load_lora_state_dict(model, {k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.eval()


def lora_gradients(model, x, y) -> tuple[list[str], list[int], np.ndarray]:
    """Per-sample gradients at an uploaded FFN-LoRA state (:func:`lora_model`): (names,
    sizes, [n, P])."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p.numel() for _, p in named], _grads(model, named, x, y)


def moe_gradients(seed, spec: dict, state: dict[str, np.ndarray], x, y
                  ) -> tuple[list[str], list[int], np.ndarray]:
    """Per-sample gradients at an uploaded FL-MoE trainable state, in the state's key order."""
    from metamoe.models.moe import MoEConfig, moe_from_seed
    from metamoe.models.moe_state import load_moe_trainable

    moe = moe_from_seed(copy.deepcopy(seed), MoEConfig(**spec["moe"]))
    load_moe_trainable(moe, state)
    moe.eval()
    named = dict(moe.named_parameters())
    keys = [k for k in state if k in named]
    for p in moe.parameters():
        p.requires_grad_(False)
    params = [(k, named[k].requires_grad_(True)) for k in keys]
    return keys, [p.numel() for _, p in params], _grads(moe, params, x, y)


def aggregate_far(agg: np.ndarray, per_sample: np.ndarray) -> tuple[float, float]:
    """(distance of ``agg`` to the nearest single sample, mean spread of the samples around
    their mean): an aggregate of many samples sits far from each of them."""
    flat = per_sample.reshape(len(per_sample), -1)
    d_single = float(np.linalg.norm(flat - agg.reshape(1, -1), axis=1).min())
    spread = float(np.linalg.norm(flat - flat.mean(0, keepdims=True), axis=1).mean())
    return d_single, spread


class Candidates:
    """One client's per-sample candidates: what an upload must not be (close to)."""

    def __init__(self, seed, dom):
        from metamoe.clients.privacy import per_sample_ffn_means
        from metamoe.training import features

        self.x = torch.from_numpy(dom.x_train)
        self.y = torch.from_numpy(dom.y_train)
        self.ffn = per_sample_ffn_means(seed, self.x).numpy()  # [n, L, d] under M0
        self.cands = {"raw train sample": dom.x_train, "raw test sample": dom.x_test,
                      "M0 token embedding": features(seed, dom.x_train, "tokens"),
                      "M0 cls embedding": features(seed, dom.x_train, "cls"),
                      "M0 per-sample FFN input": self.ffn.reshape(len(self.ffn), -1)}
        for layer in range(self.ffn.shape[1]):
            self.cands[f"M0 per-sample FFN input layer {layer}"] = self.ffn[:, layer]
        self._prepare()

    def add_gradients(self, tag: str, names, sizes, grads: np.ndarray) -> None:
        self.cands[f"per-sample gradient {tag}"] = grads
        off = 0
        for n, s in zip(names, sizes, strict=True):
            self.cands[f"per-sample gradient {tag} {n}"] = grads[:, off:off + s]
            off += s
        self._prepare()

    def _prepare(self) -> None:
        self.by_len: dict[int, list] = {}
        for name, v in self.cands.items():
            raw = np.asarray(v, np.float64).reshape(len(v), -1)
            self.by_len.setdefault(raw.shape[1], []).append((name, raw, unit(raw)))

    def check_aggregate(self, key: str, vec: np.ndarray) -> int:
        """Assert the mean ``vec`` is far from every sample's candidate of its length."""
        done = 0
        for name, raw, _U in self.by_len.get(vec.size, ()):
            d, spread = aggregate_far(vec, raw)
            assert d > 0.2 * spread, f"{key} is within {d:.4g} of a single {name} " \
                                     f"(spread {spread:.4g})"
            done += 1
        return done

    def check(self, key: str, vec: np.ndarray, worst: dict) -> int:
        """Assert ``vec`` is no candidate of its length (exact or |cos| >= COS_MAX)."""
        done = 0
        norm = max(float(np.linalg.norm(vec)), 1e-12)
        for name, raw, U in self.by_len.get(vec.size, ()):
            exact = np.any(np.all(np.isclose(raw, vec, rtol=1e-5, atol=1e-7), axis=1))
            assert not exact, f"{key} equals a {name}"
            cos = float(np.max(np.abs(U @ (vec / norm))))
            assert cos < COS_MAX, f"{key} matches a {name} (|cos|={cos:.3f})"
            kind = re.sub(r"( layer \d+| at .*)$", "", name)
            worst[kind] = max(worst.get(kind, 0.0), cos)
            done += 1
        return done
