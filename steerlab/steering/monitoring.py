"""Projection monitoring: each step's projection of the residual on a vector, per layer, before
and after the interventions in force."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float

from steerlab.base.errors import SteerlabError
from steerlab.model.hooks import check_layers, layer_hooks
from steerlab.steering.step_state import StepState, listen
from steerlab.steering.vector import SteeringVector


class ProjectionMonitor:
    """Projections of the last position's residual on the vector, one entry per forward pass,
    read twice at each layer: before every intervention (steering, ablation, capping; and any
    other hook) and after all of them, so a user sees what an intervention did (that a cap
    held, that an ablation zeroed the projection).

    In :func:`steerlab.generation.generator.generate` the first entry is the prompt's last token
    and the following ones are the generated tokens; rows that have finished are NaN.
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self._steps: dict[tuple[int, bool], list[torch.Tensor]] = {
            (layer, before): [] for layer in self.layers for before in (False, True)}
        self.state: StepState | None = None

    def on_step(self, state: StepState | None) -> None:
        self.state = state

    def trace(self, layer: int, *, before: bool = False) -> Float[torch.Tensor, "batch step"]:
        """``[batch, step]`` projections at a layer: after the interventions (the residual the
        next layer reads), or ``before`` them (the layer's own output)."""
        if layer not in self.layers:
            raise SteerlabError(f"layer {layer} is not monitored; {self.layers} are",
                                field="layer")
        steps = self._steps[layer, bool(before)]
        return torch.stack(steps, dim=1) if steps else torch.empty(0, 0)


@contextmanager
def monitor(model: Any, vector: SteeringVector, *, layers: Sequence[int] | None = None,
            normalise: bool = True) -> Iterator[ProjectionMonitor]:
    """Record each forward pass's last-position projection on ``vector`` (unit by default).

    Each layer is read before and after every intervention in force (whichever context was
    entered first): ``mon.trace(L)`` is the residual the next layer reads, ``mon.trace(L,
    before=True)`` the layer's output before steering, ablation or capping touched it.

    Examples:
        >>> ids = [sl.encode_chat(model.tokenizer, "Hello!")]
        >>> with sl.steer(model, vec, 4.0), sl.monitor(model, vec, layers=[10]) as mon:
        ...     replies = sl.generate(model, ids, max_new_tokens=4)
        >>> mon.trace(10).shape  # [batch, steps]: the prompt, then each new token but the last
        torch.Size([1, 4])
        >>> bool((mon.trace(10) > mon.trace(10, before=True)).all())  # steering pushed it up
        True
    """
    layers = check_layers(model, list(vector.layers if layers is None else layers))
    mon = ProjectionMonitor(layers)
    vec = vector.normalise() if normalise else vector

    def hook_for(layer: int, before: bool) -> Callable[[torch.Tensor], None]:
        direction = vec.direction(layer)

        def record(h: torch.Tensor) -> None:
            p = h[:, -1].float() @ direction.to(h.device, torch.float32)
            state = mon.state
            if state is not None and not state.prefill:
                p = torch.where(state.generated.to(p.device), p, torch.nan)
            mon._steps[layer, before].append(p.detach().cpu())

        return record

    with listen(model, mon), \
            layer_hooks(model, {x: hook_for(x, True) for x in layers}, observe="before"), \
            layer_hooks(model, {x: hook_for(x, False) for x in layers}, observe="after"):
        yield mon
