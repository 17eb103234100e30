"""The ``steerlab`` command: a thin typer adapter over the library."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from steerlab.cli._app import app
from steerlab.errors import SteerlabError

# Every public module in this package registers its commands on `app` when imported.
for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2 (usage errors too)."""
    try:
        app()
    except SteerlabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
