"""The ``collect`` stage: each question answered by a chosen and a rejected responder.

Output is an append-only JSONL of response records, written as answers arrive::

    {"id": "...", "prompt": "...", "role": "chosen", "sample": 0, "text": "..."}
    {"id": "...", "prompt": "...", "role": "rejected", "sample": 1, "error": "..."}

With ``samples > 1`` each question is answered several times per side: sample 0 by the
responder as given (greedy by default), samples 1, 2, ... sampled at ``temperature`` with a
seed per sample and question, so the filter can keep the best-separated loop-free pair of each
question. A rerun skips ``(id, role, sample)`` that already have a text and retries the
failures; later records win. Records without ``sample`` (older files) are sample 0. The
records are read and appended with :mod:`steerlab.base.files`, as in the ``judge`` stage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from steerlab.base.errors import SteerlabError
from steerlab.base.files import append_jsonl, read_jsonl
from steerlab.base.progress import progress_bar
from steerlab.traits.pairs import Pair, prompt_id
from steerlab.traits.responders import Responder

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


# The collect stage's defaults (the CLI, the YAML-free library call and the demo all use
# these): four answers per question and side, the first as the responder is and three sampled,
# because one greedy answer per side keeps about a quarter of a new trait's questions after
# the score-difference filter, where four samples keep about two thirds.
SAMPLES = 4
TEMPERATURE = 0.8


def collect(
    questions: Sequence[str],
    chosen: Responder,
    rejected: Responder,
    path: str | os.PathLike,
    *,
    ids: Sequence[str] | None = None,
    samples: int = SAMPLES,
    temperature: float = TEMPERATURE,
    seed: int = 0,
    progress: bool = True,
) -> CollectResult:
    """Answer every question with both responders, appending records to ``path``; resumes.

    Args:
        questions: user questions (e.g. ``trait.questions``).
        chosen: the responder expected to express the trait (positive instruction, Pi).
        rejected: the other responder (negative instruction, Llama).
        path: JSONL output, appended to.
        ids: ids per question (default: a hash of the question).
        samples: answers per question and side (sample 0 as the responder is; the rest
            sampled).
        temperature: sampling temperature of samples 1, 2, ...
        seed: base seed; sample ``s`` of a question draws with a seed derived from
            ``seed + s`` and the question (:func:`steerlab.traits.responders.question_seed`).
        progress: show a progress bar.

    Examples:
        >>> from steerlab.traits import LocalResponder
        >>> pi = LocalResponder(model, trait.positive_instructions[0], max_tokens=8)
        >>> plain = LocalResponder(model, trait.negative_instructions[0], max_tokens=8)
        >>> sl.collect(trait.questions[:2], pi, plain, "pirate/collected.jsonl", samples=1)
        CollectResult(path=PosixPath('pirate/collected.jsonl'), written=4, failed=0, skipped=0)
    """
    ids = list(ids) if ids is not None else [prompt_id(q) for q in questions]
    if len(ids) != len(questions) or len(set(ids)) != len(ids):
        raise ValueError("ids must be unique, one per question")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SteerlabError(f"got {samples!r}; expected an integer >= 1", field="samples")
    if samples > 1 and not 0 < temperature <= 2:
        raise SteerlabError(f"got {temperature!r}; expected a number in (0, 2]",
                            field="temperature")
    done = {key(r) for r in read_jsonl(path) if "text" in r}
    written = failed = skipped = 0
    total = 2 * len(questions) * samples
    with append_jsonl(path) as write, progress_bar(total, "collect", enabled=progress) as bar:
        for sample in range(samples):
            for role, base in zip(ROLES, (chosen, rejected), strict=True):
                responder = base if sample == 0 else base.sampled(temperature, seed + sample)
                todo = [i for i, qid in enumerate(ids) if (qid, role, sample) not in done]
                skipped += len(questions) - len(todo)
                bar.update(len(questions) - len(todo))
                for j, reply in responder.respond([questions[i] for i in todo]):
                    i = todo[j]
                    rec = {"id": ids[i], "index": i, "prompt": questions[i], "role": role,
                           "sample": sample,
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


Key = tuple[str, str, int]  # (id, role, sample)


def key(record: dict) -> Key:
    """A record's ``(id, role, sample)`` (sample 0 when the record has none)."""
    sample = record.get("sample", 0)
    return (record.get("id"), record.get("role"),
            sample if isinstance(sample, int) and not isinstance(sample, bool) else -1)


def latest(records: Iterable[dict], value: str) -> dict[Key, dict]:
    """The last record with ``value`` per ``(id, role, sample)``."""
    return {key(r): r for r in records if value in r and "id" in r and "role" in r}


def question_order(records: Iterable[dict]) -> list[str]:
    """Ids in question order (the ``index`` field of collect records), else first-seen order."""
    first: dict[str, tuple[int, int]] = {}
    for n, r in enumerate(records):
        if "id" in r and r["id"] not in first:
            idx = r.get("index")
            first[r["id"]] = (idx if isinstance(idx, int) else 1 << 62, n)
    return sorted(first, key=first.__getitem__)


def collected_pairs(path: str | os.PathLike) -> list[Pair]:
    """Pairs (unscored) of the first samples, for the ids that have both, in question order."""
    recs = read_jsonl(path)
    texts = latest(recs, "text")
    order = question_order(recs)
    return [Pair(i, texts[(i, "chosen", 0)]["prompt"], texts[(i, "chosen", 0)]["text"],
                 texts[(i, "rejected", 0)]["text"])
            for i in order if (i, "chosen", 0) in texts and (i, "rejected", 0) in texts]
