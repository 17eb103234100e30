"""Persona records and the system prompts built from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from steerlab.errors import SteerlabError

SystemPrompt = Callable[["Persona"], "str | None"]


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


def you_are_a() -> SystemPrompt:
    """System prompts like "You are an assistant." or "You are Hamlet."."""

    def prompt(p: Persona) -> str:
        article = f"{p.article} " if p.article else ""
        return f"You are {article}{p.persona}."

    return prompt


def no_system_prompt() -> SystemPrompt:
    """No system message (the chat template's own default, if it has one, applies)."""
    return lambda p: None


def custom_format(fmt: str) -> SystemPrompt:
    """A format string with ``{persona}``, ``{article}`` and ``{category}`` fields."""
    try:
        fmt.format(persona="x", article="a", category="c")
    except (KeyError, IndexError, ValueError) as err:
        raise SteerlabError(
            f"bad system prompt format {fmt!r} ({err}); use the fields "
            "{persona}, {article}, {category}",
            field="system_prompt_style",
        ) from None
    return lambda p: fmt.format(**p.to_dict())


def system_prompt_style(spec: str) -> SystemPrompt:
    """Parse a CLI style name: ``you-are-a``, ``none``, or a custom format with ``{persona}``."""
    named = {"you-are-a": you_are_a, "none": no_system_prompt}
    if spec in named:
        return named[spec]()
    if "{" in spec:
        return custom_format(spec)
    raise SteerlabError(
        f"unknown system prompt style {spec!r}; expected 'you-are-a', 'none' or a format "
        "string containing {persona}",
        field="system_prompt_style",
    )


def load_personae(path: str | Path) -> list[Persona]:
    """Read a personae JSON file: a non-empty list of ``{"persona", "category", "article"}``."""
    records = _read_json_list(path)
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise SteerlabError(
                f"item {i} is {type(rec).__name__}; expected an object", source=str(path)
            )
        for key in ("persona", "category", "article"):
            value = rec.get(key, "" if key == "article" else None)
            if not isinstance(value, str) or (key == "persona" and not value.strip()):
                raise SteerlabError(
                    f"item {i} has {value!r}; expected a string"
                    + (" (non-empty)" if key == "persona" else ""),
                    source=str(path),
                    field=key,
                )
        out.append(Persona(rec["persona"], rec["category"], rec.get("article", "")))
    return out


def _read_json_list(path: str | Path) -> list:
    from steerlab.files import read_json

    path = Path(path)
    data = read_json(path, "a JSON list")
    if not isinstance(data, list) or not data:
        raise SteerlabError("expected a non-empty JSON list", source=str(path))
    return data
