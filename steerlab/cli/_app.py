"""The typer application that command modules register on."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    name="steerlab",
    help="Persona experiments and steering vectors on chat LLMs (TransformerLens 4).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from steerlab import __version__

        typer.echo(f"steerlab {__version__} (`steerlab doctor` for the whole stack)")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print steerlab's version and exit."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "transformers", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
