"""Steering evaluation: sweep layers x strengths on held-out questions, score trait and coherence.

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
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from steerlab.chat import encode_chat
from steerlab.errors import SteerlabError
from steerlab.files import write_json_atomic
from steerlab.generate import generate, left_pad, position_ids
from steerlab.progress import progress_bar
from steerlab.scorers import Scorer, distinct_n
from steerlab.steer import Positions, Steering
from steerlab.vectors import SteeringVector, random_like

__all__ = ["AnswerRater", "Setting", "SteeringEval", "answer_nll", "distinct_n",
           "evaluate_steering"]


@torch.inference_mode()
def answer_nll(model: Any, prompts: Sequence[Sequence[int]],
               answers: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
    """Mean negative log-likelihood per answer token under ``model`` (no hooks should be on).

    Example:
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
    """Means over the questions for one condition (``layer`` -1 and ``alpha`` 0: no steering).

    ``trait`` is the mean trait score of all answers, ``coherence`` the share of coherent
    answers, ``coherent_trait`` the mean score with incoherent answers counted as 0, ``distinct``
    the mean distinct-2, and ``nll`` the mean of the NLLs the verdicts used (see
    :meth:`AnswerRater.nll`).
    """

    layer: int
    alpha: float
    trait: float
    coherence: float
    distinct: float
    nll: float
    coherent_trait: float = float("nan")
    answers: tuple[str, ...] = field(default=(), repr=False)
    coherent: tuple[bool, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class SteeringEval:
    """Result of :func:`evaluate_steering`: baselines, sweep, the chosen setting and control."""

    unsteered: Setting
    prompted: Setting
    sweep: tuple[Setting, ...]
    best: Setting
    random: Setting
    min_coherence: float

    def gap_closed(self, s: Setting) -> float:
        """Share of the coherent-trait gap (unsteered -> prompted with the trait instruction)
        that ``s`` closes."""
        gap = self.prompted.coherent_trait - self.unsteered.coherent_trait
        return (s.coherent_trait - self.unsteered.coherent_trait) / gap if gap else float("nan")

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole evaluation as JSON (atomically)."""
        write_json_atomic(path, asdict(self))


@dataclass(frozen=True)
class AnswerRater:
    """Rates a batch of answers to ``questions``: trait by the scorer, coherence per answer.

    ``contexts`` are the token ids the likelihood is taken under (the best one counts);
    ``nll_ref`` is the unsteered answers' mean NLL (see :meth:`calibrate`).

    Example:
        >>> rater = AnswerRater.for_questions(model, questions, scorer, trait_instruction)
        >>> rater = rater.calibrate(unsteered_tokens)
        >>> rater(tokens, texts).coherence
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

    def __call__(self, tokens: list[list[int]], texts: list[str], layer: int = -1,
                 alpha: float = 0.0) -> Setting:
        if math.isnan(self.nll_ref):
            raise SteerlabError("the rater is not calibrated; call calibrate() first")
        d = [distinct_n(t) for t in tokens]
        nll = self.nll(tokens)
        ok = tuple(not math.isnan(x) and di >= self.min_distinct
                   and x <= self.nll_ref + self.nll_margin for di, x in zip(d, nll, strict=True))
        scores = [float(self.scorer(t)) for t in texts]
        share = _mean([float(k) for k in ok])
        return Setting(layer, alpha, _mean(scores), share, _mean(d), _mean(nll),
                       _mean([s * k for s, k in zip(scores, ok, strict=True)]), tuple(texts), ok)


def _mean(xs: Sequence[float]) -> float:
    good = [float(x) for x in xs if not math.isnan(x)]
    return sum(good) / len(good) if good else float("nan")


def evaluate_steering(
    model: Any,
    vector: SteeringVector,
    questions: Sequence[str],
    scorer: Scorer,
    *,
    trait_instruction: str,
    layers: Sequence[int],
    strengths: Sequence[float],
    max_new_tokens: int = 40,
    min_coherence: float = 0.8,
    min_distinct: float = 0.5,
    nll_margin: float = 1.0,
    positions: str | Positions = Positions.ALL,
    seed: int = 0,
    progress: bool = True,
) -> SteeringEval:
    """Sweep layers x strengths, choose the best setting, and run a random-vector control.

    All strengths of one layer run as one batch with per-row strengths (greedy decoding). See
    the module docstring for how coherence and the coherent trait score are defined.

    Args:
        model: a bridge.
        vector: the steering vector (alpha is in units of its per-layer vector).
        questions: held-out questions.
        scorer: trait score 0..100 of an answer.
        trait_instruction: system prompt of the "prompted" reference answers.
        layers: layers to try (one at a time).
        strengths: alphas to try.
        max_new_tokens: answer length.
        min_coherence: coherence floor of the best setting, relative to unsteered.
        min_distinct: distinct-2 below which an answer counts as a repetition loop.
        nll_margin: nats above the unsteered mean NLL beyond which an answer is gibberish.
        positions: see :func:`steerlab.steer.steer`.
        seed: seed of the random control vector (same norm per layer as ``vector``).
        progress: show a progress bar over the conditions.

    Example:
        >>> ev = evaluate_steering(model, v, trait.held_out_questions, trait.build_scorer(),
        ...                        trait_instruction=trait.trait_instruction, layers=[12, 16],
        ...                        strengths=[0.5, 1.0, 1.5])
        >>> ev.best.layer, ev.best.alpha, ev.gap_closed(ev.best)
    """
    if not questions or not layers or not strengths:
        raise SteerlabError("questions, layers and strengths must all be non-empty")
    # one checked steering per layer (width, layers, finite strengths) before any generation
    per_layer = {layer: Steering.create(model, vector, 0.0, layers=[layer], positions=positions)
                 for layer in layers}
    alphas = list(per_layer[layers[0]].with_alpha(list(strengths)).alpha)  # finite, as floats
    tok = model.tokenizer
    rater = AnswerRater.for_questions(model, questions, scorer, trait_instruction,
                                      min_distinct=min_distinct, nll_margin=nll_margin)
    prompts, prompted_in = rater.contexts

    def run(rows: list[list[int]]) -> tuple[list[list[int]], list[str]]:
        g = generate(model, rows, max_new_tokens=max_new_tokens)
        return g.tokens, g.texts(tok)

    with progress_bar(len(layers) + 3, "steering eval", enabled=progress) as bar:
        toks, texts = run(prompts)
        rater = rater.calibrate(toks)
        unsteered = rater(toks, texts)
        prompted = rater(*run(prompted_in))
        bar.update(2)
        sweep = []
        n = len(prompts)
        for layer in layers:
            rows = [a for a in alphas for _ in range(n)]  # all strengths of a layer, one batch
            with per_layer[layer].with_alpha(rows).apply(model):
                toks, texts = run(prompts * len(strengths))
            for i, a in enumerate(strengths):
                part = slice(i * n, (i + 1) * n)
                sweep.append(rater(toks[part], texts[part], layer, float(a)))
            bar.update()
        floor = min_coherence * unsteered.coherence
        ok = [s for s in sweep if s.coherence >= floor]
        best = (max(ok, key=lambda s: (s.coherent_trait, -abs(s.alpha))) if ok
                else max(sweep, key=lambda s: s.coherence))
        control = Steering.create(model, random_like(vector, seed), best.alpha,
                                  layers=[best.layer], positions=positions)
        with control.apply(model):
            toks, texts = run(prompts)
        rand = rater(toks, texts, best.layer, best.alpha)
        bar.update()
    return SteeringEval(unsteered, prompted, tuple(sweep), best, rand, min_coherence)
