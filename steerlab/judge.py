"""The ``judge`` and ``filter`` stages: score every collected answer 0..100, keep the pairs
whose chosen answer out-scores the rejected one by a margin.

A judge is ``(question, answer) -> score``: a built-in scorer (:func:`scorer_judge`) or an LLM
rubric (:func:`rubric_judge`). Judge records are appended as they finish::

    {"id": "...", "role": "chosen", "score": 87.0}
    {"id": "...", "role": "rejected", "error": "MalformedResponse: ..."}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from steerlab.client import EndpointClient, bounded_map
from steerlab.collect import latest, question_order
from steerlab.errors import SteerlabError
from steerlab.files import append_jsonl, read_jsonl
from steerlab.pairs import Pair, save_pairs
from steerlab.progress import progress_bar
from steerlab.scorers import Scorer, text_distinct

__all__ = ["Judge", "scorer_judge", "rubric_judge", "judge", "JudgeResult", "filter_pairs",
           "SCORE_SCHEMA"]

log = logging.getLogger(__name__)
Judge = Callable[[str, str], float]
SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "number", "minimum": 0,
                                                           "maximum": 100}},
                "required": ["score"]}


def scorer_judge(scorer: Scorer) -> Judge:
    """A judge that scores the answer alone with a built-in scorer.

    Example:
        >>> j = scorer_judge(load_trait("pirate").build_scorer())
        >>> j("Who are you?", "Arr, I be a pirate, matey!")
        100.0
    """
    return lambda question, answer: float(scorer(answer))


def rubric_judge(client: EndpointClient, evaluation_prompt: str) -> Judge:
    """A judge that asks an LLM to apply a rubric and reply ``{"score": 0..100}``.

    Args:
        client: the judge endpoint.
        evaluation_prompt: rubric with ``{question}`` and ``{answer}`` placeholders.

    Replies that are not JSON, lack a score or fall outside 0..100 are malformed: retried a
    bounded number of times, then recorded as failures by :func:`judge`.
    """
    if "{answer}" not in evaluation_prompt:
        raise SteerlabError("expected an {answer} placeholder", field="evaluation_prompt")
    suffix = '\n\nReply with JSON only: {"score": <number from 0 to 100>}'

    def run(question: str, answer: str) -> float:
        text = evaluation_prompt.replace("{question}", question).replace("{answer}", answer)
        reply = client.chat_json([{"role": "user", "content": text + suffix}], SCORE_SCHEMA,
                                 name="score", max_tokens=64)
        return float(reply["score"])

    run.concurrency = client.endpoint.concurrency  # type: ignore[attr-defined]
    return run


@dataclass(frozen=True)
class JudgeResult:
    """What a judge run did: scores written, failures recorded, answers already scored."""

    path: Path
    written: int
    failed: int
    skipped: int


def judge(
    collected: str | os.PathLike,
    path: str | os.PathLike,
    judge_fn: Judge,
    *,
    concurrency: int | None = None,
    progress: bool = True,
) -> JudgeResult:
    """Score every collected answer not yet scored, appending records to ``path``; resumes.

    Args:
        collected: the collect stage's JSONL.
        path: JSONL output, appended to.
        judge_fn: from :func:`scorer_judge` or :func:`rubric_judge`.
        concurrency: threads (default: the rubric judge's endpoint concurrency, else 1).
        progress: show a progress bar.

    Example:
        >>> judge("pirate/collected.jsonl", "pirate/judged.jsonl",
        ...       scorer_judge(trait.build_scorer()))
    """
    answers = latest(read_jsonl(collected), "text")
    scored = latest(read_jsonl(path), "score")
    todo = [(k, r) for k, r in answers.items() if k not in scored]
    workers = concurrency or getattr(judge_fn, "concurrency", 1)
    written = failed = 0
    with append_jsonl(path) as write, progress_bar(len(todo), "judge",
                                                     enabled=progress) as bar:
        for i, result in bounded_map(lambda kr: judge_fn(kr[1]["prompt"], kr[1]["text"]),
                                     todo, workers):
            (qid, role), _ = todo[i]
            rec: dict = {"id": qid, "role": role}
            if isinstance(result, BaseException):
                rec["error"] = f"{type(result).__name__}: {result}"[:500]
                failed += 1
            elif not 0.0 <= float(result) <= 100.0:
                rec["error"] = f"score {result} outside 0..100"
                failed += 1
            else:
                rec["score"] = float(result)
                written += 1
            write(rec)
            bar.update(1)
    log.info("judge: %d scored, %d failed, %d already scored", written, failed,
             len(answers) - len(todo))
    return JudgeResult(Path(path), written, failed, len(answers) - len(todo))


def filter_pairs(
    collected: str | os.PathLike,
    judged: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    threshold: float = 40.0,
    min_distinct: float = 0.0,
) -> list[Pair]:
    """Pairs whose chosen score exceeds the rejected score by at least ``threshold``.

    Small models told to play a trait often loop ("Arr, aye, aye, aye..."); such answers make
    steering vectors that teach looping. ``min_distinct`` drops pairs whose chosen or rejected
    answer has a :func:`steerlab.scorers.text_distinct` (distinct word bigrams) below it.

    Args:
        collected: the collect stage's JSONL.
        judged: the judge stage's JSONL.
        path: where to save the kept pairs (JSONL, atomically); ``None`` to only return them.
        threshold: minimum score difference (the original used 40).
        min_distinct: minimum distinct-2 of both answers (0: keep loops; the demo uses 0.5).

    Example:
        >>> pairs = filter_pairs("collected.jsonl", "judged.jsonl", "pairs.jsonl")
    """
    recs = read_jsonl(collected)
    texts = latest(recs, "text")
    scores = latest(read_jsonl(judged), "score")
    keep = []
    for qid in question_order(recs):
        keys = [(qid, role) for role in ("chosen", "rejected")]
        if not all(k in texts and k in scores for k in keys):
            continue
        (c, r), (cs, rs) = ([texts[k]["text"] for k in keys],
                            [float(scores[k]["score"]) for k in keys])
        if cs - rs >= threshold and min(text_distinct(c), text_distinct(r)) >= min_distinct:
            keep.append(Pair(qid, texts[keys[0]]["prompt"], c, r, cs, rs))
    if path is not None:
        save_pairs(keep, path)
    log.info("filter: kept %d pairs (difference >= %g, distinct-2 >= %g)", len(keep), threshold,
             min_distinct)
    return keep
