"""Seed model M0 for the paper's vision setting: a pretrained CLIP vision tower (``transformers``)
with CLIP's zero-shot class-name head.

``model.encoder`` is a hub id (``openai/clip-vit-base-patch32``, ``-patch16``) or a local
directory that ``transformers.CLIPModel.from_pretrained`` loads. Each vision layer's MLP
``fc2(quick_gelu(fc1(z)))`` is re-expressed as the project's :class:`~metamoe.models.vit.FFN`
(``fc1``/``fc2`` are the pretrained ``nn.Linear`` objects, unchanged; the activation is the
layer's own ``hidden_act``), so FFN-LoRA experts and the context-aware MoE are the same code
as for the other seeds, and image features and logits equal ``transformers``' own.

* Features (sketch, DPP, router context): the pre-projection CLS after the last layer norm
  (``pooler_output``; 768-d for ViT-B), as the paper's code uses.
* Head: ``head(normalize(visual_projection(cls)) * exp(logit_scale))`` with ``head.weight`` the
  L2-normalised text embeddings of ``model.template`` filled with each class name and
  ``head.bias`` zero: CLIP's zero-shot logits ``exp(s) · cos(image, text)``, ``s`` clamped to
  ln 100. The head is frozen like the rest of M0. The server's head covers the public pool's
  classes; a client appends rows for its own classes on its node from their names
  (:meth:`CLIPClassifier.class_head`; ``clients/private_head.py``), and the names never leave
  it.
* The vision tower and projection are the public checkpoint: every node loads its own copy,
  checked against the fingerprint in the config; only the head travels in a message.

Inputs are pixel tensors [B, 3, S, S] already transformed (:func:`clip_transform`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metamoe.models.vit import FFN

DEFAULT_TEMPLATE = "This is a photo of a {}."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPSeedConfig:
    arch: str = "clip"
    encoder: str = "openai/clip-vit-base-patch32"
    num_classes: int = 1000
    template: str = DEFAULT_TEMPLATE
    fingerprint: str = ""  # encoder_fingerprint(encoder), filled on construction
    # Derived from the checkpoint (filled on construction; LoRA/MoE code and transforms read them).
    depth: int = 0
    dim: int = 0
    mlp_hidden: int = 0
    image_size: int = 0
    proj_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=2)
def _pretrained(name: str) -> tuple[dict, dict]:
    """(CLIP config dict, state dict) of a checkpoint, read once per process."""
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = CLIPModel.from_pretrained(name, dtype=torch.float32)
    return model.config.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def clip_image_size(name: str) -> int:
    """The input size of checkpoint ``name``'s vision tower."""
    cfg = _pretrained(name)[0]["vision_config"]
    return int(cfg["image_size"] if isinstance(cfg, dict) else cfg.image_size)


def _clip_model(name: str):
    from transformers import CLIPConfig, CLIPModel

    cfg_dict, state = _pretrained(name)
    cfg = CLIPConfig(**{k: v for k, v in cfg_dict.items() if k != "transformers_version"})
    model = CLIPModel(cfg)
    model.load_state_dict(state)
    return model.eval()


class CLIPClassifier(nn.Module):
    """CLIP's vision tower (FFNs exposed for LoRA/MoE) + projection + class-name head."""

    def __init__(self, cfg: CLIPSeedConfig):
        super().__init__()
        from metamoe.models.text import encoder_fingerprint

        clip = _clip_model(cfg.encoder)
        vc = clip.config.vision_config
        fp = encoder_fingerprint(cfg.encoder)
        if cfg.fingerprint and cfg.fingerprint != fp:
            raise ValueError(f"CLIP encoder {cfg.encoder!r} on this node has fingerprint {fp}, "
                             f"the model was built with {cfg.fingerprint}: install the same "
                             "checkpoint on every node")
        self.cfg = CLIPSeedConfig(**{**cfg.to_dict(), "fingerprint": fp, "depth": vc.num_hidden_layers,
                                     "dim": vc.hidden_size, "mlp_hidden": vc.intermediate_size,
                                     "image_size": vc.image_size,
                                     "proj_dim": clip.config.projection_dim})
        vision = clip.vision_model
        for layer in vision.encoder.layers:
            ffn = FFN(vc.hidden_size, vc.intermediate_size, act=vc.hidden_act)
            ffn.fc1, ffn.fc2 = layer.mlp.fc1, layer.mlp.fc2
            layer.mlp = ffn
        self.vision = vision
        self.visual_projection = clip.visual_projection
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())
        self.head = nn.Linear(self.cfg.proj_dim, cfg.num_classes)
        nn.init.zeros_(self.head.bias)
        self._public = frozenset(k for k in self.state_dict()
                                 if k.startswith(("vision.", "visual_projection.", "logit_scale")))

    # ---------------------------------------------------------------- interface
    def ffn_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self.vision.encoder.layers]

    def public_keys(self) -> frozenset[str]:
        """The public checkpoint's keys: every node loads these itself."""
        return self._public

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-projection CLS after the last layer norm."""
        return self.vision(pixel_values=x).pooler_output

    forward_embedding = forward_features  # sketch / DPP features: the paper's ln_post(CLS)

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's image feature: the projected CLS, L2-normalised."""
        return F.normalize(self.visual_projection(self.forward_features(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return self.head(self.image_embedding(x) * scale)

    # ---------------------------------------------------------------- class-name head
    @torch.no_grad()
    def class_head(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [C, proj_dim], zero bias [C]): the normalised text embeddings of the
        template filled with each name, from this node's copy of the checkpoint's text tower."""
        return class_text_embeddings(self.cfg.encoder, tuple(names), self.cfg.template)

    def set_class_head(self, names: list[str]) -> None:
        w, b = self.class_head(names)
        if w.shape[0] != self.head.out_features:
            raise ValueError(f"{len(names)} class names for a head of {self.head.out_features}")
        with torch.no_grad():
            self.head.weight.copy_(w)
            self.head.bias.copy_(b)


@lru_cache(maxsize=8)
def class_text_embeddings(encoder: str, names: tuple[str, ...], template: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    clip = _clip_model(encoder)
    tok = AutoTokenizer.from_pretrained(encoder)
    out = []
    for i in range(0, len(names), 256):
        enc = tok([template.format(n) for n in names[i:i + 256]], padding=True,
                  return_tensors="pt", truncation=True,
                  max_length=clip.config.text_config.max_position_embeddings)
        feats = clip.get_text_features(input_ids=enc["input_ids"],
                                       attention_mask=enc["attention_mask"])
        if not isinstance(feats, torch.Tensor):  # transformers 5.x: an output object
            feats = feats.pooler_output
        out.append(F.normalize(feats.float(), dim=-1))
    w = torch.cat(out)
    return w, torch.zeros(len(w))


def clip_transform(image_size: int, train: bool = False):
    """The paper's CLIP transform, any PIL image -> float32 [3, S, S]: resize the shorter side
    to S·256/224 (256 for S = 224), centre crop S (``train``: a random crop and a horizontal
    flip drawn from the ``rng`` passed with the image), CLIP's normalisation."""
    from PIL import Image

    resize = int(round(image_size * 256 / 224))
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]

    def tf(img, rng: np.random.Generator | None = None) -> np.ndarray:
        img = img.convert("RGB")
        rng = rng if rng is not None else np.random.default_rng(0)
        w, h = img.size
        s = resize / min(w, h)
        img = img.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.BICUBIC)
        w, h = img.size
        if train:
            left = int(rng.integers(0, w - image_size + 1))
            top = int(rng.integers(0, h - image_size + 1))
        else:
            left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        if train and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - mean) / std

    return tf

