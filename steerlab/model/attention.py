"""The attention kernel a model runs.

``auto`` (the default everywhere) loads with the kernel HF picks for the architecture: ``sdpa``
where the model class supports it, else ``eager`` (Gemma-2, GPT-OSS). Either way steerlab then
runs HF's own attention modules (:func:`use_hf_mixers`), which keep each architecture's
details (soft-capping, attention sinks, sliding windows) and take the static engine's cache.
Only an explicit ``eager`` keeps the bridge's re-implementation of attention, whose pattern
and score hooks (``hook_pattern``, ``hook_z``) fire. An explicit kernel the architecture cannot
run is one error line naming the kernels it can.
"""

from __future__ import annotations

import logging
from typing import Any

from steerlab.base.errors import SteerlabError
from steerlab.model.state import state

log = logging.getLogger(__name__)

AUTO = "auto"
KERNELS = (AUTO, "sdpa", "eager", "flash_attention_2", "flash_attention_3")


def hf_request(kernel: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``kernel`` (``auto``: none, so HF picks)."""
    return {} if kernel == AUTO else {"attn_implementation": kernel}


def supported_kernels(hf_class: Any) -> list[str]:
    """The kernels an HF model class declares it can run, eager first.

    Examples:
        >>> from transformers import LlamaForCausalLM
        >>> supported_kernels(LlamaForCausalLM)[:2]
        ['eager', 'sdpa']
    """
    out = ["eager"]
    if getattr(hf_class, "_supports_sdpa", False):
        out.append("sdpa")
    if getattr(hf_class, "_supports_flash_attn", False):
        out += ["flash_attention_2", "flash_attention_3"]
    return out


def kernel_error(model_id: str, kernel: str, err: Exception, hf_class: Any) -> SteerlabError:
    """The one line for an explicit ``kernel`` the architecture cannot run."""
    name = getattr(hf_class, "__name__", "this architecture")
    can = ", ".join(supported_kernels(hf_class)) if hf_class is not None else "eager"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return SteerlabError(f"{model_id} ({name}) cannot use {kernel!r} attention ({first[:160]}); "
                         f"it can use: auto, {can}", field="attn_implementation")


def use_hf_mixers(hf_model: Any, kernel: str, *, attention: bool = True) -> None:
    """Run HF's own token mixers in place of the bridge's: attention with ``kernel`` (unless
    ``attention`` is False) and always the linear-attention and state-space mixers.

    The bridge swaps every attention module for a re-implementation in eager math (so that
    its pattern and score hooks fire) and sets the config to eager; this puts the HF modules
    back and sets ``kernel``. steerlab's hooks are on the residual stream (decoder layers,
    ``hook_resid_mid`` after attention), which still fire; the bridge's attention hooks fire
    only with an explicit ``eager``. Logits, activations and metrics agree with the bridge's
    attention within float tolerance (tests check this) while the scores are never
    materialised (sdpa) and the KV cache is HF's own. The bridge's linear-attention and
    state-space wrappers (Qwen3-Next's gated delta net) lose the state a cache carries
    between steps, so HF's run there whatever the kernel.
    """
    # deferred: transformer_lens
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.ssm_protocol import (
        SSMStateHookMixin,  # deferred: transformer_lens
    )

    swap: tuple[type, ...] = (SSMStateHookMixin,)
    if attention:
        try:
            hf_model.set_attn_implementation(kernel)
        except (ValueError, ImportError) as err:
            raise kernel_error(type(hf_model).__name__, kernel, err, type(hf_model)) from None
        swap = (AttentionBridge, SSMStateHookMixin)
        state(hf_model).hf_attention = True
    for module in list(hf_model.modules()):
        for name, child in list(module.named_children()):
            original = getattr(child, "original_component", None)
            if isinstance(child, swap) and original is not None:
                setattr(module, name, original)


def hf_attention(model: Any) -> bool:
    """Whether ``model`` runs HF's attention modules (any kernel), not the bridge's eager
    re-implementation: what the static engine needs (they accept its cache and 4-D mask).
    True once :func:`use_hf_mixers` put them back, or while the config names a kernel other
    than eager (the bridge sets eager when it installs its own).

    Examples:
        >>> hf_attention(model)  # loaded with the default kernel
        True
    """
    return bool(state(model.original_model).hf_attention) or kernel(model) != "eager"


def kernel(model: Any) -> str:
    """The attention kernel ``model`` runs: ``sdpa``, ``eager`` (HF's modules or the bridge's),
    a flash kernel."""
    return str(getattr(model.original_model.config, "_attn_implementation", None) or "eager")
