"""Compatibility with a moving stack: the KV-cache keyword between transformers and the bridge.

transformers 5.24 renamed the keyword that a model passes its KV cache under, from
``past_key_values`` to ``cache``, in every forward from ``*ForCausalLM`` down to attention.
TransformerLens 4.3's attention bridge (``AttentionBridge._update_kv_cache``) reads only
``past_key_values`` (or ``layer_past``): under 5.24 it finds no cache, never fills it, and every
decode step attends to itself alone (replies like ``"La-------"``). See docs/compatibility.md.

This module is the one place that knows about it:

- :func:`ensure_bridge_reads_cache` makes the bridge read ``cache`` too. It probes the bridge
  first and patches only when the probe shows the cache is ignored, so it becomes a no-op (and
  can be deleted) once TransformerLens handles ``cache`` itself.
- :func:`cache_keyword` and :func:`output_cache` pass and read the cache under the name the
  installed transformers uses, so steerlab's own decoding loop raises no deprecation warnings.
- :func:`kv_cache_filled` checks the end result on a real model: after a prefill the cache
  holds every prompt position.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from types import SimpleNamespace
from typing import Any

import torch

log = logging.getLogger(__name__)

_SHIM_FLAG = "_steerlab_reads_cache"
SHIM_ENV = "STEERLAB_KV_CACHE_SHIM"


class _RecordingCache:
    """Stands in for a ``Cache`` in the probe: records whether ``update`` was called."""

    def __init__(self) -> None:
        self.updated = False

    def update(self, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.updated = True
        return k, v


def _bridge_reads(method: Any, keyword: str) -> bool:
    """Whether ``AttentionBridge._update_kv_cache`` updates a cache passed under ``keyword``."""
    cache = _RecordingCache()
    probe = SimpleNamespace(_layer_idx=0, name="steerlab-probe")
    k = v = torch.zeros(1, 1, 1, 1)
    method(probe, k, v, **{keyword: cache})
    return cache.updated


def ensure_bridge_reads_cache() -> bool:
    """Make the bridge's attention update a KV cache passed as ``cache`` (transformers ≥ 5.24).

    Idempotent and cheap after the first call; :func:`steerlab.load_model` and
    :func:`steerlab.generation.generate` call it. Returns True when the shim is in place, False
    when the
    installed TransformerLens needs none (it reads ``cache`` already) or when
    ``STEERLAB_KV_CACHE_SHIM=0`` turns it off (which also undoes it: to reproduce the breakage,
    or to see whether a new TransformerLens still needs it).
    """
    # deferred: transformer_lens
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache
    shimmed = getattr(original, _SHIM_FLAG, False)
    if os.environ.get(SHIM_ENV, "1") == "0":
        if shimmed:
            AttentionBridge._update_kv_cache = original.__wrapped__
        return False
    if shimmed:
        return True
    if _bridge_reads(original, "cache"):
        return False

    @functools.wraps(original)
    def _update_kv_cache(self: Any, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    setattr(_update_kv_cache, _SHIM_FLAG, True)
    AttentionBridge._update_kv_cache = _update_kv_cache
    log.debug("TransformerLens attention now reads the KV cache passed as `cache`")
    return True


@functools.cache
def _forward_takes_cache(forward_type: type) -> bool:
    return "cache" in inspect.signature(forward_type.forward).parameters


def cache_keyword(hf_model: torch.nn.Module) -> str:
    """The keyword ``hf_model.forward`` takes its KV cache under (``cache`` since 5.24)."""
    return "cache" if _forward_takes_cache(type(hf_model)) else "past_key_values"


def output_cache(result: Any) -> Any:
    """The KV cache of a model output, under whichever name the installed transformers uses."""
    cache = result.get("cache") if hasattr(result, "get") else None
    return cache if cache is not None else result.past_key_values


@torch.inference_mode()
def kv_cache_filled(model: Any, prompt: list[int]) -> bool:
    """Whether a prefill of ``prompt`` through the bridge's HF model fills its KV cache.

    The check that failed under transformers 5.24 with TransformerLens 4.3: the cache came back
    empty (``get_seq_length() == 0``).
    """
    hf = model.original_model
    device = next(hf.parameters()).device
    result = hf(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    cache = output_cache(result)
    return cache is not None and int(cache.get_seq_length()) == len(prompt)
