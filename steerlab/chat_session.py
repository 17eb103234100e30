"""Interactive chat state shared by ``steerlab chat`` and the notebook widget.

A :class:`ChatSession` holds the conversation and its settings (persona, system prompt,
thinking, token budget, steering vector and strength). :func:`parse_command` turns a
``/command`` line into a :class:`Command`; :meth:`ChatSession.apply` runs it and returns the
one line to show. :meth:`ChatSession.reply` streams a reply as decoded text chunks.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from steerlab.chat import encode_chat, think_end_marker
from steerlab.errors import SteerlabError
from steerlab.generate import generate
from steerlab.personas import ASSISTANT, Persona, SystemPrompt, you_are_a

HELP = """commands:
  /clear               forget the conversation
  /persona NAME        talk to NAME (relabels the assistant turn); /persona assistant resets
  /system TEXT         use TEXT as the system prompt; /system alone restores the persona's
  /thinking            thinking mode on (templates that support it, e.g. Qwen3)
  /nothinking          thinking mode off
  /tokens N            at most N new tokens per reply
  /steer PATH ALPHA [LAYERS]  steer with a vector file at strength ALPHA (layers: 10,12)
  /steer ALPHA         change the strength of the loaded vector
  /unsteer             stop steering
  /help                this text
Esc (or Ctrl-C) stops a reply; Ctrl-D or /quit leaves."""

COMMANDS = ("clear", "persona", "system", "thinking", "nothinking", "tokens", "steer",
            "unsteer", "help", "quit", "exit")


@dataclass(frozen=True)
class Command:
    """A parsed ``/name arg`` line; ``arg`` is the rest of the line, stripped."""

    name: str
    arg: str = ""


def parse_command(line: str) -> Command | None:
    """``Command`` for a ``/command`` line, ``None`` for an ordinary message.

    Unknown commands raise :class:`SteerlabError` with a one-line hint.

    Example:
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


@dataclass(frozen=True)
class Reply:
    """One streamed reply: its text, token count, whether the user stopped it, and the
    per-token projections on the monitored vector (when a projection layer was given)."""

    text: str
    tokens: tuple[int, ...]
    interrupted: bool
    projection: list[float] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


class StreamDecoder:
    """Turn token ids into text chunks as they arrive, never splitting a UTF-8 character.

    Each chunk is decoded with a few tokens of left context so that word-initial spaces and
    multi-byte characters spread over several tokens come out right; joining all chunks and
    :meth:`flush` gives ``tokenizer.decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of the text already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (may be empty)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back (e.g. an incomplete character at the end)."""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


@dataclass
class ChatSession:
    """Conversation and settings for an interactive chat with one model.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        persona: who answers (the assistant turn is relabelled with its name).
        system: a system prompt text; ``None`` uses the persona's ``you-are-a`` prompt.
        thinking: thinking mode for templates that support it.
        max_tokens: new tokens per reply.
        temperature: 0 for greedy decoding.
        vector, alpha, layers: steering (see :func:`steerlab.steer`); no vector, no steering.

    Example:
        >>> s = ChatSession(model, persona=Persona("Hamlet", "fictional-character"))
        >>> s.reply("Who are you?", on_text=print).text
    """

    model: Any
    persona: Persona = ASSISTANT
    system: str | None = None
    thinking: bool = False
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    vector: Any = None  # steerlab.vectors.SteeringVector
    alpha: float = 0.0
    layers: list[int] | None = None
    positions: str = "all"
    history: list[dict[str, str]] = field(default_factory=list)

    # --- settings -------------------------------------------------------------------------
    def system_prompt(self) -> SystemPrompt:
        """The system-prompt style in force: the custom text, or ``you-are-a``."""
        if self.system is None:
            return you_are_a()
        text = self.system
        return lambda p: text

    def set_persona(self, name: str) -> None:
        name = name.strip()
        if not name or "\n" in name:
            raise SteerlabError("usage: /persona NAME (one line, e.g. /persona Hamlet)")
        self.persona = ASSISTANT if name == "assistant" else Persona(name, "custom", "")

    def set_tokens(self, text: str) -> None:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise SteerlabError(f"usage: /tokens N with N a whole number >= 1 (got {text!r})")
        self.max_tokens = n

    def set_steering(self, vector: Any, alpha: float, layers: list[int] | None = None) -> None:
        """Steer later replies with ``vector`` at ``alpha`` (checked against the model)."""
        from steerlab.layers import check_layers

        d_model = self.model.cfg.d_model
        if vector.d_model != d_model:
            raise SteerlabError(f"the vector has d_model {vector.d_model}; the model {d_model}",
                                field="vector")
        chosen = list(vector.layers) if layers is None else check_layers(self.model, layers)
        missing = [x for x in chosen if x not in vector.layers]
        if missing:
            raise SteerlabError(f"the vector has no layer {missing[0]}; it has "
                                f"{list(vector.layers)}", field="layers")
        if not chosen:
            raise SteerlabError("no layers to steer; give e.g. 10 or 10,12", field="layers")
        self.vector, self.alpha = vector, float(alpha)
        self.layers = None if layers is None else chosen

    def steer_from_args(self, arg: str) -> str:
        """``/steer PATH ALPHA [LAYERS]`` or ``/steer ALPHA``."""
        usage = "usage: /steer PATH ALPHA [LAYERS] (e.g. /steer vectors/pirate 4 10,12)"
        try:
            parts = shlex.split(arg)
        except ValueError:
            raise SteerlabError(usage) from None
        if len(parts) == 1 and self.vector is not None:
            self.alpha = _number(parts[0], usage)
            return f"steering strength {self.alpha:g}"
        if len(parts) not in (2, 3):
            raise SteerlabError(usage)
        from steerlab.vectors import SteeringVector

        alpha = _number(parts[1], usage)
        layers = None
        if len(parts) == 3:
            try:
                layers = [int(x) for x in parts[2].split(",") if x]
            except ValueError:
                raise SteerlabError(usage) from None
        self.set_steering(SteeringVector.load(parts[0]), alpha, layers)
        return f"steering with {parts[0]} at {self.alpha:g} on layers {self.steered_layers()}"

    def steered_layers(self) -> list[int]:
        if self.vector is None:
            return []
        return list(self.vector.layers if self.layers is None else self.layers)

    def apply(self, command: Command) -> str:
        """Run a command; returns the one-line confirmation (bad arguments raise a hint)."""
        name, arg = command.name, command.arg
        if name == "clear":
            self.history.clear()
            return "conversation cleared"
        if name == "persona":
            self.set_persona(arg)
            return f"persona: {self.persona.persona}"
        if name == "system":
            self.system = arg or None
            return f"system prompt: {arg}" if arg else "system prompt: the persona's default"
        if name in ("thinking", "nothinking"):
            self.thinking = name == "thinking"
            return f"thinking {'on' if self.thinking else 'off'}"
        if name == "tokens":
            self.set_tokens(arg)
            return f"max tokens per reply: {self.max_tokens}"
        if name == "steer":
            return self.steer_from_args(arg)
        if name == "unsteer":
            self.vector, self.alpha, self.layers = None, 0.0, None
            return "steering off"
        return HELP

    # --- generation -----------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the conversation plus a new user turn ``text``."""
        messages = [*self.history, {"role": "user", "content": text}]
        return encode_chat(self.model.tokenizer, messages, persona=self.persona,
                           system_prompt=self.system_prompt(), enable_thinking=self.thinking)

    def reply(
        self,
        text: str,
        *,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        projection_layer: int | None = None,
    ) -> Reply:
        """Answer ``text``, streaming decoded chunks to ``on_text``; adds both turns to history.

        Args:
            text: the user's message.
            on_text: called with each new piece of decoded text.
            should_stop: polled after every token; True ends the reply early (kept in history).
            projection_layer: record each token's projection on the (unit) steering vector
                at this layer (needs a vector).
        """
        from steerlab.steer import monitor, steer

        tokenizer = self.model.tokenizer
        ids = self.prompt_ids(text)
        decoder = StreamDecoder(tokenizer)
        stopped = [False]

        def on_token(step: list[int | None]) -> bool:
            if step[0] is not None:
                chunk = decoder.push(step[0])
                if chunk and on_text is not None:
                    on_text(chunk)
            stopped[0] = bool(should_stop is not None and should_stop())
            return stopped[0]

        mon = None
        with ExitStack() as stack:
            if self.vector is not None and self.alpha != 0.0:
                stack.enter_context(steer(self.model, self.vector, self.alpha,
                                          layers=self.layers, positions=self.positions))
            if projection_layer is not None and self.vector is not None:
                mon = stack.enter_context(monitor(self.model, self.vector,
                                                  layers=[projection_layer]))
            gen = generate(self.model, [ids], max_new_tokens=self.max_tokens,
                           temperature=self.temperature, seed=self.seed, on_token=on_token,
                           think_marker=think_end_marker(tokenizer) if self.thinking else ())
        tail = decoder.flush()
        if tail and on_text is not None:
            on_text(tail)
        answer = tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
        self.history += [{"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]
        proj = None
        if mon is not None:
            # entry i is the residual at the position that produced generated token i
            proj = mon.trace(projection_layer)[0, : len(gen.tokens[0])].tolist()
        return Reply(answer, tuple(gen.tokens[0]), stopped[0], proj)


def _number(text: str, usage: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SteerlabError(f"{usage}; ALPHA must be a number (got {text!r})") from None
