"""The ``/commands`` of a chat session (``steerlab chat``): parsed from a line, applied to a
:class:`steerlab.chat.session.ChatSession`, answered in one line."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from steerlab.base.errors import SteerlabError
from steerlab.cli._parse import number_list
from steerlab.steering.intervention import DEFAULT_UNITS
from steerlab.steering.operators import bounds_from_text

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
  /cap PATH LO[:HI] [LAYERS]  clamp the projection on the vector (norm units, or
                       percentiles of its reference projections: 25%; ':HI' alone caps from
                       above, 'LO:' from below)
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
    with _usage(usage):
        if op == "cap":
            bounds = bounds_from_text(parts.pop(1))
        chosen = number_list(parts[1], int, "layers") if len(parts) > 1 else None
        made = session.add_intervention(SteeringVector.load(parts[0]), op, chosen or None,
                                        bounds=bounds)
    return f"{op} {parts[0]} on layers {list(made.layers)}" + (
        f", bounds {_shown_bounds(bounds)} ({made.units.value} units)" if bounds else "")


def _shown_bounds(bounds: tuple[float | str | None, float | str | None]) -> str:
    return "[" + ", ".join("open" if b is None else b if isinstance(b, str) else f"{b:g}"
                           for b in bounds) + "]"


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
