"""One set of defaults: each stage's default is defined once, in the library, and the CLI,
the demo and the front ends read it from there (a change in one place changes them all)."""

from __future__ import annotations

import inspect

import torch
import typer.main

from steerlab.chat.session import ChatSession
from steerlab.chat.widget import SteeringChat
from steerlab.cli import app
from steerlab.cli._commands import load_steering
from steerlab.demo import DemoConfig
from steerlab.evaluation.evaluate import EvalConfig
from steerlab.serving.requests import parse_steering
from steerlab.serving.shelf import VectorShelf
from steerlab.steering.intervention import DEFAULT_UNITS, Steering, Units, steer
from steerlab.steering.vector import SteeringVector
from steerlab.traits import collection as collect_stage
from steerlab.traits import judging as judge_stage
from steerlab.traits import responders
from steerlab.traits.trait import DEFAULT_TRAIT


def option(*path: str) -> dict[str, object]:
    """The defaults of a CLI command's options, by parameter name."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p.default for p in command.params}


def defaults(fn) -> dict[str, object]:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def test_collect_and_filter_defaults_are_the_librarys():
    cli = option("traits", "collect")
    assert cli["samples"] == collect_stage.SAMPLES == defaults(collect_stage.collect)["samples"]
    assert cli["temperature"] == collect_stage.TEMPERATURE
    assert cli["max_tokens"] == responders.ANSWER_TOKENS
    assert responders.LocalResponder.max_tokens == responders.ANSWER_TOKENS
    assert responders.EndpointResponder.max_tokens == responders.ANSWER_TOKENS
    cli = option("traits", "filter")
    for fn in (judge_stage.select_pairs, judge_stage.filter_pairs):
        assert defaults(fn)["threshold"] == cli["threshold"] == judge_stage.THRESHOLD
        assert defaults(fn)["min_distinct"] == cli["min_distinct"] == judge_stage.MIN_DISTINCT


def test_the_demo_runs_the_stage_defaults():
    demo = DemoConfig()
    assert demo.samples == collect_stage.SAMPLES
    assert demo.max_tokens == responders.ANSWER_TOKENS
    assert (demo.threshold, demo.min_distinct) == (judge_stage.THRESHOLD,
                                                   judge_stage.MIN_DISTINCT)


def test_one_strength_unit_everywhere(tiny_model, tmp_path):
    """Every front end reads strengths in DEFAULT_UNITS (norm) unless told otherwise."""
    assert DEFAULT_UNITS is Units.NORM
    unit = DEFAULT_UNITS.value
    assert defaults(Steering.create)["units"] is DEFAULT_UNITS
    assert defaults(steer)["units"] is DEFAULT_UNITS
    assert defaults(ChatSession.set_steering)["units"] == unit
    assert defaults(load_steering)["units"] == unit
    assert defaults(SteeringChat.__init__)["units"] == unit
    assert EvalConfig().units is DEFAULT_UNITS
    assert option("chat")["units"] == unit == option("vectors", "eval")["units"]
    SteeringVector(torch.ones(2, tiny_model.cfg.d_model), (0, 1)).save(tmp_path / "v")
    (asked,) = parse_steering(tiny_model, {"vector": "v", "alpha": 0.1},
                              VectorShelf(tmp_path))
    assert asked.units is DEFAULT_UNITS
    assert defaults(ChatSession.add_intervention)["units"] == unit


def test_the_demo_trait_is_the_default_trait():
    assert DemoConfig().trait == DEFAULT_TRAIT == option("demo")["trait"]
    assert option("vectors", "eval")["trait"] == DEFAULT_TRAIT
