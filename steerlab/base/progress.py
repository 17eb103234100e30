"""Progress bars for long loops: rich, the one progress library; ``enabled=False`` shows none.

:func:`quiet_hf` makes the bars and logs of transformers and huggingface_hub (e.g. their
"Loading weights" bar) follow the same settings.
"""

from __future__ import annotations

import logging
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

    Examples:
        >>> with progress_bar(len(items), "judge") as bar:
        ...     for item in items:
        ...         bar.update()
    """
    # deferred: rich
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not enabled) as progress:
        yield Bar(progress, progress.add_task(description, total=total, completed=completed))


def quiet_hf(progress: bool, level: int) -> None:
    """Make transformers' and huggingface_hub's progress bars and logs follow steerlab's.

    Without ``progress`` their tqdm bars (weight loading, downloads) are turned off; with it
    they are left as they are. Their loggers are set to ``INFO`` when steerlab logs at
    ``DEBUG`` (``--verbose``) and to ``ERROR`` otherwise, so their info messages and warnings
    only show when asked for. The CLI calls this (steerlab.cli._app); library code never does.

    Args:
        progress: whether progress bars are wanted.
        level: steerlab's log level, e.g. ``logging.INFO``.

    Examples:
        >>> quiet_hf(False, logging.INFO)  # no bars, only errors from transformers
    """
    import huggingface_hub.utils  # deferred: huggingface_hub
    from transformers.utils import logging as hf_logging  # deferred: transformers

    hf_level = logging.INFO if level <= logging.DEBUG else logging.ERROR
    hf_logging.set_verbosity(hf_level)
    huggingface_hub.utils.logging.set_verbosity(hf_level)
    if not progress:
        hf_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
