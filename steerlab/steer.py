"""Steering: add ``alpha * v`` to the residual stream at chosen layers; projection monitoring.

Both are context managers over torch forward hooks on :func:`steerlab.layers.decoder_layers`,
so they act on bridge forwards and on the fast path :func:`steerlab.generate.generate` alike,
and the hooks are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float

from steerlab.errors import SteerlabError
from steerlab.generate import generation_state
from steerlab.layers import check_layers, decoder_layers, hidden_of, replace_hidden
from steerlab.vectors import SteeringVector

# A position rule gives a [batch] row mask for this forward pass, None for "every row and
# position", or False for "nothing in this pass".
PositionRule = Callable[[], "torch.Tensor | None | bool"]


def _all() -> torch.Tensor | None | bool:
    return None


def _generated() -> torch.Tensor | None | bool:
    state = generation_state()
    if state is None or state.prefill:
        return False
    return state.generated


def _output() -> torch.Tensor | None | bool:
    state = generation_state()
    if state is None or state.prefill:
        return False
    return state.generated & state.in_output


POSITIONS: dict[str, PositionRule] = {"all": _all, "generated": _generated, "output": _output}


def _rule(positions: str) -> PositionRule:
    if positions not in POSITIONS:
        raise SteerlabError(f"unknown positions {positions!r}; expected one of "
                            f"{sorted(POSITIONS)}", field="positions")
    return POSITIONS[positions]


@contextmanager
def steer(
    model: Any,
    vector: SteeringVector,
    alpha: float | Float[torch.Tensor, " batch"],
    *,
    layers: Sequence[int] | None = None,
    positions: str = "all",
) -> Iterator[None]:
    """Add ``alpha * vector.direction(L)`` to ``resid_post`` of each layer ``L`` while inside.

    Args:
        model: a bridge (hooks sit on its decoder layers, shared with its HF model).
        vector: the steering vector; its stored scale is the unit of ``alpha``.
        alpha: strength, or one strength per batch row (a ``[batch]`` tensor).
        layers: which of the vector's layers to steer (default all of them).
        positions: ``"all"`` positions of every forward pass; ``"generated"``: only tokens
            produced by :func:`steerlab.generate.generate` (not the prompt); ``"output"``:
            generated tokens after ``</think>`` (all generated ones for non-thinking runs).
            Outside ``generate`` the last two steer nothing.

    Example:
        >>> with steer(model, vector, 4.0, layers=[10]):
        ...     replies = generate(model, prompts, max_new_tokens=40)
    """
    rule = _rule(positions)
    layers = check_layers(model, list(vector.layers if layers is None else layers))
    dirs = {layer: vector.direction(layer) for layer in layers}
    if dirs and next(iter(dirs.values())).shape[-1] != model.cfg.d_model:
        raise SteerlabError(f"vector has d_model {vector.d_model}, the model "
                            f"{model.cfg.d_model}", field="vector")
    per_row = isinstance(alpha, torch.Tensor)
    if per_row and alpha.ndim != 1:
        raise SteerlabError(f"alpha must be a float or a [batch] tensor; got shape "
                            f"{tuple(alpha.shape)}", field="alpha")
    if not per_row and float(alpha) == 0.0:
        yield  # nothing to add: leave the model untouched
        return

    def hook_for(direction: torch.Tensor) -> Callable[..., Any]:
        cache: dict[tuple[Any, Any], torch.Tensor] = {}

        def hook(module: Any, args: Any, output: Any) -> Any:
            rows = rule()
            if rows is False:
                return None
            h = hidden_of(output)
            if per_row and alpha.shape[0] != h.shape[0]:
                raise SteerlabError(f"alpha has {alpha.shape[0]} rows, the batch "
                                    f"{h.shape[0]}", field="alpha")
            key = (h.device, h.dtype)
            if key not in cache:  # alpha * direction once per device/dtype, not per step
                v = direction.to(device=h.device, dtype=h.dtype)
                cache[key] = (alpha.to(device=h.device, dtype=h.dtype)[:, None, None] * v
                              if per_row else float(alpha) * v)
            add = cache[key]
            if rows is not None:
                add = add * rows.to(device=h.device, dtype=h.dtype)[:, None, None]
            return replace_hidden(output, h + add)

        return hook

    blocks = decoder_layers(model)
    handles = []
    try:
        for layer, direction in dirs.items():
            handles.append(blocks[layer].register_forward_hook(hook_for(direction)))
        yield
    finally:
        for h in handles:
            h.remove()


class ProjectionMonitor:
    """Projections of the last position's residual on the vector, one entry per forward pass.

    In :func:`steerlab.generate.generate` the first entry is the prompt's last token and the
    following ones are the generated tokens; rows that have finished are NaN.
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self._steps: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def trace(self, layer: int) -> Float[torch.Tensor, "batch step"]:
        """``[batch, step]`` projections at a layer."""
        if layer not in self._steps:
            raise SteerlabError(f"layer {layer} is not monitored; {self.layers} are",
                                field="layer")
        steps = self._steps[layer]
        return torch.stack(steps, dim=1) if steps else torch.empty(0, 0)


@contextmanager
def monitor(model: Any, vector: SteeringVector, *, layers: Sequence[int] | None = None,
            normalise: bool = True) -> Iterator[ProjectionMonitor]:
    """Record each forward pass's last-position projection on ``vector`` (unit by default).

    Works together with :func:`steer` (hooks added later run later: enter ``steer`` first to
    see the steered residual).

    Example:
        >>> with steer(model, v, 4.0), monitor(model, v, layers=[10]) as mon:
        ...     generate(model, prompts, max_new_tokens=20)
        >>> mon.trace(10).shape  # [batch, steps]
    """
    layers = check_layers(model, list(vector.layers if layers is None else layers))
    mon = ProjectionMonitor(layers)
    vec = vector.normalise() if normalise else vector

    def hook_for(layer: int) -> Callable[..., Any]:
        direction = vec.direction(layer)

        def hook(module: Any, args: Any, output: Any) -> None:
            h = hidden_of(output)[:, -1].float()
            p = h @ direction.to(h)
            state = generation_state()
            if state is not None and not state.prefill:
                p = torch.where(state.generated.to(p.device), p, torch.nan)
            mon._steps[layer].append(p.detach().cpu())

        return hook

    blocks = decoder_layers(model)
    handles = []
    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(hook_for(layer)))
        yield mon
    finally:
        for h in handles:
            h.remove()
