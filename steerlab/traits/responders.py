"""Responders: something that answers a list of questions. One small interface
(:class:`Responder`), two kinds: an OpenAI-compatible endpoint, or a local steerlab model with a
system prompt, a persona and optionally a steering intervention."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from steerlab.generation.generator import generate
from steerlab.model.personas import ASSISTANT, Persona
from steerlab.model.templates import encode_messages
from steerlab.traits.client import EndpointClient, bounded_map
from steerlab.traits.pairs import prompt_id

# The collect stage's answer length (new tokens per answer), for both responders: long enough
# for a trait to show, short enough that 4 samples x 2 sides x 40 questions stay quick on a CPU.
ANSWER_TOKENS = 48

__all__ = ["Responder", "EndpointResponder", "LocalResponder",
           "question_seed"]

Outcome = str | BaseException  # an answer's text, or why it failed


@runtime_checkable
class Responder(Protocol):
    """Answers questions; yields ``(index, text or exception)`` as answers arrive, in any order.

    A failed answer is an exception value, never raised: callers record it and go on.
    """

    name: str

    def respond(self, questions: Sequence[str]) -> Iterator[tuple[int, Outcome]]: ...

    def sampled(self, temperature: float, seed: int) -> Responder:
        """The same responder sampling at ``temperature``; each question draws with its own
        seed, :func:`question_seed` ``(seed, question)``, where the backend honours seeds."""
        ...


def question_seed(seed: int, question: str) -> int:
    """The sampling seed of one question under a responder's ``seed`` (stable, 31 bits).

    Examples:
        >>> question_seed(1, "Who are you?") != question_seed(2, "Who are you?")
        True
    """
    return (int(prompt_id(question), 16) + 1_000_003 * int(seed)) % (2**31 - 1)


def _messages(system_prompt: str | None, question: str) -> list[dict[str, str]]:
    sys_msg = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*sys_msg, {"role": "user", "content": question}]


@dataclass
class EndpointResponder:
    """Answers through an OpenAI-compatible endpoint, ``client.endpoint.concurrency`` at a time.

    Args:
        client: an :class:`~steerlab.traits.client.EndpointClient`.
        system_prompt: system message sent before each question (``None``: none).
        max_tokens: completion budget per answer.
        temperature: 0 for greedy.
        extra_body: extra request fields, e.g. ``{"persona": "Hamlet"}`` for ``steerlab serve``.

    Examples:
        >>> client = sl.EndpointClient(sl.Endpoint("http://127.0.0.1:8000/v1", "embedded", None))
        >>> r = EndpointResponder(client, "Talk like a pirate.", max_tokens=64)
        >>> dict(r.respond(["Who are you?"]))  # doctest: +SKIP
    """

    client: EndpointClient
    system_prompt: str | None = None
    max_tokens: int = ANSWER_TOKENS
    temperature: float = 0.0
    extra_body: dict | None = None
    name: str = "endpoint"
    seed: int | None = None

    def respond(self, questions: Sequence[str]) -> Iterator[tuple[int, Outcome]]:
        def one(q: str) -> str:
            return self.client.chat(_messages(self.system_prompt, q), max_tokens=self.max_tokens,
                                    temperature=self.temperature, extra_body=self.extra_body,
                                    seed=None if self.seed is None else question_seed(self.seed, q))

        yield from bounded_map(one, questions, self.client.endpoint.concurrency)

    def sampled(self, temperature: float, seed: int) -> EndpointResponder:
        """This responder sampling at ``temperature``; each question sends
        :func:`question_seed` ``(seed, question)``."""
        return replace(self, temperature=temperature, seed=seed)


@dataclass
class LocalResponder:
    """Answers with a local steerlab model, in batches, greedy by default.

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        system_prompt: system message; with a persona and no system prompt, "You are <persona>."
        persona: relabels the assistant turn (see :func:`steerlab.model.templates.render_chat`).
        max_tokens: new tokens per answer.
        batch_size: questions per :func:`steerlab.generation.generator.generate` call.
        temperature: 0 for greedy decoding.
        seed: sampling seed when ``temperature > 0``; each question draws with
            :func:`question_seed` ``(seed, question)``.
        steering: ``model -> context manager`` applied around generation, e.g.
            ``lambda m: steer(m, vector, 4.0)``.
        engine: how generation runs (``auto``, ``eager``, ``static``; see
            :class:`steerlab.generation.engine.Engine`).

    Examples:
        >>> r = LocalResponder(model, "Talk like a pirate.", max_tokens=8)
        >>> answers = dict(r.respond(["Who are you?", "Describe the sea."]))
        >>> [type(answers[i]).__name__ for i in range(2)]  # by question index: text, or error
        ['str', 'str']
    """

    model: Any
    system_prompt: str | None = None
    persona: Persona = ASSISTANT
    max_tokens: int = ANSWER_TOKENS
    batch_size: int = 64
    temperature: float = 0.0
    seed: int | None = None
    steering: Callable[[Any], contextlib.AbstractContextManager] | None = None
    name: str = field(default="local")
    engine: str = "auto"

    def encode(self, question: str) -> list[int]:
        """Prompt token ids of one question (what the server builds for the same request)."""
        return encode_messages(self.model.tokenizer, _messages(self.system_prompt, question),
                               self.persona)

    def respond(self, questions: Sequence[str]) -> Iterator[tuple[int, Outcome]]:
        tok = self.model.tokenizer
        for start in range(0, len(questions), self.batch_size):
            chunk = questions[start : start + self.batch_size]
            try:
                prompts = [self.encode(q) for q in chunk]
                ctx = self.steering(self.model) if self.steering else contextlib.nullcontext()
                with ctx:
                    seed = (None if self.seed is None else
                            [question_seed(self.seed, q) for q in chunk])
                    texts = generate(self.model, prompts, max_new_tokens=self.max_tokens,
                                     temperature=self.temperature, seed=seed,
                                     engine=self.engine).texts(tok)
            except Exception as err:  # noqa: BLE001 - recorded by the caller, never fatal
                texts = [err] * len(chunk)
            yield from enumerate(texts, start)

    def sampled(self, temperature: float, seed: int) -> LocalResponder:
        """This responder sampling at ``temperature``; each question draws with
        :func:`question_seed` ``(seed, question)``, so an answer depends on neither its batch
        nor the other questions (a resumed collect draws what an uninterrupted one would)."""
        return replace(self, temperature=temperature, seed=seed)
