"""The ``collect`` stage: each question answered by a chosen and a rejected responder.

Output is an append-only JSONL of response records, written as answers arrive::

    {"id": "...", "prompt": "...", "role": "chosen", "responder": "local", "text": "..."}
    {"id": "...", "prompt": "...", "role": "rejected", "responder": "endpoint", "error": "..."}

A rerun skips ``(id, role)`` that already have a text and retries the failures; later records
win. The records are read and appended with :mod:`steerlab.files`, as in the ``judge`` stage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from steerlab.files import append_jsonl, read_jsonl
from steerlab.pairs import Pair, prompt_id
from steerlab.progress import progress_bar
from steerlab.responders import Responder

__all__ = ["collect", "CollectResult", "collected_pairs", "question_order", "ROLES"]

log = logging.getLogger(__name__)
ROLES = ("chosen", "rejected")


@dataclass(frozen=True)
class CollectResult:
    """What a collect run did: answers written, failures recorded, answers already present."""

    path: Path
    written: int
    failed: int
    skipped: int


def collect(
    questions: Sequence[str],
    chosen: Responder,
    rejected: Responder,
    path: str | os.PathLike,
    *,
    ids: Sequence[str] | None = None,
    progress: bool = True,
) -> CollectResult:
    """Answer every question with both responders, appending records to ``path``; resumes.

    Args:
        questions: user questions (e.g. ``trait.questions``).
        chosen: the responder expected to express the trait (positive instruction, Pi).
        rejected: the other responder (negative instruction, Llama).
        path: JSONL output, appended to.
        ids: ids per question (default: a hash of the question).
        progress: show a progress bar.

    Example:
        >>> collect(t.questions, LocalResponder(m, t.positive_instructions[0]),
        ...         LocalResponder(m, t.negative_instructions[0]), "pirate/collected.jsonl")
    """
    ids = list(ids) if ids is not None else [prompt_id(q) for q in questions]
    if len(ids) != len(questions) or len(set(ids)) != len(ids):
        raise ValueError("ids must be unique, one per question")
    done = {(r.get("id"), r.get("role")) for r in read_jsonl(path) if "text" in r}
    written = failed = skipped = 0
    with append_jsonl(path) as write, progress_bar(2 * len(questions), "collect",
                                                     enabled=progress) as bar:
        for role, responder in zip(ROLES, (chosen, rejected), strict=True):
            todo = [i for i, qid in enumerate(ids) if (qid, role) not in done]
            skipped += len(questions) - len(todo)
            bar.update(len(questions) - len(todo))
            for j, reply in responder.respond([questions[i] for i in todo]):
                i = todo[j]
                rec = {"id": ids[i], "index": i, "prompt": questions[i], "role": role,
                       "responder": getattr(responder, "name", type(responder).__name__)}
                if isinstance(reply, BaseException):
                    rec["error"] = f"{type(reply).__name__}: {reply}"[:500]
                    failed += 1
                else:
                    rec["text"] = reply
                    written += 1
                write(rec)
                bar.update(1)
    log.info("collect: %d answers written, %d failed, %d already present", written, failed,
             skipped)
    return CollectResult(Path(path), written, failed, skipped)


def latest(records: Iterable[dict], value: str) -> dict[tuple[str, str], dict]:
    """The last record with ``value`` per ``(id, role)``."""
    return {(r["id"], r["role"]): r for r in records if value in r and "id" in r and "role" in r}


def question_order(records: Iterable[dict]) -> list[str]:
    """Ids in question order (the ``index`` field of collect records), else first-seen order."""
    first: dict[str, tuple[int, int]] = {}
    for n, r in enumerate(records):
        if "id" in r and r["id"] not in first:
            idx = r.get("index")
            first[r["id"]] = (idx if isinstance(idx, int) else 1 << 62, n)
    return sorted(first, key=first.__getitem__)


def collected_pairs(path: str | os.PathLike) -> list[Pair]:
    """Pairs (unscored) for the ids that have both answers, in question order."""
    recs = read_jsonl(path)
    texts = latest(recs, "text")
    order = question_order(recs)
    return [Pair(i, texts[(i, "chosen")]["prompt"], texts[(i, "chosen")]["text"],
                 texts[(i, "rejected")]["text"])
            for i in order if (i, "chosen") in texts and (i, "rejected") in texts]
