"""metamoe-fl: MetaMoE (ICML 2026) on Flower — private domain experts unified into one MoE."""

from __future__ import annotations

__version__ = "0.1.0"


def load_moe(path):
    """Load a unified MoE emitted by a run (``results/<run-id>/`` or its moe.safetensors)."""
    from metamoe.models.io import load_moe as _load

    return _load(path)


__all__ = ["__version__", "load_moe"]
