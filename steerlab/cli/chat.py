"""``steerlab chat``: a streaming terminal chat with personas, thinking and steering."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from collections.abc import Iterator

import typer

from steerlab.cli._app import app
from steerlab.cli._model import model_flags
from steerlab.errors import SteerlabError
from steerlab.placement import ModelOptions

ESC = b"\x1b"


class _StopKeys:
    """Watch the terminal for Esc (and Ctrl-C) while a reply streams.

    On a tty the terminal is put in cbreak mode for the duration so Esc arrives at once;
    elsewhere (pipes) only Ctrl-C stops a reply.
    """

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.pressed = False

    def __call__(self) -> bool:
        if self.fd is not None and not self.pressed:
            while select.select([self.fd], [], [], 0)[0]:
                data = os.read(self.fd, 64)
                if not data or ESC in data:
                    self.pressed = True
                    break
        return self.pressed

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        self.pressed = False

        def on_sigint(signum: int, frame: object) -> None:
            self.pressed = True

        old_handler = signal.signal(signal.SIGINT, on_sigint)
        old_attrs = None
        if self.fd is not None:
            import termios
            import tty

            old_attrs = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        try:
            yield
        finally:
            if old_attrs is not None:
                import termios

                termios.tcsetattr(self.fd, termios.TCSADRAIN, old_attrs)
            signal.signal(signal.SIGINT, old_handler)


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
@model_flags
def chat(
    model: ModelOptions,
    persona: str = typer.Option("assistant", help="Who answers (relabels the assistant turn)."),
    system: str = typer.Option(None, help="System prompt text (default: 'You are PERSONA.')."),
    thinking: bool = typer.Option(False, help="Thinking mode (templates that support it)."),
    max_tokens: int = typer.Option(256, help="New tokens per reply (/tokens N changes it)."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    seed: int = typer.Option(None, help="Sampling seed."),
    vector: str = typer.Option(None, help="Steering vector file to start with."),
    alpha: float = typer.Option(1.0, help="Steering strength for --vector (x the vector)."),
    layers: str = typer.Option("", help="Comma-separated layers to steer (default: vector's)."),
) -> None:
    """Chat with a model in the terminal: streaming replies, /help for commands, Esc stops."""
    from steerlab.chat_session import ChatSession, parse_command
    if max_tokens < 1:
        raise SteerlabError(f"got {max_tokens}; expected >= 1", field="max-tokens")
    bridge = model.load()
    session = ChatSession(bridge, system=system, thinking=thinking, max_tokens=max_tokens,
                          temperature=temperature, seed=seed)
    session.set_persona(persona)
    if vector:
        session.steer_from_args(f"{vector!r} {alpha} {layers}".strip())
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    keys = _StopKeys()
    _out(f"steerlab chat: {model.model} as {session.persona.persona}. /help for commands, "
         "Esc stops a reply, Ctrl-D quits.\n")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            _out("\n")
            return
        if not line.strip():
            continue
        try:
            command = parse_command(line)
            if command is not None:
                if command.name in ("quit", "exit"):
                    return
                _out(session.apply(command) + "\n")
                continue
        except SteerlabError as err:
            _out(f"! {err}\n")
            continue
        _out(f"{session.persona.persona}> ")
        with keys.watching():
            reply = session.reply(line.removeprefix("/"), on_text=_out, should_stop=keys)
        if reply.interrupted:
            _out(f" [stopped after {reply.n_tokens} tokens]")
        _out("\n")
