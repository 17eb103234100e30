"""Persona records, the persona files, the system prompts built from them, and the length
limits of names and system prompts (checked when read, before a model loads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Formatter
from typing import Any

from steerlab.base.checks import text
from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_json_list

SystemPrompt = Callable[["Persona"], "str | None"]

MAX_PERSONA_CHARS = 256  # a persona name: the role in every assistant header it relabels
MAX_CATEGORY_CHARS = 256  # a category: a label of the results
MAX_ARTICLE_CHARS = 16  # "a", "an", "the", ...
MAX_SYSTEM_PROMPT_CHARS = 32_768  # a system prompt, or a system-prompt format string


@dataclass(frozen=True)
class Persona:
    """A persona record, as in a personae file (the demo's: ``builtin/data/personae.json``).

    Attributes:
        persona: the name the assistant turn is relabelled with, e.g. ``"Hamlet"``.
        category: a grouping for analysis, e.g. ``"fictional-character"``.
        article: the article used by ``you-are-a`` prompts (``"a"``, ``"an"`` or ``""``).
    """

    persona: str
    category: str = "assistant"
    article: str = ""

    @property
    def is_assistant(self) -> bool:
        """True for the plain assistant role, which needs no relabelling."""
        return self.persona == "assistant"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


ASSISTANT = Persona("assistant", "assistant", "an")
"""The model as itself: the assistant turn keeps its label and gets no persona prompt."""


def you_are_a() -> SystemPrompt:
    """System prompts like "You are an assistant." or "You are Hamlet."."""

    def prompt(p: Persona) -> str:
        article = f"{p.article} " if p.article else ""
        return f"You are {article}{p.persona}."

    return prompt


def no_system_prompt() -> SystemPrompt:
    """No system message (the chat template's own default, if it has one, applies)."""
    return lambda p: None


def custom_format(fmt: str, field: str = "system_prompt_style", *,
                  source: str | None = None) -> SystemPrompt:
    """A format string with ``{persona}``, ``{article}`` and ``{category}`` fields (at most
    :data:`MAX_SYSTEM_PROMPT_CHARS` characters)."""
    text(fmt, field, max_chars=MAX_SYSTEM_PROMPT_CHARS, source=source)
    try:  # plain fields only: a spec such as {persona:>999999999} would pad without bound
        bad = [f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
               for _, name, spec, conv in Formatter().parse(fmt) if name is not None and (
                   name not in ("persona", "article", "category") or spec or conv)]
        problem = f"{bad[0]!r:.80} is not a plain field" if bad else ""
    except ValueError as err:
        problem = str(err)
    if problem:
        raise SteerlabError(
            f"bad system prompt format {fmt!r:.80} ({problem}); use the fields "
            "{persona}, {article}, {category}",
            field=field, source=source,
        )
    return lambda p: fmt.format(**p.to_dict())


def system_prompt_style(spec: str, field: str = "system_prompt_style", *,
                        source: str | None = None) -> SystemPrompt:
    """Parse a CLI style name: ``you-are-a``, ``none``, or a custom format with ``{persona}``.

    ``field`` and ``source`` name where ``spec`` came from in an error.

    Examples:
        >>> style = sl.system_prompt_style("You are {persona}, a {category}.")
        >>> style(sl.Persona("Hamlet", "play"))
        'You are Hamlet, a play.'
    """
    text(spec, field, max_chars=MAX_SYSTEM_PROMPT_CHARS, source=source)
    named = {"you-are-a": you_are_a, "none": no_system_prompt}
    if spec in named:
        return named[spec]()
    if "{" in spec:
        return custom_format(spec, field, source=source)
    raise SteerlabError(
        f"unknown system prompt style {spec!r:.80}; expected 'you-are-a', 'none' or a format "
        "string containing {persona}",
        field=field, source=source,
    )


def system_prompt_text(value: Any, field: str, *, source: str | None = None) -> str:
    """A system prompt as given (a flag, a trait's instruction): a string encodable as UTF-8,
    no NUL, at most :data:`MAX_SYSTEM_PROMPT_CHARS` characters.

    Examples:
        >>> system_prompt_text("Speak like a pirate.", "chosen_system")
        'Speak like a pirate.'
    """
    return text(value, field, max_chars=MAX_SYSTEM_PROMPT_CHARS, source=source)


def persona_name(value: Any, field: str = "persona", *, source: str | None = None) -> str:
    """A persona name as it goes into the role header of a chat template: one non-blank line of
    at most :data:`MAX_PERSONA_CHARS` characters, encodable as UTF-8, no NUL.

    Examples:
        >>> persona_name("Hamlet")
        'Hamlet'
    """
    name = text(value, field, max_chars=MAX_PERSONA_CHARS, empty=False, source=source)
    if "\n" in name or "\r" in name:
        raise SteerlabError(f"got {name!r:.80}; expected one line", field=field, source=source)
    return name


def load_personae(path: str | Path) -> list[Persona]:
    """Read a personae JSON file: a non-empty list of ``{"persona", "category", "article"}``.

    Every field is checked here, before a model loads: ``persona`` with
    :func:`persona_name`, ``category`` (at most :data:`MAX_CATEGORY_CHARS`) and ``article``
    (at most :data:`MAX_ARTICLE_CHARS`, default ``""``) as text that can be written as UTF-8;
    an error names the record, e.g. ``field 'personae[3].persona'``.

    Examples:
        >>> sl.load_personae("personae.json")[3]
        Persona(persona='Hamlet', category='fictional-character', article='')
    """
    src = str(path)
    out = []
    for i, rec in enumerate(read_json_list(path)):
        where = f"personae[{i}]"
        if not isinstance(rec, dict):
            raise SteerlabError(f"got {rec!r:.60}; expected an object", source=src, field=where)
        out.append(persona_record(rec, where, source=src))
    return out


def persona_record(rec: dict, where: str, *, category: str | None = None,
                   source: str | None = None) -> Persona:
    """A persona from a ``{"persona", "category", "article"}`` object, every field checked:
    ``persona`` with :func:`persona_name`, ``category`` (at most :data:`MAX_CATEGORY_CHARS`;
    required unless ``category`` gives a default) and ``article`` (at most
    :data:`MAX_ARTICLE_CHARS`, default ``""``) as text that can be written as UTF-8.

    Examples:
        >>> persona_record({"persona": "Hamlet", "category": "fiction"}, "personae[0]")
        Persona(persona='Hamlet', category='fiction', article='')
    """
    return Persona(
        persona_name(rec.get("persona"), f"{where}.persona", source=source),
        text(rec.get("category", category), f"{where}.category", max_chars=MAX_CATEGORY_CHARS,
             source=source),
        text(rec.get("article", ""), f"{where}.article", max_chars=MAX_ARTICLE_CHARS,
             source=source))
