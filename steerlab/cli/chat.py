"""``steerlab chat``: a streaming terminal chat with personas, thinking and steering.

The terminal: a prompt, replies streamed token by token, Esc or Ctrl-C to stop one. The
``/command`` grammar lives in :mod:`steerlab.cli._commands`.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from collections.abc import Iterator
from typing import Any

import typer

from steerlab.base.errors import SteerlabError
from steerlab.cli._app import app
from steerlab.cli._commands import load_steering, parse_command, run_command
from steerlab.cli._model import ENGINE_HELP, check_engine, model_flags
from steerlab.cli._parse import number_list
from steerlab.model.loading import load_from_options, model_geometry
from steerlab.model.options import ModelOptions
from steerlab.steering.intervention import DEFAULT_UNITS

ESC = b"\x1b"

class _StopKeys:
    """Watch the terminal for Esc (and Ctrl-C) while a reply streams, keeping what else is
    typed meanwhile (type-ahead) for the next prompt.

    On a tty the terminal is put in cbreak mode for the duration so Esc arrives at once;
    elsewhere (pipes) only Ctrl-C stops a reply (and piped input is read as it comes).
    """

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.pressed = False
        self.typed = bytearray()

    def __call__(self) -> bool:
        if self.fd is not None and not self.pressed:
            self._read()
        return self.pressed

    def _read(self) -> None:
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 256)
            if not data or ESC in data:  # Esc (an arrow key's sequence too) stops the reply
                self.typed += data.split(ESC, 1)[0]
                self.pressed = True
                return
            self.typed += data

    def take_typed(self) -> tuple[list[str], str]:
        """What was typed during the reply: ``(complete lines, the unfinished line)``, with
        backspace and Ctrl-U applied as the terminal would have."""
        line, lines = "", []
        for ch in self.typed.decode("utf-8", errors="ignore"):
            if ch in "\r\n":
                lines.append(line)
                line = ""
            elif ch in "\x7f\b":
                line = line[:-1]
            elif ch == "\x15":  # Ctrl-U
                line = ""
            elif ch.isprintable():
                line += ch
        self.typed.clear()
        return [x for x in lines if x.strip()], line

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

                if not self.pressed:
                    self._read()  # what was typed after the last token
                termios.tcsetattr(self.fd, termios.TCSADRAIN, old_attrs)
            signal.signal(signal.SIGINT, old_handler)


def _read_line(prompt: str, ahead: str) -> str:
    """``input(prompt)`` with ``ahead`` (type-ahead) already on the line, editable where
    readline is available."""
    if not ahead:
        return input(prompt)
    try:
        import readline
    except ImportError:
        _out(prompt + ahead)
        return ahead + input("")
    readline.set_startup_hook(lambda: readline.insert_text(ahead))
    try:
        return input(prompt)
    finally:
        readline.set_startup_hook()


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
@model_flags
def chat(
    model: ModelOptions,
    persona: str = typer.Option("assistant", help="Who answers (relabels the assistant turn)."),
    system: str | None = typer.Option(
        None, help="System prompt text (default: 'You are PERSONA.')."),
    thinking: bool = typer.Option(False, help="Thinking mode (templates that support it)."),
    max_tokens: int = typer.Option(256, help="New tokens per reply (/tokens N changes it)."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding."),
    seed: int | None = typer.Option(None, help="Sampling seed."),
    vector: str | None = typer.Option(None, help="Steering vector file to start with."),
    alpha: float = typer.Option(0.2, help="Steering strength for --vector (in --units)."),
    units: str = typer.Option(DEFAULT_UNITS.value, help="Strength units: norm (fraction of "
                              "the residual norm, as `vectors eval` reports) or raw (x the "
                              "vector)."),
    layers: str = typer.Option("", help="Comma-separated layers to steer (default: vector's)."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
) -> None:
    """Chat with a model in the terminal: streaming replies, /help for commands, Esc stops."""
    from steerlab.base.checks import integer, number
    from steerlab.base.checks import seed as check_seed
    from steerlab.chat.session import ChatSession
    from steerlab.model.personas import persona_name, system_prompt_text
    from steerlab.steering.intervention import Units

    # every flag (and the vector file) is checked before the model loads
    persona_name(persona, "persona")
    if system is not None:
        system_prompt_text(system, "system")
    integer(max_tokens, "max_tokens", lo=1)
    number(temperature, "temperature", lo=0)
    if seed is not None:
        check_seed(seed)
    number(alpha, "alpha")
    chosen = number_list(layers, int, "layers")
    units = Units.parse(units, field="units").value
    engine = check_engine(engine)
    if vector:
        _check_vector(model, vector, chosen)
    bridge = load_from_options(model)
    session = ChatSession(bridge, system=system, thinking=thinking, max_tokens=max_tokens,
                          temperature=temperature, seed=seed, engine=engine)
    session.set_persona(persona)
    if vector:
        load_steering(session, vector, alpha, layers, units)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    _out(f"steerlab chat: {model.model} as {session.persona.persona}. /help for commands, "
         "Esc stops a reply, Ctrl-D quits.\n")
    if thinking:
        from steerlab.model.templates import has_thinking_mode

        if not has_thinking_mode(bridge.tokenizer):
            _out("--thinking has no effect: this model's chat template has no thinking mode\n")
    _converse(session)


def _check_vector(model: ModelOptions, vector: str, chosen: list[int]) -> None:
    """Refuse, before the model loads, a vector file of another model or without a ``chosen``
    layer."""
    from steerlab.steering.vector import SteeringVector

    loaded = SteeringVector.load(vector)
    geometry = model_geometry(model.model)
    if geometry:  # a vector of another model is refused before this one loads
        loaded.check_model(geometry["n_layers"], geometry["d_model"], source=vector)
    have = loaded.layers
    for layer in chosen:
        if layer not in have:
            raise SteerlabError(f"got layer {layer}; the vector has layers {list(have)}",
                                source=vector, field="layers")


def _converse(session: Any) -> None:
    """The terminal loop until Ctrl-D, Ctrl-C at the prompt or /quit: a line (type-ahead
    first) is a /command, shown with its one-line answer, or a message, its reply streamed
    until it ends or Esc or Ctrl-C stops it."""
    keys = _StopKeys()
    pending: list[str] = []  # lines typed (with Enter) while a reply streamed: sent next
    ahead = ""  # an unfinished line typed while a reply streamed: the next prompt's start
    while True:
        try:
            if pending:
                line = pending.pop(0)
                _out(f"you> {line}\n")
            else:
                line, ahead = _read_line("you> ", ahead), ""
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
                _out(run_command(session, command) + "\n")
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
        lines, rest = keys.take_typed()
        pending += lines
        ahead += rest
