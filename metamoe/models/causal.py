"""Seed model M0 for the paper's NLP setting: a causal LM (``transformers``) read as a classifier.

The paper uses Llama-3.2-3B / Llama-3.1-8B (base) and reads the multiple-choice answer from the
generated letter after ``"Answer:"``. Here the model's output is the next-token distribution at
the last position of a left-padded prompt that ends in ``"Answer:"`` (the first generated
token), so the label of an example is a vocabulary id: the answer letter for CommonsenseQA /
CosmosQA / SocialIQA, the first response token for an Alpaca proxy
(:func:`metamoe.data.hf_text.encode_next_token`), and evaluation is the argmax over the domain's
valid letters — greedy decoding of one token restricted to the answer letters. Training on
these labels is the causal-LM loss on the answer token; the paper's loss also covers the prompt
tokens (and, at the unify stage, the whole Alpaca response): a stated simplification.

Any ``AutoModelForCausalLM`` whose decoder layers have a LLaMA-style gated MLP
(``gate_proj``/``up_proj``/``down_proj``: Llama, Mistral, Qwen2, Gemma, ...) or GPT-2's
``c_fc``/``c_proj`` MLP works: each MLP is re-expressed as :class:`~metamoe.models.vit.FFN`
(gated: fc1 = up_proj, gate = gate_proj, fc2 = down_proj, the same ``nn.Linear`` objects;
GPT-2: its Conv1D weights transposed into ``nn.Linear``), so FFN-LoRA experts and the
context-aware MoE apply unchanged. The whole pretrained LM is public: nodes load it themselves (local directory or hub
id) and only a fingerprint travels; M0 has no trained part of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from metamoe.models.text import build_pretrained, masked_mean, token_mask
from metamoe.models.vit import FFN


@dataclass
class CausalConfig:
    arch: str = "causal"
    encoder: str = ""  # a local directory or a hub id of a causal LM
    layers: int = -1  # keep the first `layers` decoder layers (-1: all)
    max_len: int = 256
    num_classes: int = 0  # the vocabulary size (labels are token ids)
    pad_id: int = 0
    fingerprint: str = ""
    depth: int = 0
    dim: int = 0
    mlp_hidden: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _as_ffn(mlp: nn.Module, hf_cfg, name: str) -> FFN:
    """An LM's MLP as our FFN, with the same weights: a gated gate/up/down MLP (Llama, Mistral,
    Qwen2, Gemma, ...) or GPT-2's Conv1D c_fc/c_proj (converted to nn.Linear; GPT-2's dropout
    after c_proj is not kept)."""
    if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
        ffn = FFN(mlp.up_proj.in_features, mlp.up_proj.out_features, act=hf_cfg.hidden_act,
                  gated=True)
        ffn.fc1, ffn.gate, ffn.fc2 = mlp.up_proj, mlp.gate_proj, mlp.down_proj
        return ffn
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2 family: Conv1D, weight [in, out]
        d_in, d_hid = mlp.c_fc.weight.shape
        ffn = FFN(d_in, d_hid, act=hf_cfg.activation_function)
        with torch.no_grad():
            ffn.fc1.weight.copy_(mlp.c_fc.weight.t())
            ffn.fc1.bias.copy_(mlp.c_fc.bias)
            ffn.fc2.weight.copy_(mlp.c_proj.weight.t())
            ffn.fc2.bias.copy_(mlp.c_proj.bias)
        return ffn
    raise ValueError(f"causal LM {name!r}: its MLP {type(mlp).__name__} is neither a gated "
                     "gate_proj/up_proj/down_proj MLP nor GPT-2's c_fc/c_proj")


class CausalLMChoice(nn.Module):
    """A causal LM whose output is the next-token logits at the last prompt position."""

    def __init__(self, cfg: CausalConfig):
        super().__init__()
        if not cfg.encoder:
            raise ValueError("model.encoder must name a causal LM (a local directory or hub id)")
        hf_cfg, self.lm, fp = build_pretrained(cfg.encoder, cfg.layers, True, cfg.fingerprint,
                                               "causal LM")
        dim = hf_cfg.hidden_size
        for layer in self._layers():
            layer.mlp = _as_ffn(layer.mlp, hf_cfg, cfg.encoder)
        hidden = self._layers()[0].mlp.fc1.out_features
        pad = hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else hf_cfg.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        self.cfg = CausalConfig(**{**cfg.to_dict(), "fingerprint": fp,
                                   "depth": len(self._layers()), "dim": dim,
                                   "mlp_hidden": hidden,
                                   "num_classes": hf_cfg.vocab_size,
                                   "pad_id": int(cfg.pad_id if cfg.pad_id else (pad or 0))})
        self._public = frozenset(self.state_dict())

    def _layers(self) -> nn.ModuleList:
        base = self.lm.base_model
        layers = getattr(base, "layers", None) or getattr(base, "h", None)
        if layers is None:
            raise ValueError(f"causal LM {self.cfg.encoder if hasattr(self, 'cfg') else ''!r}: "
                             "no decoder layers at base_model.layers or base_model.h")
        return layers

    def ffn_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self._layers()]

    def public_keys(self) -> frozenset[str]:
        return self._public

    def _inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids trimmed to the batch's longest row; mask and position ids."""
        ids = torch.as_tensor(ids).long()
        mask = ids != self.cfg.pad_id
        if not ids.is_meta:  # trim the left padding (meta tensors hold no values)
            cols = mask.any(0).nonzero()
            start = int(cols.min()) if len(cols) else ids.shape[1] - 1
            ids, mask = ids[:, start:], mask[:, start:]
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        return ids, mask, pos

    def _run(self, ids: torch.Tensor, logits: bool):
        ids, mask, pos = self._inputs(ids)
        with token_mask(self.ffn_layers(), mask):
            if logits:
                out = self.lm(input_ids=ids, attention_mask=mask.long(), position_ids=pos,
                              use_cache=False, logits_to_keep=1)
                return out.logits[:, -1, :], mask
            h = self.lm.base_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos,
                                   use_cache=False).last_hidden_state
            return h, mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run(ids, logits=True)[0]

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden state over real tokens (relevance / DPP embedding)."""
        return masked_mean(*self._run(ids, logits=False))

    forward_embedding = forward_features
