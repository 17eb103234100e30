"""A bridge's decoder layers: index checks and the one hook-registration path."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder-layer modules of a bridge, shared by the bridge and its HF model.

    A torch forward hook on layer ``L`` sees ``resid_post`` of that layer, whether the forward
    runs through the bridge or through ``model.original_model`` (HF ``generate``).
    """
    return list(model.blocks)


def check_layers(model: Any, layers: Sequence[int], *, field: str = "layers") -> list[int]:
    """Validate layer indices against the model (``model.cfg.n_layers``, or an int).

    Indices count from 0; a negative index is refused (it would silently name a layer from
    the end, and files record layer numbers)."""
    n = model if isinstance(model, int) else model.cfg.n_layers
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise SteerlabError(f"got layer {layer!r}; expected 0..{n - 1} (the model has {n} "
                                "layers, counted from 0)", field=field)
        out.append(layer)
    return out


def hidden_of(output: Any) -> torch.Tensor:
    """The residual tensor inside a decoder layer's output (a tensor or a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's output with its residual tensor replaced."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


# A residual hook sees the residual tensor [batch, pos, d_model] at its point and returns a
# replacement, or None to leave it unchanged.
ResidualHook = Callable[[torch.Tensor], "torch.Tensor | None"]


class HookPoint(Choice):
    """Where in a decoder layer a hook reads (and may replace) the residual stream.

    ``resid_post``: the layer's output (= HF ``hidden_states[L + 1]``); ``resid_pre``: its
    input; ``resid_mid``: between attention and MLP (bridges with ``hook_resid_mid`` only).
    """

    RESID_POST = "resid_post"
    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"

    def attach(self, block: torch.nn.Module, fn: ResidualHook, *,
               graph_safe: bool = False, first: bool = False,
               observe: str | None = None) -> Any:
        """Register ``fn`` at this point of ``block``; returns the removable torch handle.

        ``graph_safe`` marks a hook whose work is all tensor operations with no host reads and
        no Python side effects per call, so a captured CUDA graph may replay it. ``first``
        runs it before the hooks already there. ``observe`` (``"before"`` or ``"after"``)
        makes it an observer that reads the residual before or after every other hook, however
        late those are registered (its return value is ignored)."""
        if observe is not None:
            if observe not in OBSERVE:
                raise SteerlabError(f"got {observe!r}; expected one of {OBSERVE}",
                                    field="observe")
            reader = fn

            def fn(h: torch.Tensor) -> None:
                reader(h)

        handle = self._register(block, fn, graph_safe, first)
        hooks = handle.hooks_dict_ref()  # a weak reference to the module's ordered dict
        if hooks is not None:
            if observe is not None:
                hooks[handle.id]._steerlab_observe = observe
            _keep_observers_outside(hooks)
        return handle

    def _register(self, block: torch.nn.Module, fn: ResidualHook, graph_safe: bool,
                  first: bool) -> Any:
        if self is HookPoint.RESID_POST:
            def post(module: Any, args: Any, output: Any) -> Any:
                new = fn(hidden_of(output))
                return None if new is None else replace_hidden(output, new)

            post._steerlab_graph_safe = graph_safe  # type: ignore[attr-defined]
            return block.register_forward_hook(post, prepend=first)
        if self is HookPoint.RESID_PRE:
            def pre(module: Any, args: Any, kwargs: Any) -> Any:
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            pre._steerlab_graph_safe = graph_safe  # type: ignore[attr-defined]
            return block.register_forward_pre_hook(pre, with_kwargs=True, prepend=first)
        point = getattr(block, "hook_resid_mid", None)
        if point is None:
            raise SteerlabError("this model's blocks have no hook_resid_mid", field="hook")

        def mid(module: Any, args: Any, output: Any) -> Any:
            return fn(output)

        mid._steerlab_graph_safe = graph_safe  # type: ignore[attr-defined]
        return point.register_forward_hook(mid, prepend=first)


OBSERVE = ("before", "after")


def _keep_observers_outside(hooks: Any) -> None:
    """Keep a module's ``before`` observers first and its ``after`` observers last (torch runs
    hooks in the order of its ordered dict)."""
    flags = {key: getattr(fn, "_steerlab_observe", None) for key, fn in hooks.items()}
    for key in [k for k, flag in flags.items() if flag == "after"]:
        hooks.move_to_end(key)
    for key in reversed([k for k, flag in flags.items() if flag == "before"]):
        hooks.move_to_end(key, last=False)


def unsafe_hooks(model: Any) -> int:
    """How many hooks on the decoder layers a CUDA graph could not replay: any not registered
    through :func:`layer_hooks` with ``graph_safe=True`` (monitors, users' own torch hooks)."""
    n = 0
    for block in decoder_layers(model):
        modules = [block, *([block.hook_resid_mid] if hasattr(block, "hook_resid_mid") else [])]
        for module in modules:
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                n += sum(not getattr(fn, "_steerlab_graph_safe", False) for fn in hooks.values())
    return n


@contextmanager
def layer_hooks(model: Any, hooks: Mapping[int, ResidualHook],
                point: HookPoint = HookPoint.RESID_POST, *,
                graph_safe: bool = False, first: bool = False,
                observe: str | None = None) -> Iterator[None]:
    """Residual hooks on decoder layers (``{layer: fn}``) while inside; always removed.

    The one way steerlab hooks a model: steering, monitoring, capture and the logit lens all
    register through here, so they act on bridge forwards and on
    :func:`steerlab.generation.generate`.

    Examples:
        >>> seen = {}
        >>> with layer_hooks(model, {10: lambda h: seen.setdefault(10, h.shape)}):
        ...     model.original_model(input_ids=ids)
    """
    blocks = decoder_layers(model)
    handles = []
    try:
        for layer, fn in hooks.items():
            handles.append(point.attach(blocks[layer], fn, graph_safe=graph_safe, first=first,
                                        observe=observe))
        yield
    finally:
        for h in handles:
            h.remove()
