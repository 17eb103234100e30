"""Reply activations of an inference run: the mean residual stream over each generated reply.

After a batch is generated, :func:`capture_replies` runs one teacher-forced forward of prompt
+ reply per row (left-padded, the HF model under the bridge, hooks through
:func:`steerlab.model.hooks.layer_hooks` at ``resid_post`` = HF ``hidden_states[L + 1]``) and
averages the residual over the reply's token positions, per layer, three ways: ``reply`` (all
its tokens), ``thinking`` (the tokens up to and including ``</think>``; NaN without one) and
``output`` (the tokens after ``</think>``, all of them without one; NaN when empty). A reply's
tokens are those the run records (``n_tokens``, the tokens of ``per_token.h5``): the stop token
that ended it is not one, as generation never ran the model on it.

The forward runs inside whatever the caller's context holds, so a steering in force with
``positions="all"`` steers it as it steered the generation; a steering limited to generated
or output tokens steers nothing outside generation, and is refused by
:func:`check_capture_steering` rather than captured unsteered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from steerlab.base.errors import SteerlabError
from steerlab.generation.budget import batch_memory, free_memory, rows_per_batch
from steerlab.generation.metrics import split_sections
from steerlab.inference.results import SECTIONS
from steerlab.model.hooks import HookPoint, layer_hooks
from steerlab.model.inputs import left_pad, position_ids
from steerlab.steering.intervention import Positions
from steerlab.steering.step_state import steerings_in_force

log = logging.getLogger(__name__)


def section_spans(tokens: Sequence[int], marker: Sequence[int]) -> dict[str, tuple[int, int]]:
    """``(start, end)`` in the reply of each section: ``reply`` (all), ``thinking`` (up to and
    including the first ``</think>``; empty without one) and ``output`` (after it; all without).

    Examples:
        >>> section_spans([5, 6, 7, 8], [7])
        {'reply': (0, 4), 'thinking': (0, 3), 'output': (3, 4)}
    """
    sec = split_sections(tokens, marker)
    n = sec.n_tokens
    if sec.think_end_position is None:
        return {"reply": (0, n), "thinking": (0, 0), "output": (0, n)}
    end = min(sec.think_end_position + sec.marker_length, n)
    return {"reply": (0, n), "thinking": (0, end), "output": (end, n)}


def check_capture_steering(model: Any) -> None:
    """Refuse a capture under a steering that a plain forward would not apply as generation
    did (``positions`` ``generated`` or ``output``: they steer only inside generation)."""
    for s in steerings_in_force(model):
        if s.positions is not Positions.ALL:
            raise SteerlabError(
                f"a steering with positions={s.positions.value!r} is in force; the capture "
                "forward would run unsteered, unlike the generation. Steer with "
                "positions='all' or capture without steering", field="capture_layers")


class _Stop(Exception):
    """Raised by the last needed hook to end the forward pass early."""


@torch.inference_mode()
def capture_replies(
    model: Any,
    prompts: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
    layers: Sequence[int],
    marker: Sequence[int],
    *,
    available_memory: int | None = None,
) -> dict[str, np.ndarray]:
    """Mean ``resid_post`` over each reply's sections, at ``layers``, by a teacher-forced forward.

    Args:
        model: a bridge (its HF model runs; hooks sit on the shared decoder layers).
        prompts: each row's prompt ids, as generated from.
        replies: each row's generated ids (stop token excluded).
        layers: decoder layers (validated, non-negative).
        marker: the ``</think>`` ids (:func:`steerlab.model.templates.think_end_marker`).
        available_memory: bytes a forward may plan with (default: free now); a batch that does
            not fit runs in parts.

    Returns:
        ``{"reply", "thinking", "output"}``, each ``[batch, len(layers), d_model]`` float32;
        a row whose section is empty is NaN.

    Examples:
        >>> acts = capture_replies(model, [prompt_ids], [reply_ids], [8, 12], marker)
        >>> acts["reply"].shape
        (1, 2, 576)
    """
    n, width = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, replies, strict=True))
    size = rows_per_batch(lambda rows: batch_memory(model, rows, width).total, n,
                          free_memory(model) if available_memory is None else available_memory,
                          what=f"a {width}-token capture forward")
    parts = [_capture_rows(model, prompts[i : i + size], replies[i : i + size], layers, marker)
             for i in range(0, n, size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in SECTIONS}


def _weights(replies: Sequence[Sequence[int]],
             marker: Sequence[int], width: int, device: torch.device
             ) -> Float[torch.Tensor, "section batch pos"]:
    """Per section and row, 1 at the padded positions of the section's tokens."""
    w = torch.zeros(len(SECTIONS), len(replies), width)
    for row, r in enumerate(replies):
        start = width - len(r)  # left-padded: the reply ends the row
        for s, (lo, hi) in enumerate(section_spans(r, marker).values()):
            w[s, row, start + lo : start + hi] = 1.0
    return w.to(device)


def _capture_rows(model: Any, prompts: Sequence[Sequence[int]],
                  replies: Sequence[Sequence[int]], layers: Sequence[int],
                  marker: Sequence[int]) -> dict[str, np.ndarray]:
    """One forward of :func:`capture_replies`."""
    hf = model.original_model
    device = next(hf.parameters()).device
    pad = model.tokenizer.pad_token_id or 0
    ids, mask = left_pad([[*p, *r] for p, r in zip(prompts, replies, strict=True)], pad, device)
    w = _weights(replies, marker, ids.shape[1], device)
    count = w.sum(-1, keepdim=True)  # 0 for an empty section: 0 / 0 gives its NaN row
    means: dict[int, torch.Tensor] = {}
    last = max(layers)

    def reader(layer: int) -> Callable[[torch.Tensor], None]:
        def fn(h: torch.Tensor) -> None:
            means[layer] = torch.einsum("sbp,bpd->sbd", w, h.float()) / count
            if layer == last:
                raise _Stop

        return fn

    try:
        with layer_hooks(model, {x: reader(x) for x in sorted(set(layers))},
                         HookPoint.RESID_POST):
            hf(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
               use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    out = torch.stack([means[x] for x in layers], dim=2).cpu().numpy().astype(np.float32)
    return dict(zip(SECTIONS, out, strict=True))
