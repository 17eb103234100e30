"""Trait files: ``traits/<name>.json`` with the original ``name``/``trait_instruction`` and the
optional generated artefacts (elicitation instructions, questions, rubric, built-in scorer).

Names are looked up in ``./traits`` first, then among the built-in traits shipped in the
package (``steerlab/builtin/traits``, read with :mod:`importlib.resources`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

from steerlab.base.checks import text
from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_text, write_json_atomic
from steerlab.model.personas import MAX_SYSTEM_PROMPT_CHARS
from steerlab.model.templates import MAX_MESSAGE_CHARS
from steerlab.traits.scorers import Scorer, scorer_from_spec

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

__all__ = ["Trait", "list_traits", "load_trait", "trait_dirs", "trait_file"]

_LISTS = ("positive_instructions", "negative_instructions", "questions", "held_out_questions")
MAX_NAME_CHARS = 255  # a trait name names files: traits/<name>.json, runs/traits/<name>/
# the longest text each field may hold: instructions are system prompts, questions prompts
_MAX_CHARS = {"name": MAX_NAME_CHARS, "trait_instruction": MAX_SYSTEM_PROMPT_CHARS,
              "positive_instructions": MAX_SYSTEM_PROMPT_CHARS,
              "negative_instructions": MAX_SYSTEM_PROMPT_CHARS, "questions": MAX_MESSAGE_CHARS,
              "held_out_questions": MAX_MESSAGE_CHARS, "evaluation_prompt": MAX_MESSAGE_CHARS}


@dataclass(frozen=True)
class Trait:
    """A behavioural trait and the artefacts to elicit and judge it.

    Args:
        name: short identifier ("pirate").
        trait_instruction: the original one-paragraph description of the trait.
        positive_instructions: system prompts that elicit the trait.
        negative_instructions: system prompts that elicit its absence (neutral behaviour).
        questions: user questions answered to build contrastive pairs.
        held_out_questions: questions kept out of the pairs, to evaluate steering.
        evaluation_prompt: LLM-judge rubric with ``{question}`` and ``{answer}`` placeholders,
            asking for a 0..100 score.
        scorer: a built-in scorer spec (see :func:`steerlab.traits.scorers.scorer_from_spec`).
    """

    name: str
    trait_instruction: str
    positive_instructions: tuple[str, ...] = ()
    negative_instructions: tuple[str, ...] = ()
    questions: tuple[str, ...] = ()
    held_out_questions: tuple[str, ...] = ()
    evaluation_prompt: str | None = None
    scorer: dict | None = None

    @property
    def prompted_instruction(self) -> str:
        """The system prompt of the *prompted* reference that steering is compared with: the
        first positive instruction (the prompt that elicits the trait in the pairs, the
        strongest prompting baseline), else the trait instruction."""
        return self.positive_instructions[0] if self.positive_instructions else \
            self.trait_instruction

    def build_scorer(self) -> Scorer:
        """The built-in scorer of this trait.

        Examples:
            >>> sl.load_trait("pirate").build_scorer()("Arr matey!")
            100.0
        """
        if self.scorer is None:
            raise SteerlabError("the trait has no built-in scorer; judge with an LLM rubric",
                                source=self.name, field="scorer")
        return scorer_from_spec(self.scorer, source=self.name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; empty optional artefacts are left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or v == ():
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def replace(self, **changes: Any) -> Trait:
        """A copy with some fields changed (lists become tuples), validated again."""
        return trait_from_dict({**self.to_dict(), **changes})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trait as JSON atomically.

        Examples:
            >>> path = sl.load_trait("pirate").save("traits/pirate-copy.json")
            >>> sl.load_trait(path) == sl.load_trait("pirate")
            True
        """
        return write_json_atomic(path, self.to_dict(), indent=2)


def trait_from_dict(d: Any, *, source: str | None = None) -> Trait:
    """Validate a trait object (as read from JSON) and build a :class:`Trait`."""
    if not isinstance(d, dict):
        raise SteerlabError(f"expected a JSON object, got {type(d).__name__}", source=source)
    known = {f.name for f in fields(Trait)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SteerlabError(f"unknown field(s) {unknown}; expected some of {sorted(known)}",
                            source=source)
    kwargs: dict[str, Any] = {}
    for key in ("name", "trait_instruction"):
        kwargs[key] = text(d.get(key), key, max_chars=_MAX_CHARS[key], empty=False,
                           source=source)
    for key in _LISTS:
        v = d.get(key, [])
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
            raise SteerlabError(f"expected a list of non-empty strings, got {v!r:.60}",
                                source=source, field=key)
        kwargs[key] = tuple(text(s, f"{key}[{i}]", max_chars=_MAX_CHARS[key], source=source)
                            for i, s in enumerate(v))
    ep = d.get("evaluation_prompt")
    if ep is not None and (not isinstance(ep, str) or "{answer}" not in ep):
        raise SteerlabError("expected a string with an {answer} placeholder", source=source,
                            field="evaluation_prompt")
    if ep is not None:
        text(ep, "evaluation_prompt", max_chars=_MAX_CHARS["evaluation_prompt"], source=source)
    kwargs["evaluation_prompt"] = ep
    if d.get("scorer") is not None:
        scorer_from_spec(d["scorer"], source=source)  # validate now, not at judge time
        kwargs["scorer"] = dict(d["scorer"])
    return Trait(**kwargs)


def trait_dirs() -> list[Traversable]:
    """Where trait names are looked up, first match wins: ``./traits`` in the current
    directory (so a project can add traits or override a built-in), then the built-in traits.
    """
    return [Path.cwd() / "traits", files("steerlab.builtin") / "traits"]


# The trait a first run demonstrates (`steerlab demo`, `vectors eval`): one the embedded model
# can play when asked (its prompted cowboy answers are coherent nine times in ten; its pirate
# answers half the time), so the demo shows the method, with the verdict computed as always.
DEFAULT_TRAIT = "cowboy"


def list_traits() -> dict[str, Traversable]:
    """Every trait :func:`load_trait` finds by name, sorted: name -> the file it loads.

    A ``./traits/<name>.json`` hides the built-in of the same name, as in :func:`load_trait`.

    Examples:
        >>> list(list_traits())
        ['cowboy', 'emoji', 'formatting', 'pirate', 'playful']
    """
    found: dict[str, Traversable] = {}
    for d in trait_dirs():
        if d.is_dir():
            for f in d.iterdir():
                if f.name.endswith(".json") and f.is_file():
                    found.setdefault(f.name.removesuffix(".json"), f)
    return dict(sorted(found.items()))


def _locate(name_or_path: str | os.PathLike) -> Path | Traversable:
    """The file a trait name or path loads (:func:`load_trait`'s lookup)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix or os.sep in str(name_or_path):
        raise SteerlabError("no such trait file", source=str(path))
    known = list_traits()
    if path.name not in known:
        raise SteerlabError(f"no trait named {path.name!r}; known traits: {list(known)}",
                            source=str(name_or_path))
    return known[path.name]


def trait_file(name_or_path: str | os.PathLike) -> Path | None:
    """The local file a trait name or path loads, or None for a built-in in package data
    that is not a plain file (an installed wheel's zip) or a name that finds nothing: an
    input no output may alias.

    Examples:
        >>> trait_file("traits/pirate-copy.json")
        PosixPath('traits/pirate-copy.json')
    """
    try:
        found = _locate(name_or_path)
    except SteerlabError:
        return None
    return found if isinstance(found, Path) else None


def load_trait(name_or_path: str | os.PathLike) -> Trait:
    """Load and validate a trait file, by path or by name (``traits/<name>.json`` in the
    current directory, else a built-in; see :func:`list_traits`).

    Examples:
        >>> t = sl.load_trait("pirate")  # the built-in one (no ./traits/pirate.json here)
        >>> t.name, len(t.questions), len(t.held_out_questions)
        ('pirate', 50, 30)
    """
    p = _locate(name_or_path)
    try:
        data = json.loads(read_text(p, "a trait file (JSON)") if isinstance(p, Path)
                          else p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SteerlabError(f"invalid JSON at line {e.lineno}: {e.msg}", source=str(p)) from None
    return trait_from_dict(data, source=str(p))
