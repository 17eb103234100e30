"""``steerlab chat``: a streaming terminal chat with personas, thinking and steering.

The ``/command`` grammar of the terminal lives here: :func:`parse_command` turns a line into a
:class:`Command`, :func:`run_command` applies it to a :class:`steerlab.ChatSession` through
the session's typed setters and returns the one line to show.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import typer

from steerlab.base.errors import SteerlabError
from steerlab.cli._app import app
from steerlab.cli._model import ENGINE_HELP, check_engine, model_flags
from steerlab.cli._parse import number_list
from steerlab.model.loading import load_from_options, model_geometry
from steerlab.model.options import ModelOptions
from steerlab.steering.intervention import DEFAULT_UNITS

ESC = b"\x1b"

HELP = """commands:
  /clear               forget the conversation
  /persona NAME        talk to NAME (relabels the assistant turn); /persona assistant resets
  /system TEXT         use TEXT as the system prompt; /system alone restores the persona's
  /thinking [on|off]   thinking mode on (the default) or off (templates that support it,
                       e.g. Qwen3)
  /nothinking          thinking mode off
  /tokens N            at most N new tokens per reply
  /steer PATH ALPHA [LAYERS]  steer with a vector file at strength ALPHA (layers: 10,12)
  /steer ALPHA         change the strength of the loaded vector
  /ablate PATH [LAYERS]  remove the vector's direction from the residual stream
  /cap PATH LO[:HI] [LAYERS]  clamp the projection on the vector (norm units; ':HI' alone
                       caps from above, 'LO:' from below)
  /interventions       what is steering the replies now
  /unsteer             stop steering (the steering and every intervention)
  /help                this text
Esc (or Ctrl-C) stops a reply; what you type while it streams is kept for the next prompt;
Ctrl-D or /quit leaves."""

COMMANDS = ("clear", "persona", "system", "thinking", "nothinking", "tokens", "steer",
            "ablate", "cap", "interventions", "unsteer", "help", "quit", "exit")
ABLATE_USAGE = "usage: /ablate PATH [LAYERS] (e.g. /ablate vectors/pirate 10,12)"
CAP_USAGE = "usage: /cap PATH LO[:HI] [LAYERS] (e.g. /cap vectors/pirate :0.1 12, norm units)"
STEER_USAGE = "usage: /steer PATH ALPHA [LAYERS] (e.g. /steer vectors/pirate 4 10,12)"


@dataclass(frozen=True)
class Command:
    """A parsed ``/name arg`` line; ``arg`` is the rest of the line, stripped."""

    name: str
    arg: str = ""


def parse_command(line: str) -> Command | None:
    """``Command`` for a ``/command`` line, ``None`` for an ordinary message.

    Unknown commands raise :class:`SteerlabError` with a one-line hint.

    Examples:
        >>> parse_command("/tokens 50")
        Command(name='tokens', arg='50')
    """
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    name = name.lower()
    if name not in COMMANDS:
        raise SteerlabError(f"unknown command /{name}; type /help for the list")
    return Command(name, arg.strip())


@contextlib.contextmanager
def _usage(usage: str) -> Iterator[None]:
    """Re-raise a setter's error with the command's usage line."""
    try:
        yield
    except SteerlabError as err:
        raise SteerlabError(f"{usage} ({err})") from None


def _alpha(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SteerlabError(f"{STEER_USAGE}; ALPHA must be a number (got {text!r})") from None


def load_steering(session: Any, path: str, alpha: float, layers: str = "",
                  units: str = DEFAULT_UNITS.value) -> str:
    """Steer ``session`` with the vector file ``path`` at ``alpha`` on ``layers`` ("10,12";
    "" for the vector's own) in ``units``; returns the confirmation line."""
    from steerlab.steering.vector import SteeringVector

    chosen = number_list(layers, int, "layers") or None
    steering = session.set_steering(SteeringVector.load(path), alpha, chosen, units)
    return (f"steering with {path} at {steering.alpha:g} ({steering.units.value} units) on "
            f"layers {list(steering.layers)}")


def _steer(session: Any, arg: str) -> str:
    try:
        parts = shlex.split(arg)
    except ValueError:
        raise SteerlabError(STEER_USAGE) from None
    if len(parts) == 1 and session.steering is not None:
        steering = session.set_strength(_alpha(parts[0]))
        return f"steering strength {steering.alpha:g} ({steering.units.value} units)"
    if len(parts) not in (2, 3):
        raise SteerlabError(STEER_USAGE)
    with _usage(STEER_USAGE):
        return load_steering(session, parts[0], _alpha(parts[1]), *parts[2:])


def _bound(text: str) -> float | None:
    try:
        return None if text.strip() == "" else float(text)
    except ValueError:
        raise SteerlabError(f"{CAP_USAGE}; LO and HI must be numbers (got {text!r})") from None


def _intervene(session: Any, op: str, arg: str) -> str:
    """``/ablate PATH [LAYERS]`` or ``/cap PATH LO[:HI] [LAYERS]``."""
    from steerlab.steering.vector import SteeringVector

    usage = ABLATE_USAGE if op == "ablate" else CAP_USAGE
    try:
        parts = shlex.split(arg)
    except ValueError:
        raise SteerlabError(usage) from None
    if len(parts) not in ((1, 2) if op == "ablate" else (2, 3)):
        raise SteerlabError(usage)
    bounds = None
    if op == "cap":
        lo, _, hi = parts.pop(1).partition(":")
        bounds = (_bound(lo), _bound(hi))
    with _usage(usage):
        chosen = number_list(parts[1], int, "layers") if len(parts) > 1 else None
        made = session.add_intervention(SteeringVector.load(parts[0]), op, chosen or None,
                                        bounds=bounds)
    return f"{op} {parts[0]} on layers {list(made.layers)}" + (
        f", bounds {_shown_bounds(bounds)} ({made.units.value} units)" if bounds else "")


def _shown_bounds(bounds: tuple[float | None, float | None]) -> str:
    return "[" + ", ".join("open" if b is None else f"{b:g}" for b in bounds) + "]"


def describe(session: Any) -> str:
    """What steers the replies now, one line per intervention (or ``no steering``).

    Examples:
        >>> describe(session)
        'no steering'
    """
    lines = []
    if session.steering is not None:
        s = session.steering
        lines.append(f"add at {s.alpha} ({s.units.value} units) on layers {list(s.layers)}")
    for s in session.interventions:
        where = f"on layers {list(s.layers)}"
        lines.append(f"{s.op.value} {where}" if s.op.value == "ablate" else
                     f"{s.op.value} {where}, raw bounds "
                     f"{[round(x, 4) for x in s.lo]}..{[round(x, 4) for x in s.hi]}")
    return "\n".join(lines) or "no steering"


def run_command(session: Any, command: Command) -> str:
    """Apply ``command`` to ``session``; the one-line confirmation (bad arguments raise a hint).

    Examples:
        >>> run_command(session, parse_command("/persona Hamlet"))
        'persona: Hamlet'
    """
    name, arg = command.name, command.arg
    if name == "clear":
        session.clear()
        return "conversation cleared"
    if name == "persona":
        with _usage("usage: /persona NAME (one line, e.g. /persona Hamlet)"):
            session.set_persona(arg)
        return f"persona: {session.persona.persona}"
    if name == "system":
        session.system = arg or None
        return f"system prompt: {arg}" if arg else "system prompt: the persona's default"
    if name in ("thinking", "nothinking"):
        switch = {"": True, "on": True, "off": False}
        if name == "nothinking" and arg or arg.strip().lower() not in switch:
            raise SteerlabError(f"usage: /thinking [on|off] or /nothinking (got {arg!r})")
        session.thinking = name == "thinking" and switch[arg.strip().lower()]
        line = f"thinking {'on' if session.thinking else 'off'}"
        from steerlab.model.templates import has_thinking_mode

        if not has_thinking_mode(session.model.tokenizer):
            line += " (no effect: this model's chat template has no thinking mode)"
        return line
    if name == "tokens":
        usage = f"usage: /tokens N with N a whole number >= 1 (got {arg!r})"
        try:
            n = int(arg)
        except ValueError:
            raise SteerlabError(usage) from None
        with _usage(usage):
            session.set_max_tokens(n)
        return f"max tokens per reply: {session.max_tokens}"
    if name == "steer":
        return _steer(session, arg)
    if name in ("ablate", "cap"):
        return _intervene(session, name, arg)
    if name == "interventions":
        return describe(session)
    if name == "unsteer":
        session.clear_steering()
        return "steering off"
    return HELP


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
