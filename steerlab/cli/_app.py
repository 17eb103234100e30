"""The typer application that command modules register on."""

from __future__ import annotations

import logging
from typing import Any, no_type_check

import typer

from steerlab.base.progress import quiet_hf

VERBOSE = False  # set by --verbose: the CLI boundary then shows tracebacks
TRAIT_HELP = "Trait: a built-in name (steerlab traits list), ./traits/<name>.json, or a path."

app = typer.Typer(
    name="steerlab",
    help="Persona experiments and steering vectors on chat LLMs (TransformerLens 4).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
@no_type_check  # typer passes its base click Context, not the typer.Context subclass it documents
def _root(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    global VERBOSE
    VERBOSE = verbose
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_hf(True, level)
    _progress_flags_quiet_hf(ctx.command, level)


def _progress_flags_quiet_hf(command: Any, level: int) -> None:
    """Make every command's ``--no-progress`` also turn off the transformers/HF bars.

    Runs before the subcommand parses its options, so the flag takes effect before anything
    loads; a command opts in by naming its flag ``progress``.
    """

    def on_value(ctx: Any, param: Any, value: Any) -> Any:
        if value is not None and not ctx.resilient_parsing:
            quiet_hf(bool(value), level)
        return value

    for param in getattr(command, "params", []):
        if param.name == "progress" and param.callback is None:
            param.callback = on_value
    for sub in getattr(command, "commands", {}).values():
        _progress_flags_quiet_hf(sub, level)
