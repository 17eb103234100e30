"""Where and how a model ran (devices, dtype, attention, package versions), recorded in run
folders, activation files and vector sidecars."""

from __future__ import annotations

import importlib.metadata
from typing import Any

VERSIONED = ("steerlab", "torch", "transformers", "transformer-lens")


def model_devices(model: Any) -> list[str]:
    """The devices a model's parameters are on, in layer order (first device first)."""
    hf = getattr(model, "original_model", model)
    seen: dict[str, None] = {}
    for p in hf.parameters():
        seen.setdefault(str(p.device), None)
    return list(seen)


def versions() -> dict[str, str]:
    """steerlab, torch, transformers and transformer-lens versions."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(model: Any) -> dict[str, Any]:
    """Where and how a model ran, for run folders, HDF5 attributes and vector files.

    Returns:
        ``{"devices": [...], "dtype": "bfloat16", "attn_implementation": "sdpa",
        "versions": {"steerlab": ..., "torch": ..., "transformers": ...,
        "transformer-lens": ...}}``
    """
    hf = getattr(model, "original_model", model)
    first = next(hf.parameters())
    attn = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    return {"devices": model_devices(model), "dtype": str(first.dtype).removeprefix("torch."),
            "attn_implementation": str(attn), "versions": versions()}
