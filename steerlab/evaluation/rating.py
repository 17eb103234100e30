"""Rating answers: trait score and coherence, answer by answer.

Coherence catches what steering breaks, answer by answer. An answer is *coherent* when

* it is not a repetition loop: its *distinct-2* (share of distinct token bigrams) is at least
  ``min_distinct`` (unsteered answers of the embedded model sit near 0.94, "aye, aye, aye" loops
  below 0.3), and
* it is not gibberish: its mean negative log-likelihood per token under the unsteered model is at
  most ``nll_margin`` nats above the unsteered answers' mean. The likelihood is the better of two
  contexts, the plain question and the question under the trait instruction, so that an answer is
  not called gibberish merely for speaking in the trait's register.

A setting's *coherence* is the share of coherent answers; its *coherent trait* is the mean trait
score with incoherent answers counted as 0. The best setting maximises the coherent trait among
settings whose coherence is at least ``min_coherence`` times the unsteered coherence, and the gap
closed is measured on the coherent trait, from unsteered answers to answers prompted with the
trait instruction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from steerlab.base.errors import SteerlabError
from steerlab.model.inputs import left_pad, position_ids
from steerlab.model.templates import encode_chat
from steerlab.traits.scorers import Scorer, distinct_n

__all__ = ["AnswerRater", "Setting", "answer_nll", "distinct_n"]


@torch.inference_mode()
def answer_nll(model: Any, prompts: Sequence[Sequence[int]],
               answers: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
    """Mean negative log-likelihood per answer token under ``model`` (no hooks should be on).

    Examples:
        >>> answer_nll(model, [encode_chat(tok, "Hi")], [tok("Hello!")["input_ids"]])
    """
    hf = model.original_model
    device = next(hf.parameters()).device
    pad = model.tokenizer.pad_token_id or 0
    out: list[float] = []
    for at in range(0, len(prompts), batch_size):
        rows = [list(p) + list(a) for p, a in
                zip(prompts[at : at + batch_size], answers[at : at + batch_size], strict=True)]
        ids, mask = left_pad(rows, pad, device)
        logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask,
                                    position_ids=position_ids(mask)).logits.float().to(device),
                                 -1)
        for i, a in enumerate(answers[at : at + batch_size]):
            if not a:
                out.append(float("nan"))
                continue
            w = ids.shape[1]
            pos = torch.arange(w - len(a) - 1, w - 1, device=device)
            tgt = torch.tensor(list(a), device=device)
            out.append(float(-logp[i, pos, tgt].mean()))
    return out


@dataclass(frozen=True)
class Setting:
    """Means over the questions for one condition (``layers`` empty and ``alpha`` 0: no
    steering).

    ``trait`` is the mean trait score of all answers, ``coherence`` the share of coherent
    answers, ``coherent_trait`` the mean score with incoherent answers counted as 0, ``distinct``
    the mean distinct-2, and ``nll`` the mean of the NLLs the verdicts used (see
    :meth:`AnswerRater.nll`). ``scores``, ``coherent`` and ``answers`` are per question (in
    question order), for confidence intervals and examples.
    """

    layers: tuple[int, ...]
    alpha: float
    trait: float
    coherence: float
    distinct: float
    nll: float
    coherent_trait: float = float("nan")
    answers: tuple[str, ...] = field(default=(), repr=False)
    coherent: tuple[bool, ...] = field(default=(), repr=False)
    scores: tuple[float, ...] = field(default=(), repr=False)

    @property
    def label(self) -> str:
        """``"12"``, ``"10+12+14"`` (layers steered together), or ``"-"`` (no steering)."""
        return "+".join(str(x) for x in self.layers) or "-"

    @classmethod
    def from_dict(cls, d: dict) -> Setting:
        """The inverse of ``dataclasses.asdict`` (as stored in evaluation JSON)."""
        return cls(**{**d, **{k: tuple(d.get(k, ())) for k in
                              ("layers", "answers", "coherent", "scores")}})


@dataclass(frozen=True)
class AnswerRater:
    """Rates a batch of answers to ``questions``: trait by the scorer, coherence per answer.

    ``contexts`` are the token ids the likelihood is taken under (the best one counts);
    ``nll_ref`` is the unsteered answers' mean NLL (see :meth:`calibrate`).

    Examples:
        >>> questions = list(trait.held_out_questions[:2])
        >>> rater = AnswerRater.for_questions(model, questions, trait.build_scorer(),
        ...                                   trait.trait_instruction)
        >>> prompts = [sl.encode_chat(model.tokenizer, q) for q in questions]
        >>> plain = sl.generate(model, prompts, max_new_tokens=8)
        >>> rater = rater.calibrate(plain.tokens)  # the unsteered answers set the NLL bar
        >>> rated = rater(plain.tokens, plain.texts(model.tokenizer))
        >>> len(rated.scores), 0.0 <= rated.coherence <= 1.0
        (2, True)
    """

    model: Any
    scorer: Scorer
    contexts: tuple[list[list[int]], ...]
    min_distinct: float = 0.5
    nll_margin: float = 1.0
    nll_ref: float = float("nan")

    @classmethod
    def for_questions(cls, model: Any, questions: Sequence[str], scorer: Scorer,
                      trait_instruction: str, **kwargs: float) -> AnswerRater:
        """A rater whose contexts are the plain questions and the trait-prompted questions."""
        tok = model.tokenizer
        plain = [encode_chat(tok, q) for q in questions]
        prompted = [encode_chat(tok, [{"role": "system", "content": trait_instruction},
                                      {"role": "user", "content": q}]) for q in questions]
        return cls(model, scorer, (plain, prompted), **kwargs)

    def calibrate(self, tokens: list[list[int]]) -> AnswerRater:
        """This rater with ``nll_ref`` set from reference (unsteered) answers, plain context."""
        nll = answer_nll(self.model, self.contexts[0], tokens)
        return replace(self, nll_ref=_mean(nll))

    def nll(self, tokens: list[list[int]]) -> list[float]:
        """Per answer, the lowest mean NLL over the contexts (answers repeat the questions).

        Later contexts are only tried for answers the earlier ones leave above the gibberish
        bound, which gives the same verdicts at a fraction of the forward passes."""
        bound = self.nll_ref + self.nll_margin
        best = [float("nan")] * len(tokens)
        todo = list(range(len(tokens)))
        for ctx in self.contexts:
            got = answer_nll(self.model, [ctx[i % len(ctx)] for i in todo],
                             [tokens[i] for i in todo])
            for i, x in zip(todo, got, strict=True):
                best[i] = x if math.isnan(best[i]) else min(best[i], x)
            todo = [i for i in todo if not best[i] <= bound]
            if not todo:
                break
        return best

    def __call__(self, tokens: list[list[int]], texts: list[str],
                 layers: tuple[int, ...] = (), alpha: float = 0.0) -> Setting:
        if math.isnan(self.nll_ref):
            raise SteerlabError("the rater is not calibrated; call calibrate() first")
        d = [distinct_n(t) for t in tokens]
        nll = self.nll(tokens)
        ok = tuple(not math.isnan(x) and di >= self.min_distinct
                   and x <= self.nll_ref + self.nll_margin for di, x in zip(d, nll, strict=True))
        scores = [float(self.scorer(t)) for t in texts]
        share = _mean([float(k) for k in ok])
        return Setting(tuple(layers), alpha, _mean(scores), share, _mean(d), _mean(nll),
                       _mean([s * k for s, k in zip(scores, ok, strict=True)]), tuple(texts), ok,
                       tuple(scores))


def _mean(xs: Sequence[float]) -> float:
    good = [float(x) for x in xs if not math.isnan(x)]
    return sum(good) / len(good) if good else float("nan")
