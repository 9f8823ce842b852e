"""Client-side DDOME: the per-client expert subset, local training of gate + experts, and
test-time prediction (baselines_detail.md §4; server side: ``strategies/ddome.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metamoe import device
from metamoe.data.dataset import ArrayDataset, IndexDataset
from metamoe.models.gate import GateMLP
from metamoe.models.moe import MoEMixin
from metamoe.training import predict_logits, train


def ddome_scores(gate: GateMLP, feats: torch.Tensor) -> torch.Tensor:
    """Σ over the local samples of the gate's softmax scores: [M]."""
    rt = device.current()
    rt.place(gate)
    with torch.no_grad(), rt.autocast():
        return gate(rt.batch(feats)).float().softmax(-1).sum(0).cpu()


def ddome_pick(gate: GateMLP, feats: torch.Tensor, k: int) -> list[int]:
    """DDOME's per-client expert subset: TOPK of the summed gate scores (sorted indices)."""
    s = ddome_scores(gate, feats)
    return sorted(int(i) for i in s.topk(min(k, len(s))).indices)


def ddome_local_train(cfg, moe: MoEMixin, gate: GateMLP, feats: torch.Tensor, x: torch.Tensor,
                      y: torch.Tensor, experts: list[int], anchor: int | None,
                      rng_seed: int, rnd: int = 1) -> dict:
    """One DDOME local step set (round ``rnd`` of ``fl.rounds``: its share of the budget's
    steps). ``moe`` holds the client's experts in slots 0..K-1 (global ids
    ``experts``). Normal client: CE of the gate-renormalised mixture Σ_k ĝ_k softmax(f_k(x))
    (gate + experts jointly). Anchor client for expert q (``anchor``, slot 0): CE(f_q(x), y) +
    CE(gate(x̂), q)."""
    f = cfg.fl
    moe.freeze_base()
    for p in moe.router_parameters() + moe.lambda_parameters():
        p.requires_grad_(False)
    wrapper = nn.ModuleDict({"moe": moe, "gate": gate})
    groups = [{"params": moe.expert_parameters(), "lr": f.lr},
              {"params": list(gate.parameters()), "lr": f.ddome_gate_lr}]
    rt = device.current()
    # The whole local set on the device: the loop's batches are indices into it.
    x, feats = rt.batch(torch.as_tensor(x)), rt.batch(torch.as_tensor(feats))
    idx_experts = torch.as_tensor(experts, device=rt.device)

    def loss_fn(model, ib, yb):
        xb, fb = x[ib], feats[ib]
        logits_g = model["gate"](fb)
        if anchor is not None:
            model["moe"].set_forced(0)
            out = F.cross_entropy(model["moe"](xb), yb)
            target = torch.full_like(yb, int(anchor))
            return out + F.cross_entropy(logits_g, target)
        g = logits_g[:, idx_experts].softmax(-1)  # renormalised over the client's subset
        logp = []
        for slot in range(len(experts)):
            model["moe"].set_forced(slot)
            logp.append(model["moe"](xb).log_softmax(-1).gather(1, yb[:, None])[:, 0])
        mix = torch.logsumexp(torch.stack(logp, 1) + g.clamp_min(1e-12).log(), dim=1)
        return -mix.mean()

    # Batches of indices into the local set, grouped by the texts' lengths like every other
    # method's (fl.group_by_length; images have no lengths).
    lengths = ArrayDataset(x.cpu()).lengths(int(getattr(moe.cfg, "pad_id", 0) or 0))
    try:
        hist = train(wrapper, IndexDataset(y, lengths), None, f, params=groups,
                     loss_fn=loss_fn, seed=rng_seed, desc="ddome",
                     round_of=(rnd, int(f.rounds)))
    finally:
        moe.set_forced(None)
    return hist


@torch.no_grad()
def ddome_predict(moe: MoEMixin, gate: GateMLP, feats: torch.Tensor, x: torch.Tensor,
                  classes, k: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """DDOME test time on unlabelled data: the client's top-K experts from the summed gate
    scores, then per sample the single expert with the highest gate score among those K.
    Returns (predictions, the K experts, each sample's expert id)."""
    chosen = ddome_pick(gate, feats, k)
    per = predict_logits(gate, feats)[:, chosen].argmax(1)
    cls = torch.as_tensor(list(classes))
    pred = torch.empty(len(x), dtype=torch.long)
    for j, e in enumerate(chosen):
        sel = (per == j).nonzero().flatten()
        if len(sel) == 0:
            continue
        moe.set_forced(e)
        logits = predict_logits(moe, x[sel])
        pred[sel] = cls[logits[:, cls].argmax(1)]
    moe.set_forced(None)
    return pred, chosen, torch.as_tensor(chosen, dtype=torch.long)[per]
