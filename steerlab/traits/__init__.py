"""Trait datasets: definitions, prompts, answers from two models, judges, pairs."""

from typing import Any

from steerlab.base import moved as _moved
from steerlab.traits.client import Endpoint, EndpointClient
from steerlab.traits.collection import collect
from steerlab.traits.elicit import elicit_trait
from steerlab.traits.judging import filter_pairs, judge, rubric_judge, scorer_judge, select_pairs
from steerlab.traits.pairs import Pair, load_pairs, merge_pairs, save_pairs
from steerlab.traits.responders import EndpointResponder, LocalResponder
from steerlab.traits.scorers import scorer_from_spec
from steerlab.traits.trait import Trait, load_trait

__all__ = [
    "Endpoint", "EndpointClient", "EndpointResponder", "LocalResponder", "Pair", "Trait",
    "collect", "elicit_trait", "filter_pairs", "judge", "load_pairs", "load_trait",
    "merge_pairs", "rubric_judge", "save_pairs", "scorer_from_spec", "scorer_judge",
    "select_pairs",
]


def __getattr__(name: str) -> Any:
    # steerlab 0.1's steerlab.traits was one module, now steerlab.traits.trait
    return _moved.moved_attribute("traits", name, ("traits.trait",), globals())
