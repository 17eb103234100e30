"""Logit lens: the model's final norm and unembedding applied to every layer's ``resid_post``.

The lens at the last layer is exactly the model's own next-token distribution. Lens logits are
never materialised for all layers at once: rows (layer x position) are pushed through the
unembedding in chunks of at most ``max_elements`` logits, so a 150k vocabulary x 36 layers
x a batch of 256 fits in a few hundred MB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int

from steerlab.generation.metrics import token_metrics
from steerlab.model.hooks import layer_hooks

DEFAULT_MAX_ELEMENTS = 2**25  # logits per chunk: 128 MB in float32


def lens_logits(
    model: Any, resid: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... d_vocab"]:
    """``unembed(ln_final(resid))`` with the model's own modules, then the scaling the
    architecture applies to its logits (:func:`output_scaling`), so that the lens at the last
    layer is the model's own output.

    Examples:
        >>> lens_logits(model, resid_post[-1]) == model(ids)  # at the last layer
    """
    return output_scaling(model, model.unembed(model.ln_final(resid)))


def output_scaling(model: Any, logits: torch.Tensor) -> torch.Tensor:
    """What an architecture's causal-LM head does to ``lm_head``'s output, read from its
    config: Gemma-2's soft-capping (``final_logit_softcapping``), Cohere's ``logit_scale``,
    Granite's ``logits_scaling``; the logits as they are elsewhere.

    Examples:
        >>> output_scaling(model, torch.ones(2)).tolist()  # Llama: nothing
        [1.0, 1.0]
    """
    cfg = model.original_model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divide = getattr(cfg, "logits_scaling", None)
    if isinstance(divide, (int, float)) and divide != 1:
        logits = logits / divide
    cap = getattr(cfg, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap > 0:
        logits = torch.tanh(logits / cap) * cap
    return logits


def lens_metrics(
    model: Any,
    resid: Float[torch.Tensor, "layer batch d_model"],
    k: int,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[Float[torch.Tensor, "layer batch"], Float[torch.Tensor, "layer batch"]]:
    """Entropy and top-k mass of the lens distribution for every (layer, row) residual.

    Args:
        model: the bridge the residuals come from.
        resid: ``resid_post`` per layer and row (e.g. the last position of each row).
        k: top-k for the mass.
        max_elements: most logits computed at once (rows per chunk = this / d_vocab).

    Examples:
        >>> ent, mass = lens_metrics(model, resid, k=5)  # [n_layers, batch] each
    """
    n_layers, batch, d_model = resid.shape
    rows = resid.reshape(n_layers * batch, d_model)
    step = max(1, max_elements // model.cfg.d_vocab)
    ents, masses = [], []
    with torch.inference_mode():
        for start in range(0, rows.shape[0], step):
            ent, mass = token_metrics(lens_logits(model, rows[start : start + step]), k)
            ents.append(ent)
            masses.append(mass)
    return (
        torch.cat(ents).reshape(n_layers, batch),
        torch.cat(masses).reshape(n_layers, batch),
    )


class LastPositionRecorder:
    """Keeps each decoder layer's ``resid_post`` at the last position of the latest forward.

    Use as a context manager around generation; after each forward, :meth:`residuals`
    returns ``[layer, batch, d_model]``. Hooks are removed on exit.
    """

    def __init__(self, model: Any, layers: Sequence[int] | None = None):
        self.model = model
        self.layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
        self._last: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int) -> Any:
        def hook(h: torch.Tensor) -> None:
            self._last[layer] = h[:, -1, :].detach()

        return hook

    @contextmanager
    def recording(self) -> Iterator[LastPositionRecorder]:
        with layer_hooks(self.model, {layer: self._hook(layer) for layer in self.layers},
                         graph_safe=True):
            yield self

    def residuals(self) -> Float[torch.Tensor, "layer batch d_model"]:
        dev = next(self.model.unembed.parameters()).device
        return torch.stack([self._last[layer].to(dev) for layer in self.layers])


@torch.inference_mode()
def logit_lens(
    model: Any, input_ids: Int[torch.Tensor, " pos"], k: int = 5
) -> tuple[Float[torch.Tensor, "layer pos"], Float[torch.Tensor, "layer pos"]]:
    """Lens entropy and top-k mass at every layer and position of one token sequence.

    Examples:
        >>> ent, mass = logit_lens(model, torch.tensor(encode_chat(tok, "Hi")))
        >>> ent.shape  # [n_layers, n_tokens]
    """
    hidden: dict[int, torch.Tensor] = {}

    def grab(layer: int) -> Any:
        return lambda h: hidden.__setitem__(layer, h[0].detach())

    n = model.cfg.n_layers
    hf = model.original_model
    ids = input_ids.reshape(1, -1).to(next(hf.parameters()).device)
    with layer_hooks(model, {layer: grab(layer) for layer in range(n)}):
        hf(input_ids=ids, use_cache=False)
    return lens_metrics(model, torch.stack([hidden[layer] for layer in range(n)]), k)
