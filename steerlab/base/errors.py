"""The one exception type for bad user input."""

from __future__ import annotations


class SteerlabError(ValueError):
    """Bad user input: a message naming the file, the field and what was expected.

    The CLI turns it into a one-line error and exit code 2.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.message = message
        self.source = source
        self.field = field
        where = ", ".join(
            part for part in (source, f"field {field!r}" if field else None) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
