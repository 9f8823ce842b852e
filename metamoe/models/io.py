"""Saving, loading and shipping models: M0, the emitted unified MoE, message payloads.

The MoE artifact is two files in one directory: ``moe.safetensors`` (every tensor) and
``config.json`` (architecture, MoE switches, label names, domains). ``load_moe(dir)`` rebuilds
the exact model in one call.

Architectures are told apart by the ``arch`` field of the model config (``vit``, the default of
configs written before text existed, or ``bert``). In messages and checkpoints a model travels
as :func:`shipped_state`: everything but the public pretrained encoder weights (text), which
each node loads from its own installation; the receiver checks the encoder's fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metamoe.models.causal import CausalConfig, CausalLMChoice
from metamoe.models.clip import CLIPClassifier, CLIPSeedConfig
from metamoe.models.moe import MoEConfig, moe_class
from metamoe.models.text import TextClassifier, TextConfig
from metamoe.models.vit import ViT, ViTConfig

MOE_FORMAT = "metamoe-moe/1"


def seed_config(d: dict):
    """ViTConfig, TextConfig, CausalConfig or CLIPSeedConfig from its dict."""
    arch = d.get("arch", "vit")
    return {"bert": TextConfig, "causal": CausalConfig, "clip": CLIPSeedConfig}.get(
        arch, ViTConfig)(**d)


def model_config(conf: dict) -> dict:
    """The architecture dict of a MoE config (key ``model``; ``vit`` in older files)."""
    if "model" in conf:
        return conf["model"]
    if "vit" in conf:
        return conf["vit"]
    raise KeyError("model config has neither 'model' nor 'vit'")


def shipped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a message carries: all but the public encoder's weights (vision: all)."""
    public = model.public_keys() if hasattr(model, "public_keys") else frozenset()
    return {k: v for k, v in model.state_dict().items() if k not in public}


def _load(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    public = model.public_keys() if hasattr(model, "public_keys") else frozenset()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in public]
    if missing or unexpected:
        raise ValueError(f"{what}: state does not match the architecture: missing "
                         f"{missing[:3]}, unexpected {list(unexpected)[:3]}")
    model.eval()
    return model


def save_moe(model: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write the full MoE (public encoder weights included, so the artifact stands alone)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / "moe.safetensors"))
    cfg = {"format": MOE_FORMAT, "model": model.cfg.to_dict(), "moe": model.moe_cfg.to_dict(),
           **(extra or {})}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def load_moe(path: str | Path) -> nn.Module:
    """Load a unified MoE from its directory (or from its ``moe.safetensors`` path)."""
    p = Path(path)
    d = p.parent if p.suffix == ".safetensors" else p
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"no config.json next to the MoE weights in {d}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != MOE_FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r} is not {MOE_FORMAT!r}")
    model = moe_from_state(load_file(str(d / "moe.safetensors")), cfg)
    return model


def moe_from_state(state: dict[str, torch.Tensor], config: dict) -> nn.Module:
    """Rebuild a MoE from a (shipped) state dict + config dict (the evaluate message)."""
    arch = seed_config(model_config(config))
    model = moe_class(arch)(arch, MoEConfig(**config["moe"]))
    return _load(model, state, "MoE")


def seed_from_state(state: dict[str, torch.Tensor], config: dict) -> nn.Module:
    """Rebuild M0 from a (shipped) state dict + its architecture dict."""
    arch = seed_config(config)
    cls = {TextConfig: TextClassifier, CausalConfig: CausalLMChoice,
           CLIPSeedConfig: CLIPClassifier}.get(type(arch), ViT)
    model = cls(arch)
    return _load(model, state, "seed model")


def save_seed(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in shipped_state(model).items()},
              str(path))
    path.with_suffix(".json").write_text(json.dumps(model.cfg.to_dict(), indent=2))


def load_seed(path: Path) -> nn.Module:
    cfg = json.loads(path.with_suffix(".json").read_text())
    return seed_from_state(load_file(str(path)), cfg)


def seed_payload(model: nn.Module):
    """(ArrayRecord, ConfigRecord) that carry M0 to the clients: the shipped state (for text,
    the head; the public encoder is loaded on the node) and the architecture dict."""
    from flwr.app import ConfigRecord

    from metamoe.protocol import torch_state_to_record

    return (torch_state_to_record(shipped_state(model)),
            ConfigRecord({"model": json.dumps(model.cfg.to_dict())}))
