"""Automatic strength calibration: per layer group, raise alpha until coherence breaks, refine.

The search knows nothing about models: it asks a ``rate`` callable for the coherence and the
coherent trait score of a list of ``(layers, alpha)`` candidates (one round, rated as one
batch) and decides the next round. Per group it

1. *expands*: ``start``, ``start * growth``, ``start * growth**2``, ... until a strength's
   coherence falls below ``floor`` (or ``max_alpha`` is passed: the group never breaks);
2. *refines*: ``refine`` bisections (geometric midpoints) between the strongest coherent and the
   weakest incoherent strength; when even ``start`` is incoherent it steps down instead.

A budget caps the number of generations (``cost`` per candidate); it counts every candidate
including those a resumed run finds already rated, so a resumed search makes the same choices
as an uninterrupted one. The best setting is then chosen from all rated points by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from steerlab.base.errors import SteerlabError

__all__ = ["Candidate", "Rated", "Search", "search_strengths"]

Candidate = tuple[tuple[int, ...], float]  # (layers, alpha)


@runtime_checkable
class Rated(Protocol):
    """What the search reads of a rated candidate (e.g.
    :class:`steerlab.evaluation.rating.Setting`)."""

    coherence: float
    coherent_trait: float


@dataclass(frozen=True)
class Search:
    """How :func:`search_strengths` explores strengths (defaults are in norm units: fractions
    of the residual norm; 0.05 is a gentle push, 1.6 replaces the residual several times over).

    Args:
        start: the first strength tried per group.
        growth: factor between expansion steps (> 1).
        max_alpha: the strongest strength tried.
        refine: bisection steps once coherence has broken.
        budget: most generations in all (0: no limit); a candidate costs one per question.
    """

    start: float = 0.05
    growth: float = 2.0
    max_alpha: float = 1.6
    refine: int = 2
    budget: int = 0

    def __post_init__(self) -> None:
        checks = [("start", self.start > 0, "a positive number"),
                  ("growth", self.growth > 1, "a number above 1"),
                  ("max_alpha", self.max_alpha >= self.start, f"at least start={self.start}"),
                  ("refine", isinstance(self.refine, int) and self.refine >= 0,
                   "an integer >= 0"),
                  ("budget", isinstance(self.budget, int) and self.budget >= 0,
                   "an integer >= 0 (0: no limit)")]
        for name, ok, want in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise SteerlabError(f"got {value!r}; expected {want}", field=f"search.{name}")

    def most_points(self, groups: int) -> int:
        """An upper bound on the candidates rated for ``groups`` layer groups."""
        steps = int(math.floor(math.log(self.max_alpha / self.start, self.growth) + 1e-9)) + 1
        return groups * (steps + self.refine)


@dataclass
class _State:
    lo: float = 0.0  # strongest coherent strength (0: unsteered, coherent by definition)
    hi: float | None = None  # weakest incoherent strength
    refined: int = 0
    done: bool = False

    def next(self, s: Search) -> float | None:
        if self.hi is None:
            alpha = s.start if self.lo == 0 else self.lo * s.growth
            return alpha if alpha <= s.max_alpha * (1 + 1e-9) else None
        if self.refined >= s.refine:
            return None
        return self.hi / s.growth if self.lo == 0 else math.sqrt(self.lo * self.hi)

    def see(self, alpha: float, coherent: bool) -> None:
        if self.hi is not None:
            self.refined += 1
        if coherent:
            self.lo = max(self.lo, alpha)
        else:
            self.hi = alpha if self.hi is None else min(self.hi, alpha)


def search_strengths(
    rate: Callable[[list[Candidate]], Sequence[Rated]],
    groups: Sequence[Sequence[int]],
    floor: float,
    search: Search = Search(),
    *,
    cost: int = 1,
    on_round: Callable[[int], None] | None = None,
) -> list[tuple[Candidate, Rated]]:
    """Search strengths for every layer group; returns every rated ``(candidate, rating)``.

    Args:
        rate: rates one round of candidates, in order (one batch of generations).
        groups: layer groups; each group is steered together at one strength.
        floor: coherence below which a strength counts as broken.
        search: the schedule and budget.
        cost: generations per candidate (the number of questions), for the budget.
        on_round: called with the number of candidates after each round (a progress bar).

    Examples:
        >>> points = search_strengths(rate, [(12,), (16,)], floor=0.8)
        >>> max(points, key=lambda p: p[1].coherent_trait)
    """
    keys = [tuple(int(x) for x in g) for g in groups]
    if not keys or any(not k for k in keys) or len(set(keys)) != len(keys):
        raise SteerlabError(f"expected distinct, non-empty layer groups; got {keys}",
                            field="layers")
    states = {k: _State() for k in keys}
    spent = 0
    out: list[tuple[Candidate, Rated]] = []
    while True:
        todo: list[Candidate] = []
        for k in keys:
            alpha = None if states[k].done else states[k].next(search)
            if alpha is None:
                states[k].done = True
                continue
            if search.budget and spent + cost * (len(todo) + 1) > search.budget:
                break
            todo.append((k, float(alpha)))
        if not todo:
            return out
        rated = list(rate(todo))
        if len(rated) != len(todo):
            raise SteerlabError(f"rate returned {len(rated)} ratings for {len(todo)} candidates")
        spent += cost * len(todo)
        for cand, r in zip(todo, rated, strict=True):
            states[cand[0]].see(cand[1], r.coherence >= floor)
            out.append((cand, r))
        if on_round is not None:
            on_round(len(todo))
