"""``Choice``: the base of steerlab's named options (hook points, positions, fitting methods).

A choice is a ``str`` enum, so YAML, JSON and command-line values are plain strings
(``"resid_post"``), ``str()`` of a member is its value, and :meth:`Choice.parse` turns a bad
value into one clear line naming the field and the allowed values.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from steerlab.base.errors import SteerlabError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A named option whose members compare equal to their string values."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls: type[C], value: object, *, field: str, source: str | None = None) -> C:
        """The member named ``value`` (a member passes through); otherwise raise one line."""
        try:
            return cls(value)
        except ValueError:
            raise SteerlabError(f"got {value!r}; expected one of {[m.value for m in cls]}",
                                source=source, field=field) from None
