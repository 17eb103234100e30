"""Progress bars for long loops: rich, the one progress library; ``enabled=False`` shows none."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bar:
    """A running bar: :meth:`update` advances it by ``n`` steps."""

    progress: Any
    task: Any

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.progress.advance(self.task, n)


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True,
                 completed: int = 0) -> Iterator[Bar]:
    """A rich bar over ``total`` steps (``completed`` already done), closed on exit.

    Example:
        >>> with progress_bar(len(items), "judge") as bar:
        ...     for item in items:
        ...         bar.update()
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not enabled) as progress:
        yield Bar(progress, progress.add_task(description, total=total, completed=completed))
