"""The one-shot driver: the client phases a set of one-shot methods needs, run ONCE, then
every method's merge and evaluation (one row each).

:func:`run_members` reads top to bottom in four steps — sketch + selection, experts, merge +
evaluate per member, byte accounting per row — each its own function. A single method
(``method=btx``) is a run with one member; a suite (``strategies/suites.py``) has several
members sharing their client phases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import RecordDict

from metamoe.config import ConfigError, to_container
from metamoe.models.moe import MoEMixin
from metamoe.protocol import EVALUATE, EXPERT, SKETCH, record_nbytes, to_record
from metamoe.strategies.base import Federation, Outcome

if TYPE_CHECKING:
    from metamoe.strategies.oneshot import OneShot

log = logging.getLogger("metamoe")


@dataclass
class Shared:
    """What the client phases produced, shared by every member."""

    identify_bytes: dict[str, int]
    sketch_bytes: dict[str, int] = field(default_factory=dict)
    selections: dict[str, dict] = field(default_factory=dict)  # member -> client -> picks
    sketch_ran: bool = False
    experts: dict[str, tuple] = field(default_factory=dict)  # client -> (LoRA, vectors, metrics)
    expert_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> record -> B
    extra: dict = field(default_factory=dict)


def _delta(fed: Federation, before: dict[str, int]) -> dict[str, int]:
    return {c.name: int(fed.upload_bytes.get(c.name, 0) - before.get(c.name, 0))
            for c in fed.clients.values()}


def sketch_and_select(lead: OneShot, fed: Federation, node_ids: list[int],
                      members: dict[str, OneShot], shared: Shared) -> None:
    """Sketch phase + proxy selection (FlexOlmo, MetaMoE); each member selects with its own
    ``select`` config, members with the same one share the result."""
    if not any(m.needs_sketch for m in members.values()):
        return
    before = dict(fed.upload_bytes)
    with fed.phase("sketch"):
        got = fed.exchange("sketch", SKETCH, lead.configure_sketch(node_ids),
                           lambda nid, c: lead.aggregate_sketch(fed, nid, c))
    shared.sketch_ran = True
    shared.sketch_bytes = _delta(fed, before)
    fed.drop_missing(got)
    sketches = {fed.client_name(n): sk for n, (sk, _) in got.items()}
    dp = {fed.client_name(n): d for n, (_, d) in got.items() if d}
    if dp:
        shared.extra["sketch_dp"] = dp
    with fed.phase("select"):
        cache: dict[str, dict] = {}
        for rname, m in members.items():
            if m.needs_sketch:
                key = str(sorted(to_container(m.cfg.select).items()))
                if key not in cache:
                    cache[key] = m.select(sketches)
                shared.selections[rname] = cache[key]


def train_experts(lead: OneShot, fed: Federation, members: dict[str, OneShot],
                  shared: Shared) -> None:
    """The expert phase: one training per client, shared by every member."""
    if not any(m.needs_experts for m in members.values()):
        return
    if lead.cfg.expert.use_proxies:
        sel = next(iter(shared.selections.values()), None)
        if sel is None:
            raise ConfigError("expert.use_proxies=true needs a member with a sketch phase")
    else:  # private-only experts: no proxies are sent
        sel = {c.name: {lead.cfg.select.method: np.zeros(0, np.int64)}
               for c in fed.clients.values()}

    def validate(nid: int, content: RecordDict):
        out = lead.aggregate_expert(fed, nid, content)
        shared.expert_bytes[fed.client_name(nid)] = {
            k: record_nbytes(RecordDict({k: content[k]})) for k in content}
        return out

    payloads = lead.configure_expert(fed, sel, with_seed=not shared.sketch_ran)
    if not lead.cfg.expert.use_proxies:  # send no coverage ablation picks either
        for content in payloads.values():
            content["proxies"] = to_record({"selected": np.zeros(0, np.int64)})
    with fed.phase("expert"):
        got = fed.exchange("expert", EXPERT, payloads, validate)
    fed.drop_missing(got)
    order = sorted(got, key=lambda n: fed.clients[n].partition_id)
    shared.experts = {fed.client_name(n): got[n] for n in order}
    shared.extra.update(lead.expert_extras(shared.experts))


def merge_and_evaluate(lead: OneShot, fed: Federation, members: dict[str, OneShot],
                       shared: Shared, model_extra: dict
                       ) -> tuple[dict[str, tuple[dict, dict]], dict[str, MoEMixin | None]]:
    """Each member's merge, then the clients' evaluation of it. Reference-only rows (M0, the
    single experts) are read from another member's evaluation when one carries them.
    Returns ({member: (evaluations by client, evaluation upload bytes)}, {member: model})."""
    evaluated: dict[str, tuple[dict, dict]] = {}
    models: dict[str, MoEMixin | None] = {}
    for rname in sorted(members, key=lambda r: members[r].reference_only):  # refs last
        m = members[rname]
        if m.reference_only and len(members) > 1:
            src = next((r for r in evaluated if members[r].provides_references), None)
            if src is not None:
                evaluated[rname] = evaluated[src]
                models[rname] = None
                continue
        used = {c: shared.selections.get(rname, {}).get(c) for c in shared.experts} \
            if rname in shared.selections else None
        with fed.phase(f"merge[{rname}]"):
            moe = m.build(shared.experts, used)
        models[rname] = moe
        before = dict(fed.upload_bytes)
        with fed.phase(f"evaluate[{rname}]" if len(members) > 1 else "evaluate"):
            evals = fed.evaluate(
                f"evaluate[{rname}]", EVALUATE,
                m.configure_evaluate(fed, moe, {**model_extra, "mode": m.eval_mode}),
                lambda nid, c, m=m: m.aggregate_evaluate(fed, nid, c))
        evaluated[rname] = ({fed.client_name(n): v for n, v in evals.items()},
                            _delta(fed, before))
    return evaluated, models


def row_upload_bytes(m: OneShot, fed: Federation, shared: Shared,
                     eval_bytes: dict[str, int]) -> dict[str, int]:
    """What method ``m`` itself makes each client send: identify + its evaluation, plus the
    sketch if it uses one, plus the expert records it uses (router vectors only if used)."""
    up = {}
    for c in fed.clients.values():
        b = shared.identify_bytes.get(c.name, 0) + eval_bytes.get(c.name, 0)
        if m.needs_sketch:
            b += shared.sketch_bytes.get(c.name, 0)
        if m.needs_experts and c.name in shared.expert_bytes:
            eb = shared.expert_bytes[c.name]
            b += sum(v for k, v in eb.items() if k != "router" or m.uses_router_vectors)
        up[c.name] = int(b)
    return up


def run_members(lead: OneShot, fed: Federation, node_ids: list[int],
                members: dict[str, OneShot]) -> Outcome:
    """Run the client phases the members need ONCE, then every member's merge + evaluation.

    ``lead`` carries the run's config (the suite's, or the single method's). Returns an
    Outcome whose ``extra["rows"]`` has one row per member:
    {accuracy, upload_bytes {client: int}, private, rounds, notes, ...}."""
    domains = list(lead.cfg.benchmark.domains)
    fed.identify(node_ids)
    node_ids = list(fed.clients)
    shared = Shared(identify_bytes={c.name: int(fed.upload_bytes.get(c.name, 0))
                                    for c in fed.clients.values()})
    sketch_and_select(lead, fed, node_ids, members, shared)
    train_experts(lead, fed, members, shared)
    dom_classes = {d.name: list(map(int, d.classes)) for d in lead.bench.domains}
    model_extra = {"class_names": list(lead.bench.class_names), "domains": dom_classes}
    evaluated, models = merge_and_evaluate(lead, fed, members, shared, model_extra)

    extra = shared.extra
    rows: dict[str, dict] = {}
    for rname, m in members.items():
        evals, eval_bytes = evaluated[rname]
        row = m.row(evals, fed)
        up = row_upload_bytes(m, fed, shared, eval_bytes)
        row.update({"upload_bytes": up, "private": m.private, "rounds": 1,
                    "notes": m.notes, "method": m.cfg.method})
        rows[rname] = row
        log.info("row %s: average %.4f, upload bytes %s", rname, row["accuracy"]["average"], up)
    extra["rows"] = rows

    main = next(iter(members))
    model = models.get(main)
    keep_model = len(members) == 1 and model is not None and \
        not members[main].reference_only and members[main].eval_mode == "routed"
    if len(members) == 1:
        measured = {k: int(v) for k, v in fed.upload_bytes.items()}
        # What this method really sends (the shared expert handler also uploads router vectors,
        # which only FlexOlmo/MetaMoE use): metrics.json's upload_bytes is the row's count.
        for c, b in rows[main]["upload_bytes"].items():
            fed.upload_bytes[c] = b
        extra["upload_accounting"] = {
            "transport_bytes": measured,
            "note": "upload_bytes counts the records this method uses; transport_bytes is "
                    "what the shared handlers sent"}
        extra["accuracy"] = rows[main]["accuracy"]
    else:
        extra["accuracy"] = {"per_domain": {d: float("nan") for d in domains},
                             "average": float("nan")}
        extra["suite_note"] = "a suite run: see rows[<method>] for each method's results"
    extra["private"] = all(m.private for m in members.values())
    return Outcome(evaluations=evaluated[main][0], model=model if keep_model else None,
                   model_extra=model_extra, extra=extra)
