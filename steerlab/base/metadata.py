"""Checks of the metadata stored beside data: vector sidecars and activation-file attributes.

Built on :mod:`steerlab.base.checks` and refusing the same way (one :class:`SteerlabError` line
naming the file, the field, the value and the expectation), so a corrupt or hand-edited file
is refused like a bad flag, before a model loads:

* :func:`layer_list`: distinct non-negative layer indices, below the model's layer count when
  it is known (else below :data:`MAX_LAYERS`).
* :func:`layer_values`: ``{layer: finite positive number}`` keyed by layers as strings (the
  residual norms stored with vectors and activation files).
* :func:`strict_json`: parse JSON refusing ``NaN`` and infinities, which Python's ``json``
  reads and writes by default although JSON has no such values.
* :func:`json_object`: a dict that can be written as strict JSON in UTF-8.
"""

from __future__ import annotations

import json
import math
from numbers import Integral
from typing import Any

from steerlab.base.checks import integer, number
from steerlab.base.errors import SteerlabError

__all__ = ["MAX_LAYERS", "json_object", "layer_list", "layer_values", "strict_json"]

# no model has this many decoder layers: a larger index in a file whose model's layer count
# is unknown is corruption (and would not fit the int64 and uint32 fields it is written to)
MAX_LAYERS = 1 << 16


def layer_list(value: Any, field: str = "layers", *, n_layers: int | None = None,
               source: str | None = None) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of distinct layer indices in ``[0, n_layers)`` (a list,
    tuple or range of ints; numpy ints pass, bools do not).

    Args:
        value: the layers as read from a file.
        field: the field that holds them.
        n_layers: the model's layer count, when known (0 or None: only :data:`MAX_LAYERS`).
        source: the file, for the message.

    Examples:
        >>> layer_list([4, 7], n_layers=30)
        (4, 7)
    """
    if not isinstance(value, (list, tuple, range)):
        raise SteerlabError(f"got {value!r:.60}; expected a list of layer indices",
                            source=source, field=field)
    if not value:
        raise SteerlabError("is empty; expected at least one layer", source=source, field=field)
    hint = (f"(the model has {n_layers} layers, counted from 0)" if n_layers else
            "(layers count from 0)")
    out = tuple(integer(int(x) if isinstance(x, Integral) and not isinstance(x, bool) else x,
                        field, lo=0, hi=(n_layers or MAX_LAYERS) - 1, source=source, hint=hint)
                for x in value)
    seen: set[int] = set()
    for layer in out:
        if layer in seen:
            raise SteerlabError(f"repeats layer {layer} in {list(out)}; expected distinct "
                                "layers", source=source, field=field)
        seen.add(layer)
    return out


def layer_values(value: Any, field: str, *, layers: tuple[int, ...] | None = None,
                 source: str | None = None) -> dict[str, float]:
    """``value`` as ``{layer: finite number > 0}``, keyed by layer indices written as decimal
    strings (JSON object keys), each one of ``layers`` when given.

    Examples:
        >>> layer_values({"4": 12.5}, "resid_norms", layers=(4, 7))
        {'4': 12.5}
    """
    if not isinstance(value, dict):
        raise SteerlabError(f"got {value!r:.60}; expected an object {{layer: number}}",
                            source=source, field=field)
    names = None if layers is None else [str(x) for x in layers]
    out = {}
    for key, v in value.items():
        if names is not None:
            ok, want = key in names, f"one of the layers {names}"
        else:
            ok = isinstance(key, str) and key.isdecimal() and key == str(int(key))
            want = "a layer index as a string, such as '4'"
        if not ok:
            raise SteerlabError(f"has key {key!r:.40}; expected {want}", source=source,
                                field=field)
        out[key] = number(v, f"{field}.{key}", lo=0, lo_open=True, source=source)
    return out


def strict_json(text: str, *, source: str | None = None, field: str | None = None,
                what: str = "JSON") -> Any:
    """Parse ``text`` as JSON, refusing ``NaN``, ``Infinity`` and numbers beyond the float
    range (``1e999``), which Python's ``json`` reads as non-finite floats; the refusal names
    where the number is (``field 'resid_norms.4'``).

    Examples:
        >>> strict_json('{"layers": [4]}')
        {'layers': [4]}
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SteerlabError(f"not valid JSON ({err}); expected {what}", source=source,
                            field=field) from None
    except (ValueError, RecursionError) as err:  # an integer of > 4300 digits; deep nesting
        raise SteerlabError(f"cannot be read ({type(err).__name__}: {str(err):.80}); "
                            f"expected {what}", source=source, field=field) from None
    stack: list[tuple[str | None, Any]] = [(field, data)]
    while stack:  # depth first, without recursion (the nesting may be deep)
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise SteerlabError(f"got {value}; expected a finite number (JSON has no NaN or "
                                "infinity)", source=source, field=where)
        if isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else k, v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{where or ''}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
    return data


def json_object(value: Any, field: str, *, source: str | None = None) -> dict[str, Any]:
    """``value`` as a dict that can be written as strict JSON in UTF-8: finite numbers,
    string keys (or ints), text with no lone surrogate, nothing circular.

    Examples:
        >>> json_object({"devices": ["cpu"]}, "capture")
        {'devices': ['cpu']}
    """
    if not isinstance(value, dict):
        raise SteerlabError(f"got {value!r:.60}; expected a JSON object", source=source,
                            field=field)
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as err:
        raise SteerlabError(f"cannot be written as strict JSON ({str(err):.80}); expected an "
                            "object of finite numbers, text, lists and objects",
                            source=source, field=field) from None
    return value
