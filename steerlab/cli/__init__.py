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
    """Entry point: bad input becomes one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except SteerlabError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as done:
        sys.exit(getattr(done, "exit_code", getattr(done, "code", 0)))
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise
