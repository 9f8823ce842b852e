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
(``gate_proj``/``up_proj``/``down_proj``: Llama, Mistral, Qwen2, Gemma, ...) works: each MLP is
re-expressed as :class:`~metamoe.models.vit.FFN` (fc1 = up_proj, gate = gate_proj, fc2 =
down_proj, the same ``nn.Linear`` objects), so FFN-LoRA experts and the context-aware MoE apply
unchanged. The whole pretrained LM is public: nodes load it themselves (local directory or hub
id) and only a fingerprint travels; M0 has no trained part of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn

from metamoe.models.text import encoder_fingerprint, resolve_encoder
from metamoe.models.vit import FFN


@lru_cache(maxsize=2)
def _load_lm_state(name: str) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(resolve_encoder(name), dtype=torch.float32)
    return model.config.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_lm_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder(name))


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


class CausalLMChoice(nn.Module):
    """A causal LM whose output is the next-token logits at the last prompt position."""

    def __init__(self, cfg: CausalConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        if not cfg.encoder:
            raise ValueError("model.encoder must name a causal LM (a local directory or hub id)")
        hf_dict, state = _load_lm_state(cfg.encoder)
        hf_cfg = AutoConfig.for_model(**{k: v for k, v in hf_dict.items()
                                         if k != "transformers_version"})
        if cfg.layers > 0:
            hf_cfg.num_hidden_layers = min(cfg.layers, hf_cfg.num_hidden_layers)
        lm = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        missing, _ = lm.load_state_dict(state, strict=False)
        missing = [k for k in missing if "rotary" not in k]
        if missing:
            raise RuntimeError(f"causal LM {cfg.encoder!r}: weights missing for {missing[:3]}")
        fp = encoder_fingerprint(cfg.encoder)
        if cfg.fingerprint and cfg.fingerprint != fp:
            raise ValueError(f"causal LM {cfg.encoder!r} on this node has fingerprint {fp}, the "
                             f"model was built with {cfg.fingerprint}")
        layers = lm.model.layers
        mlp0 = layers[0].mlp
        if not all(hasattr(mlp0, a) for a in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"causal LM {cfg.encoder!r}: its MLP {type(mlp0).__name__} is not a "
                             "gated gate_proj/up_proj/down_proj MLP (Llama, Mistral, Qwen2, ...)")
        act = hf_cfg.hidden_act
        for layer in layers:
            mlp = layer.mlp
            ffn = FFN(hf_cfg.hidden_size, hf_cfg.intermediate_size, act=act, gated=True)
            ffn.fc1, ffn.gate, ffn.fc2 = mlp.up_proj, mlp.gate_proj, mlp.down_proj
            layer.mlp = ffn
        pad = hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None else hf_cfg.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        self.cfg = CausalConfig(**{**cfg.to_dict(), "fingerprint": fp,
                                   "depth": hf_cfg.num_hidden_layers,
                                   "dim": hf_cfg.hidden_size,
                                   "mlp_hidden": hf_cfg.intermediate_size,
                                   "num_classes": hf_cfg.vocab_size,
                                   "pad_id": int(cfg.pad_id if cfg.pad_id else (pad or 0))})
        self.lm = lm
        self._public = frozenset(self.state_dict())

    def ffn_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self.lm.model.layers]

    def public_keys(self) -> frozenset[str]:
        return self._public

    def _inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ids trimmed to the batch's longest row; mask and position ids."""
        ids = torch.as_tensor(ids).long()
        mask = ids != self.cfg.pad_id
        cols = mask.any(0).nonzero()
        start = int(cols.min()) if len(cols) else ids.shape[1] - 1
        ids, mask = ids[:, start:], mask[:, start:]
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        return ids, mask, pos

    def _run(self, ids: torch.Tensor, logits: bool):
        ids, mask, pos = self._inputs(ids)
        for f in self.ffn_layers():
            f.token_mask = mask
        try:
            if logits:
                out = self.lm(input_ids=ids, attention_mask=mask.long(), position_ids=pos,
                              use_cache=False, logits_to_keep=1)
                return out.logits[:, -1, :], mask
            h = self.lm.model(input_ids=ids, attention_mask=mask.long(), position_ids=pos,
                              use_cache=False).last_hidden_state
            return h, mask
        finally:
            for f in self.ffn_layers():
                f.token_mask = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run(ids, logits=True)[0]

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden state over real tokens (relevance / DPP embedding)."""
        h, mask = self._run(ids, logits=False)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    forward_embedding = forward_features
