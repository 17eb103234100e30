"""What interventions are told while a model generates: the step state (:class:`StepState`,
:func:`listen`), the steerings in force, and whether a generation is under way.

Kept in the model's :class:`steerlab.model.state.ModelState`, so that
:mod:`steerlab.steering.intervention`
(which registers) and :mod:`steerlab.generation.decode` (which generates) share them without
importing
each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Bool

from steerlab.model.state import state


@dataclass(frozen=True)
class StepState:
    """What interventions may need to know about the forward pass under way.

    ``prefill`` is True for the prompt pass; ``generated`` marks rows still generating;
    ``in_output`` marks rows whose new positions are in the output section (after
    ``</think>``, or always when the model is not thinking).
    """

    prefill: bool
    generated: Bool[torch.Tensor, " batch"]
    in_output: Bool[torch.Tensor, " batch"]


@runtime_checkable
class StepListener(Protocol):
    """Told the state of each forward pass generation runs (``None``: not generating).

    Interventions that act on some positions only (monitoring) register with :func:`listen`
    and are told before every forward pass."""

    def on_step(self, state: StepState | None) -> None: ...


def listeners(model: Any) -> list[StepListener]:
    """The step listeners registered on ``model``."""
    return state(model).listeners


@contextmanager
def listen(model: Any, listener: StepListener) -> Iterator[StepListener]:
    """Tell ``listener`` the step state of every generation on ``model`` inside."""
    registered = listeners(model)
    registered.append(listener)
    listener.on_step(None)
    try:
        yield listener
    finally:
        registered.remove(listener)


def announce(model: Any, state: StepState | None) -> None:
    """Tell the registered listeners the state of the next forward pass."""
    for listener in listeners(model):
        listener.on_step(state)


def in_force(model: Any) -> list[Any]:
    """The steerings applied on ``model`` now (``Steering.apply`` adds and removes itself),
    outermost first. Generation reads them and adds them itself (per row, from tensors a
    CUDA graph can replay), so their hooks stand aside while it runs (:func:`generating`)."""
    return state(model).steerings


def steerings_in_force(model: Any) -> list[Any]:
    """A copy of :func:`in_force`: the steerings generation adds."""
    return list(in_force(model))


def is_generating(model: Any) -> bool:
    """Whether a generation is under way on ``model`` (see :func:`generating`)."""
    return state(model).generating


@contextmanager
def generating(model: Any) -> Iterator[None]:
    """Mark a generation under way: the hooks of ``Steering.apply`` add nothing inside
    (the generation adds the same steering from its own buffers)."""
    kept = state(model)
    kept.generating = True
    try:
        yield
    finally:
        kept.generating = False
