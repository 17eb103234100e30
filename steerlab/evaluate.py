"""Steering evaluation: sweep layers x strengths on held-out questions, score trait and coherence.

Coherence catches what steering breaks. Repetition loops lower *distinct-n* (the share of
distinct token n-grams in an answer); gibberish raises the *negative log-likelihood* of the answer
under the unsteered model. Each is taken relative to the unsteered answers and capped at 1, and
coherence is their product: 1.0 is "as coherent as unsteered", 0.5 is half.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from steerlab.chat import encode_chat
from steerlab.errors import SteerlabError
from steerlab.generate import generate, left_pad
from steerlab.steer import steer
from steerlab.vectors import SteeringVector, random_like

Scorer = Callable[[str], float]


def distinct_n(tokens: Sequence[int], n: int = 2) -> float:
    """Share of distinct n-grams among an answer's n-grams (1.0 for answers shorter than n+1)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if len(grams) > 1 else 1.0


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
                                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
                                    ).logits.float(), -1)
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
    """Means over the questions for one condition (``layer`` -1 and ``alpha`` 0: no steering)."""

    layer: int
    alpha: float
    trait: float
    coherence: float
    distinct: float
    nll: float
    answers: tuple[str, ...] = field(default=(), repr=False)


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
        """Share of the trait gap (unsteered -> prompted with the trait instruction) closed."""
        gap = self.prompted.trait - self.unsteered.trait
        return (s.trait - self.unsteered.trait) / gap if gap else float("nan")

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole evaluation as JSON."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, path)

    def figure(self) -> Any:
        """Plotly figure: trait score and coherence against strength, one line per layer."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("trait score", "coherence"))
        for layer in sorted({s.layer for s in self.sweep}):
            pts = [s for s in self.sweep if s.layer == layer]
            for col, key in ((1, "trait"), (2, "coherence")):
                fig.add_trace(go.Scatter(x=[s.alpha for s in pts], y=[getattr(s, key)
                                         for s in pts], mode="lines+markers",
                                         name=f"layer {layer}", legendgroup=str(layer),
                                         showlegend=col == 1), row=1, col=col)
        for s, name, dash in ((self.unsteered, "unsteered", "dot"),
                              (self.prompted, "prompted", "dash")):
            fig.add_hline(y=s.trait, line_dash=dash, annotation_text=name, row=1, col=1)
        fig.add_hline(y=self.min_coherence * self.unsteered.coherence, line_dash="dot",
                      annotation_text="min coherence", row=1, col=2)
        fig.add_trace(go.Scatter(x=[self.random.alpha], y=[self.random.trait], mode="markers",
                                 marker_symbol="x", name="random vector"), row=1, col=1)
        fig.update_xaxes(title_text="alpha (x vector)")
        return fig


def _settle(model: Any, prompts: list[list[int]], tokens: list[list[int]], texts: list[str],
            scorer: Scorer, ref: tuple[float, float] | None, layer: int, alpha: float
            ) -> tuple[Setting, tuple[float, float]]:
    d = [distinct_n(t) for t in tokens]
    nll = answer_nll(model, prompts, tokens)
    d_ref, nll_ref = ref or (sum(d) / len(d), _nanmean(nll))
    coh = [min(1.0, di / d_ref) * min(1.0, math.exp(nll_ref - ni)) if not math.isnan(ni)
           else 0.0 for di, ni in zip(d, nll, strict=True)]
    scores = [float(scorer(t)) for t in texts]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    s = Setting(layer, alpha, mean(scores), mean(coh), mean(d), _nanmean(nll), tuple(texts))
    return s, (d_ref, nll_ref)


def _nanmean(xs: Sequence[float]) -> float:
    good = [x for x in xs if not math.isnan(x)]
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
    positions: str = "all",
    seed: int = 0,
) -> SteeringEval:
    """Sweep layers x strengths, choose the best setting, and run a random-vector control.

    All strengths of one layer run as one batch with per-row strengths. The best setting has
    the highest trait score among those whose coherence is at least ``min_coherence`` times the
    unsteered coherence (the most coherent one if none is). The control is a random vector
    with the same norm at the best setting.

    Args:
        model: a bridge.
        vector: the steering vector (alpha is in units of its per-layer norm).
        questions: held-out questions.
        scorer: trait score 0..100 of an answer.
        trait_instruction: system prompt of the "prompted" reference answers.
        layers: layers to try (one at a time).
        strengths: alphas to try.
        max_new_tokens: answer length (greedy).
        min_coherence: coherence floor relative to unsteered.
        positions: see :func:`steerlab.steer.steer`.
        seed: seed of the random control vector.

    Example:
        >>> ev = evaluate_steering(model, v, trait.held_out_questions, trait.build_scorer(),
        ...                        trait_instruction=trait.trait_instruction, layers=[8, 10],
        ...                        strengths=[2, 4, 6])
        >>> ev.best.layer, ev.best.alpha, ev.gap_closed(ev.best)
    """
    if not questions or not layers or not strengths:
        raise SteerlabError("questions, layers and strengths must all be non-empty")
    tok = model.tokenizer
    prompts = [encode_chat(tok, q) for q in questions]
    sys_prompts = [encode_chat(tok, [{"role": "system", "content": trait_instruction},
                                     {"role": "user", "content": q}]) for q in questions]

    def run(rows: list[list[int]]) -> tuple[list[list[int]], list[str]]:
        g = generate(model, rows, max_new_tokens=max_new_tokens)
        return g.tokens, g.texts(tok)

    toks, texts = run(prompts)
    unsteered, ref = _settle(model, prompts, toks, texts, scorer, None, -1, 0.0)
    toks, texts = run(sys_prompts)
    prompted, _ = _settle(model, prompts, toks, texts, scorer, ref, -1, 0.0)
    sweep = []
    n = len(prompts)
    for layer in layers:
        alphas = torch.tensor([float(a) for a in strengths for _ in range(n)])
        with steer(model, vector, alphas, layers=[layer], positions=positions):
            toks, texts = run(prompts * len(strengths))
        for i, a in enumerate(strengths):
            part = slice(i * n, (i + 1) * n)
            s, _ = _settle(model, prompts, toks[part], texts[part], scorer, ref, layer, float(a))
            sweep.append(s)
    floor = min_coherence * unsteered.coherence
    ok = [s for s in sweep if s.coherence >= floor]
    best = max(ok, key=lambda s: s.trait) if ok else max(sweep, key=lambda s: s.coherence)
    with steer(model, random_like(vector, seed), best.alpha, layers=[best.layer],
               positions=positions):
        toks, texts = run(prompts)
    rand, _ = _settle(model, prompts, toks, texts, scorer, ref, best.layer, best.alpha)
    return SteeringEval(unsteered, prompted, tuple(sweep), best, rand, min_coherence)
