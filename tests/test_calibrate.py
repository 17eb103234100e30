"""The strength search against synthetic models with a planted direction (known best alpha).

A synthetic "model" steered along vector v at strength alpha moves its residual by
alpha * cos(v, d) along a planted trait direction d and by alpha in total: the trait score
grows with the planted component, coherence holds until the total push passes a break-down
size. The best coherent alpha is therefore known in closed form, whatever the layer's gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from steerlab.base.errors import SteerlabError
from steerlab.evaluation.calibrate import Search, search_strengths


@dataclass(frozen=True)
class Rating:
    coherence: float
    coherent_trait: float


def planted_model(breaks: dict[tuple[int, ...], float], seed: int = 0):
    """rate() of a model whose group g stays coherent up to alpha = breaks[g] (then falls to
    coherence 0.2), with trait proportional to alpha * cos(v, d) while coherent."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(64, generator=g)
    v = d + 0.5 * torch.randn(64, generator=g)
    cos = float(torch.nn.functional.cosine_similarity(v, d, dim=0))
    calls = []

    def rate(cands):
        calls.append(list(cands))
        out = []
        for group, alpha in cands:
            coherent = alpha <= breaks[group]
            trait = 100 * min(1.0, alpha * cos) if coherent else 0.0
            out.append(Rating(1.0 if coherent else 0.2, trait))
        return out

    return rate, calls


def best(points):
    ok = [(c, r) for c, r in points if r.coherence >= 0.8]
    return max(ok, key=lambda p: p[1].coherent_trait)[0]


@pytest.mark.parametrize("true", [0.07, 0.3, 0.55, 1.2])
def test_search_brackets_the_planted_break_point(true):
    """After expansion the break lies in (lo, lo * growth]; each bisection halves the bracket
    in log space, so the chosen alpha is within growth ** (1 / 2 ** refine) of the truth."""
    s = Search(start=0.05, growth=2.0, max_alpha=1.6, refine=3)
    rate, _ = planted_model({(12,): true})
    (group, alpha) = best(search_strengths(rate, [(12,)], 0.8, s))
    assert group == (12,)
    assert alpha <= true < alpha * s.growth ** (1 / 2 ** s.refine) * (1 + 1e-9)


def test_groups_are_searched_independently_in_shared_rounds():
    breaks = {(8,): 0.1, (12,): 0.4, (10, 12, 14): 0.25}
    rate, calls = planted_model(breaks)
    points = search_strengths(rate, list(breaks), 0.8, Search(refine=2))
    for g, true in breaks.items():
        mine = [a for (grp, a), r in points if grp == g and r.coherence >= 0.8]
        assert max(mine) <= true < max(mine) * 2 ** 0.25 * (1 + 1e-9)
    # one call per round, each group at most once per round
    assert all(len({grp for grp, _ in c}) == len(c) for c in calls)
    assert len(calls) <= Search(refine=2).most_points(1)


def test_never_breaking_stops_at_max_alpha_and_breaking_at_start_steps_down():
    rate, _ = planted_model({(1,): 99.0, (2,): 0.01})
    points = search_strengths(rate, [(1,), (2,)], 0.8, Search(start=0.05, max_alpha=0.4,
                                                            refine=2))
    one = sorted(a for (g, a), _ in points if g == (1,))
    assert one == pytest.approx([0.05, 0.1, 0.2, 0.4])  # never incoherent: no refinement
    two = [a for (g, a), _ in points if g == (2,)]
    assert two == pytest.approx([0.05, 0.025, 0.0125])  # steps down from the start


def test_budget_caps_generations_and_a_resumed_search_repeats_itself():
    rate, calls = planted_model({(1,): 0.3, (2,): 0.6})
    full = search_strengths(rate, [(1,), (2,)], 0.8, Search(budget=0), cost=10)
    capped = search_strengths(rate, [(1,), (2,)], 0.8, Search(budget=50), cost=10)
    assert len(capped) == 5 and [c for c, _ in capped] == [c for c, _ in full[:5]]
    # a rate() that answers from a cache for the first rounds gives the same schedule
    seen = {c: r for c, r in full[:4]}
    fresh, _ = planted_model({(1,): 0.3, (2,): 0.6})
    again = search_strengths(lambda cs: [seen.get(c) or fresh([c])[0] for c in cs],
                             [(1,), (2,)], 0.8, Search(), cost=10)
    assert [c for c, _ in again] == [c for c, _ in full]


@pytest.mark.parametrize("field,kwargs", [("search.start", {"start": 0.0}),
                                          ("search.growth", {"growth": 1.0}),
                                          ("search.max_alpha", {"max_alpha": 0.01}),
                                          ("search.refine", {"refine": -1}),
                                          ("search.budget", {"budget": -5}),
                                          ("search.start", {"start": math.inf})])
def test_bad_search_settings_name_the_field(field, kwargs):
    with pytest.raises(SteerlabError, match=field.replace(".", r"\.")):
        Search(**kwargs)


def test_groups_must_be_distinct_and_non_empty():
    rate, _ = planted_model({(1,): 0.3})
    for groups in ([], [(1,), (1,)], [()]):
        with pytest.raises(SteerlabError, match="layer groups"):
            search_strengths(rate, groups, 0.8)
