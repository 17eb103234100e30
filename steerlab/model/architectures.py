"""Which architectures steerlab runs, told at load: one line naming the architecture and what
breaks, never a failure deep inside a generation.

Two checks run once the weights are loaded. TransformerLens must have a bridge for the
architecture (:func:`boot_bridge`), and generation through the model's own cache must work and
agree with a full forward (:func:`check_cached_generation`): a prefill of two tokens, one
decode step on its cache, against one forward of the three tokens. Models without a cache
steerlab can carry (Mamba, RWKV, RecurrentGemma in transformers 5) fail the second check, and
so would a bridge component that loses the state a cache carries.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from steerlab.base.compat import cache_keyword, output_cache
from steerlab.base.errors import SteerlabError

log = logging.getLogger(__name__)

# A cached decode step and a full forward differ by summation order only: far below this share
# of the logits' range in any dtype (bf16 keeps ~3 significant digits), while a cache that lost
# its state changes the logits by their own order.
CACHE_AGREEMENT = 0.05


def boot_bridge(model_id: str, hf_model: Any, tokenizer: Any, device: torch.device,
                dtype: torch.dtype) -> Any:
    """``TransformerBridge.boot_transformers`` on a loaded HF model; an architecture the
    bridge does not know is one :class:`SteerlabError` line."""
    from transformer_lens.model_bridge import TransformerBridge  # deferred: transformer_lens

    try:
        return TransformerBridge.boot_transformers(
            model_id, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
    except ValueError as err:
        if "architecture" not in str(err).lower():
            raise
        arch = ", ".join(getattr(hf_model.config, "architectures", None)
                         or [type(hf_model).__name__])
        raise SteerlabError(
            f"{model_id}: TransformerLens has no bridge for the architecture {arch} (model "
            f"type {hf_model.config.model_type!r}), so steerlab cannot hook it; see "
            "docs/models.md for the families steerlab runs", field="model") from None


@torch.inference_mode()
def check_cached_generation(model: Any, model_id: str) -> None:
    """Prefill two tokens, decode one on the returned cache, and compare the logits with a
    full forward of the three tokens (:data:`CACHE_AGREEMENT`); a failure or a disagreement
    is one :class:`SteerlabError` line naming the architecture. Skipped on the meta device.

    Examples:
        >>> check_cached_generation(model, "embedded")  # passes: returns None
    """
    hf = model.original_model
    device = next(hf.parameters()).device
    if device.type == "meta":
        return
    arch = type(hf).__name__
    ids = torch.tensor([_probe_ids(model.tokenizer)], device=device)
    try:
        first = hf(input_ids=ids[:, :2], use_cache=True)
        cache = output_cache(first)
        if cache is None:
            raise AttributeError("the forward returned no cache")
        step = hf(input_ids=ids[:, 2:], use_cache=True, **{cache_keyword(hf): cache})
        full = hf(input_ids=ids, use_cache=False)
    except Exception as err:  # noqa: BLE001 - any failure here is what a generation would hit
        first_line = (str(err).splitlines() or [""])[0][:160]
        raise SteerlabError(f"{model_id}: {arch} cannot generate through its cache in steerlab "
                            f"({type(err).__name__}: {first_line}); not supported",
                            field="model") from None
    got, want = step.logits[0, -1].float(), full.logits[0, -1].float()
    gap = float((got - want).abs().max())
    scale = float(want.max() - want.min()) or 1.0
    if not gap <= CACHE_AGREEMENT * scale:
        raise SteerlabError(f"{model_id}: {arch}'s cached decode step differs from a full "
                            f"forward by {gap:.3g} (logit range {scale:.3g}): its cache loses "
                            "state under the TransformerLens bridge; not supported",
                            field="model")


def _probe_ids(tokenizer: Any) -> list[int]:
    ids = list(tokenizer("The sea is wide", add_special_tokens=False)["input_ids"])[:3]
    return (ids + [0, 1, 2])[:3]
