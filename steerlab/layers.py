"""Access to a bridge's decoder layers for plain torch hooks (the fast path)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from steerlab.errors import SteerlabError


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder-layer modules of a bridge, shared by the bridge and its HF model.

    A torch forward hook on layer ``L`` sees ``resid_post`` of that layer, whether the forward
    runs through the bridge or through ``model.original_model`` (HF ``generate``).
    """
    return list(model.blocks)


def check_layers(model: Any, layers: Sequence[int], *, field: str = "layers") -> list[int]:
    """Validate layer indices (negative ones count from the end) and return them normalised."""
    n = model.cfg.n_layers
    out = []
    for layer in layers:
        if not isinstance(layer, int) or not -n <= layer < n:
            raise SteerlabError(
                f"layer {layer!r} is out of range; the model has layers 0..{n - 1}", field=field
            )
        out.append(layer % n)
    return out


def hidden_of(output: Any) -> torch.Tensor:
    """The residual tensor inside a decoder layer's output (a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's output with its residual tensor replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def layer_hooks(
    model: Any, hooks: dict[int, Callable[[torch.nn.Module, Any, Any], Any]]
) -> Iterator[None]:
    """Register torch forward hooks on decoder layers; always removed on exit."""
    blocks = decoder_layers(model)
    handles = []
    try:
        for layer, fn in hooks.items():
            handles.append(blocks[layer].register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()
