"""``steerlab serve``: an OpenAI-compatible HTTP server over a local model."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from steerlab.cli._app import app


@app.command()
def serve(
    model: str = typer.Option("embedded", help="'embedded', a hub id or a local directory."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port (0: pick a free one and print it)."),
    name: Annotated[str | None, typer.Option(help="Model name reported by /v1/models "
                                             "[default: the model id].")] = None,
    dtype: str = typer.Option("float32", help="Weights dtype, e.g. bfloat16 on GPUs."),
    device: Annotated[str | None, typer.Option(help="Device [default: cuda, mps or cpu].")] = None,
) -> None:
    """Serve /v1/models and /v1/chat/completions (streaming too) with persona and steering
    request fields; one generation at a time."""
    from steerlab.models import load_model
    from steerlab.serve import make_server

    kwargs = {"dtype": dtype, **({"device": device} if device else {})}
    srv = make_server(load_model(model, **kwargs), host, port, model_name=name or model)
    h, p = srv.server_address[:2]
    typer.echo(f"serving {name or model} on http://{h}:{p}/v1")
    sys.stdout.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
