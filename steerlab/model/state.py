"""What steerlab keeps about a model between calls, in one registry beside the model.

The static engine's workspaces (:mod:`steerlab.generation.engine`), the step listeners, the
steerings in
force and whether a generation is under way (:mod:`steerlab.steering.step_state`) live in one
:class:`ModelState` per model, which :func:`state` finds. The registry holds the model weakly
(the state goes when the model does) and never touches the model object itself: steerlab
neither wraps nor mutates the user's model.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class ModelState:
    """steerlab's state of one model.

    ``workspaces``: the static engine's :class:`steerlab.generation.cache.Workspace` per bucket
    ``(slots, capacity)``, least recently used first; ``listeners``: the
    :class:`steerlab.steering.step_state.StepListener` told each step; ``steerings``: the
    :class:`steerlab.steering.intervention.Steering` applied now, outermost first; ``generating``:
    whether a
    generation is under way.
    """

    workspaces: OrderedDict[tuple[int, int], Any] = field(default_factory=OrderedDict)
    listeners: list[Any] = field(default_factory=list)
    steerings: list[Any] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)  # residual norms per layer, measured once
    generating: bool = False
    hf_attention: bool = False  # HF's attention modules put back in place of the bridge's


_STATES: weakref.WeakKeyDictionary[Any, ModelState] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # two threads asking first get the same state


def state(model: Any) -> ModelState:
    """The state of ``model``, created empty on first use (the same object every call).

    Args:
        model: a bridge from :func:`steerlab.load_model` (any object that takes a weak
            reference and hashes by identity).

    Examples:
        >>> state(model).generating
        False
    """
    found = _STATES.get(model)
    if found is None:
        with _LOCK:
            found = _STATES.setdefault(model, ModelState())
    return found
