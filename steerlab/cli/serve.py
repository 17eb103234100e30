"""``steerlab serve``: an OpenAI-compatible HTTP server over a local model."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from steerlab.cli._app import app
from steerlab.cli._model import model_flags
from steerlab.placement import ModelOptions


@app.command()
@model_flags
def serve(
    model: ModelOptions,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port (0: pick a free one and print it)."),
    name: Annotated[str | None, typer.Option(help="Model name reported by /v1/models "
                                             "[default: the model id].")] = None,
) -> None:
    """Serve /v1/models and /v1/chat/completions (streaming too) with persona and steering
    request fields; one generation at a time."""
    from steerlab.serve import make_server

    name = name or model.model
    srv = make_server(model.load(), host, port, model_name=name)
    h, p = srv.server_address[:2]
    typer.echo(f"serving {name} on http://{h}:{p}/v1")
    sys.stdout.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
