"""Interactive chat state shared by ``steerlab chat`` and the notebook widget.

A :class:`ChatSession` holds the conversation and its settings (persona, system prompt,
thinking, token budget, and the :class:`steerlab.steering.intervention.Steering` in force); its
setters
validate. :meth:`ChatSession.reply` streams a reply as text chunks
(:class:`steerlab.generation.detokenize.Detokenizer`). The terminal's ``/command`` grammar lives
with the
command, in :mod:`steerlab.cli.chat`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from steerlab.base.checks import number, seed
from steerlab.base.errors import SteerlabError
from steerlab.generation.detokenize import Detokenizer
from steerlab.generation.engine import Engine
from steerlab.generation.generator import generate
from steerlab.model.hooks import check_layers
from steerlab.model.personas import (
    ASSISTANT,
    Persona,
    SystemPrompt,
    persona_name,
    system_prompt_text,
    you_are_a,
)
from steerlab.model.templates import encode_chat, think_end_marker
from steerlab.steering.intervention import DEFAULT_UNITS, Positions, Steering
from steerlab.steering.monitoring import monitor
from steerlab.steering.vector import SteeringVector


@dataclass(frozen=True)
class ChatReply:
    """One streamed reply: its text, token count, whether the user stopped it, and the
    per-token projections on the watched vector (unit) after and before the interventions
    (when one is watched: :meth:`ChatSession.watch`, or a projection layer was given)."""

    text: str
    tokens: tuple[int, ...]
    interrupted: bool
    projection: list[float] | None = None
    projection_before: list[float] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def mean_projection(self) -> float | None:
        """The reply's mean projection after the interventions (``None`` when not watched
        or empty): the number a drift plot follows from turn to turn."""
        if not self.projection:
            return None
        return sum(self.projection) / len(self.projection)


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
        steering: the steering in force (see :meth:`set_steering`); ``None``: none.
        interventions: ablate, cap and set interventions in force besides it, in the order
            added (see :meth:`add_intervention`).
        positions: where :meth:`set_steering` steers (see
            :class:`steerlab.steering.intervention.Positions`).
        engine: how generation runs (``auto``, ``eager``, ``static``); the reply streams
            token by token with eager, in bursts of a few tokens with static.

    Examples:
        >>> hamlet = sl.Persona("Hamlet", "fictional-character")
        >>> s = sl.ChatSession(model, persona=hamlet, max_tokens=8)
        >>> pieces = []
        >>> reply = s.reply("Who are you?", on_text=pieces.append)  # streams into pieces
        >>> "".join(pieces) == reply.text, reply.n_tokens <= 8
        (True, True)
    """

    model: Any
    persona: Persona = ASSISTANT
    system: str | None = None
    thinking: bool = False
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    steering: Steering | None = None
    positions: Positions = Positions.ALL
    history: list[dict[str, str]] = field(default_factory=list)
    engine: str = "auto"
    interventions: list[Steering] = field(default_factory=list)
    watched: tuple[SteeringVector, int] | None = None

    def __post_init__(self) -> None:
        self.engine = Engine.parse(self.engine, field="engine").value
        self.temperature = number(self.temperature, "temperature", lo=0)
        if self.system is not None:
            system_prompt_text(self.system, "system")
        self.set_max_tokens(self.max_tokens)
        if self.seed is not None:
            self.seed = seed(self.seed)

    # --- settings -------------------------------------------------------------------------
    def system_prompt(self) -> SystemPrompt:
        """The system-prompt style in force: the custom text, or ``you-are-a``."""
        if self.system is None:
            return you_are_a()
        text = self.system
        return lambda p: text

    def set_persona(self, name: str) -> None:
        """Talk to ``name`` (one line); ``assistant`` resets the plain assistant."""
        name = persona_name(name.strip())  # one line, at most MAX_PERSONA_CHARS
        self.persona = ASSISTANT if name == "assistant" else Persona(name, "custom", "")

    def set_max_tokens(self, n: int) -> None:
        """At most ``n`` (>= 1) new tokens per reply."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SteerlabError(f"got {n!r}; expected a whole number >= 1", field="max_tokens")
        self.max_tokens = n

    def set_steering(self, vector: SteeringVector, alpha: float,
                     layers: Sequence[int] | None = None,
                     units: str = DEFAULT_UNITS.value) -> Steering:
        """Steer later replies with ``vector`` at ``alpha`` (checked against the model);
        ``units`` ``"norm"`` (the default) makes alpha a fraction of the residual norm (as
        ``vectors eval`` reports it), ``"raw"`` a multiple of the vector."""
        self.steering = Steering.create(self.model, vector, alpha, layers=layers,
                                        positions=self.positions, units=units)
        return self.steering

    def set_strength(self, alpha: float) -> Steering:
        """Change the strength of the steering in force."""
        if self.steering is None:
            raise SteerlabError("no steering vector is loaded; load one first", field="alpha")
        self.steering = self.steering.with_alpha(alpha)
        return self.steering

    def add_intervention(self, vector: SteeringVector, op: str,
                         layers: Sequence[int] | None = None, *,
                         bounds: tuple[float | str | None, float | str | None] | None = None,
                         target: float | str | None = None,
                         units: str = DEFAULT_UNITS.value) -> Steering:
        """Add an ``ablate``, ``cap`` or ``set`` intervention for later replies (checked
        against the model), besides the steering in force; bounds and target in ``units``."""
        if op == "add":
            raise SteerlabError("add is the steering: use set_steering", field="op")
        made = Steering.create(self.model, vector, 1.0, layers=layers, positions=self.positions,
                               units=units, op=op, bounds=bounds, target=target)
        self.interventions.append(made)
        return made

    def watch(self, vector: SteeringVector | None, layer: int | None = None) -> int | None:
        """Report every reply's projection on ``vector`` (e.g. a persona axis; unit) at
        ``layer`` (default: the vector's middle layer), whatever steers; ``None`` stops.
        Returns the layer watched."""
        if vector is None:
            self.watched = None
            return None
        if vector.d_model != self.model.cfg.d_model:
            raise SteerlabError(f"the vector has d_model {vector.d_model}; the model "
                                f"{self.model.cfg.d_model}", field="axis")
        chosen = vector.layers[len(vector.layers) // 2] if layer is None else layer
        check_layers(self.model, [chosen], field="axis_layer")
        vector.direction(chosen)  # one of its layers
        self.watched = (vector, chosen)
        return chosen

    def clear_steering(self) -> None:
        """Stop steering: the steering and every intervention."""
        self.steering = None
        self.interventions.clear()

    def steered_layers(self) -> list[int]:
        """The layers steered now ([] without steering)."""
        return [] if self.steering is None else list(self.steering.layers)

    def clear(self) -> None:
        """Forget the conversation."""
        self.history.clear()

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
    ) -> ChatReply:
        """Answer ``text``, streaming decoded chunks to ``on_text``; adds both turns to history.

        Args:
            text: the user's message.
            on_text: called with each new piece of decoded text.
            should_stop: polled after every token; True ends the reply early (kept in history).
            projection_layer: record each token's projection on the (unit) steering vector
                at this layer (needs a vector); the watched vector (:meth:`watch`) is
                recorded whatever this says.
        """
        tokenizer = self.model.tokenizer
        ids = self.prompt_ids(text)
        decoder = Detokenizer(tokenizer)
        stopped = [False]

        def on_token(step: list[int | None]) -> bool:
            if step[0] is not None:
                chunk = decoder.push([step[0]])
                if chunk and on_text is not None:
                    on_text(chunk)
            stopped[0] = bool(should_stop is not None and should_stop())
            return stopped[0]

        mon = None
        with ExitStack() as stack:
            if self.steering is not None:
                stack.enter_context(self.steering.apply(self.model))
            for intervention in self.interventions:
                stack.enter_context(intervention.apply(self.model))
            watched = self.watched
            if watched is None and projection_layer is not None and self.steering is not None:
                watched = (self.steering.vector, projection_layer)
            if watched is not None:
                mon = stack.enter_context(monitor(self.model, watched[0],
                                                  layers=[watched[1]]))
            gen = generate(self.model, [ids], max_new_tokens=self.max_tokens,
                           temperature=self.temperature, seed=self.seed, on_token=on_token,
                           think_marker=think_end_marker(tokenizer) if self.thinking else (),
                           engine=self.engine)
        tail = decoder.flush()
        if tail and on_text is not None:
            on_text(tail)
        answer = tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
        self.history += [{"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]
        if mon is None:
            return ChatReply(answer, tuple(gen.tokens[0]), stopped[0])
        # entry i is the residual at the position that produced generated token i
        n, layer = len(gen.tokens[0]), mon.layers[0]
        return ChatReply(answer, tuple(gen.tokens[0]), stopped[0],
                         mon.trace(layer)[0, :n].tolist(),
                         mon.trace(layer, before=True)[0, :n].tolist())
