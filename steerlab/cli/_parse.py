"""Parsing of the CLI's list-valued text (``--layers 10,12``, ``--strengths 0.5,1``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from steerlab.base.errors import SteerlabError

N = TypeVar("N", int, float)


def number_list(text: str, kind: Callable[[str], N], field: str) -> list[N]:
    """Comma-separated numbers (``""`` gives ``[]``); a bad item raises one line naming
    ``field``."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise SteerlabError(f"got {text!r}; expected comma-separated {what}",
                            field=field) from None


def layer_groups(text: str, field: str = "layers") -> list[tuple[int, ...]]:
    """Comma-separated layers or ``+``-joined groups steered together: ``"12,16,10+12+14"``
    gives ``[(12,), (16,), (10, 12, 14)]`` (``""`` gives ``[]``)."""
    try:
        return [tuple(int(x) for x in item.split("+")) for item in text.split(",")
                if item.strip()]
    except ValueError:
        raise SteerlabError(f"got {text!r}; expected comma-separated layers, a group of layers "
                            "joined by '+' (e.g. 12,16,10+12+14)", field=field) from None
