"""Residual-stream scale: the typical norm of each layer's residual on neutral prompts.

Steering strengths in *norm units* are fractions of this norm (``alpha = 0.1`` adds a tenth
of a typical residual), so one range of strengths means the same push for every vector, layer
and model. The norm is the median over token positions of ``||resid_post||`` on the built-in
neutral prompts, chat-formatted; the first position of each row is left out, because many
models park a huge "attention sink" activation there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import torch

from steerlab.model.hooks import HookPoint, check_layers, layer_hooks
from steerlab.model.inputs import left_pad, position_ids
from steerlab.model.state import state
from steerlab.model.templates import encode_chat
from steerlab.steering.vector import SteeringVector

__all__ = ["neutral_prompts", "residual_norms", "vector_norms"]

log = logging.getLogger(__name__)


def neutral_prompts(n: int = 16) -> list[str]:
    """The first ``n`` built-in neutral prompts (``steerlab/builtin/data/prompts.json``)."""
    data = json.loads((files("steerlab.builtin") / "data" / "prompts.json").read_text("utf-8"))
    return [str(p) for p in data[:n]]


@torch.inference_mode()
def residual_norms(model: Any, layers: Sequence[int] | None = None,
                   prompts: Sequence[str] | None = None, *,
                   point: HookPoint = HookPoint.RESID_POST) -> dict[int, float]:
    """``{layer: median residual norm}`` over the tokens of chat-formatted neutral prompts.

    The default measurement (built-in prompts, ``resid_post``) is made once per model and
    layer and kept beside the model (:func:`steerlab.model.state.state`), so norm-unit
    strengths cost one forward pass per model, and a server measures before it serves.

    Args:
        model: a bridge.
        layers: decoder layers (default all).
        prompts: user messages (default :func:`neutral_prompts`).
        point: where in the layer the residual is read.

    Examples:
        >>> norms = residual_norms(model, [8, 16])
        >>> list(norms), norms[8] < norms[16]  # the residual grows with depth
        ([8, 16], True)
    """
    chosen = check_layers(model, list(range(model.cfg.n_layers) if layers is None else layers))
    if prompts is None and point is HookPoint.RESID_POST:
        kept = state(model).norms
        todo = [layer for layer in chosen if layer not in kept]
        if todo:
            kept.update(_measure(model, todo, neutral_prompts(), point))
        return {layer: kept[layer] for layer in chosen}
    return _measure(model, chosen, prompts, point)


def _measure(model: Any, chosen: list[int], prompts: Sequence[str],
             point: HookPoint) -> dict[int, float]:
    texts = list(prompts)
    rows = [encode_chat(model.tokenizer, t) for t in texts]
    hf = model.original_model
    device = next(hf.parameters()).device
    ids, mask = left_pad(rows, model.tokenizer.pad_token_id or 0, device)
    first = mask.float().argmax(dim=1)  # each row's first real token
    keep = mask.bool().clone()
    keep[torch.arange(len(rows), device=device), first] = False
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def fn(h: torch.Tensor) -> None:
            seen[layer] = h.float().norm(dim=-1)[keep.to(h.device)].cpu()
        return fn

    with layer_hooks(model, {layer: record(layer) for layer in chosen}, point):
        hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
           logits_to_keep=1)
    return {layer: float(seen[layer].median()) for layer in chosen}


def vector_norms(model: Any, vector: SteeringVector, layers: Sequence[int]) -> dict[int, float]:
    """Each layer's typical residual norm: stored with the vector, else measured once
    (:func:`residual_norms`): the unit of norm-unit strengths and bounds."""
    known = {x: vector.resid_norm(x) for x in layers}
    missing = [x for x, n in known.items() if n is None]
    if missing:
        log.info("the vector has no residual norms for layers %s; measuring them", missing)
        known.update(residual_norms(model, missing))
    return known  # type: ignore[return-value]
