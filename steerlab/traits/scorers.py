"""Built-in trait scorers: text -> score 0..100, for traits a small model cannot judge.

A scorer is any ``Callable[[str], float]``. Trait files name one with a spec such as
``{"type": "lexicon", "words": ["arr", "matey"]}``; :func:`scorer_from_spec` looks the type up
in :data:`SCORERS` (a dict of factories) and passes the other keys as keyword arguments.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

from steerlab.base.errors import SteerlabError

__all__ = ["Scorer", "SCORERS", "lexicon_scorer", "regex_scorer", "emoji_rate_scorer",
           "scorer_from_spec", "distinct_n", "text_distinct"]

Scorer = Callable[[str], float]

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*", re.UNICODE)
# Emoji blocks: pictographs, emoticons, transport, supplemental symbols, dingbats, flags.
_EMOJI = re.compile(
    "[\U0001F300-\U0001F5FF\U0001F600-\U0001F64F\U0001F680-\U0001F6FF\U0001F900-\U0001F9FF"
    "\U0001FA70-\U0001FAFF\U0001F1E6-\U0001F1FF\u2600-\u26FF\u2700-\u27BF\u2B50\u2B55]"
)


def distinct_n(items: Sequence, n: int = 2) -> float:
    """Share of distinct n-grams among a sequence's n-grams (tokens or words); 1.0 when it has
    fewer than two n-grams. Repetition loops ("aye, aye, aye") score low.

    Examples:
        >>> distinct_n([1, 2, 1, 2, 1, 2])
        0.4
    """
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    return len(set(grams)) / len(grams) if len(grams) > 1 else 1.0


def text_distinct(text: str, n: int = 2) -> float:
    """:func:`distinct_n` over a text's lower-cased words and punctuation marks (no tokenizer).

    Examples:
        >>> text_distinct("Aye, aye, aye, aye!")
        0.5
    """
    return distinct_n(re.findall(r"\w+|[^\w\s]", text.lower()), n)


def _clip(x: float) -> float:
    return float(min(100.0, max(0.0, x)))


def lexicon_scorer(words: Sequence[str], *, saturation: float = 0.1) -> Scorer:
    """Score the share of words (or phrases) from a lexicon, whole-word and case-insensitive.

    Args:
        words: lexicon entries; multi-word phrases are allowed ("shiver me timbers").
        saturation: share of lexicon hits among all words that scores 100 (linear below).

    Examples:
        >>> score = lexicon_scorer(["arr", "matey"])
        >>> score("Arr, matey, the sea be calm today, arr!")  # 3 hits / 8 words -> 100
        100.0
    """
    entries = [w.strip() for w in words if isinstance(w, str) and w.strip()]
    if not entries:
        raise SteerlabError("expected a non-empty list of strings", field="words")
    if saturation <= 0:
        raise SteerlabError(f"expected a positive number, got {saturation}", field="saturation")
    alts = "|".join(re.escape(w) for w in sorted(entries, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w'])(?:{alts})(?![\w'])", re.IGNORECASE)

    def score(text: str) -> float:
        n = len(_WORD.findall(text))
        return _clip(100.0 * len(pattern.findall(text)) / (n * saturation)) if n else 0.0

    return score


def regex_scorer(pattern: str, *, saturation: int = 1, ignore_case: bool = False) -> Scorer:
    """Score by the number of (multi-line) regex matches: ``saturation`` matches score 100.

    Args:
        pattern: a Python regular expression, compiled with ``re.MULTILINE``.
        saturation: number of matches that scores 100 (linear below).
        ignore_case: compile with ``re.IGNORECASE``.

    Examples:
        >>> score = regex_scorer(r"^\\s*([-*]|\\d+\\.)\\s", saturation=3)  # list items
        >>> score("- a\\n- b\\n- c")
        100.0
    """
    if saturation < 1:
        raise SteerlabError(f"expected an integer >= 1, got {saturation}", field="saturation")
    try:
        rx = re.compile(pattern, re.MULTILINE | (re.IGNORECASE if ignore_case else 0))
    except (re.error, TypeError) as e:
        raise SteerlabError(f"invalid regular expression {pattern!r}: {e}",
                            field="pattern") from None

    def score(text: str) -> float:
        return _clip(100.0 * sum(1 for _ in rx.finditer(text)) / saturation)

    return score


def emoji_rate_scorer(*, saturation: float = 0.1) -> Scorer:
    """Score the rate of emoji among words and emoji: ``saturation`` of them scores 100.

    Examples:
        >>> emoji_rate_scorer()("Great job 🎉🎉")  # 2 emoji / 4 tokens
        100.0
    """
    if saturation <= 0:
        raise SteerlabError(f"expected a positive number, got {saturation}", field="saturation")

    def score(text: str) -> float:
        n_emoji = len(_EMOJI.findall(text))
        n = len(_WORD.findall(_EMOJI.sub(" ", text))) + n_emoji
        return _clip(100.0 * n_emoji / (n * saturation)) if n else 0.0

    return score


SCORERS: dict[str, Callable[..., Scorer]] = {
    "lexicon": lexicon_scorer,
    "regex": regex_scorer,
    "emoji_rate": emoji_rate_scorer,
}


def scorer_from_spec(spec: dict, *, source: str | None = None) -> Scorer:
    """Build a scorer from a spec ``{"type": <name in SCORERS>, **factory_kwargs}``.

    Args:
        spec: e.g. ``{"type": "lexicon", "words": ["arr"], "saturation": 0.1}``.
        source: file the spec came from, named in errors.

    Examples:
        >>> score = sl.scorer_from_spec({"type": "regex", "pattern": "^#+ ", "saturation": 2})
        >>> score("# Title\\n## Part"), score("# Title"), score("plain")  # 2 headings: 100
        (100.0, 50.0, 0.0)
    """
    if not isinstance(spec, dict):
        raise SteerlabError(f"expected an object with a 'type', got {spec!r:.60}",
                            source=source, field="scorer")
    kind = spec.get("type")
    factory = SCORERS.get(kind) if isinstance(kind, str) else None
    if factory is None:
        raise SteerlabError(f"unknown scorer type {kind!r}; expected one of {sorted(SCORERS)}",
                            source=source, field="scorer.type")
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise SteerlabError(f"unknown option(s) {unknown} for a {kind} scorer; expected "
                            f"{sorted(params)}", source=source, field="scorer")
    try:
        return factory(**kwargs)
    except SteerlabError as e:
        raise SteerlabError(f"scorer: {e}", source=source) from None
    except TypeError as e:
        raise SteerlabError(f"bad {kind} scorer options: {e}", source=source,
                            field="scorer") from None
