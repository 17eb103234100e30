"""Parsing of the CLI's list-valued text (``--layers 10,12``, ``--strengths 0.5,1``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from steerlab.errors import SteerlabError

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
