"""Saving and loading models: M0 checkpoints and the emitted unified MoE.

The MoE artifact is two files in one directory: ``moe.safetensors`` (every tensor) and
``config.json`` (architecture, MoE switches, label names, domains). ``load_moe(dir)`` rebuilds
the exact model in one call.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from metamoe.models.moe import MoEConfig, MoEViT
from metamoe.models.vit import ViT, ViTConfig

MOE_FORMAT = "metamoe-moe/1"


def save_moe(model: MoEViT, directory: str | Path, extra: dict | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / "moe.safetensors"))
    cfg = {"format": MOE_FORMAT, "vit": model.cfg.to_dict(), "moe": model.moe_cfg.to_dict(),
           **(extra or {})}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def load_moe(path: str | Path) -> MoEViT:
    """Load a unified MoE from its directory (or from its ``moe.safetensors`` path)."""
    p = Path(path)
    d = p.parent if p.suffix == ".safetensors" else p
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"no config.json next to the MoE weights in {d}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != MOE_FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r} is not {MOE_FORMAT!r}")
    model = MoEViT(ViTConfig(**cfg["vit"]), MoEConfig(**cfg["moe"]))
    model.load_state_dict(load_file(str(d / "moe.safetensors")), strict=True)
    model.eval()
    return model


def moe_from_state(state: dict[str, torch.Tensor], config: dict) -> MoEViT:
    """Rebuild a MoE from a state dict + config dict (what the evaluate message carries)."""
    model = MoEViT(ViTConfig(**config["vit"]), MoEConfig(**config["moe"]))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def vit_from_state(state: dict[str, torch.Tensor], config: dict) -> ViT:
    model = ViT(ViTConfig(**config))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def save_vit(model: ViT, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(model.cfg.to_dict(), indent=2))


def load_vit(path: Path) -> ViT:
    cfg = json.loads(path.with_suffix(".json").read_text())
    return vit_from_state(load_file(str(path)), cfg)
