"""The ``judge`` and ``filter`` stages: score every collected answer 0..100, keep the pairs
whose chosen answer out-scores the rejected one by a margin.

A judge is ``(question, answer) -> score``: a built-in scorer (:func:`scorer_judge`) or an LLM
rubric (:func:`rubric_judge`). Judge records are appended as they finish::

    {"id": "...", "role": "chosen", "sample": 0, "score": 87.0}
    {"id": "...", "role": "rejected", "sample": 1, "error": "MalformedResponse: ..."}

The filter keeps, per question, the best-separated loop-free pair among its samples and says
for every other question why it was dropped (:class:`Dropped`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from steerlab.base.checks import output_file
from steerlab.base.errors import SteerlabError
from steerlab.base.files import append_jsonl, read_jsonl, write_jsonl_atomic
from steerlab.base.progress import progress_bar
from steerlab.traits.client import EndpointClient, bounded_map
from steerlab.traits.collection import ROLES, latest, question_order
from steerlab.traits.pairs import Pair, save_pairs
from steerlab.traits.scorers import Scorer, text_distinct

__all__ = ["Dropped", "Judge", "JudgeResult", "SCORE_SCHEMA", "Selection", "dropped_path",
           "filter_pairs", "judge", "rubric_judge", "scorer_judge", "select_pairs"]

log = logging.getLogger(__name__)
Judge = Callable[[str, str], float]
SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "number", "minimum": 0,
                                                           "maximum": 100}},
                "required": ["score"]}


def scorer_judge(scorer: Scorer) -> Judge:
    """A judge that scores the answer alone with a built-in scorer.

    Examples:
        >>> j = sl.scorer_judge(sl.load_trait("pirate").build_scorer())
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

    Examples:
        >>> sl.judge("collected.jsonl", "scored.jsonl", sl.scorer_judge(trait.build_scorer()))
        JudgeResult(path=PosixPath('scored.jsonl'), written=4, failed=0, skipped=0)
    """
    output_file(path, "path", inputs={"collected": collected})
    answers = latest(read_jsonl(collected), "text")
    scored = latest(read_jsonl(path), "score")
    todo = [(k, r) for k, r in answers.items() if k not in scored]
    workers = concurrency or getattr(judge_fn, "concurrency", 1)
    written = failed = 0
    with append_jsonl(path) as write, progress_bar(len(todo), "judge",
                                                     enabled=progress) as bar:
        for i, result in bounded_map(lambda kr: judge_fn(kr[1]["prompt"], kr[1]["text"]),
                                     todo, workers):
            (qid, role, sample), _ = todo[i]
            rec: dict = {"id": qid, "role": role, "sample": sample}
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


@dataclass(frozen=True)
class Dropped:
    """A question the filter kept no pair of, and why (``best_difference``: the largest
    chosen - rejected score difference among its loop-free pairs, ``None`` when it has none)."""

    id: str
    prompt: str
    reason: str
    best_difference: float | None = None


@dataclass(frozen=True)
class Selection:
    """What :func:`select_pairs` kept (one pair per question) and dropped."""

    pairs: tuple[Pair, ...]
    dropped: tuple[Dropped, ...]

    def reasons(self) -> dict[str, int]:
        """How many questions were dropped for each reason."""
        out: dict[str, int] = {}
        for d in self.dropped:
            out[d.reason] = out.get(d.reason, 0) + 1
        return out


# The filter stage's defaults: keep a question's best pair when the chosen answer out-scores the
# rejected one by THRESHOLD points (scores are 0-100) and both answers are loop-free
# (distinct word-bigram share >= MIN_DISTINCT; 0.5 drops "aye, aye, aye" loops).
THRESHOLD = 40.0
MIN_DISTINCT = 0.5


def select_pairs(collected: str | os.PathLike, judged: str | os.PathLike, *,
                 threshold: float = THRESHOLD, min_distinct: float = MIN_DISTINCT,
                 samples: int | None = None) -> Selection:
    """Per question, the loop-free (chosen, rejected) pair of samples with the largest score
    difference, kept when the difference is at least ``threshold``.

    Small models told to play a trait often loop ("Arr, aye, aye, aye..."); such answers make
    steering vectors that teach looping. An answer whose
    :func:`steerlab.traits.scorers.text_distinct` (distinct word bigrams) is below ``min_distinct``
    is never used. Ties go to the lowest sample numbers (greedy sample 0 first). ``samples``
    limits the choice to the first samples of each side (``1``: the greedy answers only).

    Examples:
        >>> sel = select_pairs("collected.jsonl", "judged.jsonl", min_distinct=0.5)
        >>> len(sel.pairs) + len(sel.dropped)  # each of the two questions: kept, or why not
        2
    """
    recs = read_jsonl(collected)
    texts = latest(recs, "text")
    scores = latest(read_jsonl(judged), "score")
    answers: dict[tuple[str, str], list[tuple[int, str, float]]] = {}
    prompts: dict[str, str] = {}
    for (qid, role, sample), rec in sorted(texts.items(), key=lambda kv: kv[0][2]):
        prompts.setdefault(qid, rec["prompt"])
        if (qid, role, sample) in scores and (samples is None or sample < samples):
            answers.setdefault((qid, role), []).append(
                (sample, rec["text"], float(scores[(qid, role, sample)]["score"])))
    keep, dropped = [], []
    for qid in question_order(recs):
        sides = [answers.get((qid, role), []) for role in ROLES]
        if not all(sides):
            missing = [r for r, side in zip(ROLES, sides, strict=True) if not side]
            dropped.append(Dropped(qid, prompts.get(qid, ""), f"no scored {missing[0]} answer"))
            continue
        clean = [[a for a in side if text_distinct(a[1]) >= min_distinct] for side in sides]
        if not all(clean):
            loops = [r for r, side in zip(ROLES, clean, strict=True) if not side]
            dropped.append(Dropped(qid, prompts[qid], f"every {loops[0]} answer loops"))
            continue
        diff, c, r = max(((c[2] - r[2], c, r) for c in clean[0] for r in clean[1]),
                         key=lambda t: (t[0], -t[1][0], -t[2][0]))
        if diff >= threshold:
            keep.append(Pair(qid, prompts[qid], c[1], r[1], c[2], r[2]))
        else:
            dropped.append(Dropped(qid, prompts[qid], f"score difference < {threshold:g}",
                                   diff))
    return Selection(tuple(keep), tuple(dropped))


def filter_pairs(
    collected: str | os.PathLike,
    judged: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    threshold: float = THRESHOLD,
    min_distinct: float = MIN_DISTINCT,
) -> list[Pair]:
    """The pairs :func:`select_pairs` keeps, saved to ``path`` (JSONL, atomically) with the
    dropped questions and their reasons beside it (``<path stem>.dropped.jsonl``).

    Args:
        collected: the collect stage's JSONL.
        judged: the judge stage's JSONL.
        path: where to save the kept pairs; ``None`` to only return them.
        threshold: minimum score difference (the original used 40).
        min_distinct: minimum distinct-2 of both answers (0: keep loops; the demo uses 0.5).

    Examples:
        >>> kept = sl.filter_pairs("collected.jsonl", "judged.jsonl", "kept.jsonl")
        >>> sl.load_pairs("kept.jsonl") == kept
        True
    """
    if path is not None:  # before anything is read: no input is overwritten
        output_file(path, "path", inputs={"collected": collected, "judged": judged},
                    owns=[dropped_path(path)])
    sel = select_pairs(collected, judged, threshold=threshold, min_distinct=min_distinct)
    if path is not None and not sel.pairs:  # an empty pairs file is not a result to keep
        why = "; ".join(f"{n}: {reason}" for reason, n in sel.reasons().items()) or "none"
        raise SteerlabError(f"no pair passed the filter (threshold {threshold:g}, "
                            f"min_distinct {min_distinct:g}; dropped: {why}); nothing written",
                            source=str(path))
    if path is not None:
        save_pairs(sel.pairs, path)
        write_jsonl_atomic(dropped_path(path), (asdict(d) for d in sel.dropped))
    log.info("filter: kept %d pairs (difference >= %g, distinct-2 >= %g); dropped %s",
             len(sel.pairs), threshold, min_distinct, sel.reasons() or "none")
    return list(sel.pairs)


def dropped_path(pairs_path: str | os.PathLike) -> Path:
    """Where :func:`filter_pairs` writes the dropped questions of a pairs file."""
    p = Path(pairs_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".dropped.jsonl")
