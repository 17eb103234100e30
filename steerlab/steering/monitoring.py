"""Projection monitoring: each step's projection of the residual on a vector, per layer."""

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
    """Projections of the last position's residual on the vector, one entry per forward pass.

    In :func:`steerlab.generation.generator.generate` the first entry is the prompt's last token and
    the
    following ones are the generated tokens; rows that have finished are NaN.
    """

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self._steps: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self.state: StepState | None = None

    def on_step(self, state: StepState | None) -> None:
        self.state = state

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

    Examples:
        >>> ids = [sl.encode_chat(model.tokenizer, "Hello!")]
        >>> with sl.steer(model, vec, 4.0), sl.monitor(model, vec, layers=[10]) as mon:
        ...     replies = sl.generate(model, ids, max_new_tokens=4)
        >>> mon.trace(10).shape  # [batch, steps]: the prompt, then each new token but the last
        torch.Size([1, 4])
    """
    layers = check_layers(model, list(vector.layers if layers is None else layers))
    mon = ProjectionMonitor(layers)
    vec = vector.normalise() if normalise else vector

    def hook_for(layer: int) -> Callable[[torch.Tensor], None]:
        direction = vec.direction(layer)

        def record(h: torch.Tensor) -> None:
            p = h[:, -1].float() @ direction.to(h.device, torch.float32)
            state = mon.state
            if state is not None and not state.prefill:
                p = torch.where(state.generated.to(p.device), p, torch.nan)
            mon._steps[layer].append(p.detach().cpu())

        return record

    with listen(model, mon), layer_hooks(model, {layer: hook_for(layer) for layer in layers}):
        yield mon
