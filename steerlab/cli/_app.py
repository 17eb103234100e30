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


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "transformers", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
