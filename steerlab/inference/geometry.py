"""Persona space: where each persona of an inference run sits in the residual stream.

From a run that captured activations (``steerlab infer --capture-layers``): each persona's
mean residual over its replies, per layer; a PCA of those means; the **assistant axis** (Lu
et al. 2026, "the assistant axis"): the mean of the assistant category's personae minus the
mean of the others; every persona's projection on it with a bootstrap interval over prompts;
how well the leading principal component agrees with the axis; and the projections joined with
the run's output metrics (entropy, top-k mass), with a correlation and its interval.

Every number is recomputable with numpy from ``activations.h5`` and ``results.json``
(``tests/test_persona_space.py`` does so).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steerlab.base.checks import integer
from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError
from steerlab.inference.results import RunActivations, load_results, read_activations
from steerlab.steering.reference import with_reference
from steerlab.steering.vector import Provenance, SteeringVector

log = logging.getLogger(__name__)

# the output metrics a persona's projection is joined with (results.json fields)
METRICS = ("avg_entropy", "avg_top_k_mass")


class Section(Choice):
    """Which tokens of a reply a persona's activations average over: all of them (``reply``),
    its thinking, or its output after ``</think>`` (all of it without thinking)."""

    REPLY = "reply"
    THINKING = "thinking"
    OUTPUT = "output"


@dataclass(frozen=True)
class Correlation:
    """Pearson's r between two per-persona quantities, with a bootstrap interval over
    personae (resampled with replacement; ``nan`` when undefined, e.g. a constant metric)."""

    r: float
    lo: float
    hi: float
    n: int


@dataclass(frozen=True)
class PersonaSpace:
    """The persona space of one run at its captured layers (see :func:`persona_space`).

    Arrays are indexed ``[persona, layer, ...]`` in the order of :attr:`personae` and
    :attr:`layers`; projections are raw (on the unit axis of each layer).

    Attributes:
        personae, categories: the personae (first-seen order in the run) and their categories.
        means: ``[persona, layer, d_model]`` mean activation over each persona's replies.
        axis: ``[layer, d_model]`` the assistant category's mean of persona means minus the
            others' (not normalised).
        projections: ``[persona, layer]`` each persona mean projected on the unit axis.
        intervals: ``[persona, layer, 2]`` a bootstrap interval of :attr:`projections` over
            prompts (the axis held fixed).
        components: ``[layer, k, d_model]`` principal directions of the persona means (PC1
            oriented along the axis); ``explained``: ``[layer, k]`` their explained-variance
            ratios; ``scores``: ``[persona, layer, k]`` each persona's coordinates.
        pc1_cosine: ``[layer]`` cosine of PC1 with the axis.
        assistant_projections: per layer, the projections of every assistant-category reply
            (the reference distribution stored with :meth:`axis_vector`).
        metrics: ``{metric: [persona]}`` averages of the run's output metrics;
            ``correlations``: ``{metric: [Correlation per layer]}`` projection vs metric.
    """

    run: str
    model: str
    section: str
    assistant: str
    layers: tuple[int, ...]
    personae: tuple[str, ...]
    categories: tuple[str, ...]
    n_prompts: int
    means: np.ndarray
    axis: np.ndarray
    projections: np.ndarray
    intervals: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    scores: np.ndarray
    pc1_cosine: np.ndarray
    assistant_projections: dict[int, np.ndarray]
    metrics: dict[str, np.ndarray]
    correlations: dict[str, tuple[Correlation, ...]]

    def layer_index(self, layer: int) -> int:
        """The position of a captured layer in the arrays; one error line for another."""
        if layer not in self.layers:
            raise SteerlabError(f"layer {layer} was not captured; the run has {list(self.layers)}",
                                field="layers")
        return self.layers.index(layer)

    def is_assistant(self) -> np.ndarray:
        """``[persona]`` whether each persona is in the assistant category."""
        return np.array([c == self.assistant for c in self.categories])

    def axis_vector(self) -> SteeringVector:
        """The assistant axis as a :class:`SteeringVector` (one direction per captured layer),
        carrying the assistant's own per-reply projections as its reference, so ``cap``
        bounds may be given as their percentiles (``bounds=("25%", None)``)."""
        prov = Provenance(model_id=self.model, method=f"assistant-axis({self.section})",
                          n_pairs=int(self.is_assistant().sum()), source=self.run)
        vec = SteeringVector(torch.from_numpy(self.axis.astype(np.float32)), self.layers, prov)
        return with_reference(vec, self.assistant_projections,
                              f"assistant replies' {self.section} means (category "
                              f"{self.assistant!r}) of {self.run}")

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: per layer the explained variance, PC1 cosine and per persona
        projection with its interval and metrics."""
        out: dict[str, Any] = {
            "run": self.run, "model": self.model, "section": self.section,
            "assistant_category": self.assistant, "n_prompts": self.n_prompts,
            "layers": list(self.layers), "layer_summaries": []}
        for i, layer in enumerate(self.layers):
            rows = [{"persona": p, "category": c, "projection": float(self.projections[j, i]),
                     "interval": [_json_float(x) for x in self.intervals[j, i]],
                     **{m: _json_float(v[j]) for m, v in self.metrics.items()}}
                    for j, (p, c) in enumerate(zip(self.personae, self.categories, strict=True))]
            out["layer_summaries"].append({
                "layer": layer, "explained_variance": [float(x) for x in self.explained[i]],
                "pc1_axis_cosine": float(self.pc1_cosine[i]),
                "correlations": {m: {"r": _json_float(c[i].r), "lo": _json_float(c[i].lo),
                                     "hi": _json_float(c[i].hi), "n": c[i].n}
                                 for m, c in self.correlations.items()},
                "personae": rows})
        return out


def _json_float(x: float | np.floating) -> float | None:
    """A number for strict JSON: ``None`` for NaN (an undefined interval or correlation)."""
    return float(x) if math.isfinite(float(x)) else None


def persona_space(
    run: str | os.PathLike,
    *,
    assistant: str = "assistant",
    section: str | Section = Section.REPLY,
    layers: Sequence[int] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> PersonaSpace:
    """The persona space of a finished run that captured activations.

    Args:
        run: the run folder (``steerlab infer --capture-layers ...``).
        assistant: the category whose personae are the default assistant (``personae.json``'s
            ``category``); the others are the role-play side of the axis.
        section: average ``reply`` (all tokens), ``thinking`` or ``output`` activations.
        layers: a subset of the captured layers (default all).
        n_boot: bootstrap resamples for the intervals (prompts; personae for correlations).
        seed: seeds the resampling.

    Examples:
        >>> space = sl.persona_space("logs/personas")
        >>> space.personae[:2], space.projections.shape  # [persona, layer]
        (('assistant', 'Hamlet'), (2, 1))
        >>> axis = space.axis_vector()  # a SteeringVector whose reference is the assistant's
    """
    section = Section.parse(section, field="section")
    n_boot = integer(n_boot, "n_boot", lo=1, hi=1_000_000)
    root = Path(run)
    acts, rows, chosen = _read_run(root, layers)
    x = _section_array(acts, section)[:, [acts.layers.index(x) for x in chosen]]
    names, cats = _personae(rows)
    if assistant not in cats:
        raise SteerlabError(f"no persona has category {assistant!r}; the run's categories are "
                            f"{sorted(set(cats))}", source=str(root), field="assistant")
    if all(c == assistant for c in cats):
        raise SteerlabError(f"every persona has category {assistant!r}; the axis needs others",
                            source=str(root), field="assistant")
    persona_of = np.array([names.index(r["persona"]) for r in rows])
    prompt_of = np.array([int(r["prompt_index"]) for r in rows])
    usable = np.isfinite(x).all(axis=(1, 2))
    if not usable.all():
        log.info("%d of %d replies have no %s tokens; left out", int((~usable).sum()),
                 len(usable), section.value)
    means = _group_means(x, persona_of, usable, len(names), names, section)
    is_asst = np.array([c == assistant for c in cats])
    axis = means[is_asst].mean(0) - means[~is_asst].mean(0)
    unit = axis / np.maximum(np.linalg.norm(axis, axis=-1, keepdims=True), 1e-30)
    per_reply = np.einsum("nld,ld->nl", x, unit)  # NaN where unusable
    projections = np.einsum("pld,ld->pl", means, unit)
    rng = np.random.default_rng(seed)
    intervals = _prompt_bootstrap(per_reply, persona_of, prompt_of, usable, len(names),
                                  n_boot, rng)
    components, explained, scores, cosine = _pca(means, unit)
    metrics = {m: _persona_metric(rows, persona_of, len(names), m) for m in METRICS}
    correlations = {m: tuple(_correlation(projections[:, i], v, n_boot, rng)
                             for i in range(len(chosen))) for m, v in metrics.items()}
    asst_rows = is_asst[persona_of] & usable
    return PersonaSpace(
        run=str(root), model=acts.model, section=section.value, assistant=assistant,
        layers=tuple(chosen), personae=tuple(names), categories=tuple(cats),
        n_prompts=len(set(prompt_of.tolist())), means=means, axis=axis,
        projections=projections, intervals=intervals, components=components,
        explained=explained, scores=scores, pc1_cosine=cosine,
        assistant_projections={layer: per_reply[asst_rows, i]
                               for i, layer in enumerate(chosen)},
        metrics=metrics, correlations=correlations)


def _read_run(root: Path, layers: Sequence[int] | None
              ) -> tuple[RunActivations, list[dict], list[int]]:
    """The run's activations, its records in the activations' order, and the layers chosen
    (each one captured)."""
    acts = read_activations(root)
    records = load_results(root)
    by_id = {r["id"]: r for r in records}
    missing = [int(i) for i in acts.record_id if int(i) not in by_id]
    if missing or len(acts.record_id) != len(records):
        raise SteerlabError("activations.h5 and results.json describe different results "
                            f"({len(acts.record_id)} vs {len(records)} rows)", source=str(root))
    chosen = list(acts.layers) if layers is None else list(layers)
    for layer in chosen:
        if layer not in acts.layers:
            raise SteerlabError(f"layer {layer} was not captured; the run has "
                                f"{list(acts.layers)}", source=str(root), field="layers")
    return acts, [by_id[int(i)] for i in acts.record_id], chosen


def _section_array(acts: RunActivations, section: Section) -> np.ndarray:
    return np.asarray({Section.REPLY: acts.reply, Section.THINKING: acts.thinking,
                       Section.OUTPUT: acts.output}[section], dtype=np.float64)


def _personae(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Persona names in first-seen order and their categories (one category each)."""
    names: list[str] = []
    cats: list[str] = []
    for r in rows:
        if r["persona"] not in names:
            names.append(r["persona"])
            cats.append(r.get("category", "assistant"))
    return names, cats


def _group_means(x: np.ndarray, persona_of: np.ndarray, usable: np.ndarray, n: int,
                 names: list[str], section: Section) -> np.ndarray:
    """``[persona, layer, d]`` means over each persona's usable replies (float64)."""
    out = np.zeros((n, *x.shape[1:]))
    for p in range(n):
        mine = (persona_of == p) & usable
        if not mine.any():
            raise SteerlabError(f"persona {names[p]!r} has no reply with {section.value} "
                                "tokens; choose another section", field="section")
        out[p] = x[mine].mean(0)
    return out


def _prompt_bootstrap(per_reply: np.ndarray, persona_of: np.ndarray, prompt_of: np.ndarray,
                      usable: np.ndarray, n: int, n_boot: int,
                      rng: np.random.Generator) -> np.ndarray:
    """``[persona, layer, 2]``: 2.5th and 97.5th percentiles of each persona's mean
    projection when the prompts are resampled with replacement (one draw of prompts shared by
    every persona, so the personae stay paired)."""
    prompts = np.unique(prompt_of)
    n_layers = per_reply.shape[1]
    # per persona x prompt: the sum and count of usable replies' projections
    sums = np.zeros((n, len(prompts), n_layers))
    counts = np.zeros((n, len(prompts)))
    col = np.searchsorted(prompts, prompt_of)
    for row in np.flatnonzero(usable):
        sums[persona_of[row], col[row]] += per_reply[row]
        counts[persona_of[row], col[row]] += 1
    draws = rng.integers(0, len(prompts), size=(n_boot, len(prompts)))
    weight = np.zeros((n_boot, len(prompts)))
    np.add.at(weight, (np.arange(n_boot)[:, None], draws), 1.0)
    total = np.einsum("bq,pql->bpl", weight, sums)
    count = np.einsum("bq,pq->bp", weight, counts)[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = total / count  # NaN in a draw that missed every prompt a persona answered
    return np.moveaxis(np.nanpercentile(boot, [2.5, 97.5], axis=0), 0, -1)


def _pca(means: np.ndarray, unit: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per layer, the SVD of the centred persona means: components ``[layer, k, d]`` (PC1
    oriented to a non-negative cosine with the axis), explained-variance ratios ``[layer,
    k]``, scores ``[persona, layer, k]`` and PC1's cosine with the unit axis ``[layer]``."""
    n_p, n_l, d = means.shape
    k = max(1, min(n_p - 1, d, 10))
    comps, ratios = np.zeros((n_l, k, d)), np.zeros((n_l, k))
    scores, cosine = np.zeros((n_p, n_l, k)), np.zeros(n_l)
    for i in range(n_l):
        centred = means[:, i] - means[:, i].mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        vt = vt[:k]
        if vt[0] @ unit[i] < 0:
            vt[0] = -vt[0]
        var = s**2
        ratios[i, : len(vt)] = var[: len(vt)] / max(var.sum(), 1e-300)
        comps[i, : len(vt)] = vt
        scores[:, i, : len(vt)] = centred @ vt.T
        cosine[i] = float(vt[0] @ unit[i])
    return comps, ratios, scores, cosine


def _persona_metric(rows: list[dict], persona_of: np.ndarray, n: int, name: str) -> np.ndarray:
    """``[persona]`` the mean of a results.json metric over each persona's replies (NaN where
    none has it)."""
    values = np.array([np.nan if r.get(name) is None else float(r[name]) for r in rows])
    out = np.full(n, np.nan)
    for p in range(n):
        mine = values[(persona_of == p) & np.isfinite(values)]
        if len(mine):
            out[p] = mine.mean()
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else math.nan


def _correlation(x: np.ndarray, y: np.ndarray, n_boot: int,
                 rng: np.random.Generator) -> Correlation:
    """Pearson's r of the personae with both values, and a bootstrap interval over them."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return Correlation(math.nan, math.nan, math.nan, int(len(x)))
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boot = np.array([_pearson(x[i], y[i]) for i in idx])
    boot = boot[np.isfinite(boot)]
    lo, hi = (np.percentile(boot, [2.5, 97.5]) if len(boot) else (math.nan, math.nan))
    return Correlation(_pearson(x, y), float(lo), float(hi), int(len(x)))
