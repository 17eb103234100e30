"""The model flags every model-loading command shares, defined once: ``@model_flags``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from steerlab.base.errors import SteerlabError
from steerlab.model.loading import model_geometry
from steerlab.model.options import ModelOptions

_PANEL = "Model"
FLAGS: dict[str, tuple[Any, Any]] = {
    "model": (str, typer.Option(
        help="'embedded', a hub id or a local directory.", rich_help_panel=_PANEL)),
    "device": (str, typer.Option(
        help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps or meta; a device "
        "this machine lacks is an error.", rich_help_panel=_PANEL)),
    "dtype": (str, typer.Option(
        help="Weights dtype: float32, bfloat16 or float16.", rich_help_panel=_PANEL)),
    "device_map": (str | None, typer.Option(
        help="Split over GPUs: auto, balanced, balanced_low_0, sequential or a JSON map "
        "of module -> device.", rich_help_panel=_PANEL)),
    "n_devices": (int, typer.Option(
        help="Split evenly over the first N GPUs (1: no split).", rich_help_panel=_PANEL)),
    "attn_implementation": (str, typer.Option(
        help="Attention kernel: auto (what HF picks for the architecture: sdpa where "
        "supported, else eager), sdpa, flash_attention_2, or eager for TransformerLens "
        "attention hooks.",
        rich_help_panel=_PANEL)),
}
_DEFAULTS = ModelOptions()
ENGINE_HELP = ("Generation engine: eager (growing KV cache, one Python step per token), "
               "static (preallocated cache; the decode step replayed as a CUDA graph on GPUs) "
               "or auto (static on a GPU where `steerlab doctor` checked it, else eager). Same "
               "tokens and metrics either way.")


def check_engine(engine: str) -> str:
    """``--engine`` checked before anything loads (one error line, exit code 2)."""
    from steerlab.generation.engine import Engine

    return Engine.parse(engine, field="engine").value


def model_flags(command: Callable[..., Any] | None = None, *, overrides: bool = False) -> Any:
    """Give a typer command the model flags; it receives them as ``model: ModelOptions``.

    The options are validated (devices against this machine) before the command body runs,
    so a bad ``--device`` is one error line and exit code 2 before anything is read or loaded.
    With ``overrides=True`` (commands whose config file also names the model) the command
    receives ``model`` as a dict of only the flags given on the command line, which override
    the file's keys.
    """
    if command is None:
        return functools.partial(model_flags, overrides=overrides)
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "model"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                               default=None if overrides else getattr(_DEFAULTS, name),
                               annotation=Annotated[kind | None if overrides else kind, option])
             for name, (kind, option) in FLAGS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        flags = {name: kwargs.pop(name) for name in FLAGS}
        if overrides:  # flags left out are None: the config file decides
            given = {name: value for name, value in flags.items() if value is not None}
            ModelOptions(**{**_DEFAULTS.to_dict(), **given}).validate()
            return command(model=given, **kwargs)
        return command(model=ModelOptions(**flags).validate(), **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # typer must read the signature above, not the command's
    return wrapper


def check_vector_file(model: ModelOptions, vector: str, chosen: list[int]) -> Any:
    """Refuse, before the model loads, a vector file of another model (its width or layer
    count) or without a ``chosen`` layer; the vector."""
    from steerlab.steering.vector import SteeringVector  # deferred: torch

    loaded = SteeringVector.load(vector)
    geometry = model_geometry(model.model)
    if geometry:  # a vector of another model is refused before this one loads
        loaded.check_model(geometry["n_layers"], geometry["d_model"], source=vector)
    have = loaded.layers
    for layer in chosen:
        if layer not in have:
            raise SteerlabError(f"got layer {layer}; the vector has layers {list(have)}",
                                source=vector, field="layers")
    return loaded
