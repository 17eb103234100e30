"""``steerlab demo``: the main job on the embedded model."""

from __future__ import annotations

import typer
from rich.console import Console

from steerlab.cli._app import app


@app.command()
def demo(
    model: str = typer.Option("embedded", help="Model: 'embedded', a hub id or a local dir."),
    prompt: str = typer.Option("What do you do on a Sunday morning?", help="The prompt."),
    max_tokens: int = typer.Option(60, help="Tokens per reply."),
) -> None:
    """Chat one prompt as two personas on the embedded model and print both replies."""
    from steerlab.chat import encode_chat
    from steerlab.generate import generate
    from steerlab.models import load_model
    from steerlab.personas import ASSISTANT, Persona

    console = Console()
    with console.status("loading model"):
        bridge = load_model(model)
    personae = [ASSISTANT, Persona("a pirate captain", "fictional-character", "")]
    prompts = [encode_chat(bridge.tokenizer, prompt, persona=p) for p in personae]
    with console.status("generating"):
        replies = generate(bridge, prompts, max_new_tokens=max_tokens).texts(bridge.tokenizer)
    console.print(f"[bold]user[/]: {prompt}")
    for persona, reply in zip(personae, replies, strict=True):
        console.print(f"[bold cyan]{persona.persona}[/]: {reply.strip()}")
