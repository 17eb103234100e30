"""The ``steerlab`` command: a thin typer adapter over the library."""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
from collections.abc import Sequence

import typer

from steerlab.base.errors import SteerlabError
from steerlab.cli import _app
from steerlab.cli._app import app

# Every public module in this package registers its commands on `app` when imported.
for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

log = logging.getLogger("steerlab.cli")
# typer ships its own copy of click (typer._click); its exception classes live beside this one
click = importlib.import_module(typer.BadParameter.__module__)


def _boundary_line(err: BaseException) -> str | None:
    """One line for an error caught at the CLI boundary, or None (a bug: re-raised)."""
    if isinstance(err, SteerlabError):
        return str(err)
    if isinstance(err, click.UsageError):
        where = err.ctx.command_path if err.ctx else "steerlab"
        return f"{where}: {err.format_message()} (see '{where} --help')"
    if isinstance(err, click.ClickException):
        return err.format_message()
    if isinstance(err, OSError):
        name = err.filename if err.filename is not None else ""
        other = f" -> {err.filename2}" if err.filename2 is not None else ""
        reason = err.strerror or str(err)
        return f"{name}{other}: {reason}" if name else reason
    if isinstance(err, UnicodeDecodeError):
        return f"an input is not UTF-8 text ({err.reason} at byte {err.start})"
    if isinstance(err, json.JSONDecodeError):
        return f"an input is not valid JSON ({err})"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2 (usage errors, OS
    errors on paths and unreadable files too); ``--verbose`` shows the traceback instead.

    A failure that is not bad input (a bug) is one line and exit code 1 without
    ``--verbose``.
    """
    try:
        code = app(args=list(argv) if argv is not None else None, prog_name="steerlab",
                   standalone_mode=False)
    except click.NoArgsIsHelpError as err:
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as err:  # the boundary: nothing below prints a traceback by itself
        line = _boundary_line(err)
        if _app.VERBOSE or (line is None and _verbose_flag(argv)):
            raise
        if line is None:
            log.debug("unexpected error", exc_info=True)
            typer.echo(f"error: unexpected {type(err).__name__}: {err} (rerun with --verbose "
                       "for the traceback)", err=True)
            sys.exit(1)
        typer.echo(f"error: {' '.join(line.split())}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _verbose_flag(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else list(argv)
    return bool(args) and args[0] in ("-v", "--verbose")
