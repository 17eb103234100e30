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
from steerlab.cli._model import ENGINE_HELP, check_engine, check_vector_file, model_flags
from steerlab.cli._parse import number_list
from steerlab.model.loading import load_from_options
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
    axis: str | None = typer.Option(None, help="A vector to follow (e.g. the assistant axis "
                                    "of `steerlab personas map`): each reply's mean projection "
                                    "on it is shown after the reply."),
    axis_layer: int | None = typer.Option(None, help="Where --axis is read (default: its "
                                          "middle layer)."),
    cap: str | None = typer.Option(None, help="Cap the projection on --axis at its layers: a "
                                   "floor such as 25% (a percentile of the axis's reference "
                                   "projections) or a number in --units, or LO:HI."),
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
        check_vector_file(model, vector, chosen)
    bounds = _check_axis(model, axis, axis_layer, cap)
    bridge = load_from_options(model)
    session = ChatSession(bridge, system=system, thinking=thinking, max_tokens=max_tokens,
                          temperature=temperature, seed=seed, engine=engine)
    session.set_persona(persona)
    if vector:
        load_steering(session, vector, alpha, layers, units)
    if axis:
        _follow(session, axis, axis_layer, bounds, units)
    _greet(session, model.model, thinking)
    _converse(session)


def _greet(session: Any, name: str, thinking: bool) -> None:
    """The first line, and a note when --thinking cannot take effect."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    _out(f"steerlab chat: {name} as {session.persona.persona}. /help for commands, "
         "Esc stops a reply, Ctrl-D quits.\n")
    if thinking:
        from steerlab.model.templates import has_thinking_mode

        if not has_thinking_mode(session.model.tokenizer):
            _out("--thinking has no effect: this model's chat template has no thinking mode\n")


def _check_axis(model: ModelOptions, axis: str | None, layer: int | None,
                cap: str | None) -> tuple[Any, Any] | None:
    """Refuse, before the model loads, an axis of another model or without ``layer``, and
    cap bounds that do not parse (or a cap without an axis); the bounds (a lone value is a
    floor)."""
    if axis is None:
        if cap is not None or layer is not None:
            raise SteerlabError("needs --axis (the vector to follow)",
                                field="cap" if cap is not None else "axis_layer")
        return None
    check_vector_file(model, axis, [] if layer is None else [layer])
    if cap is None:
        return None
    from steerlab.steering.operators import bounds_from_text

    return bounds_from_text(cap, "cap")  # a lone value is a floor


def _follow(session: Any, axis: str, layer: int | None, bounds: Any, units: str) -> None:
    """Watch ``axis`` at ``layer`` and, with ``bounds``, cap the projection on it."""
    from steerlab.steering.vector import SteeringVector

    followed = SteeringVector.load(axis)
    session.watch(followed, layer)
    if bounds is not None:
        session.add_intervention(followed, "cap", bounds=bounds, units=units)


def _status(session: Any, reply: Any) -> str:
    """The line after a reply: its mean projection on the followed axis (and before the
    interventions, when they moved it)."""
    if session.watched is None or reply.mean_projection is None:
        return ""
    before = sum(reply.projection_before) / len(reply.projection_before)
    moved = "" if abs(before - reply.mean_projection) <= 1e-6 * max(1.0, abs(before)) else \
        f" (before the interventions {before:+.3f})"
    return f"[axis, layer {session.watched[1]}: {reply.mean_projection:+.3f}{moved}]\n"


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
        _out("\n" + _status(session, reply))
        lines, rest = keys.take_typed()
        pending += lines
        ahead += rest
