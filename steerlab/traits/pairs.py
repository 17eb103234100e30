"""Contrastive pairs: a prompt with a trait-expressing (chosen) and a plain (rejected) response.

Two file formats are read: JSONL with one :class:`Pair` per line, and the original project's
filtered JSON ``{prompt: {"pi_response": str, "llama_response": str}}`` (Pi = chosen).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from steerlab.base.checks import text as check_text
from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_text, write_jsonl_atomic
from steerlab.model.templates import MAX_MESSAGE_CHARS

__all__ = ["Pair", "load_pairs", "save_pairs", "merge_pairs", "prompt_id"]


@dataclass(frozen=True)
class Pair:
    """One contrastive pair.

    Args:
        id: stable identifier (defaults to a hash of the prompt when read from files).
        prompt: the user question.
        chosen: the response expressing the trait.
        rejected: the other response.
        chosen_score: judge score 0..100 of ``chosen``, when known.
        rejected_score: judge score 0..100 of ``rejected``, when known.
    """

    id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None


def prompt_id(prompt: str) -> str:
    """Stable short id of a prompt (first 16 hex digits of its SHA-256).

    Examples:
        >>> prompt_id("Hi")
        '3639efcd08abb273'
    """
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


_TEXT_FIELDS = ("prompt", "chosen", "rejected")
_SCORE_FIELDS = ("chosen_score", "rejected_score")
MAX_ID_CHARS = 256  # a pair id, stored with every activation row


def _pair_from_dict(d: object, source: str) -> Pair:
    if not isinstance(d, dict):
        raise SteerlabError(f"expected a JSON object, got {type(d).__name__}", source=source)
    for key in _TEXT_FIELDS:  # text every later stage can tokenise and write back
        check_text(d.get(key), key, max_chars=MAX_MESSAGE_CHARS, source=source)
    for key in _SCORE_FIELDS:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SteerlabError(f"expected a number or null, got {v!r:.60}", source=source,
                                field=key)
    pid = d.get("id")
    if pid is None:
        pid = prompt_id(d["prompt"])
    elif not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise SteerlabError(f"expected a string, got {pid!r:.60}", source=source, field="id")
    check_text(str(pid), "id", max_chars=MAX_ID_CHARS, source=source)
    scores = {k: (None if d.get(k) is None else float(d[k])) for k in _SCORE_FIELDS}
    return Pair(str(pid), d["prompt"], d["chosen"], d["rejected"], **scores)


def _from_original(data: dict, source: str) -> list[Pair]:
    pairs = []
    for prompt, rec in data.items():
        check_text(prompt, prompt[:60], max_chars=MAX_MESSAGE_CHARS, source=source)
        if not isinstance(rec, dict):
            raise SteerlabError("expected an object with 'pi_response' and 'llama_response'",
                                source=source, field=prompt[:60])
        for key in ("pi_response", "llama_response"):
            check_text(rec.get(key), f"{prompt[:60]}.{key}", max_chars=MAX_MESSAGE_CHARS,
                       source=source)
        pairs.append(Pair(prompt_id(prompt), prompt, rec["pi_response"], rec["llama_response"]))
    return pairs


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read pairs from JSONL (one :class:`Pair` object per line) or the original filtered JSON.

    Args:
        path: a ``.jsonl`` file of pair objects (``id`` optional) or a JSON object
            ``{prompt: {"pi_response": ..., "llama_response": ...}}``.

    Returns:
        The pairs in file order. Every prompt and response is checked here (text that can be
        written as UTF-8, no NUL, at most :data:`steerlab.model.templates.MAX_MESSAGE_CHARS`
        characters),
        so a bad pair is refused before a model loads, naming the file, line and field.

    Examples:
        >>> pairs = sl.load_pairs("pairs.jsonl")
        >>> len(pairs), pairs[0].prompt
        (8, 'Who are you?')
    """
    p = Path(path)
    text = read_text(p, "pairs as JSONL or filtered JSON")
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSONL whose first line is an object
        if isinstance(whole, dict) and not {"prompt", "chosen"} <= whole.keys():
            pairs = _from_original(whole, str(p))
            if not pairs:
                raise SteerlabError("no pairs in the file; expected at least one prompt",
                                    source=str(p))
            return pairs
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SteerlabError(f"invalid JSON ({e.msg}); expected one pair object per line",
                                source=where) from None
        pairs.append(_pair_from_dict(d, where))
    if not pairs:
        raise SteerlabError("no pairs in the file; expected at least one pair object",
                            source=str(p))
    return pairs


def save_pairs(pairs: Iterable[Pair], path: str | os.PathLike) -> Path:
    """Write pairs as JSONL atomically (temp file + ``os.replace``).

    Examples:
        >>> sl.save_pairs([sl.Pair("0", "Hi", "Ahoy!", "Hello.")], "one-pair.jsonl")
        PosixPath('one-pair.jsonl')
    """
    return write_jsonl_atomic(path, (asdict(pair) for pair in pairs))


def merge_pairs(paths: Iterable[str | os.PathLike]) -> list[Pair]:
    """Pairs from several files (JSONL or the original filtered JSON), first occurrence of each
    prompt kept; an id already taken by another prompt gets the prompt's hash appended.

    Examples:
        >>> merged = sl.merge_pairs(["pairs.jsonl", "filtered.json"])  # JSONL, original JSON
        >>> len(merged)  # 8 + 2 prompts, one of them in both files
        9
        >>> sl.save_pairs(merged, "all.jsonl")
        PosixPath('all.jsonl')
    """
    seen: dict[str, Pair] = {}
    ids: set[str] = set()
    for path in paths:
        for pair in load_pairs(path):
            if pair.prompt in seen:
                continue
            if pair.id in ids:
                pair = replace(pair, id=f"{pair.id}-{prompt_id(pair.prompt)[:8]}")
            ids.add(pair.id)
            seen[pair.prompt] = pair
    return list(seen.values())
