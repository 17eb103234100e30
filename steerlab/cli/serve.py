"""``steerlab serve``: an OpenAI-compatible HTTP server over a local model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._app import app
from steerlab.cli._model import check_engine, model_flags
from steerlab.model.loading import load_from_options
from steerlab.model.options import ModelOptions


def check_serving(model: ModelOptions, engine: str, max_batch: int, max_context: int,
                  sync_every: int) -> str:
    """The batching flags checked before the model loads (one error line, exit code 2)."""
    from steerlab.base.errors import SteerlabError

    engine = check_engine(engine)
    for value, field, low in ((max_batch, "max_batch", 1), (max_context, "max_context", 16),
                              (sync_every, "sync_every", 1)):
        if value < low:
            raise SteerlabError(f"got {value}; expected an integer >= {low}", field=field)
    if engine == "static" and model.attn_implementation == "eager":
        raise SteerlabError("the static engine needs HF attention kernels; use "
                            "--attn-implementation sdpa, or --engine eager", field="engine")
    return engine


# The help of serve's longer flags, here so that its signature reads as the list of flags.
_HELP = {
    "engine": "static: continuous batching (concurrent requests decode together in one "
    "static-engine batch; a finished row's slot goes to the next request), on the CPU too; "
    "eager: one request at a time; auto: static unless the static engine cannot hold the "
    "model's cache (the bridge's eager attention, linear-attention layers) or, on a GPU, has "
    "not passed `steerlab doctor`'s check there (one log line says which).",
    "max_batch": "Requests decoding together (static); more wait for a free slot.",
    "max_context": "Most positions per request, prompt plus max_tokens; a longer request is "
    "refused with 400 (static: larger costs memory and time per step, every step attends "
    "over the whole cache).",
    "sync_every": "Decode steps between host checks (static): new requests join and streamed "
    "chunks go out at each.",
    "api_key": "Require 'Authorization: Bearer <key>' on every route but /health (better: the "
    "environment variable STEERLAB_API_KEY; a flag shows in ps).",
    "no_auth": "Serve beyond localhost without a key (refused otherwise).",
    "max_tokens_cap": "Most max_tokens a request may ask for; more is refused with 400 (not "
    "cut short).",
    "request_timeout": "Seconds a request may take, waiting included; past them its slot is "
    "freed and it gets 504 (a stream: an error event).",
    "max_queue": "Requests that may wait for a slot; more get 429 with Retry-After.",
    "read_timeout": "Seconds a client may take to send a whole request (request line, "
    "headers and body), counted from the connection's accept (from the first byte on a "
    "kept-alive connection); a slower one gets 408 and is disconnected. Also the longest one "
    "write waits on a client that does not read.",
    "idle_timeout": "Seconds a keep-alive connection may sit idle between requests before it "
    "is closed.",
    "max_connections": "Open connections (each holds a thread); one more is answered 503 with "
    "Retry-After and closed at once.",
    "vectors_dir": "Folder of the vectors requests may steer with, by name (NAME.safetensors "
    "and NAME.json); without it every steering request is refused.",
}


@app.command()
@model_flags
def serve(
    model: ModelOptions,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port (0: pick a free one and print it)."),
    name: Annotated[str | None, typer.Option(help="Model name reported by /v1/models "
                                             "[default: the model id].")] = None,
    engine: str = typer.Option("auto", help=_HELP["engine"]),
    max_batch: int = typer.Option(16, help=_HELP["max_batch"]),
    max_context: int = typer.Option(2048, help=_HELP["max_context"]),
    sync_every: int = typer.Option(4, help=_HELP["sync_every"]),
    api_key: Annotated[str | None, typer.Option(
        envvar="STEERLAB_API_KEY", show_envvar=True, help=_HELP["api_key"])] = None,
    no_auth: bool = typer.Option(False, "--no-auth", help=_HELP["no_auth"]),
    max_tokens_cap: int = typer.Option(1024, help=_HELP["max_tokens_cap"]),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body; more is 413."),
    request_timeout: float = typer.Option(300.0, help=_HELP["request_timeout"]),
    max_queue: int = typer.Option(64, help=_HELP["max_queue"]),
    read_timeout: float = typer.Option(30.0, help=_HELP["read_timeout"]),
    idle_timeout: float = typer.Option(10.0, help=_HELP["idle_timeout"]),
    max_connections: int = typer.Option(256, help=_HELP["max_connections"]),
    vectors_dir: Annotated[Path | None, typer.Option(help=_HELP["vectors_dir"])] = None,
) -> None:
    """Serve /v1/models, /v1/chat/completions (streaming too) and /health over a local model.

    Persona and steering request fields (steering names a vector of --vectors-dir, listed by
    /v1/vectors); concurrent requests batched (continuous batching);
    a key required beyond localhost; tokens, prompt, body, time, queue and connections
    bounded; HTTP/1.1 keep-alive (a stream closes its connection)."""
    from steerlab.base.checks import integer
    from steerlab.serving.http_edge import Limits, check_exposure
    from steerlab.serving.server import make_server
    from steerlab.serving.shelf import VectorShelf

    integer(port, "port", lo=0, hi=65535)
    engine = check_serving(model, engine, max_batch, max_context, sync_every)
    check_exposure(host, api_key, no_auth)
    limits = Limits(max_tokens=max_tokens_cap, max_body_bytes=max_body_bytes,
                    request_timeout=request_timeout, max_queue=max_queue,
                    read_timeout=read_timeout, idle_timeout=idle_timeout,
                    max_connections=max_connections)  # each value checked (steerlab.base.checks)
    if vectors_dir is not None:
        VectorShelf(vectors_dir)  # the server's own folder check, before the model loads
    name = name or model.model
    srv = make_server(load_from_options(model), host, port, model_name=name, engine=engine,
                      max_batch=max_batch, max_context=max_context, sync_every=sync_every,
                      api_key=api_key, no_auth=no_auth, limits=limits,
                      vectors_dir=vectors_dir)
    h, p = srv.server_address[:2]
    typer.echo(f"serving {name} on http://{h}:{p}/v1")
    sys.stdout.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
